//! ds4-chat: DeepSeek V4 chat prompt rendering and completion parsing.
//!
//! # Rendering
//! [`render`] turns a [`ChatRequest`] into the prompt text, byte-identical to DeepSeek's
//! official `encoding_dsv4.encode_messages(messages, thinking_mode, reasoning_effort=…)`
//! (BOS, system/developer/user/assistant/tool/latest_reminder roles, tools block inside
//! the system or developer message, `response_format`, `reasoning_effort="max"` prefix,
//! drop-thinking of older turns, tool results merged into one user turn and sorted by
//! call order, quick-instruction `task` tokens). Where the official encoder would
//! crash, [`render`] returns an [`Error`] (unknown role, developer without content,
//! invalid task, tool without `function`, tool arguments that are JSON but not an object)
//! or, for content shapes it cannot take, renders the natural text.
//!
//! Input is the official test-input JSON / OpenAI message format:
//! `{"thinking_mode": "chat"|"thinking", "reasoning_effort": null|"high"|"max",
//!   "messages": [...], "tools": [...]?, "response_format": {...}?}`. Tools normally sit
//! inside a system/developer message (`"tools": [...]`), as in the official inputs;
//! top-level `tools` / `response_format` are a convenience (see [`ChatRequest::tools`]).
//!
//! # Exact replay
//! [`Message::raw_dsml`] on an assistant message replaces the canonical tool-call block
//! by the given bytes (normally [`ParsedCompletion::raw_dsml`] of the sampled text).
//! [`attach_replay`] fills it from a call-id lookup: when every call id of the message is
//! known and all map to the same block.
//!
//! # Parsing
//! [`parse_completion`] splits generated text into reasoning, content and DSML tool
//! calls; [`CompletionStream`] does the same incrementally with identical results for
//! any split of the text. Malformed DSML becomes plain content, never an error. The
//! rules are documented in the `parse` module ([`parse_completion`]).
//!
//! [`render_tool_calls`] renders an assistant tool-call list as canonical DSML.
//!
//! ```
//! use ds4_chat::{ChatRequest, CompletionStream, StreamEvent, ThinkingMode, render};
//!
//! let req = ChatRequest::from_json(r#"{"thinking_mode": "thinking",
//!     "messages": [{"role": "system", "content": "Be brief."},
//!                  {"role": "user", "content": "Hi"}]}"#)?;
//! assert_eq!(
//!     render(&req)?,
//!     "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜><think>"
//! );
//!
//! let mut stream = CompletionStream::new(ThinkingMode::Thinking);
//! let mut events = stream.push("greet</thi");
//! events.extend(stream.push("nk>Hello!"));
//! events.extend(stream.finish());
//! assert_eq!(events, [
//!     StreamEvent::ReasoningDelta("greet".into()),
//!     StreamEvent::ContentDelta("Hello!".into()),
//! ]);
//! # Ok::<(), ds4_chat::Error>(())
//! ```

mod dsml;
mod parse;
mod pyjson;
mod render;
mod types;

pub use dsml::{ParsedToolCall, render_tool_calls};
pub use parse::{CompletionStream, ParsedCompletion, StreamEvent, parse_completion};
pub use pyjson::{python_float_repr, to_python_json};
pub use render::{render, render_messages};
pub use types::{
    ChatRequest, Content, ContentPart, FunctionCall, Message, ReasoningEffort, ThinkingMode,
    ToolCall,
};

/// Special-token strings used in rendered prompts.
pub mod tokens {
    pub const BOS: &str = "<｜begin▁of▁sentence｜>";
    pub const EOS: &str = "<｜end▁of▁sentence｜>";
    pub const USER: &str = "<｜User｜>";
    pub const ASSISTANT: &str = "<｜Assistant｜>";
    pub const LATEST_REMINDER: &str = "<｜latest_reminder｜>";
    pub const THINK_START: &str = "<think>";
    pub const THINK_END: &str = "</think>";
    pub const DSML: &str = "｜DSML｜";
}

