//! ds4-server: OpenAI- and Anthropic-compatible HTTP API over one inference worker.
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`,
//! `POST /v1/chat/completions` ([`openai_chat`]), `POST /v1/completions`
//! ([`openai_completions`]), `POST /v1/responses` ([`responses`]), `POST /v1/messages`
//! and `POST /v1/messages/count_tokens` ([`anthropic`]).
//!
//! Each request is parsed, rendered with `ds4-chat` and tokenized on its connection task,
//! then queued on the single inference worker (`ds4_engine::worker`), which owns the model
//! and serves requests FIFO. The generated tokens go through [`stream::OutputProcessor`]
//! (reasoning split, live DSML tool-call projection, stop sequences) and each dialect turns
//! the resulting events into its own response or SSE lifecycle.

pub mod anthropic;
pub mod errors;
pub mod generate;
pub mod models;
pub mod openai_chat;
pub mod openai_completions;
pub mod responses;
pub mod sse;
pub mod stream;
pub mod tool_memory;
pub mod types;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use ds4_engine::request::TextCodec;
use ds4_engine::worker::WorkerHandle;

use crate::errors::{Api, ApiError, ApiResult};
use crate::tool_memory::ToolMemory;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Required bearer token / `x-api-key`, if any.
    pub api_key: Option<String>,
    /// Send permissive CORS headers and answer preflights.
    pub cors: bool,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Generation limit when the request gives none (always clamped to the context).
    pub default_max_tokens: u32,
    /// Accept any `model` name (as `deepseek-v4-flash`) instead of answering 404.
    pub accept_any_model: bool,
    /// Interval of `: prefill` keep-alive comments on idle SSE streams.
    pub keepalive: Duration,
    /// How long a streaming request waits for prefill before committing to SSE (errors
    /// within this window are plain HTTP errors).
    pub first_event_wait_ms: u64,
    /// Exact-replay memory bounds.
    pub tool_memory_max_ids: usize,
    pub tool_memory_max_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            cors: false,
            max_body_bytes: 64 << 20,
            default_max_tokens: 393_216,
            accept_any_model: false,
            keepalive: Duration::from_secs(5),
            first_event_wait_ms: 1000,
            tool_memory_max_ids: 100_000,
            tool_memory_max_bytes: 512 << 20,
        }
    }
}

/// Shared state of all connections.
pub struct AppState {
    pub worker: WorkerHandle,
    pub codec: Arc<dyn TextCodec>,
    pub config: ServerConfig,
    pub tool_memory: ToolMemory,
}

impl AppState {
    pub fn new(worker: WorkerHandle, codec: Arc<dyn TextCodec>, config: ServerConfig) -> Arc<Self> {
        let tool_memory = ToolMemory::new(config.tool_memory_max_ids, config.tool_memory_max_bytes);
        Arc::new(Self {
            worker,
            codec,
            config,
            tool_memory,
        })
    }
}

/// The axum application.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::get_one))
        .route("/v1/chat/completions", post(openai_chat::handle))
        .route("/v1/completions", post(openai_completions::handle))
        .route("/v1/responses", post(responses::handle))
        .route("/v1/messages", post(anthropic::handle))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .fallback(unknown_endpoint)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), gate))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` completes (in-flight requests finish first).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

fn api_for_path(path: &str) -> Api {
    if path.starts_with("/v1/messages") {
        Api::Anthropic
    } else {
        Api::OpenAi
    }
}

/// Preflight, authentication and CORS headers for every route.
async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let api = api_for_path(req.uri().path());
    let mut resp = if req.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else if req.uri().path() != "/health" && !authorized(&state.config, req.headers()) {
        ApiError::new(
            api,
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
        )
        .with_code("invalid_api_key")
        .into_response()
    } else {
        next.run(req).await
    };
    if state.config.cors {
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("*"),
        );
    }
    resp
}

fn authorized(config: &ServerConfig, headers: &HeaderMap) -> bool {
    let Some(key) = &config.api_key else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let x_api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    bearer == Some(key.as_str()) || x_api_key == Some(key.as_str())
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "model": types::MODEL_ID,
        "context_length": state.worker.context_size(),
        "pending_requests": state.worker.pending(),
        "tokenizer": state.codec.name(),
    }))
    .into_response()
}

async fn unknown_endpoint(req: Request) -> Response {
    let api = api_for_path(req.uri().path());
    ApiError::new(
        api,
        StatusCode::NOT_FOUND,
        format!("unknown endpoint: {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

/// Reads a request body up to the configured limit (413 beyond it).
pub async fn read_body(state: &AppState, api: Api, body: Body) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|e| {
            // axum reports the limit through http-body-util's `LengthLimitError`.
            let mut too_large = false;
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(err) = source {
                too_large |= err.to_string().contains("length limit exceeded");
                source = err.source();
            }
            if too_large {
                ApiError::new(
                    api,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {} bytes", state.config.max_body_bytes),
                )
            } else {
                ApiError::bad_request(api, format!("cannot read request body: {e}"))
            }
        })
}
