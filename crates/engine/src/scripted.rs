//! A [`Generator`] that "generates" pre-written completion text. It tokenizes the text with
//! the real codec and emits it token by token through exactly the path the sampler feeds
//! (`GenerationEvent::Token`), so the server's reasoning split, DSML tool-call streaming,
//! stop sequences and cancellation are exercised end to end without a model.
//! Used by `ds4 serve --scripted FILE` (client integration testing) and by tests.
//!
//! Script file (JSON):
//! ```json
//! {"context": 32768,
//!  "rules": [{"match": "weather", "output": "…DSML…", "token_delay_ms": 0, "prefill_delay_ms": 0}],
//!  "default": {"output": "Hello!"}}
//! ```
//! A rule matches when its `match` string occurs in the latest user turn of the rendered
//! prompt (the text after the last `<｜User｜>`, or the whole prompt without one); the
//! first matching rule wins, else `default`. `output` is the raw completion, e.g.
//! `reasoning</think>answer` in thinking mode.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::request::{
    Directive, EngineFinish, GenerationEvent, GenerationRequest, TextCodec, Usage,
};
use crate::worker::{GenerateError, Generator, Outcome};
use std::sync::Arc;

const USER_MARKER: &str = "<｜User｜>";

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot read script {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid script: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid script: {0}")]
    Invalid(String),
}

/// One scripted reply.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScriptReply {
    /// Substring of the latest user turn that selects this reply (ignored for `default`).
    #[serde(default, rename = "match")]
    pub pattern: String,
    /// The completion text the "model" produces.
    pub output: String,
    /// Pause between tokens (lets tests exercise slow streams and cancellation).
    #[serde(default)]
    pub token_delay_ms: u64,
    /// Pause before the first token, reported as prefill progress (keep-alive tests).
    #[serde(default)]
    pub prefill_delay_ms: u64,
}

/// A whole script.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Script {
    #[serde(default = "default_context")]
    pub context: u32,
    #[serde(default)]
    pub rules: Vec<ScriptReply>,
    pub default: ScriptReply,
}

fn default_context() -> u32 {
    32768
}

impl Script {
    pub fn from_json(text: &str) -> Result<Self, ScriptError> {
        let script: Script = serde_json::from_str(text)?;
        if script.context < 2 {
            return Err(ScriptError::Invalid(
                "context must be at least 2 tokens".into(),
            ));
        }
        if script.rules.iter().any(|r| r.pattern.is_empty()) {
            return Err(ScriptError::Invalid(
                "every rule needs a non-empty \"match\"".into(),
            ));
        }
        Ok(script)
    }

    pub fn from_file(path: &Path) -> Result<Self, ScriptError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// The reply for a rendered prompt.
    pub fn reply_for(&self, prompt_text: &str) -> &ScriptReply {
        let latest = prompt_text
            .rfind(USER_MARKER)
            .map_or(prompt_text, |p| &prompt_text[p..]);
        self.rules
            .iter()
            .find(|r| latest.contains(&r.pattern))
            .unwrap_or(&self.default)
    }
}

/// Scripted generator; keeps a "live session" token list so cached-token accounting
/// behaves like the real engine's token-prefix reuse.
pub struct ScriptedGenerator {
    script: Script,
    codec: Arc<dyn TextCodec>,
    live: Vec<u32>,
}

impl ScriptedGenerator {
    pub fn new(script: Script, codec: Arc<dyn TextCodec>) -> Self {
        Self {
            script,
            codec,
            live: Vec::new(),
        }
    }
}

impl Generator for ScriptedGenerator {
    fn context_size(&self) -> u32 {
        self.script.context
    }

    fn generate(
        &mut self,
        req: &GenerationRequest,
        emit: &mut dyn FnMut(GenerationEvent) -> Directive,
    ) -> Result<Outcome, GenerateError> {
        let ctx = self.script.context as usize;
        let n_prompt = req.prompt_tokens.len();
        if n_prompt == 0 || n_prompt >= ctx {
            return Err(GenerateError(format!(
                "prompt exceeds context ({n_prompt} tokens, context {ctx})"
            )));
        }
        let cached = if !self.live.is_empty() && req.prompt_tokens.starts_with(&self.live) {
            self.live.len()
        } else {
            0
        };
        let reply = self.script.reply_for(&req.prompt_text).clone();
        if reply.prefill_delay_ms > 0 {
            // Report progress in a few steps, like a chunked prefill.
            let steps = 4u64;
            for i in 1..=steps {
                std::thread::sleep(Duration::from_millis(reply.prefill_delay_ms / steps));
                if req.cancel.is_cancelled() {
                    self.live.clear();
                    return Ok(outcome(EngineFinish::Cancelled, n_prompt, cached, 0));
                }
                let done = (n_prompt as u64 * i / steps) as u32;
                if emit(GenerationEvent::Prefill {
                    done,
                    total: n_prompt as u32,
                }) == Directive::Stop
                {
                    self.live.clear();
                    return Ok(outcome(EngineFinish::Stopped, n_prompt, cached, 0));
                }
            }
        }
        self.live = req.prompt_tokens.clone();
        emit(GenerationEvent::Started {
            prompt_tokens: n_prompt as u32,
            cached_tokens: cached as u32,
        });

        let budget = (req.max_tokens as usize).min(ctx - n_prompt);
        let tokens = self.codec.encode_rendered(&reply.output);
        let mut produced = 0usize;
        for id in tokens {
            if produced >= budget {
                return Ok(outcome(EngineFinish::Length, n_prompt, cached, produced));
            }
            if req.cancel.is_cancelled() {
                return Ok(outcome(EngineFinish::Cancelled, n_prompt, cached, produced));
            }
            if reply.token_delay_ms > 0 {
                std::thread::sleep(Duration::from_millis(reply.token_delay_ms));
            }
            produced += 1;
            self.live.push(id);
            let bytes = self.codec.decode_token(id);
            if emit(GenerationEvent::Token { id, bytes }) == Directive::Stop {
                return Ok(outcome(EngineFinish::Stopped, n_prompt, cached, produced));
            }
        }
        if produced >= budget && budget == 0 {
            return Ok(outcome(EngineFinish::Length, n_prompt, cached, 0));
        }
        Ok(outcome(EngineFinish::Eos, n_prompt, cached, produced))
    }
}

