//! `GET /v1/models` and `GET /v1/models/{id}`, in the OpenAI shape, or the Anthropic
//! shape when the client sends `anthropic-version`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::AppState;
use crate::errors::{Api, ApiError};
use crate::types::MODEL_ID;

/// Fixed creation time of the model entry (2026-01-01).
const CREATED: u64 = 1_767_225_600;
const ALIASES: [&str; 3] = [MODEL_ID, "deepseek-chat", "deepseek-reasoner"];

fn openai_model(state: &AppState, id: &str) -> Value {
    let ctx = state.worker.context_size();
    json!({
        "id": id,
        "object": "model",
        "created": CREATED,
        "owned_by": "ds4",
        "name": "DeepSeek V4 Flash",
        "context_length": ctx,
        "top_provider": {
            "context_length": ctx,
            "max_completion_tokens": state.config.default_max_tokens.min(ctx),
            "is_moderated": false
        },
        "supported_parameters": ["tools", "tool_choice", "max_tokens", "temperature", "top_p", "top_k",
            "min_p", "stop", "seed", "stream", "reasoning_effort"]
    })
}

fn anthropic_model(id: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": "DeepSeek V4 Flash", "created_at": "2026-01-01T00:00:00Z"})
}

fn wants_anthropic(headers: &HeaderMap) -> bool {
    headers.contains_key("anthropic-version")
}

pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if wants_anthropic(&headers) {
        let data: Vec<Value> = ALIASES.iter().map(|id| anthropic_model(id)).collect();
        return Json(
            json!({"data": data, "has_more": false, "first_id": ALIASES[0], "last_id": ALIASES[2]}),
        )
        .into_response();
    }
    let data: Vec<Value> = ALIASES.iter().map(|id| openai_model(&state, id)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let anthropic = wants_anthropic(&headers);
    if !ALIASES.contains(&id.as_str()) {
        let api = if anthropic {
            Api::Anthropic
        } else {
            Api::OpenAi
        };
        return ApiError::new(
            api,
            StatusCode::NOT_FOUND,
            format!("The model '{id}' does not exist"),
        )
        .with_code("model_not_found")
        .into_response();
    }
    if anthropic {
        Json(anthropic_model(&id)).into_response()
    } else {
        Json(openai_model(&state, &id)).into_response()
    }
}
