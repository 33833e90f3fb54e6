//! `POST /v1/messages` and `POST /v1/messages/count_tokens` (Anthropic Messages API;
//! Claude Code). Errors use the Anthropic error shape.
//!
//! Usage: `input_tokens` counts the prompt tokens that were prefilled, and
//! `cache_read_input_tokens` those served from the live session, so that
//! `input_tokens + cache_read_input_tokens` is the real prompt length.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use ds4_chat::{ChatRequest, Content, FunctionCall, Message, ToolCall};

use crate::AppState;
use crate::errors::{Api, ApiError, ApiResult};
use crate::generate::{self, GenResult, GenSpec};
use crate::openai_chat::chat_request;
use crate::sse::{self, SseDialect};
use crate::stream::{Completion, Finish, OutEvent};
use crate::types::content::{normalize_tools, value_text};
use crate::types::{self, Fields};

const API: Api = Api::Anthropic;

pub async fn handle(State(state): State<Arc<AppState>>, body: Body) -> Response {
    match run(&state, body).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

pub async fn count_tokens(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let result: ApiResult<Response> = async {
        let bytes = crate::read_body(&state, API, body).await?;
        let obj = types::parse_object(API, &bytes)?;
        let f = Fields::new(&obj, API);
        let parsed = parse_request(&state, &f)?;
        let mut chat = parsed.chat;
        ds4_chat::attach_replay(&mut chat.messages, |id| state.tool_memory.lookup(id));
        let text =
            ds4_chat::render(&chat).map_err(|e| ApiError::bad_request(API, e.to_string()))?;
        let n = state.codec.encode_rendered(&text).len();
        Ok(Json(json!({"input_tokens": n})).into_response())
    }
    .await;
    result.unwrap_or_else(|e| e.into_response())
}

struct Parsed {
    model: String,
    chat: ChatRequest,
    thinking: bool,
    tools_active: bool,
}

/// System prompt: a string or an array of text blocks; `x-anthropic-*` parts dropped.
fn system_text(f: &Fields<'_>) -> ApiResult<String> {
    let parts: Vec<String> = match f.get("system") {
        None => return Ok(String::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut parts = Vec::new();
            for item in items {
                match item {
                    Value::String(s) => parts.push(s.clone()),
                    Value::Object(o) => match o.get("text") {
                        Some(Value::String(s)) => parts.push(s.clone()),
                        _ => {
                            return Err(ApiError::bad_request(
                                API,
                                "system blocks need a string 'text'",
                            )
                            .with_param("system"));
                        }
                    },
                    other => return Err(f.type_error("system[]", "string or text block", other)),
                }
            }
            parts
        }
        Some(other) => return Err(f.type_error("system", "string or array", other)),
    };
    let mut out = String::new();
    for p in parts.into_iter().filter(|p| !p.starts_with("x-anthropic-")) {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&p);
    }
    Ok(out)
}

fn convert_messages(f: &Fields<'_>, messages: &[Value], out: &mut Vec<Message>) -> ApiResult<()> {
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(obj) = m else {
            return Err(
                ApiError::bad_request(API, format!("messages.{i}: must be an object"))
                    .with_param("messages"),
            );
        };
        let mf = Fields::new(obj, API);
        let role = mf.str("role")?.unwrap_or("user");
        if role != "user" && role != "assistant" {
            return Err(ApiError::bad_request(
                API,
                format!("messages.{i}.role: must be 'user' or 'assistant'"),
            ));
        }
        let blocks: Vec<Value> = match mf.get("content") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(a)) => a.clone(),
            Some(other) => {
                return Err(mf.type_error(
                    &format!("messages.{i}.content"),
                    "string or array",
                    other,
                ));
            }
        };
        if role == "assistant" {
            let mut msg = Message::new("assistant", "");
            let mut texts = Vec::new();
            let mut reasoning = String::new();
            let mut calls = Vec::new();
            for block in &blocks {
                let kind = block.get("type").and_then(Value::as_str).unwrap_or("text");
                match kind {
                    "text" => texts.push(
                        block
                            .get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ),
                    "thinking" => reasoning
                        .push_str(block.get("thinking").and_then(Value::as_str).unwrap_or("")),
                    "tool_use" | "server_tool_use" => {
                        let Some(name) = block.get("name").and_then(Value::as_str) else {
                            return Err(ApiError::bad_request(
                                API,
                                format!("messages.{i}: tool_use block needs a name"),
                            ));
                        };
                        let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                        calls.push(ToolCall {
                            id: block.get("id").and_then(Value::as_str).map(str::to_string),
                            kind: Some("function".into()),
                            function: FunctionCall {
                                name: name.to_string(),
                                arguments: Value::String(input.to_string()),
                                id: None,
                            },
                        });
                    }
                    _ => {} // redacted_thinking, images, …
                }
            }
            msg.content = Content::Text(texts.concat());
            if !reasoning.is_empty() {
                msg.reasoning_content = Some(reasoning);
            }
            if !calls.is_empty() {
                if texts.is_empty() {
                    msg.content = Content::Absent;
                }
                msg.tool_calls = Some(calls);
            }
            out.push(msg);
            continue;
        }
        // User turn: tool results become tool messages, text stays a user message.
        let mut texts: Vec<String> = Vec::new();
        let flush = |texts: &mut Vec<String>, out: &mut Vec<Message>| {
            if !texts.is_empty() {
                out.push(Message::new("user", &texts.join("\n\n")));
                texts.clear();
            }
        };
        let mut any = false;
        for block in &blocks {
            let kind = block.get("type").and_then(Value::as_str).unwrap_or("text");
            match kind {
                "text" => {
                    any = true;
                    texts.push(
                        block
                            .get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    );
                }
                "tool_result" => {
                    any = true;
                    flush(&mut texts, out);
                    let content = match block.get("content") {
                        None => String::new(),
                        Some(v) => value_text(f, "tool_result.content", v)?,
                    };
                    let mut msg = Message::new("tool", &content);
                    msg.tool_call_id = block
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    out.push(msg);
                }
                _ => {}
            }
        }
        if !any {
            texts.push(String::new());
        }
        flush(&mut texts, out);
    }
    Ok(())
}

