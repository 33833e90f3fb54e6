//! Server-sent events: a generic driver that feeds a generation through an API
//! dialect's event builder, with keep-alive comments while the prompt is queued or
//! prefilled, and cancellation as soon as the client disconnects.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use crate::AppState;
use crate::errors::{Api, ApiError};
use crate::generate::{GenItem, GenResult, Generation};
use crate::stream::OutEvent;

/// Builds one API's SSE events.
pub trait SseDialect: Send + 'static {
    /// Prefill done: the first protocol event(s).
    fn started(&mut self, prompt_tokens: u32, cached_tokens: u32) -> Vec<Event>;
    fn event(&mut self, event: OutEvent) -> Vec<Event>;
    /// Terminal events after a completed generation.
    fn done(&mut self, result: &GenResult) -> Vec<Event>;
    /// Terminal event after a failure once the stream has begun.
    fn failed(&mut self, message: &str) -> Vec<Event>;
}

/// `data:` event with a JSON payload.
pub fn data(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// `event:` + `data:` event.
pub fn named(name: &str, value: &serde_json::Value) -> Event {
    Event::default().event(name).data(value.to_string())
}

/// Streams a generation. Failures that happen before anything was streamed (within
/// a short wait for prefill) become ordinary HTTP errors.
pub async fn respond<D: SseDialect>(
    state: &Arc<AppState>,
    api: Api,
    mut generation: Generation,
    mut dialect: D,
) -> Response {
    let mut first = Vec::new();
    let wait = tokio::time::sleep(Duration::from_millis(state.config.first_event_wait_ms));
    tokio::pin!(wait);
    loop {
        tokio::select! {
            item = generation.rx.recv() => match item {
                None => return ApiError::new(api, StatusCode::INTERNAL_SERVER_ERROR, "inference worker stopped").into_response(),
                Some(GenItem::Failed(message)) => {
                    return ApiError::new(api, StatusCode::INTERNAL_SERVER_ERROR, message).into_response();
                }
                Some(GenItem::Prefill) => {}
                Some(item) => {
                    first.push(item);
                    break;
                }
            },
            _ = &mut wait => break,
        }
    }
    let (etx, erx) = mpsc::channel::<Event>(64);
    let prompt_tokens = generation.prompt_tokens;
    tokio::spawn(async move {
        let Generation { mut rx, guard, .. } = generation;
        let _guard = guard; // dropping it cancels the generation
        let mut started = false;
        let mut pending = first.into_iter();
        loop {
            let item = match pending.next() {
                Some(item) => item,
                None => tokio::select! {
                    item = rx.recv() => match item { Some(item) => item, None => break },
                    _ = etx.closed() => break,
                },
            };
            let mut out = Vec::new();
            let terminal = matches!(item, GenItem::Done(_) | GenItem::Failed(_));
            match item {
                GenItem::Prefill => {}
                GenItem::Started {
                    prompt_tokens,
                    cached_tokens,
                } => {
                    if !started {
                        started = true;
                        out.extend(dialect.started(prompt_tokens, cached_tokens));
                    }
                }
                GenItem::Events(events) => {
                    if !started {
                        started = true;
                        out.extend(dialect.started(prompt_tokens, 0));
                    }
                    for ev in events {
                        out.extend(dialect.event(ev));
                    }
                }
                GenItem::Done(result) => {
                    if !started {
                        started = true;
                        out.extend(
                            dialect.started(result.usage.prompt_tokens, result.usage.cached_tokens),
                        );
                    }
                    out.extend(dialect.done(&result));
                }
                GenItem::Failed(message) => out.extend(dialect.failed(&message)),
            }
            for ev in out {
                if etx.send(ev).await.is_err() {
                    return;
                }
            }
            if terminal {
                break;
            }
        }
    });
    let stream = futures_util::stream::unfold(erx, |mut erx| async move {
        erx.recv().await.map(|ev| (Ok::<_, Infallible>(ev), erx))
    });
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(state.config.keepalive)
                .text("prefill"),
        )
        .into_response()
}
