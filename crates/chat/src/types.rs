//! Request / message model, deserialisable from the official encoder's test inputs
//! (OpenAI chat message format plus DeepSeek extensions).

use serde::Deserialize;
use serde_json::Value;

/// Whether the assistant turn opens with `<think>` (reasoning) or `</think>` (direct answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThinkingMode {
    /// Official `thinking_mode="chat"`: generation opener `<｜Assistant｜></think>`.
    Chat,
    /// Official `thinking_mode="thinking"`: generation opener `<｜Assistant｜><think>`.
    #[default]
    Thinking,
}

/// Official `reasoning_effort`; only `Max` changes the rendered bytes (a fixed prefix
/// after BOS, thinking mode only). `High` renders exactly like `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    High,
    Max,
}

/// One conversation to render. `Default` is an empty thinking-mode conversation with
/// `drop_thinking = true` (the official default).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub thinking_mode: ThinkingMode,
    #[serde(default)]
    pub reasoning_effort: Option<ReasoningEffort>,
    pub messages: Vec<Message>,
    /// Convenience for API front ends: OpenAI `tools` given beside the messages.
    /// They are attached to the first message when it is a system message, otherwise a
    /// content-less system message carrying them is inserted at the front (the official
    /// encoder only knows tools inside a system/developer message).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Same convenience for `response_format` (attached like `tools`).
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Official `drop_thinking` (default true): reasoning of assistant turns before the
    /// last user turn is dropped unless some message carries tools.
    #[serde(default = "default_true")]
    pub drop_thinking: bool,
}

fn default_true() -> bool {
    true
}

impl Default for ChatRequest {
    fn default() -> Self {
        ChatRequest {
            thinking_mode: ThinkingMode::default(),
            reasoning_effort: None,
            messages: Vec::new(),
            tools: None,
            response_format: None,
            drop_thinking: true,
        }
    }
}

/// One message, OpenAI format plus DeepSeek fields. Roles: `system`, `developer`,
/// `user`, `assistant`, `tool` (alias `function`), `latest_reminder`; any other role is
/// dropped when it precedes the last user turn in thinking mode with drop-thinking, and
/// is an error otherwise (as in the official encoder).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Message {
    pub role: String,
    /// Absent, `null`, a string, or an array of content parts (`{"type":"text","text":…}`).
    #[serde(default)]
    pub content: Content,
    /// Assistant hidden reasoning.
    #[serde(default)]
    pub reasoning_content: Option<String>,
    /// Assistant tool calls (OpenAI format).
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For `tool` messages: which call this result answers (used to order results).
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// OpenAI-format tool definitions (`{"type":"function","function":{…}}`), rendered
    /// only on system and developer messages.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Rendered only on system and developer messages.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// DeepSeek quick-instruction task (`action`, `query`, `authority`, `domain`,
    /// `title`, `read_url`).
    #[serde(default)]
    pub task: Option<String>,
    /// Assistant message rendered without its trailing EOS.
    #[serde(default)]
    pub wo_eos: bool,
    /// Exact-replay hook (not part of the official format): when set on an assistant
    /// message, these bytes are appended verbatim instead of the canonical DSML block
    /// rendered from `tool_calls`. Use the `raw_dsml` of a [`crate::ParsedCompletion`]
    /// (it includes the `"\n\n"` that precedes `<｜DSML｜tool_calls>`).
    #[serde(default)]
    pub raw_dsml: Option<String>,
}

impl Message {
    /// A message with a role and plain text content.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: Content::Text(content.to_string()),
            ..Default::default()
        }
    }
}

/// OpenAI tool call of an assistant message.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ToolCall {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCall,
}

/// Name and arguments of a tool call.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// Normally a JSON string holding an object (OpenAI). Any other JSON value is
    /// rendered the way the official encoder does: as one non-string parameter named
    /// `arguments`.
    #[serde(default)]
    pub arguments: Value,
    /// Some clients put the call id here; used for tool-result ordering like `id`.
    #[serde(default)]
    pub id: Option<String>,
}

/// Message content. The official encoder distinguishes an absent `content` from an
/// explicit `null` in two places (tool results and latest reminders render a null as
/// the text `None`, Python's `str(None)`), so both are kept apart here.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Content {
    #[default]
    Absent,
    Null,
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One element of an array content.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    /// Text as the official encoder renders `content or ""`; array parts are joined the
    /// way it renders a tool result given as a list: text parts joined by `"\n\n"`,
    /// other parts as `[Unsupported <type>]`.
    pub fn text_or_empty(&self) -> String {
        match self {
            Content::Absent | Content::Null => String::new(),
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p.kind.as_deref() {
                    Some("text") => p.text.clone().unwrap_or_default(),
                    Some(other) => format!("[Unsupported {other}]"),
                    None => "[Unsupported None]".to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }

    /// Like [`Content::text_or_empty`] but an explicit `null` renders as `None`
    /// (Python `str.format` of `None`).
    pub(crate) fn text_python(&self) -> String {
        match self {
            Content::Null => "None".to_string(),
            other => other.text_or_empty(),
        }
    }

    /// Python truthiness of the content value.
    pub(crate) fn is_truthy(&self) -> bool {
        match self {
            Content::Absent | Content::Null => false,
            Content::Text(s) => !s.is_empty(),
            Content::Parts(p) => !p.is_empty(),
        }
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match v {
            Value::Null => Ok(Content::Null),
            Value::String(s) => Ok(Content::Text(s)),
            Value::Array(items) => {
                let parts = items
                    .into_iter()
                    .map(|item| match item {
                        Value::String(s) => Ok(ContentPart {
                            kind: Some("text".into()),
                            text: Some(s),
                        }),
                        other => serde_json::from_value(other).map_err(serde::de::Error::custom),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Content::Parts(parts))
            }
            other => Err(serde::de::Error::custom(format!(
                "message content must be a string, null or an array, got {other}"
            ))),
        }
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_string())
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}
