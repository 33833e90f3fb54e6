//! DSML tool-call blocks: canonical rendering (official `encode_arguments_to_dsml` +
//! templates) and parsing of one complete block.

use serde_json::{Map, Value};

use crate::pyjson::to_python_json;
use crate::types::ToolCall;
use crate::{Error, Result, tokens};

pub(crate) const BLOCK_START: &str = "<｜DSML｜tool_calls>";
pub(crate) const BLOCK_END: &str = "</｜DSML｜tool_calls>";
const INVOKE_START: &str = "<｜DSML｜invoke";
const INVOKE_END: &str = "</｜DSML｜invoke>";
const PARAM_START: &str = "<｜DSML｜parameter";
const PARAM_END: &str = "</｜DSML｜parameter>";

/// Canonical DSML for an assistant message's tool calls, exactly as the official encoder
/// renders them: `"\n\n<｜DSML｜tool_calls>\n" … "</｜DSML｜tool_calls>"`.
///
/// Arguments given as a JSON string holding an object become one parameter per member
/// (strings raw with `string="true"`, other values as Python-style JSON with
/// `string="false"`); a string that is not valid JSON becomes a single string parameter
/// `arguments`; a non-string JSON value becomes a single non-string parameter
/// `arguments`. A JSON string holding a non-object is an error.
pub fn render_tool_calls(calls: &[ToolCall]) -> Result<String> {
    let mut invokes = Vec::with_capacity(calls.len());
    for call in calls {
        let params = render_arguments(&call.function.arguments, &call.function.name)?;
        invokes.push(format!(
            "<{d}invoke name=\"{name}\">\n{params}\n</{d}invoke>",
            d = tokens::DSML,
            name = call.function.name,
        ));
    }
    Ok(format!(
        "\n\n<{d}tool_calls>\n{body}\n</{d}tool_calls>",
        d = tokens::DSML,
        body = invokes.join("\n")
    ))
}

fn render_arguments(arguments: &Value, tool: &str) -> Result<String> {
    let members: Vec<(String, Value)> = match arguments {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map.into_iter().collect(),
            Ok(_) => return Err(Error::ToolArgumentsNotObject(tool.to_string())),
            Err(_) => vec![("arguments".to_string(), arguments.clone())],
        },
        other => vec![("arguments".to_string(), other.clone())],
    };
    let params: Vec<String> = members
        .iter()
        .map(|(key, value)| {
            let (is_str, text) = match value {
                Value::String(s) => ("true", s.clone()),
                other => ("false", to_python_json(other)),
            };
            format!(
                "<{d}parameter name=\"{key}\" string=\"{is_str}\">{text}</{d}parameter>",
                d = tokens::DSML
            )
        })
        .collect();
    Ok(params.join("\n"))
}

/// One tool call parsed from model output.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedToolCall {
    pub name: String,
    /// Arguments as a JSON object in the order the model wrote them (a repeated
    /// parameter keeps its first position and its last value).
    pub arguments: Map<String, Value>,
    /// The exact `<｜DSML｜invoke …>…</｜DSML｜invoke>` bytes.
    pub raw_invoke: String,
}

impl ParsedToolCall {
    /// Compact JSON text of the arguments (OpenAI `function.arguments`).
    pub fn arguments_json(&self) -> String {
        Value::Object(self.arguments.clone()).to_string()
    }

    /// This call as an OpenAI tool call with the given id (arguments as a JSON string).
    pub fn to_tool_call(&self, id: Option<String>) -> ToolCall {
        ToolCall {
            id,
            kind: Some("function".into()),
            function: crate::types::FunctionCall {
                name: self.name.clone(),
                arguments: Value::String(self.arguments_json()),
                id: None,
            },
        }
    }
}

/// Value of `attr="…"` in a tag's attribute text (the attribute must follow whitespace).
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut search = tag;
    loop {
        let pos = search.find(name)?;
        let before_ok = search[..pos].ends_with(char::is_whitespace);
        let after = &search[pos + name.len()..];
        if let Some(v) = after.strip_prefix("=\"").filter(|_| before_ok) {
            let end = v.find('"')?;
            return Some(&v[..end]);
        }
        search = after;
    }
}