/// Errors of this crate (input the official encoder rejects).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown message role `{0}`")]
    UnknownRole(String),
    #[error("developer message needs non-empty content")]
    DeveloperWithoutContent,
    #[error("invalid task `{0}` (valid: action, query, authority, domain, title, read_url)")]
    InvalidTask(String),
    #[error("tool definition without a `function` object")]
    ToolWithoutFunction,
    #[error("arguments of tool call `{0}` are JSON but not an object")]
    ToolArgumentsNotObject(String),
    #[error("invalid chat request JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl ChatRequest {
    /// Parses a request from JSON text (see the crate docs for the format).
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(text)?)
    }
}

/// Exact-replay hook: for every assistant message with tool calls and no `raw_dsml`,
/// looks up each call id with `lookup`; if all ids are found and map to the same bytes,
/// sets `raw_dsml` to them (the client's JSON arguments are then ignored for rendering).
pub fn attach_replay<F, S>(messages: &mut [Message], lookup: F)
where
    F: Fn(&str) -> Option<S>,
    S: AsRef<str>,
{
    for msg in messages.iter_mut() {
        if msg.role != "assistant" || msg.raw_dsml.is_some() {
            continue;
        }
        let Some(calls) = msg.tool_calls.as_ref().filter(|c| !c.is_empty()) else {
            continue;
        };
        let mut block: Option<String> = None;
        let mut all_same = true;
        for call in calls {
            let found = call.id.as_deref().and_then(&lookup);
            match (found, &block) {
                (Some(b), None) => block = Some(b.as_ref().to_string()),
                (Some(b), Some(prev)) if b.as_ref() == prev => {}
                _ => {
                    all_same = false;
                    break;
                }
            }
        }
        if all_same {
            msg.raw_dsml = block;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_request_drops_thinking_like_the_official_default() {
        let req = ChatRequest::default();
        assert!(req.drop_thinking);
        assert_eq!(req.thinking_mode, ThinkingMode::Thinking);
        let parsed = ChatRequest::from_json(r#"{"messages": []}"#).unwrap();
        assert!(parsed.drop_thinking);
        assert_eq!(render(&parsed).unwrap(), tokens::BOS);
    }

    #[test]
    fn invalid_input_is_an_error_not_a_panic() {
        let cases = [
            (
                r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
                "wizard",
            ),
            (
                r#"{"messages":[{"role":"developer","content":""}]}"#,
                "developer",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x","task":"nope"}]}"#,
                "nope",
            ),
            (
                r#"{"messages":[{"role":"system","content":"x","tools":[{"name":"f"}]}]}"#,
                "function",
            ),
            (
                r#"{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"[1]"}}]}]}"#,
                "`f`",
            ),
        ];
        for (json, needle) in cases {
            let err = render(&ChatRequest::from_json(json).unwrap()).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        assert!(ChatRequest::from_json(r#"{"messages":[{"role":"user","content":5}]}"#).is_err());
        assert!(ChatRequest::from_json(r#"{"thinking_mode":"deep","messages":[]}"#).is_err());
    }

    #[test]
    fn top_level_tools_go_on_a_leading_system_message() {
        let tools = r#"[{"type":"function","function":{"name":"f","parameters":{}}}]"#;
        let with_system = ChatRequest::from_json(&format!(
            r#"{{"tools":{tools},"messages":[{{"role":"system","content":"S"}},{{"role":"user","content":"u"}}]}}"#
        ))
        .unwrap();
        let inline = ChatRequest::from_json(&format!(
            r#"{{"messages":[{{"role":"system","content":"S","tools":{tools}}},{{"role":"user","content":"u"}}]}}"#
        ))
        .unwrap();
        assert_eq!(render(&with_system).unwrap(), render(&inline).unwrap());
        let without_system = ChatRequest::from_json(&format!(
            r#"{{"tools":{tools},"messages":[{{"role":"user","content":"u"}}]}}"#
        ))
        .unwrap();
        let text = render(&without_system).unwrap();
        assert!(text.starts_with(&format!("{}\n\n## Tools\n\n", tokens::BOS)));
        assert!(text.ends_with("<｜User｜>u<｜Assistant｜><think>"));
    }
}
