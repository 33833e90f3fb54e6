//! `POST /v1/completions` (legacy OpenAI completions). The prompt is wrapped in the chat
//! template (a default system message and one user turn) and the generated text is
//! returned raw: in thinking mode it reads `reasoning</think>answer` (spec server.md §5.9).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use ds4_chat::Message;

use crate::AppState;
use crate::errors::{Api, ApiError, ApiResult};
use crate::generate::{self, GenResult, GenSpec};
use crate::openai_chat::{chat_request, chat_think_mode, usage_json};
use crate::sse::{self, SseDialect};
use crate::stream::OutEvent;
use crate::types::{self, Fields};

const API: Api = Api::OpenAi;
const DEFAULT_SYSTEM: &str = "You are a helpful assistant";

pub async fn handle(State(state): State<Arc<AppState>>, body: Body) -> Response {
    match run(&state, body).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn run(state: &Arc<AppState>, body: Body) -> ApiResult<Response> {
    let bytes = crate::read_body(state, API, body).await?;
    let obj = types::parse_object(API, &bytes)?;
    let f = Fields::new(&obj, API);
    let model = f.str("model")?.unwrap_or(types::MODEL_ID).to_string();
    let alias = types::resolve_model(API, &model, state.config.accept_any_model)?;
    let prompt_text = match f.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => match items.first() {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    API,
                    "'prompt' must be a string or an array of strings",
                )
                .with_param("prompt"));
            }
        },
        Some(other) => {
            return Err(f
                .type_error("prompt", "string or array of strings", other)
                .with_param("prompt"));
        }
        None => return Err(ApiError::bad_request(API, "missing 'prompt'").with_param("prompt")),
    };
    let mode = chat_think_mode(&f, alias, state.worker.context_size())?;
    let messages = vec![
        Message::new("system", DEFAULT_SYSTEM),
        Message::new("user", &prompt_text),
    ];
    let prompt = generate::build_prompt(state, API, "prompt", chat_request(mode, messages, None))?;
    let spec = GenSpec {
        prompt,
        sampling: types::sampling(&f, mode.enabled, true, true)?,
        max_tokens: f.u32("max_tokens")?,
        stops: f.stop_list("stop")?,
        thinking: false, // raw text: no reasoning split
        parse_tools: false,
        tools_active: false,
        id_prefix: "call_",
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        Some(o) => o.bool("include_usage")?.unwrap_or(false),
        None => false,
    };
    let mut generation = generate::start(state, API, spec)?;
    let id = format!("cmpl-{}", crate::stream::random_hex(12));
    let created = types::unix_now();
    if stream {
        return Ok(sse::respond(
            state,
            API,
            generation,
            CompletionStream {
                id,
                model,
                created,
                include_usage,
            },
        )
        .await);
    }
    let result = generate::collect(API, &mut generation).await?;
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": result.completion.content, "index": 0, "logprobs": null,
                     "finish_reason": result.completion.finish.openai()}],
        "usage": usage_json(&result),
    }))
    .into_response())
}

struct CompletionStream {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl CompletionStream {
    fn chunk(&self, text: &str, finish: Option<&str>) -> Event {
        sse::data(&json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
        }))
    }
}

impl SseDialect for CompletionStream {
    fn started(&mut self, _prompt_tokens: u32, _cached: u32) -> Vec<Event> {
        Vec::new()
    }

    fn event(&mut self, event: OutEvent) -> Vec<Event> {
        match event {
            OutEvent::Text(s) | OutEvent::Reasoning(s) => vec![self.chunk(&s, None)],
            _ => Vec::new(),
        }
    }

    fn done(&mut self, result: &GenResult) -> Vec<Event> {
        let mut out = vec![self.chunk("", Some(result.completion.finish.openai()))];
        if self.include_usage {
            out.push(sse::data(&json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_json(result),
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
