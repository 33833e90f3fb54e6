//! `POST /v1/chat/completions` (OpenAI Chat Completions; opencode, Cursor, Continue).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use ds4_chat::{
    ChatRequest, Content, FunctionCall, Message, ReasoningEffort, ThinkingMode, ToolCall,
};

use crate::AppState;
use crate::errors::{Api, ApiError, ApiResult};
use crate::generate::{self, GenResult, GenSpec};
use crate::sse::{self, SseDialect};
use crate::stream::OutEvent;
use crate::types::content::{content_text, normalize_tools};
use crate::types::{self, Fields};

const API: Api = Api::OpenAi;

pub async fn handle(State(state): State<Arc<AppState>>, body: Body) -> Response {
    match run(&state, body).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

/// Thinking mode of a chat-type request (`thinking`, `think`, `reasoning_effort`).
pub fn chat_think_mode(
    f: &Fields<'_>,
    alias: types::ModelAlias,
    ctx: u32,
) -> ApiResult<types::ThinkMode> {
    let explicit = match types::thinking_control(f)? {
        Some(b) => Some(b),
        None => f.bool("think")?,
    };
    let effort = f
        .str("reasoning_effort")?
        .map(|e| types::parse_effort(f.api, "reasoning_effort", e))
        .transpose()?;
    Ok(types::resolve_thinking(alias, explicit, effort, ctx))
}

/// `ChatRequest` rendering options from a resolved thinking mode.
pub fn chat_request(
    mode: types::ThinkMode,
    messages: Vec<Message>,
    tools: Option<Vec<Value>>,
) -> ChatRequest {
    ChatRequest {
        thinking_mode: if mode.enabled {
            ThinkingMode::Thinking
        } else {
            ThinkingMode::Chat
        },
        reasoning_effort: mode.max.then_some(ReasoningEffort::Max),
        messages,
        tools,
        response_format: None,
        drop_thinking: true,
    }
}

/// OpenAI usage object.
pub fn usage_json(r: &GenResult) -> Value {
    let u = r.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens.min(u.prompt_tokens)},
        "completion_tokens_details": {"reasoning_tokens": r.reasoning_tokens}
    })
}

fn convert_messages(f: &Fields<'_>, messages: &[Value]) -> ApiResult<Vec<Message>> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(obj) = m else {
            return Err(
                ApiError::bad_request(API, format!("messages[{i}] must be an object"))
                    .with_param("messages"),
            );
        };
        let mf = Fields::new(obj, f.api);
        let role = match mf.str("role")?.unwrap_or("user") {
            "function" => "tool",
            r => r,
        };
        let mut msg = Message::new(role, &content_text(&mf, "content")?);
        msg.reasoning_content = mf
            .str("reasoning_content")?
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        msg.tool_call_id = mf.str("tool_call_id")?.map(str::to_string);
        if let Some(calls) = mf.array("tool_calls")? {
            let mut tool_calls = Vec::new();
            for (j, call) in calls.iter().enumerate() {
                let bad = || {
                    ApiError::bad_request(
                        API,
                        format!("messages[{i}].tool_calls[{j}] needs function.name"),
                    )
                    .with_param("messages")
                };
                let Some(call) = call.as_object() else {
                    return Err(bad());
                };
                let Some(func) = call.get("function").and_then(Value::as_object) else {
                    return Err(bad());
                };
                let Some(name) = func.get("name").and_then(Value::as_str) else {
                    return Err(bad());
                };
                let arguments = match func.get("arguments") {
                    Some(Value::String(s)) => Value::String(s.clone()),
                    None | Some(Value::Null) => Value::String("{}".into()),
                    Some(other) => Value::String(other.to_string()),
                };
                tool_calls.push(ToolCall {
                    id: call.get("id").and_then(Value::as_str).map(str::to_string),
                    kind: Some("function".into()),
                    function: FunctionCall {
                        name: name.to_string(),
                        arguments,
                        id: None,
                    },
                });
            }
            if !tool_calls.is_empty() {
                msg.tool_calls = Some(tool_calls);
            }
        }
        if role == "assistant"
            && msg.tool_calls.is_some()
            && msg.content == Content::Text(String::new())
        {
            msg.content = Content::Absent;
        }
        out.push(msg);
    }
    Ok(out)
}