fn parse_request(state: &AppState, f: &Fields<'_>) -> ApiResult<Parsed> {
    let model = f.str("model")?.unwrap_or(types::MODEL_ID).to_string();
    let alias = types::resolve_model(API, &model, state.config.accept_any_model)?;
    let messages = f
        .array("messages")?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(API, "messages: at least one message is required")
                .with_param("messages")
        })?;
    let explicit = types::thinking_control(f)?;
    let effort_text = match f.object("output_config")? {
        Some(o) => o.str("effort")?,
        None => None,
    };
    let effort_text = match effort_text {
        Some(e) => Some(e),
        None => f.str("reasoning_effort")?,
    };
    let effort = effort_text
        .map(|e| types::parse_effort(API, "effort", e))
        .transpose()?;
    let mode = types::resolve_thinking(alias, explicit, effort, state.worker.context_size());
    let tools = match f.array("tools")? {
        Some(t) if !t.is_empty() => normalize_tools(f, t)?,
        _ => Vec::new(),
    };
    let tool_choice_none = match f.object("tool_choice")? {
        Some(o) => o.str("type")? == Some("none"),
        None => false,
    };
    let tools_active = !tools.is_empty() && !tool_choice_none;
    let mut out = Vec::new();
    let system = system_text(f)?;
    if !system.is_empty() {
        out.push(Message::new("system", &system));
    }
    convert_messages(f, messages, &mut out)?;
    Ok(Parsed {
        model,
        chat: chat_request(mode, out, tools_active.then_some(tools)),
        thinking: mode.enabled,
        tools_active,
    })
}

async fn run(state: &Arc<AppState>, body: Body) -> ApiResult<Response> {
    let bytes = crate::read_body(state, API, body).await?;
    let obj = types::parse_object(API, &bytes)?;
    let f = Fields::new(&obj, API);
    let parsed = parse_request(state, &f)?;
    let prompt = generate::build_prompt(state, API, "messages", parsed.chat)?;
    let spec = GenSpec {
        prompt,
        sampling: types::sampling(&f, parsed.thinking, true, false)?,
        max_tokens: f.u32("max_tokens")?,
        stops: f.stop_list("stop_sequences")?,
        thinking: parsed.thinking,
        parse_tools: true,
        tools_active: parsed.tools_active,
        id_prefix: "toolu_",
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let mut generation = generate::start(state, API, spec)?;
    let id = format!("msg_{}", crate::stream::random_hex(12));
    if stream {
        let dialect = MessageStream {
            id,
            model: parsed.model,
            open: None,
            next_index: 0,
            streamed_tools: false,
            text_seen: false,
        };
        return Ok(sse::respond(state, API, generation, dialect).await);
    }
    let result = generate::collect(API, &mut generation).await?;
    let c = &result.completion;
    let mut content = Vec::new();
    if let Some(r) = c.reasoning.as_ref().filter(|r| !r.is_empty()) {
        content.push(json!({"type": "thinking", "thinking": r, "signature": id}));
    }
    if !c.content.is_empty() {
        content.push(json!({"type": "text", "text": c.content}));
    }
    for call in &c.calls {
        content.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(&call.arguments)}));
    }
    if content.iter().all(|b| b["type"] == "thinking") {
        content.push(json!({"type": "text", "text": ""}));
    }
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": parsed.model,
        "content": content,
        "stop_reason": stop_reason(c),
        "stop_sequence": c.stop_sequence,
        "usage": usage_json(&result),
    }))
    .into_response())
}

