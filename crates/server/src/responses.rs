//! `POST /v1/responses` (OpenAI Responses API; Codex CLI). Stateless: the client replays
//! the full input each turn (`previous_response_id` is rejected); the engine's live
//! session makes that replay cheap. Reasoning is returned as a summary only when the
//! client asks for one (`reasoning.summary`).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use ds4_chat::{Content, FunctionCall, Message, ToolCall};

use crate::AppState;
use crate::errors::{Api, ApiError, ApiResult};
use crate::generate::{self, GenResult, GenSpec};
use crate::openai_chat::chat_request;
use crate::sse::{self, SseDialect};
use crate::stream::{Finish, OutEvent, random_hex};
use crate::types::content::{normalize_tools, value_text};
use crate::types::{self, Fields};

const API: Api = Api::OpenAi;

pub async fn handle(State(state): State<Arc<AppState>>, body: Body) -> Response {
    match run(&state, body).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(API, msg).with_param("input")
}

/// Tools: function tools as-is; `custom` (freeform) tools become a function with one
/// string parameter `input`; hosted tools without a schema are skipped.
fn convert_tools(
    f: &Fields<'_>,
    tools: &[Value],
    custom: &mut Vec<String>,
) -> ApiResult<Vec<Value>> {
    let mut picked = Vec::new();
    for t in tools {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
        let name = t.get("name").and_then(Value::as_str);
        match (kind, name) {
            ("function", _) => picked.push(t.clone()),
            ("custom", Some(name)) => {
                custom.push(name.to_string());
                picked.push(json!({"type": "function", "name": name,
                    "description": t.get("description").cloned().unwrap_or(json!("")),
                    "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}));
            }
            _ => {}
        }
    }
    normalize_tools(f, &picked)
}

fn item_text(f: &Fields<'_>, v: Option<&Value>) -> ApiResult<String> {
    match v {
        None => Ok(String::new()),
        Some(v) => value_text(f, "input[].content", v),
    }
}

fn arguments_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => "{}".into(),
        Some(other) => other.to_string(),
    }
}

fn push_call(out: &mut Vec<Message>, pending_reasoning: &mut Option<String>, call: ToolCall) {
    if let Some(last) = out.last_mut().filter(|m| m.role == "assistant") {
        last.tool_calls.get_or_insert_with(Vec::new).push(call);
        if last.reasoning_content.is_none() {
            last.reasoning_content = pending_reasoning.take();
        }
        return;
    }
    let mut msg = Message::new("assistant", "");
    msg.content = Content::Absent;
    msg.reasoning_content = pending_reasoning.take();
    msg.tool_calls = Some(vec![call]);
    out.push(msg);
}

fn convert_input(f: &Fields<'_>, items: &[Value], out: &mut Vec<Message>) -> ApiResult<()> {
    let mut reasoning: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let Value::Object(obj) = item else {
            return Err(bad(format!("input[{i}] must be an object")));
        };
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let role = match obj.get("role").and_then(Value::as_str).unwrap_or("user") {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant") => r,
                    other => return Err(bad(format!("input[{i}]: unknown role '{other}'"))),
                };
                let mut msg = Message::new(role, &item_text(f, obj.get("content"))?);
                if role == "assistant" {
                    msg.reasoning_content = reasoning.take();
                }
                out.push(msg);
            }
            "reasoning" => {
                let mut parts = Vec::new();
                for key in ["summary", "content"] {
                    let t = item_text(f, obj.get(key))?;
                    if !t.is_empty() {
                        parts.push(t);
                    }
                }
                if !parts.is_empty() {
                    let text = parts.join("\n");
                    reasoning = Some(match reasoning.take() {
                        Some(prev) => format!("{prev}\n{text}"),
                        None => text,
                    });
                }
            }
            "function_call" | "custom_tool_call" => {
                let name = obj
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("input[{i}]: missing name")))?;
                let arguments = if kind == "custom_tool_call" {
                    json!({"input": obj.get("input").and_then(Value::as_str).unwrap_or("")})
                        .to_string()
                } else {
                    arguments_text(obj.get("arguments"))
                };
                let id = obj
                    .get("call_id")
                    .or_else(|| obj.get("id"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let call = ToolCall {
                    id,
                    kind: Some("function".into()),
                    function: FunctionCall {
                        name: name.to_string(),
                        arguments: Value::String(arguments),
                        id: None,
                    },
                };
                push_call(out, &mut reasoning, call);
            }
            "function_call_output" | "custom_tool_call_output" => {
                let content = match obj.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ Value::Array(_)) => item_text(f, Some(v))?,
                    None | Some(Value::Null) => String::new(),
                    Some(other) => other.to_string(),
                };
                let mut msg = Message::new("tool", &content);
                msg.tool_call_id = obj
                    .get("call_id")
                    .or_else(|| obj.get("id"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                out.push(msg);
            }
            // Hosted-tool calls and their outputs (local_shell_call, web_search_call, …).
            other if other.ends_with("_call_output") || other.ends_with("_output") => {
                let content = ["output", "result"]
                    .iter()
                    .find_map(|k| obj.get(*k).filter(|v| !v.is_null()))
                    .map_or(String::new(), |v| {
                        v.as_str().map_or_else(|| v.to_string(), str::to_string)
                    });
                let mut msg = Message::new("tool", &content);
                msg.tool_call_id = obj
                    .get("call_id")
                    .or_else(|| obj.get("id"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                out.push(msg);
            }
            other if other.ends_with("_call") => {
                let name = other.strip_suffix("_call").unwrap_or(other);
                let arguments = ["action", "arguments", "input"]
                    .iter()
                    .find_map(|k| obj.get(*k).filter(|v| !v.is_null()))
                    .map_or_else(
                        || "{}".to_string(),
                        |v| v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    );
                let id = obj
                    .get("call_id")
                    .or_else(|| obj.get("id"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let call = ToolCall {
                    id,
                    kind: Some("function".into()),
                    function: FunctionCall {
                        name: name.to_string(),
                        arguments: Value::String(arguments),
                        id: None,
                    },
                };
                push_call(out, &mut reasoning, call);
            }
            // Bookkeeping items that carry nothing the model needs.
            "compaction" | "context_compaction" | "item_reference" => {}
            other => return Err(bad(format!("input[{i}]: unsupported item type '{other}'"))),
        }
    }
    if let Some(r) = reasoning {
        let mut msg = Message::new("assistant", "");
        msg.reasoning_content = Some(r);
        out.push(msg);
    }
    Ok(())
}

struct Meta {
    id: String,
    model: String,
    created: u64,
    summary: bool,
    custom_tools: Vec<String>,
}

async fn run(state: &Arc<AppState>, body: Body) -> ApiResult<Response> {
    let bytes = crate::read_body(state, API, body).await?;
    let obj = types::parse_object(API, &bytes)?;
    let f = Fields::new(&obj, API);
    for key in ["previous_response_id", "conversation"] {
        if f.get(key).is_some() {
            return Err(ApiError::bad_request(
                API,
                format!("{key} is not supported; replay the full input instead"),
            )
            .with_param(key));
        }
    }
    let model = f.str("model")?.unwrap_or(types::MODEL_ID).to_string();
    let alias = types::resolve_model(API, &model, state.config.accept_any_model)?;
    let reasoning = f.object("reasoning")?;
    let (effort, summary) = match reasoning {
        Some(r) => (
            r.str("effort")?
                .map(|e| types::parse_effort(API, "reasoning.effort", e))
                .transpose()?,
            matches!(r.str("summary")?, Some("auto" | "concise" | "detailed")),
        ),
        None => (None, false),
    };
    // Responses `reasoning.effort` is an explicit control (it overrides the alias).
    let explicit = types::thinking_control(&f)?.or(effort.map(|e| e != types::Effort::None));
    let mode = types::resolve_thinking(alias, explicit, effort, state.worker.context_size());
    let mut custom_tools = Vec::new();
    let tools = match f.array("tools")? {
        Some(t) if !t.is_empty() => convert_tools(&f, t, &mut custom_tools)?,
        _ => Vec::new(),
    };
    let tools_active =
        !tools.is_empty() && f.get("tool_choice").and_then(Value::as_str) != Some("none");
    let mut messages = Vec::new();
    if let Some(instr) = f.str("instructions")?.filter(|s| !s.is_empty()) {
        messages.push(Message::new("system", instr));
    }
    match f.get("input") {
        Some(Value::String(s)) => messages.push(Message::new("user", s)),
        Some(Value::Array(items)) if !items.is_empty() => convert_input(&f, items, &mut messages)?,
        Some(Value::Array(_)) | None => {
            return Err(bad("'input' must be a non-empty string or array"));
        }
        Some(other) => {
            return Err(f
                .type_error("input", "string or array", other)
                .with_param("input"));
        }
    }
    let prompt = generate::build_prompt(
        state,
        API,
        "input",
        chat_request(mode, messages, tools_active.then_some(tools)),
    )?;
    let spec = GenSpec {
        prompt,
        sampling: types::sampling(&f, mode.enabled, false, false)?,
        max_tokens: match f.u32("max_output_tokens")? {
            Some(n) => Some(n),
            None => f.u32("max_tokens")?,
        },
        stops: Vec::new(),
        thinking: mode.enabled,
        parse_tools: true,
        tools_active,
        id_prefix: "call_",
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let mut generation = generate::start(state, API, spec)?;
    let meta = Meta {
        id: format!("resp_{}", random_hex(12)),
        model,
        created: types::unix_now(),
        summary,
        custom_tools,
    };
    if stream {
        let dialect = ResponseStream {
            meta,
            seq: 0,
            next_output: 0,
            reasoning: None,
            message: None,
            live_calls: Vec::new(),
            items: Vec::new(),
        };
        return Ok(sse::respond(state, API, generation, dialect).await);
    }
    let result = generate::collect(API, &mut generation).await?;
    let c = &result.completion;
    let item_status = if matches!(c.finish, Finish::Length | Finish::Error) {
        "incomplete"
    } else {
        "completed"
    };
    let mut output = Vec::new();
    if let Some(r) = c
        .reasoning
        .as_ref()
        .filter(|r| !r.is_empty() && meta.summary)
    {
        output.push(reasoning_item(
            &format!("rs_{}", random_hex(12)),
            r,
            if c.reasoning_closed {
                "completed"
            } else {
                "incomplete"
            },
        ));
    }
    if !c.content.is_empty() {
        output.push(message_item(
            &format!("msg_{}", random_hex(12)),
            &c.content,
            item_status,
        ));
    }
    for call in &c.calls {
        output.push(call_item(&meta, call, item_status));
    }
    Ok(Json(response_object(
        &meta,
        status(c.finish),
        output,
        Some(&result),
    ))
    .into_response())
}

fn status(finish: Finish) -> &'static str {
    match finish {
        Finish::Length => "incomplete",
        Finish::Error => "failed",
        Finish::Stop | Finish::ToolCalls => "completed",
    }
}

fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    json!({"id": id, "type": "reasoning", "status": status, "summary": [{"type": "summary_text", "text": text}]})
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"id": id, "type": "message", "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call_item(meta: &Meta, call: &crate::stream::ToolCall, status: &str) -> Value {
    let id = format!("fc_{}", random_hex(12));
    if meta.custom_tools.contains(&call.name) {
        let input = serde_json::from_str::<Value>(&call.arguments)
            .ok()
            .and_then(|v| v.get("input").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default();
        return json!({"id": id, "type": "custom_tool_call", "status": status, "call_id": call.id, "name": call.name, "input": input});
    }
    json!({"id": id, "type": "function_call", "status": status, "name": call.name, "call_id": call.id, "arguments": call.arguments})
}

fn response_object(
    meta: &Meta,
    status: &str,
    output: Vec<Value>,
    result: Option<&GenResult>,
) -> Value {
    let mut r = Map::new();
    r.insert("id".into(), json!(meta.id));
    r.insert("object".into(), json!("response"));
    r.insert("created_at".into(), json!(meta.created));
    r.insert("status".into(), json!(status));
    r.insert("model".into(), json!(meta.model));
    r.insert("output".into(), Value::Array(output));
    r.insert(
        "error".into(),
        if status == "failed" {
            json!({"code": "server_error", "message": "generation failed"})
        } else {
            Value::Null
        },
    );
    r.insert(
        "incomplete_details".into(),
        if status == "incomplete" {
            json!({"reason": "max_output_tokens"})
        } else {
            Value::Null
        },
    );
    r.insert("parallel_tool_calls".into(), json!(true));
    r.insert("tool_choice".into(), json!("auto"));
    r.insert("tools".into(), json!([]));
    r.insert("metadata".into(), json!({}));
    if let Some(res) = result {
        let u = res.usage;
        r.insert(
            "usage".into(),
            json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens.min(u.prompt_tokens)},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": res.reasoning_tokens},
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            }),
        );
    } else {
        r.insert("usage".into(), Value::Null);
    }
    Value::Object(r)
}