async fn run(state: &Arc<AppState>, body: Body) -> ApiResult<Response> {
    let bytes = crate::read_body(state, API, body).await?;
    let obj = types::parse_object(API, &bytes)?;
    let f = Fields::new(&obj, API);
    let model = f.str("model")?.unwrap_or(types::MODEL_ID).to_string();
    let alias = types::resolve_model(API, &model, state.config.accept_any_model)?;
    let messages = f
        .array("messages")?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(API, "'messages' must be a non-empty array")
                .with_param("messages")
        })?;
    let mode = chat_think_mode(&f, alias, state.worker.context_size())?;
    let tools = match f.array("tools")? {
        Some(t) if !t.is_empty() => normalize_tools(&f, t)?,
        _ => Vec::new(),
    };
    let tools_active =
        !tools.is_empty() && f.get("tool_choice").and_then(Value::as_str) != Some("none");
    let mut chat = chat_request(
        mode,
        convert_messages(&f, messages)?,
        tools_active.then_some(tools),
    );
    chat.response_format = f
        .object("response_format")?
        .filter(|o| o.str("type").ok().flatten() != Some("text"))
        .map(|o| Value::Object(o.obj.clone()));
    let prompt = generate::build_prompt(state, API, "messages", chat)?;
    let spec = GenSpec {
        prompt,
        sampling: types::sampling(&f, mode.enabled, true, true)?,
        max_tokens: match f.u32("max_completion_tokens")? {
            Some(n) => Some(n),
            None => f.u32("max_tokens")?,
        },
        stops: f.stop_list("stop")?,
        thinking: mode.enabled,
        parse_tools: true,
        tools_active,
        id_prefix: "call_",
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        Some(o) => o.bool("include_usage")?.unwrap_or(false),
        None => false,
    };
    let mut generation = generate::start(state, API, spec)?;
    let id = format!("chatcmpl-{}", crate::stream::random_hex(12));
    let created = types::unix_now();
    if stream {
        let dialect = ChatStream {
            id,
            model,
            created,
            include_usage,
            streamed_tools: false,
        };
        return Ok(sse::respond(state, API, generation, dialect).await);
    }
    let result = generate::collect(API, &mut generation).await?;
    let c = &result.completion;
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert("content".into(), json!(c.content));
    if let Some(r) = c.reasoning.as_ref().filter(|r| !r.is_empty()) {
        message.insert("reasoning_content".into(), json!(r));
    }
    if !c.calls.is_empty() {
        let calls: Vec<Value> = c
            .calls
            .iter()
            .map(|t| json!({"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}))
            .collect();
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": c.finish.openai()}],
        "usage": usage_json(&result),
    }))
    .into_response())
}

/// SSE lifecycle of chat completions (spec server.md §5.8).
struct ChatStream {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    streamed_tools: bool,
}

impl ChatStream {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        sse::data(&json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        }))
    }
}

impl SseDialect for ChatStream {
    fn started(&mut self, _prompt_tokens: u32, _cached: u32) -> Vec<Event> {
        vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
    }

    fn event(&mut self, event: OutEvent) -> Vec<Event> {
        match event {
            OutEvent::Reasoning(s) => vec![self.chunk(json!({"reasoning_content": s}), None)],
            OutEvent::Text(s) => vec![self.chunk(json!({"content": s}), None)],
            OutEvent::ToolStart { index, id, name } => {
                self.streamed_tools = true;
                vec![self.chunk(
                    json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                    None,
                )]
            }
            OutEvent::ToolArgs { index, fragment } => {
                vec![self.chunk(
                    json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
                    None,
                )]
            }
            OutEvent::ReasoningDone | OutEvent::ToolEnd { .. } => Vec::new(),
        }
    }

    fn done(&mut self, result: &GenResult) -> Vec<Event> {
        let c = &result.completion;
        let mut out = Vec::new();
        if !c.calls.is_empty() && !self.streamed_tools {
            let calls: Vec<Value> = c
                .calls
                .iter()
                .enumerate()
                .map(|(i, t)| json!({"index": i, "id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}))
                .collect();
            out.push(self.chunk(json!({"tool_calls": calls}), None));
        }
        out.push(self.chunk(json!({}), Some(c.finish.openai())));
        if self.include_usage {
            out.push(sse::data(&json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_json(result),
            })));
        }
        out.push(Event::default().data("[DONE]"));
        out
    }

    fn failed(&mut self, message: &str) -> Vec<Event> {
        vec![sse::named(
            "error",
            &json!({"error": {"message": message, "type": "server_error"}}),
        )]
    }
}
