//! The contract between the HTTP server (or any other front end) and the engine.
//!
//! A front end renders and tokenizes the prompt itself, then hands the engine a
//! [`GenerationRequest`] carrying the *whole* prompt (token ids and rendered text). The
//! engine decides on its own how much of its live session it can reuse (token prefix or
//! rendered-byte prefix), so a multi-turn conversation never re-prefills its history.
//! The engine reports progress as a stream of [`GenerationEvent`]s; the consumer answers
//! each event with a [`Directive`] (keep going, keep going greedily, or stop).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Sampling knobs of one request (already resolved by the front end: e.g. thinking mode
/// forces the defaults, spec server.md §4.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
    pub min_p: f32,
    /// `None` = derive from time.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.05,
            seed: None,
        }
    }
}

/// Shared cancellation flag: set by the front end when the client goes away, checked by
/// the worker before it starts a queued request and by the generator between tokens.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// One generation job.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The full prompt, tokenized with the rendered-chat tokenizer (7 specials).
    pub prompt_tokens: Vec<u32>,
    /// The rendered prompt text the tokens came from; lets the engine reuse its live
    /// session by byte prefix when token boundaries differ (spec server.md §6.2).
    pub prompt_text: String,
    pub sampling: SamplingParams,
    /// Maximum number of generated tokens (the engine also clamps to its context).
    pub max_tokens: u32,
    /// When true the engine samples greedily whenever the consumer answered the previous
    /// token with [`Directive::ContinueGreedy`] (DSML tool-call syntax, spec §4.5).
    pub greedy_dsml: bool,
    pub cancel: CancelToken,
}

/// Why a generation ended, as seen by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineFinish {
    /// The model sampled end-of-sequence (not evaluated into the KV state).
    Eos,
    /// `max_tokens` reached or the context is full.
    Length,
    /// The consumer answered [`Directive::Stop`] (stop sequence, tool block end, …).
    Stopped,
    /// The cancel token was set (client gone).
    Cancelled,
}

/// Real token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Length of the prompt actually synced into the session.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the live session or a cache instead of prefill.
    pub cached_tokens: u32,
    /// Generated tokens (EOS excluded).
    pub completion_tokens: u32,
}

/// What the engine reports while serving a request.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Prefill progress (sent per chunk of a long prefill; lets the front end keep the
    /// connection alive).
    Prefill { done: u32, total: u32 },
    /// Prefill finished; generation starts.
    Started {
        prompt_tokens: u32,
        cached_tokens: u32,
    },
    /// One generated token and its decoded bytes (may be part of a UTF-8 character).
    Token { id: u32, bytes: Vec<u8> },
    /// Terminal: generation ended normally.
    Finished { reason: EngineFinish, usage: Usage },
    /// Terminal: generation failed.
    Error { message: String },
}

impl GenerationEvent {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Finished { .. } | Self::Error { .. })
    }
}

/// The consumer's answer to each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Continue,
    /// Continue, and sample the next token greedily (only honoured with `greedy_dsml`).
    ContinueGreedy,
    Stop,
}

/// Tokenizer view needed by front ends and by the scripted generator: the
/// rendered-chat tokenization (spec server.md §1.6) and per-token decoding.
pub trait TextCodec: Send + Sync {
    /// Token ids of rendered chat text (special-token strings recognised).
    fn encode_rendered(&self, text: &str) -> Vec<u32>;
    /// The bytes of one token (possibly an incomplete UTF-8 sequence).
    fn decode_token(&self, id: u32) -> Vec<u8>;
    /// Short name for logs.
    fn name(&self) -> &str;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cancel_token_is_shared_between_clones() {
        let a = CancelToken::new();
        let b = a.clone();
        assert!(!b.is_cancelled());
        a.cancel();
        assert!(b.is_cancelled());
    }

    #[test]
    fn terminal_events() {
        assert!(
            GenerationEvent::Error {
                message: "x".into()
            }
            .is_terminal()
        );
        assert!(
            !GenerationEvent::Token {
                id: 1,
                bytes: vec![]
            }
            .is_terminal()
        );
    }
}