/// SSE lifecycle of the Responses API (spec server.md §5.10, with `event:` lines).
struct ResponseStream {
    meta: Meta,
    seq: u64,
    next_output: usize,
    /// (item id, output index, text so far, closed)
    reasoning: Option<(String, usize, String, bool)>,
    /// (item id, output index, text so far)
    message: Option<(String, usize, String)>,
    /// Function calls projected live from the DSML block, in block order.
    live_calls: Vec<LiveCall>,
    items: Vec<(usize, Value)>,
}

/// A function call whose item was opened while its DSML was still being generated.
struct LiveCall {
    /// Position of the call within the DSML block (the parser's `index`).
    block_index: usize,
    output_index: usize,
    item_id: String,
    call_id: String,
    name: String,
    /// Concatenation of every arguments delta sent so far.
    arguments: String,
    /// `response.output_item.done` was sent (the invoke end tag was seen).
    closed: bool,
}

impl ResponseStream {
    fn ev(&mut self, kind: &str, mut body: Value) -> Event {
        if let Value::Object(m) = &mut body {
            let mut ordered = Map::new();
            ordered.insert("type".into(), json!(kind));
            ordered.insert("sequence_number".into(), json!(self.seq));
            for (k, v) in std::mem::take(m) {
                ordered.insert(k, v);
            }
            *m = ordered;
        }
        self.seq += 1;
        sse::named(kind, &body)
    }

