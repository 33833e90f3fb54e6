//! `ds4 run`: one-shot chat answer, streamed (reasoning dimmed, then the answer).
//! Also the turn machinery that `ds4 chat` shares.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use ds4_chat::{
    ChatRequest, CompletionStream, Message, ReasoningEffort, StreamEvent, ThinkingMode,
};
use ds4_engine::live::{LoadedModel, ModelGenerator};
use ds4_engine::request::{
    CancelToken, Directive, GenerationEvent, GenerationRequest, SamplingParams,
};
use ds4_engine::worker::Generator;
use ds4_model::ForwardOptions;
use ds4_tokenizer::StreamDecoder;

/// Model and sampling flags shared by `run` and `chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file (a ds4 Flash layout; tiny test models work too).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Context size in tokens (the KV state is allocated for it up front).
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// Maximum tokens generated per answer.
    #[arg(short = 'n', long = "tokens", default_value_t = 50_000)]
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Random seed (default: time-based).
    #[arg(long)]
    pub seed: Option<u64>,
    /// System prompt ("" for none).
    #[arg(long = "system", default_value = "You are a helpful assistant")]
    pub system: String,
    /// Answer directly, without a reasoning phase.
    #[arg(long, conflicts_with = "think_max")]
    pub nothink: bool,
    /// Maximum reasoning effort.
    #[arg(long)]
    pub think_max: bool,
    /// The official FP8 KV / FP4 indexer activation rounding.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub official_rounding: String,
    /// Where the model runs: auto (the GPU when usable and the model fits, else the CPU),
    /// cpu, or cuda (fail with the reason when the GPU cannot take it).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub backend: String,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: ModelArgs,
    /// The user prompt ("-" reads stdin).
    #[arg(short = 'p', long = "prompt")]
    pub prompt: String,
}

/// A loaded model with its live session, ready for turns.
pub struct Chat {
    pub loaded: LoadedModel,
    pub generator: ModelGenerator,
    pub args: ModelArgs,
    pub messages: Vec<Message>,
    pub thinking: ThinkingMode,
    pub effort: Option<ReasoningEffort>,
}

impl Chat {
    pub fn open(args: ModelArgs) -> anyhow::Result<Self> {
        let options = ForwardOptions {
            official_rounding: args.official_rounding == "on",
            ..Default::default()
        };
        let t0 = Instant::now();
        let load = ds4_engine::live::LoadOptions {
            backend: crate::cmd::backend_pref(&args.backend),
            device: args.device,
            ctx: args.ctx,
            chunk: args.chunk,
        };
        let loaded = LoadedModel::load_with(&args.model, options, &load)
            .with_context(|| format!("loading {}", args.model.display()))?;
        eprintln!(
            "ds4: {} ({} layers, vocab {}, {:.1} MiB) loaded in {:.2} s; context {} tokens, KV state {:.1} MiB ({})",
            args.model.display(),
            loaded.config.n_layer,
            loaded.config.vocab,
            loaded.file_bytes as f64 / (1 << 20) as f64,
            t0.elapsed().as_secs_f64(),
            args.ctx,
            loaded.kv_bytes(args.ctx) as f64 / (1 << 20) as f64,
            loaded.model.backend_name(),
        );
        let generator = ModelGenerator::new(&loaded, args.ctx, args.chunk)?;
        let mut messages = Vec::new();
        if !args.system.is_empty() {
            messages.push(Message::new("system", &args.system));
        }
        let thinking = if args.nothink {
            ThinkingMode::Chat
        } else {
            ThinkingMode::Thinking
        };
        let effort = args.think_max.then_some(ReasoningEffort::Max);
        Ok(Self {
            loaded,
            generator,
            args,
            messages,
            thinking,
            effort,
        })
    }

    /// Re-creates the session (e.g. for a new context size); the KV state is lost.
    pub fn reset_session(&mut self, ctx: usize) -> anyhow::Result<()> {
        self.generator = ModelGenerator::new(&self.loaded, ctx, self.args.chunk)?;
        self.args.ctx = ctx;
        Ok(())
    }

