//! Content and tool-definition normalisation shared by the dialects.

use serde_json::{Map, Value, json};

use crate::errors::{ApiError, ApiResult};
use crate::types::Fields;

/// Text of a message `content`: a string, `null`, or an array of parts (strings or
/// objects with a `text` member). Text parts are joined with `"\n\n"`; parts without
/// text (images, documents) are skipped.
pub fn content_text(f: &Fields<'_>, key: &str) -> ApiResult<String> {
    match f.get(key) {
        None => Ok(String::new()),
        Some(v) => value_text(f, key, v),
    }
}

pub fn value_text(f: &Fields<'_>, key: &str, v: &Value) -> ApiResult<String> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts: Vec<&str> = Vec::new();
            for part in parts {
                match part {
                    Value::String(s) => texts.push(s),
                    Value::Object(o) => match o.get("text") {
                        Some(Value::String(s)) => texts.push(s),
                        Some(Value::Null) | None => {}
                        Some(other) => {
                            return Err(f.type_error(&format!("{key}[].text"), "string", other));
                        }
                    },
                    other => {
                        return Err(f.type_error(&format!("{key}[]"), "string or object", other));
                    }
                }
            }
            Ok(texts.join("\n\n"))
        }
        other => Err(f.type_error(key, "string, array or null", other)),
    }
}

/// Converts tool definitions of any supported dialect into the OpenAI form the
/// renderer takes: `{"type":"function","function":{"name","description","parameters"}}`.
/// Accepts OpenAI chat tools, Anthropic tools (`input_schema`) and Responses function
/// tools (flat `name`/`parameters`).
pub fn normalize_tools(f: &Fields<'_>, tools: &[Value]) -> ApiResult<Vec<Value>> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let Value::Object(t) = tool else {
            return Err(ApiError::bad_request(
                f.api,
                format!("invalid tool at index {i}: expected an object"),
            )
            .with_param("tools"));
        };
        if let Some(func) = t.get("function") {
            match func {
                Value::Object(fo)
                    if fo
                        .get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| !n.is_empty()) =>
                {
                    out.push(json!({"type": "function", "function": func}));
                    continue;
                }
                _ => {
                    return Err(ApiError::bad_request(
                        f.api,
                        format!("invalid tool at index {i}: function needs a name"),
                    )
                    .with_param("tools"));
                }
            }
        }
        let Some(name) = t
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            return Err(ApiError::bad_request(
                f.api,
                format!("invalid tool at index {i}: missing name"),
            )
            .with_param("tools"));
        };
        let mut func = Map::new();
        func.insert("name".into(), json!(name));
        if let Some(d) = t.get("description").filter(|d| d.is_string()) {
            func.insert("description".into(), d.clone());
        }
        let params = t
            .get("input_schema")
            .or_else(|| t.get("parameters"))
            .filter(|p| p.is_object())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        func.insert("parameters".into(), params);
        out.push(json!({"type": "function", "function": func}));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::errors::Api;

    #[test]
    fn content_forms() {
        let m = json!({"a": "x", "b": [{"type": "text", "text": "p"}, {"type": "image_url"}, "q"], "c": 5})
            .as_object()
            .cloned()
            .unwrap();
        let f = Fields::new(&m, Api::OpenAi);
        assert_eq!(content_text(&f, "a").unwrap(), "x");
        assert_eq!(content_text(&f, "b").unwrap(), "p\n\nq");
        assert_eq!(content_text(&f, "missing").unwrap(), "");
        assert!(content_text(&f, "c").is_err());
    }

    #[test]
    fn tools_of_every_dialect() {
        let m = Map::new();
        let f = Fields::new(&m, Api::Anthropic);
        let tools = vec![
            json!({"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}),
            json!({"name": "b", "description": "d", "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}}),
            json!({"type": "function", "name": "c", "parameters": {"type": "object"}}),
        ];
        let out = normalize_tools(&f, &tools).unwrap();
        assert_eq!(out[0]["function"]["name"], "a");
        assert_eq!(
            out[1]["function"]["parameters"]["properties"]["x"]["type"],
            "string"
        );
        assert_eq!(out[1]["function"]["description"], "d");
        assert_eq!(out[2]["function"]["name"], "c");
        assert!(normalize_tools(&f, &[json!({"type": "function"})]).is_err());
        assert!(normalize_tools(&f, &[json!(3)]).is_err());
    }
}