    fn close_reasoning(&mut self, out: &mut Vec<Event>, completed: bool) {
        let Some((id, index, text, closed)) = self.reasoning.take() else {
            return;
        };
        if closed {
            self.reasoning = Some((id, index, text, closed));
            return;
        }
        out.push(self.ev(
            "response.reasoning_summary_text.done",
            json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
        ));
        out.push(self.ev("response.reasoning_summary_part.done",
            json!({"item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": text}})));
        let item = reasoning_item(
            &id,
            &text,
            if completed { "completed" } else { "incomplete" },
        );
        out.push(self.ev(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        ));
        self.items.push((index, item));
        self.reasoning = Some((id, index, text, true));
    }

    fn close_message(&mut self, out: &mut Vec<Event>, status: &str) {
        let Some((id, index, text)) = self.message.take() else {
            return;
        };
        out.push(self.ev(
            "response.output_text.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
        ));
        out.push(self.ev("response.content_part.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}})));
        let item = message_item(&id, &text, status);
        out.push(self.ev(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        ));
        self.items.push((index, item));
    }

    fn live_call(&mut self, block_index: usize) -> Option<&mut LiveCall> {
        self.live_calls
            .iter_mut()
            .find(|c| c.block_index == block_index && !c.closed)
    }

    /// Opens a `function_call` item as soon as the invoke tag names the function. Text
    /// and reasoning end at the DSML block, so their items are closed first to keep
    /// output indexes in generation order. Custom (freeform) tools are not projected:
    /// their `input` is only known from the final parse.
    fn open_live_call(
        &mut self,
        out: &mut Vec<Event>,
        block_index: usize,
        call_id: String,
        name: String,
    ) {
        if self.meta.custom_tools.contains(&name) {
            return;
        }
        self.close_reasoning(out, true);
        self.close_message(out, "completed");
        let output_index = self.next_output;
        self.next_output += 1;
        let item_id = format!("fc_{}", random_hex(12));
        out.push(self.ev(
            "response.output_item.added",
            json!({"output_index": output_index, "item": {"id": item_id, "type": "function_call",
                "status": "in_progress", "name": name, "call_id": call_id, "arguments": ""}}),
        ));
        self.live_calls.push(LiveCall {
            block_index,
            output_index,
            item_id,
            call_id,
            name,
            arguments: String::new(),
            closed: false,
        });
    }

    fn live_args(&mut self, out: &mut Vec<Event>, block_index: usize, fragment: String) {
        let Some(call) = self.live_call(block_index) else {
            return;
        };
        call.arguments.push_str(&fragment);
        let body =
            json!({"item_id": call.item_id, "output_index": call.output_index, "delta": fragment});
        out.push(self.ev("response.function_call_arguments.delta", body));
    }

    /// Sends `arguments.done` and `output_item.done` for a live call and records its item.
    fn close_live_call(&mut self, out: &mut Vec<Event>, pos: usize, status: &str) {
        let Some(call) = self.live_calls.get_mut(pos) else {
            return;
        };
        call.closed = true;
        let (item_id, output_index) = (call.item_id.clone(), call.output_index);
        let item = json!({"id": item_id, "type": "function_call", "status": status,
            "name": call.name, "call_id": call.call_id, "arguments": call.arguments});
        let done = json!({"item_id": item_id, "output_index": output_index,
            "name": call.name, "arguments": call.arguments});
        out.push(self.ev("response.function_call_arguments.done", done));
        out.push(self.ev(
            "response.output_item.done",
            json!({"output_index": output_index, "item": item.clone()}),
        ));
        self.items.push((output_index, item));
    }

    /// Calls whose invoke end never streamed (projection stopped, or generation ended
    /// mid-call): the authoritative parse completes them where it extends what was sent.
    fn finish_live_calls(
        &mut self,
        out: &mut Vec<Event>,
        calls: &[crate::stream::ToolCall],
        status: &str,
    ) {
        for pos in 0..self.live_calls.len() {
            let Some(call) = self.live_calls.get(pos).filter(|c| !c.closed) else {
                continue;
            };
            let parsed = calls.iter().find(|p| p.id == call.call_id);
            let (item_id, output_index, sent) = (
                call.item_id.clone(),
                call.output_index,
                call.arguments.clone(),
            );
            let status = match parsed {
                Some(p) => {
                    if let Some(rest) = p
                        .arguments
                        .strip_prefix(sent.as_str())
                        .filter(|r| !r.is_empty())
                    {
                        out.push(self.ev("response.function_call_arguments.delta",
                            json!({"item_id": item_id, "output_index": output_index, "delta": rest})));
                    }
                    if let Some(c) = self.live_calls.get_mut(pos) {
                        c.arguments = p.arguments.clone();
                    }
                    status
                }
                None => "incomplete",
            };
            self.close_live_call(out, pos, status);
        }
    }
}

impl SseDialect for ResponseStream {
    fn started(&mut self, _prompt_tokens: u32, _cached: u32) -> Vec<Event> {
        let response = response_object(&self.meta, "in_progress", Vec::new(), None);
        vec![
            self.ev("response.created", json!({"response": response.clone()})),
            self.ev("response.in_progress", json!({"response": response})),
        ]
    }

    fn event(&mut self, event: OutEvent) -> Vec<Event> {
        let mut out = Vec::new();
        match event {
            OutEvent::Reasoning(s) if self.meta.summary => {
                if self.reasoning.is_none() {
                    let id = format!("rs_{}", random_hex(12));
                    let index = self.next_output;
                    self.next_output += 1;
                    out.push(self.ev("response.output_item.added",
                        json!({"output_index": index, "item": {"id": id, "type": "reasoning", "status": "in_progress", "summary": []}})));
                    out.push(self.ev("response.reasoning_summary_part.added",
                        json!({"item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}})));
                    self.reasoning = Some((id, index, String::new(), false));
                }
                if let Some((id, index, text, false)) = self.reasoning.as_mut() {
                    text.push_str(&s);
                    let (id, index) = (id.clone(), *index);
                    out.push(self.ev("response.reasoning_summary_text.delta",
                        json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": s})));
                }
            }
            OutEvent::ReasoningDone => self.close_reasoning(&mut out, true),
            OutEvent::Text(s) => {
                if self.message.is_none() {
                    let id = format!("msg_{}", random_hex(12));
                    let index = self.next_output;
                    self.next_output += 1;
                    out.push(self.ev("response.output_item.added",
                        json!({"output_index": index, "item": {"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}})));
                    out.push(self.ev("response.content_part.added",
                        json!({"item_id": id, "output_index": index, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})));
                    self.message = Some((id, index, String::new()));
                }
                if let Some((id, index, text)) = self.message.as_mut() {
                    text.push_str(&s);
                    let (id, index) = (id.clone(), *index);
                    out.push(self.ev("response.output_text.delta",
                        json!({"item_id": id, "output_index": index, "content_index": 0, "delta": s})));
                }
            }
            OutEvent::ToolStart { index, id, name } => {
                self.open_live_call(&mut out, index, id, name);
            }
            OutEvent::ToolArgs { index, fragment } => self.live_args(&mut out, index, fragment),
            OutEvent::ToolEnd { index } => {
                if let Some(pos) = self
                    .live_calls
                    .iter()
                    .position(|c| c.block_index == index && !c.closed)
                {
                    self.close_live_call(&mut out, pos, "completed");
                }
            }
            OutEvent::Reasoning(_) => {}
        }
        out
    }

    fn done(&mut self, result: &GenResult) -> Vec<Event> {
        let c = &result.completion;
        let item_status = if matches!(c.finish, Finish::Length | Finish::Error) {
            "incomplete"
        } else {
            "completed"
        };
        let mut out = Vec::new();
        self.close_reasoning(&mut out, c.reasoning_closed);
        self.close_message(&mut out, item_status);
        self.finish_live_calls(&mut out, &c.calls, item_status);
        for call in &c.calls {
            if self.live_calls.iter().any(|l| l.call_id == call.id) {
                continue;
            }
            let index = self.next_output;
            self.next_output += 1;
            let item = call_item(&self.meta, call, item_status);
            let item_id = item["id"].clone();
            let mut added = item.clone();
            added["status"] = json!("in_progress");
            if item["type"] == "function_call" {
                added["arguments"] = json!("");
                out.push(self.ev(
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                ));
                out.push(self.ev(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": call.arguments}),
                ));
                out.push(self.ev("response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": index, "name": call.name, "arguments": call.arguments})));
            } else {
                added["input"] = json!("");
                out.push(self.ev(
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                ));
            }
            out.push(self.ev(
                "response.output_item.done",
                json!({"output_index": index, "item": item.clone()}),
            ));
            self.items.push((index, item));
        }
        self.items.sort_by_key(|(i, _)| *i);
        let output: Vec<Value> = self.items.iter().map(|(_, v)| v.clone()).collect();
        let st = status(c.finish);
        let terminal = match st {
            "incomplete" => "response.incomplete",
            "failed" => "response.failed",
            _ => "response.completed",
        };
        let response = response_object(&self.meta, st, output, Some(result));
        out.push(self.ev(terminal, json!({"response": response})));
        out
    }

    fn failed(&mut self, message: &str) -> Vec<Event> {
        let mut response = response_object(&self.meta, "failed", Vec::new(), None);
        response["error"] = json!({"code": "server_error", "message": message});
        vec![self.ev("response.failed", json!({"response": response}))]
    }
}