/// Parses one complete block, from `<｜DSML｜tool_calls>` through `</｜DSML｜tool_calls>`
/// (nothing may follow). `None` when the block is malformed.
///
/// Accepted: any whitespace between tags; `string` missing (treated as `"true"`);
/// `string="true"` values kept byte-for-byte (the official format has no escaping);
/// `string="false"` values parsed as JSON (empty → `null`, invalid JSON → kept as a
/// string); a parameter without `string` whose value starts with further parameters
/// (loose nested form) becomes a JSON object of those leaf parameters.
pub(crate) fn parse_block(block: &str) -> Option<Vec<ParsedToolCall>> {
    let mut rest = block.strip_prefix(BLOCK_START)?;
    let mut calls = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix(BLOCK_END) {
            return after.is_empty().then_some(calls);
        }
        let invoke_begin = block.len() - rest.len();
        let after_start = rest.strip_prefix(INVOKE_START)?;
        if !after_start.starts_with(char::is_whitespace) {
            return None;
        }
        let gt = after_start.find('>')?;
        let name = attribute(&after_start[..gt], "name")?.to_string();
        rest = &after_start[gt + 1..];
        let mut arguments = Map::new();
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix(INVOKE_END) {
                rest = after;
                break;
            }
            let after_start = rest.strip_prefix(PARAM_START)?;
            if !after_start.starts_with(char::is_whitespace) {
                return None;
            }
            let gt = after_start.find('>')?;
            let tag = &after_start[..gt];
            let key = attribute(tag, "name")?.to_string();
            let string_attr = attribute(tag, "string");
            let body = &after_start[gt + 1..];
            if string_attr.is_none() && body.trim_start().starts_with(PARAM_START) {
                // Loose nested form: leaf parameters directly inside a parameter without
                // `string` form a JSON object; its own closing tag is optional.
                let mut object = Map::new();
                rest = body.trim_start();
                while let Some(after_leaf) = rest.strip_prefix(PARAM_START) {
                    let (leaf_key, leaf_value, after) = parse_param(after_leaf)?;
                    object.insert(leaf_key, leaf_value);
                    rest = after.trim_start();
                }
                rest = rest.strip_prefix(PARAM_END).unwrap_or(rest);
                arguments.insert(key, Value::Object(object));
                continue;
            }
            let (key, value, after) = parse_param(after_start)?;
            rest = after;
            arguments.insert(key, value);
        }
        let invoke_end = block.len() - rest.len();
        calls.push(ParsedToolCall {
            name,
            arguments,
            raw_invoke: block.get(invoke_begin..invoke_end)?.to_string(),
        });
    }
}

/// One `<｜DSML｜parameter` (text after the tag name): key, value and the rest.
fn parse_param(after_start: &str) -> Option<(String, Value, &str)> {
    if !after_start.starts_with(char::is_whitespace) {
        return None;
    }
    let gt = after_start.find('>')?;
    let tag = &after_start[..gt];
    let key = attribute(tag, "name")?.to_string();
    let is_string = attribute(tag, "string") != Some("false");
    let body = &after_start[gt + 1..];
    let end = body.find(PARAM_END)?;
    let raw = &body[..end];
    let value = if is_string {
        Value::String(raw.to_string())
    } else if raw.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_string()))
    };
    Some((key, value, &body[end + PARAM_END.len()..]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn attribute_needs_whitespace_before() {
        assert_eq!(attribute(" xname=\"a\" name=\"b\"", "name"), Some("b"));
        assert_eq!(attribute(" name=\"a\"", "string"), None);
    }

    #[test]
    fn block_with_trailing_text_is_malformed() {
        assert!(parse_block("<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>x").is_none());
        assert_eq!(
            parse_block("<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>"),
            Some(vec![])
        );
    }
}
