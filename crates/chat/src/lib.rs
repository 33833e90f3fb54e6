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