    /// Runs one user turn: renders the whole conversation, lets the live session reuse
    /// its prefix, and streams the answer to stdout. The assistant reply is appended to
    /// the history unless the turn was interrupted before producing anything.
    /// Returns whether the turn was interrupted.
    pub fn turn(&mut self, user_text: &str, cancel: &CancelToken) -> anyhow::Result<bool> {
        self.messages.push(Message::new("user", user_text));
        let request = ChatRequest {
            thinking_mode: self.thinking,
            reasoning_effort: self.effort,
            messages: self.messages.clone(),
            ..ChatRequest::default()
        };
        let prompt = ds4_chat::render(&request).context("rendering the conversation")?;
        let tokens = self
            .loaded
            .tokenizer
            .encode(&prompt, true)
            .context("tokenizing the prompt")?;
        let req = GenerationRequest {
            prompt_tokens: tokens,
            prompt_text: prompt,
            sampling: SamplingParams {
                temperature: self.args.temperature,
                top_p: self.args.top_p,
                top_k: 0,
                min_p: self.args.min_p,
                seed: self.args.seed,
            },
            max_tokens: self.args.max_tokens,
            greedy_dsml: false,
            cancel: cancel.clone(),
        };
        let mut decoder = StreamDecoder::new();
        let mut parser = CompletionStream::new(self.thinking);
        let mut out = std::io::stdout().lock();
        let mut text = String::new();
        let mut in_reasoning = false;
        let mut gen_start = None;
        let mut n_gen = 0u32;
        let mut show = |events: Vec<StreamEvent>, out: &mut std::io::StdoutLock<'_>| {
            for ev in events {
                let _ = match ev {
                    StreamEvent::ReasoningDelta(s) => {
                        in_reasoning = true;
                        write!(out, "\x1b[2m{s}\x1b[0m")
                    }
                    StreamEvent::ContentDelta(s) => {
                        let sep = if in_reasoning { "\n\n" } else { "" };
                        in_reasoning = false;
                        write!(out, "{sep}{s}")
                    }
                    StreamEvent::ToolCallStart { name, .. } => {
                        write!(out, "\n[tool call: {name}] ")
                    }
                    StreamEvent::ToolCallArgsDelta { json_fragment, .. } => {
                        write!(out, "{json_fragment}")
                    }
                    StreamEvent::ToolCallEnd { .. } | StreamEvent::ToolBlockEnd { .. } => Ok(()),
                };
                let _ = out.flush();
            }
        };
        let prefill_start = Instant::now();
        let mut emit = |ev: GenerationEvent| -> Directive {
            match ev {
                GenerationEvent::Prefill { done, total } => {
                    eprint!(
                        "\rprocessing {total} input tokens: {done}/{total} ({}%)",
                        done * 100 / total.max(1)
                    );
                }
                GenerationEvent::Started {
                    prompt_tokens,
                    cached_tokens,
                } => {
                    if prompt_tokens - cached_tokens > self.args.chunk as u32 {
                        eprintln!();
                    }
                    tracing::debug!(prompt_tokens, cached_tokens, "generation started");
                    gen_start = Some(Instant::now());
                }
                GenerationEvent::Token { bytes, .. } => {
                    n_gen += 1;
                    let mut piece = String::new();
                    decoder.push_bytes(&bytes, &mut piece);
                    text.push_str(&piece);
                    show(parser.push(&piece), &mut out);
                    if parser.tool_block_done() {
                        return Directive::Stop;
                    }
                }
                GenerationEvent::Finished { .. } | GenerationEvent::Error { .. } => {}
            }
            Directive::Continue
        };
        let outcome = self.generator.generate(&req, &mut emit);
        let mut rest = String::new();
        decoder.finish(&mut rest);
        text.push_str(&rest);
        show(parser.push(&rest), &mut out);
        show(parser.finish(), &mut out);
        let _ = writeln!(out);
        drop(out);
        let outcome = outcome.map_err(|e| anyhow::anyhow!("generation failed: {e}"))?;
        let gen_secs = gen_start.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        let prefill_secs = prefill_start.elapsed().as_secs_f64() - gen_secs;
        let fresh = outcome.usage.prompt_tokens - outcome.usage.cached_tokens;
        eprintln!(
            "\x1b[2m[prompt {} tokens ({} reused), prefill {:.1} tok/s; generated {} tokens, {:.1} tok/s; {:?}]\x1b[0m",
            outcome.usage.prompt_tokens,
            outcome.usage.cached_tokens,
            fresh as f64 / prefill_secs.max(1e-9),
            n_gen,
            n_gen as f64 / gen_secs.max(1e-9),
            outcome.finish
        );
        let parsed = parser.into_parsed();
        let interrupted = cancel.is_cancelled();
        if interrupted && n_gen == 0 {
            self.messages.pop();
        } else {
            let mut reply = Message::new("assistant", &parsed.content);
            reply.reasoning_content = parsed.reasoning.filter(|r| !r.is_empty());
            self.messages.push(reply);
        }
        Ok(interrupted)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt = if args.prompt == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading the prompt from stdin")?;
        s
    } else {
        args.prompt.clone()
    };
    if prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let mut chat = Chat::open(args.common)?;
    let cancel = CancelToken::new();
    crate::cmd::chat::CtrlC::install()?.arm(&cancel);
    chat.turn(&prompt, &cancel)?;
    Ok(())
}