fn tool_input(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| json!({}))
}

fn stop_reason(c: &Completion) -> &'static str {
    if c.stop_sequence.is_some() && c.finish == Finish::Stop {
        "stop_sequence"
    } else {
        c.finish.anthropic()
    }
}

fn usage_json(r: &GenResult) -> Value {
    let u = r.usage;
    let cached = u.cached_tokens.min(u.prompt_tokens);
    json!({
        "input_tokens": u.prompt_tokens - cached,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    Tool,
}

/// SSE lifecycle of the Messages API.
struct MessageStream {
    id: String,
    model: String,
    open: Option<(Block, usize)>,
    next_index: usize,
    streamed_tools: bool,
    text_seen: bool,
}

impl MessageStream {
    fn open_block(&mut self, kind: Block, block: Value, out: &mut Vec<Event>) -> usize {
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((kind, index));
        out.push(sse::named(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((kind, index)) = self.open.take() {
            if kind == Block::Thinking {
                out.push(delta(
                    index,
                    json!({"type": "signature_delta", "signature": self.id}),
                ));
            }
            out.push(sse::named(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn ensure(&mut self, kind: Block, out: &mut Vec<Event>) -> usize {
        match self.open {
            Some((k, index)) if k == kind => index,
            _ => {
                let block = match kind {
                    Block::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
                    _ => json!({"type": "text", "text": ""}),
                };
                self.open_block(kind, block, out)
            }
        }
    }
}

fn delta(index: usize, d: Value) -> Event {
    sse::named(
        "content_block_delta",
        &json!({"type": "content_block_delta", "index": index, "delta": d}),
    )
}

impl SseDialect for MessageStream {
    fn started(&mut self, prompt_tokens: u32, cached: u32) -> Vec<Event> {
        let cached = cached.min(prompt_tokens);
        vec![sse::named(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens - cached, "output_tokens": 0,
                          "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}}}),
        )]
    }

    fn event(&mut self, event: OutEvent) -> Vec<Event> {
        let mut out = Vec::new();
        match event {
            OutEvent::Reasoning(s) => {
                let index = self.ensure(Block::Thinking, &mut out);
                out.push(delta(
                    index,
                    json!({"type": "thinking_delta", "thinking": s}),
                ));
            }
            OutEvent::ReasoningDone => {
                if matches!(self.open, Some((Block::Thinking, _))) {
                    self.close(&mut out);
                }
            }
            OutEvent::Text(s) => {
                self.text_seen = true;
                let index = self.ensure(Block::Text, &mut out);
                out.push(delta(index, json!({"type": "text_delta", "text": s})));
            }
            OutEvent::ToolStart { id, name, .. } => {
                self.streamed_tools = true;
                self.open_block(
                    Block::Tool,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    &mut out,
                );
            }
            OutEvent::ToolArgs { fragment, .. } => {
                if let Some((Block::Tool, index)) = self.open {
                    out.push(delta(
                        index,
                        json!({"type": "input_json_delta", "partial_json": fragment}),
                    ));
                }
            }
            OutEvent::ToolEnd { .. } => self.close(&mut out),
        }
        out
    }

    fn done(&mut self, result: &GenResult) -> Vec<Event> {
        let mut out = Vec::new();
        self.close(&mut out);
        let c = &result.completion;
        if !self.streamed_tools {
            for call in &c.calls {
                let index = self.open_block(
                    Block::Tool,
                    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}),
                    &mut out,
                );
                out.push(delta(
                    index,
                    json!({"type": "input_json_delta", "partial_json": call.arguments}),
                ));
                self.close(&mut out);
            }
        }
        if !self.text_seen && c.calls.is_empty() {
            self.open_block(Block::Text, json!({"type": "text", "text": ""}), &mut out);
            self.close(&mut out);
        }
        out.push(sse::named(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason(c), "stop_sequence": c.stop_sequence},
                    "usage": {"output_tokens": result.usage.completion_tokens}}),
        ));
        out.push(sse::named("message_stop", &json!({"type": "message_stop"})));
        out
    }

    fn failed(&mut self, message: &str) -> Vec<Event> {
        vec![sse::named(
            "error",
            &json!({"type": "error", "error": {"type": "api_error", "message": message}}),
        )]
    }
}
