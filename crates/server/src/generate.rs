//! From a rendered conversation to a running generation: prompt rendering with exact
//! tool-call replay, tokenization and the context check (on the connection's task), then
//! submission to the inference worker with a sink that runs the output processor on the
//! worker thread and forwards API-neutral items to the connection.

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::mpsc;

use ds4_chat::ChatRequest;
use ds4_engine::request::{
    CancelToken, Directive, GenerationEvent, GenerationRequest, SamplingParams, Usage,
};

use crate::AppState;
use crate::errors::{Api, ApiError, ApiResult};
use crate::stream::{Completion, OutEvent, OutputProcessor};

/// A rendered, tokenized prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub tokens: Vec<u32>,
}

/// Renders a conversation (after attaching exactly replayed DSML blocks) and tokenizes it.
pub fn build_prompt(
    state: &AppState,
    api: Api,
    param: &'static str,
    mut chat: ChatRequest,
) -> ApiResult<Prompt> {
    ds4_chat::attach_replay(&mut chat.messages, |id| state.tool_memory.lookup(id));
    let text = ds4_chat::render(&chat)
        .map_err(|e| ApiError::bad_request(api, e.to_string()).with_param(param))?;
    prompt_from_text(state, api, param, text)
}

/// Tokenizes rendered text and checks it leaves room for at least one generated token.
pub fn prompt_from_text(
    state: &AppState,
    api: Api,
    param: &'static str,
    text: String,
) -> ApiResult<Prompt> {
    let tokens = state.codec.encode_rendered(&text);
    let ctx = state.worker.context_size();
    if tokens.len() >= ctx as usize {
        return Err(ApiError::context_length(api, param, tokens.len(), ctx));
    }
    Ok(Prompt { text, tokens })
}

/// Everything the worker needs for one request.
pub struct GenSpec {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_tokens: Option<u32>,
    pub stops: Vec<String>,
    /// Output starts with reasoning (prompt ends with `<think>`).
    pub thinking: bool,
    /// Recognise DSML tool calls in the output.
    pub parse_tools: bool,
    /// Tools are active: DSML syntax is sampled greedily.
    pub tools_active: bool,
    pub id_prefix: &'static str,
}

/// Final result of a generation.
#[derive(Debug, Clone)]
pub struct GenResult {
    pub completion: Completion,
    pub usage: Usage,
    pub reasoning_tokens: u32,
}

/// What the connection receives.
#[derive(Debug)]
pub enum GenItem {
    Prefill,
    Started {
        prompt_tokens: u32,
        cached_tokens: u32,
    },
    Events(Vec<OutEvent>),
    Done(Box<GenResult>),
    Failed(String),
}

/// Cancels the generation when dropped (client gone, handler future dropped).
pub struct CancelGuard(pub CancelToken);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A submitted generation.
pub struct Generation {
    pub rx: mpsc::UnboundedReceiver<GenItem>,
    pub guard: CancelGuard,
    pub prompt_tokens: u32,
}

/// Queues a generation on the worker.
pub fn start(state: &Arc<AppState>, api: Api, spec: GenSpec) -> ApiResult<Generation> {
    let ctx = state.worker.context_size();
    let n_prompt = spec.prompt.tokens.len() as u32;
    let room = ctx.saturating_sub(n_prompt);
    let max_tokens = spec
        .max_tokens
        .unwrap_or(state.config.default_max_tokens)
        .min(room);
    let cancel = CancelToken::new();
    let request = GenerationRequest {
        prompt_tokens: spec.prompt.tokens,
        prompt_text: spec.prompt.text,
        sampling: spec.sampling,
        max_tokens,
        greedy_dsml: spec.tools_active,
        cancel: cancel.clone(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut processor =
        OutputProcessor::new(spec.thinking, spec.parse_tools, &spec.stops, spec.id_prefix);
    let memory_state = Arc::clone(state);
    let sink = Box::new(move |event: GenerationEvent| -> Directive {
        let send = |item: GenItem| {
            if tx.send(item).is_ok() {
                Directive::Continue
            } else {
                Directive::Stop
            }
        };
        match event {
            GenerationEvent::Prefill { .. } => send(GenItem::Prefill),
            GenerationEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => send(GenItem::Started {
                prompt_tokens,
                cached_tokens,
            }),
            GenerationEvent::Token { bytes, .. } => {
                let (events, directive) = processor.push(&bytes);
                if !events.is_empty() && send(GenItem::Events(events)) == Directive::Stop {
                    return Directive::Stop;
                }
                directive
            }
            GenerationEvent::Finished { reason, mut usage } => {
                let (events, completion) = processor.finish(Some(reason));
                if let Some(block) = &completion.raw_dsml
                    && !completion.calls.is_empty()
                {
                    let ids: Vec<String> = completion.calls.iter().map(|c| c.id.clone()).collect();
                    memory_state.tool_memory.remember(&ids, block);
                }
                if usage.prompt_tokens == 0 {
                    usage.prompt_tokens = n_prompt;
                }
                if !events.is_empty() {
                    send(GenItem::Events(events));
                }
                let reasoning_tokens = processor.reasoning_tokens().min(usage.completion_tokens);
                send(GenItem::Done(Box::new(GenResult {
                    completion,
                    usage,
                    reasoning_tokens,
                })))
            }
            GenerationEvent::Error { message } => send(GenItem::Failed(message)),
        }
    });
    state
        .worker
        .submit(request, sink)
        .map_err(|e| ApiError::new(api, StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Generation {
        rx,
        guard: CancelGuard(cancel),
        prompt_tokens: n_prompt,
    })
}

/// Waits for the end of a non-streaming generation.
pub async fn collect(api: Api, generation: &mut Generation) -> ApiResult<GenResult> {
    while let Some(item) = generation.rx.recv().await {
        match item {
            GenItem::Done(result) => return Ok(*result),
            GenItem::Failed(message) => {
                return Err(ApiError::new(
                    api,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    message,
                ));
            }
            GenItem::Prefill | GenItem::Started { .. } | GenItem::Events(_) => {}
        }
    }
    Err(ApiError::new(
        api,
        StatusCode::INTERNAL_SERVER_ERROR,
        "inference worker stopped",
    ))
}