fn outcome(finish: EngineFinish, prompt: usize, cached: usize, completion: usize) -> Outcome {
    Outcome {
        finish,
        usage: Usage {
            prompt_tokens: prompt as u32,
            cached_tokens: cached as u32,
            completion_tokens: completion as u32,
        },
    }
}

/// One token per byte (ids 0..=255). Used for scripted serving when no vocabulary is
/// given: it splits UTF-8 characters across tokens, which stress-tests the streaming
/// holds; token counts are byte counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteCodec;

impl TextCodec for ByteCodec {
    fn encode_rendered(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }
    fn decode_token(&self, id: u32) -> Vec<u8> {
        u8::try_from(id).map(|b| vec![b]).unwrap_or_default()
    }
    fn name(&self) -> &str {
        "bytes"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::request::{CancelToken, SamplingParams};

    fn script() -> Script {
        Script::from_json(
            r#"{"context": 64, "rules": [{"match": "weather", "output": "sunny"}], "default": {"output": "héllo"}}"#,
        )
        .unwrap()
    }

    fn req(text: &str, max: u32) -> GenerationRequest {
        GenerationRequest {
            prompt_tokens: ByteCodec.encode_rendered(text),
            prompt_text: text.into(),
            sampling: SamplingParams::default(),
            max_tokens: max,
            greedy_dsml: false,
            cancel: CancelToken::new(),
        }
    }

    fn run(g: &mut ScriptedGenerator, r: &GenerationRequest) -> (Vec<u8>, Outcome) {
        let mut out = Vec::new();
        let o = g
            .generate(r, &mut |ev| {
                if let GenerationEvent::Token { bytes, .. } = ev {
                    out.extend(bytes);
                }
                Directive::Continue
            })
            .unwrap();
        (out, o)
    }

    #[test]
    fn picks_rule_from_latest_user_turn() {
        let s = script();
        assert_eq!(
            s.reply_for("<｜User｜>weather?<｜Assistant｜>").output,
            "sunny"
        );
        assert_eq!(
            s.reply_for("<｜User｜>weather?<｜User｜>hi").output,
            "héllo"
        );
        assert!(
            Script::from_json(r#"{"rules":[{"match":"","output":"x"}],"default":{"output":"y"}}"#)
                .is_err()
        );
        assert!(Script::from_json(r#"{"default":{"output":"y"},"bogus":1}"#).is_err());
    }

    #[test]
    fn emits_bytes_counts_tokens_and_reuses_prefix() {
        let mut g = ScriptedGenerator::new(script(), Arc::new(ByteCodec));
        let (bytes, o) = run(&mut g, &req("hi", 100));
        assert_eq!(String::from_utf8(bytes).unwrap(), "héllo");
        assert_eq!(o.finish, EngineFinish::Eos);
        assert_eq!(
            o.usage,
            Usage {
                prompt_tokens: 2,
                cached_tokens: 0,
                completion_tokens: 6
            }
        );
        // The live session is prompt + generated tokens; a prompt extending it reuses it.
        let (_, o) = run(&mut g, &req("hihéllo more", 100));
        assert_eq!(o.usage.cached_tokens, 8);
        let (bytes, o) = run(&mut g, &req("weather", 3));
        assert_eq!(bytes, b"sun");
        assert_eq!(o.finish, EngineFinish::Length);
        assert_eq!(o.usage.cached_tokens, 0);
    }

    #[test]
    fn rejects_prompt_longer_than_context_and_honours_stop() {
        let mut g = ScriptedGenerator::new(script(), Arc::new(ByteCodec));
        let long = "x".repeat(64);
        assert!(
            g.generate(&req(&long, 1), &mut |_| Directive::Continue)
                .is_err()
        );
        let mut n = 0;
        let o = g
            .generate(&req("hi", 100), &mut |ev| {
                if matches!(ev, GenerationEvent::Token { .. }) {
                    n += 1;
                    if n == 2 {
                        return Directive::Stop;
                    }
                }
                Directive::Continue
            })
            .unwrap();
        assert_eq!(o.finish, EngineFinish::Stopped);
        assert_eq!(o.usage.completion_tokens, 2);
    }
}
