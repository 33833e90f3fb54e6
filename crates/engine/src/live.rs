//! The model-backed generator: one live session that every request tries to extend,
//! prefill with progress, sampling, and lazy feeding of sampled tokens.
//!
//! Prefix reuse: a new prompt that starts with the live session's tokens is served by
//! feeding only the new suffix. Before the last token of every prompt the session is
//! checkpointed: the next prompt of a thinking-mode conversation re-renders that last
//! token (`<think>` becomes `</think>` once the reasoning is dropped), so it restarts from
//! the checkpoint instead of recomputing its history. Any other divergence rewinds the
//! session (exact, but it recomputes the kept tokens; see `Session::rewind`).
//!
//! A sampled token is fed into the KV state only when generation continues past it, so
//! the last token of a reply (stop sequence, end of a tool block) never has to be rewound
//! when the next prompt renders the history slightly differently.

use std::path::Path;
use std::sync::Arc;

use ds4_cpu::CpuBackend;
use ds4_cuda::{CudaBackend, CudaRuntime};
use ds4_gguf::GgufFile;
use ds4_model::config::Config;
use ds4_model::sampler::{Sampler, SamplerConfig, argmax, time_seed};
use ds4_model::{ForwardOptions, Model, Session};
use ds4_tokenizer::Tokenizer;

use crate::request::{
    Directive, EngineFinish, GenerationEvent, GenerationRequest, SamplingParams, TextCodec, Usage,
};
use crate::worker::{GenerateError, Generator, Outcome};

/// Errors while loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open model {path}: {source}")]
    Open {
        path: String,
        source: ds4_gguf::Error,
    },
    #[error("model metadata: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("session: {0}")]
    Session(String),
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Where the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendPref {
    /// The GPU when one is usable and the model fits it (memory plan), else the CPU.
    Auto,
    Cpu,
    /// The GPU or an error saying why not.
    Cuda,
}

/// How to load: backend, device, and the session size the memory plan must hold.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub backend: BackendPref,
    pub device: usize,
    pub ctx: usize,
    pub chunk: usize,
}

/// The model bound to the backend it runs on.
pub enum AnyModel {
    Cpu(&'static Model<'static, CpuBackend>),
    Cuda(&'static Model<'static, CudaBackend>),
}

impl AnyModel {
    pub fn shape(&self) -> &ds4_model::ModelShape {
        match self {
            AnyModel::Cpu(m) => &m.shape,
            AnyModel::Cuda(m) => &m.shape,
        }
    }
    pub fn backend_name(&self) -> &'static str {
        match self {
            AnyModel::Cpu(_) => "CPU",
            AnyModel::Cuda(_) => "CUDA",
        }
    }
}

/// A session on either backend; every method delegates.
pub enum AnySession {
    // Boxed: sessions are large and one lives per generator.
    Cpu(Box<Session<'static, 'static, CpuBackend>>),
    Cuda(Box<Session<'static, 'static, CudaBackend>>),
}

macro_rules! each {
    ($s:expr, $v:ident => $e:expr) => {
        match $s {
            AnySession::Cpu($v) => $e,
            AnySession::Cuda($v) => $e,
        }
    };
}

impl AnySession {
    fn new(model: &AnyModel, ctx: usize, chunk: usize) -> ds4_model::Result<Self> {
        Ok(match model {
            AnyModel::Cpu(m) => AnySession::Cpu(Box::new(Session::new(m, ctx, chunk)?)),
            AnyModel::Cuda(m) => AnySession::Cuda(Box::new(Session::new(m, ctx, chunk)?)),
        })
    }
    pub fn tokens(&self) -> &[u32] {
        each!(self, s => s.tokens())
    }
    pub fn n_tokens(&self) -> usize {
        each!(self, s => s.n_tokens())
    }
    pub fn ctx(&self) -> usize {
        each!(self, s => s.ctx())
    }
    /// Bytes of the session's KV state.
    pub fn kv_bytes(&self) -> usize {
        each!(self, s => s.kv_bytes())
    }
    pub fn last_logits(&self) -> &[f32] {
        each!(self, s => s.last_logits())
    }
    pub fn feed(
        &mut self,
        tokens: &[u32],
        chunk: usize,
        all_logits: Option<&mut Vec<f32>>,
    ) -> ds4_model::Result<()> {
        each!(self, s => s.feed(tokens, chunk, all_logits))
    }
    pub fn rewind(&mut self, n: usize) -> ds4_model::Result<()> {
        each!(self, s => s.rewind(n))
    }
    pub fn decode(&mut self, token: u32) -> ds4_model::Result<&[f32]> {
        each!(self, s => s.decode(token))
    }
    pub fn snapshot(&self) -> ds4_model::Result<Vec<u8>> {
        each!(self, s => s.snapshot())
    }
    pub fn restore(&mut self, bytes: &[u8]) -> ds4_model::Result<()> {
        each!(self, s => s.restore(bytes))
    }
}

/// A model file loaded for the whole life of the process: mapping, config, the model
/// bound to its backend, and the tokenizer.
pub struct LoadedModel {
    pub config: Config,
    pub model: AnyModel,
    pub tokenizer: Arc<Tokenizer>,
    pub file_bytes: u64,
}

impl LoadedModel {
    /// Maps `path`, validates its metadata and binds the weights (zero-copy).
    ///
    /// The mapping and the bound model are leaked on purpose: they live as long as the
    /// process, and a `'static` borrow lets sessions be stored next to them in a worker.
    pub fn load(path: &Path, options: ForwardOptions) -> Result<Self, LoadError> {
        Self::load_with(
            path,
            options,
            &LoadOptions {
                backend: BackendPref::Cpu,
                device: 0,
                ctx: 1,
                chunk: 1,
            },
        )
    }

    /// [`Self::load`] on the backend `load` asks for. On CUDA the memory plan for
    /// `load.ctx` / `load.chunk` is checked first: `Cuda` refuses with the plan's numbers,
    /// `Auto` says why and falls back to the CPU.
    pub fn load_with(
        path: &Path,
        options: ForwardOptions,
        load: &LoadOptions,
    ) -> Result<Self, LoadError> {
        let file = GgufFile::open(path).map_err(|source| LoadError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let file_bytes = file.bytes().len() as u64;
        let file: &'static GgufFile = Box::leak(Box::new(file));
        let config = Config::from_gguf(file).map_err(|e| LoadError::Config(e.to_string()))?;
        let tokenizer =
            Tokenizer::from_gguf(file).map_err(|e| LoadError::Tokenizer(e.to_string()))?;
        let shape = config.shape();
        if tokenizer.vocab_size() > shape.vocab {
            return Err(LoadError::Tokenizer(format!(
                "tokenizer has {} tokens but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                shape.vocab
            )));
        }
        let model = match load.backend {
            BackendPref::Cpu => None,
            BackendPref::Cuda => Some(cuda_model(file, &shape, options, load)?),
            BackendPref::Auto => match cuda_model(file, &shape, options, load) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("{e}; running on the CPU");
                    None
                }
            },
        };
        let model = match model {
            Some(m) => AnyModel::Cuda(m),
            None => {
                let model = Model::new(CpuBackend::new(&shape), shape, file, options)
                    .map_err(|e| LoadError::Weights(e.to_string()))?;
                AnyModel::Cpu(Box::leak(Box::new(model)))
            }
        };
        Ok(Self {
            config,
            model,
            tokenizer: Arc::new(tokenizer),
            file_bytes,
        })
    }

    /// A fresh session of `ctx` tokens, prefilling `chunk` tokens at a time.
    pub fn new_session(&self, ctx: usize, chunk: usize) -> Result<AnySession, LoadError> {
        AnySession::new(&self.model, ctx.max(1), chunk.max(1))
            .map_err(|e| LoadError::Session(e.to_string()))
    }

    /// Bytes a session of `ctx` tokens allocates for its KV state.
    pub fn kv_bytes(&self, ctx: usize) -> usize {
        ds4_model::HostKv::estimate_bytes(self.model.shape(), ctx)
    }
}

/// Probes the GPU, checks the memory plan and uploads the weights.
fn cuda_model(
    file: &'static GgufFile,
    shape: &ds4_model::ModelShape,
    options: ForwardOptions,
    load: &LoadOptions,
) -> Result<&'static Model<'static, CudaBackend>, LoadError> {
    let cuda = |e: String| LoadError::Cuda(e);
    let rt = CudaRuntime::probe(load.device).map_err(|e| cuda(format!("no usable GPU: {e}")))?;
    tracing::info!("{}", rt.summary().replace('\n', "; "));
    let mem = ds4_cuda::plan::DeviceMemory {
        free: rt.device.free_mem as u64,
        total: rt.device.total_mem as u64,
    };
    let tensors = ds4_cuda::plan::gguf_tensor_list(file);
    let plan = ds4_cuda::plan::MemoryPlan::new(shape, &tensors, load.ctx, load.chunk, mem);
    for line in plan.to_string().lines() {
        tracing::info!("{line}");
    }
    plan.check().map_err(|e| cuda(e.to_string()))?;
    let backend = CudaBackend::new(Arc::new(rt), shape).map_err(|e| cuda(e.to_string()))?;
    let model = Model::new(backend, shape.clone(), file, options)
        .map_err(|e| LoadError::Weights(e.to_string()))?;
    Ok(Box::leak(Box::new(model)))
}

/// [`TextCodec`] over the real tokenizer: rendered chat text recognises special tokens.
pub struct TokenizerCodec(pub Arc<Tokenizer>);

impl TextCodec for TokenizerCodec {
    fn encode_rendered(&self, text: &str) -> Vec<u32> {
        // Encoding cannot fail on valid UTF-8 with this tokenizer; an error would mean a
        // broken vocabulary, which loading already rejected.
        self.0.encode(text, true).unwrap_or_default()
    }
    fn decode_token(&self, id: u32) -> Vec<u8> {
        self.0.token_bytes(id).to_vec()
    }
    fn name(&self) -> &str {
        "gguf"
    }
}

/// Serves generation requests from one live session.
pub struct ModelGenerator {
    session: AnySession,
    tokenizer: Arc<Tokenizer>,
    sampler: Sampler,
    chunk: usize,
    eos: u32,
    /// Snapshot of the session just before the last token of the previous prompt:
    /// (its token count, the snapshot bytes).
    checkpoint: Option<(usize, Vec<u8>)>,
}

impl ModelGenerator {
    /// A generator with a session of `ctx` tokens, prefilling `chunk` tokens at a time.
    pub fn new(loaded: &LoadedModel, ctx: usize, chunk: usize) -> Result<Self, LoadError> {
        let session = AnySession::new(&loaded.model, ctx.max(1), chunk.max(1))
            .map_err(|e| LoadError::Session(e.to_string()))?;
        Ok(Self {
            session,
            tokenizer: Arc::clone(&loaded.tokenizer),
            sampler: Sampler::new(SamplerConfig::default()),
            chunk: chunk.max(1),
            eos: loaded.tokenizer.eos(),
            checkpoint: None,
        })
    }

    /// Tokens currently held by the live session.
    pub fn session_tokens(&self) -> &[u32] {
        self.session.tokens()
    }

    /// Brings the live session to exactly `prompt`, reusing the longest common prefix.
    /// Returns how many prompt tokens were served without being computed again, or
    /// `None` when the request was cancelled or stopped during prefill.
    fn sync_prompt(
        &mut self,
        prompt: &[u32],
        req: &GenerationRequest,
        emit: &mut dyn FnMut(GenerationEvent) -> Directive,
    ) -> Result<Option<usize>, GenerateError> {
        let err = |e: ds4_model::Error| GenerateError(e.to_string());
        let live = self.session.tokens();
        let live_len = live.len();
        let mut common = live.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // The last prompt token must be fed to produce its logits; keep one back if the
        // session already holds the whole prompt but has no logits for it.
        if common == prompt.len() && (common != live_len || self.session.last_logits().is_empty()) {
            common = common.saturating_sub(1);
        }
        let mut reused = common;
        if common < live_len {
            match self.checkpoint.take() {
                Some((pos, bytes)) if pos <= common => {
                    tracing::debug!(from = live_len, to = pos, "restoring the prompt checkpoint");
                    self.session.restore(&bytes).map_err(err)?;
                    self.checkpoint = Some((pos, bytes));
                    reused = pos;
                }
                stale => {
                    tracing::debug!(
                        from = live_len,
                        to = common,
                        "rewinding live session (recompute)"
                    );
                    self.checkpoint = stale.filter(|(pos, _)| *pos <= common);
                    self.session.rewind(common).map_err(err)?;
                    reused = 0;
                }
            }
        }
        let total = prompt.len() as u32;
        let last = prompt.len() - 1;
        while self.session.n_tokens() < prompt.len() {
            if req.cancel.is_cancelled() {
                return Ok(None);
            }
            let at = self.session.n_tokens();
            // The checkpoint always holds a prefix state of the live session, so one
            // already taken at this position is the same state: don't copy it again.
            if at == last && self.checkpoint.as_ref().map(|(pos, _)| *pos) != Some(at) {
                let snapshot = self.session.snapshot().map_err(err)?;
                self.checkpoint = Some((at, snapshot));
            }
            // Chunks stop just before the last token so the checkpoint can be taken there.
            let end = if at < last {
                (at + self.chunk).min(last)
            } else {
                prompt.len()
            };
            self.session
                .feed(&prompt[at..end], self.chunk, None)
                .map_err(err)?;
            let done = self.session.n_tokens() as u32;
            if done < total && emit(GenerationEvent::Prefill { done, total }) == Directive::Stop {
                return Ok(None);
            }
        }
        Ok(Some(reused))
    }
}

fn sampler_config(p: &SamplingParams) -> SamplerConfig {
    SamplerConfig {
        temperature: p.temperature,
        top_k: i32::try_from(p.top_k).unwrap_or(i32::MAX),
        top_p: p.top_p,
        min_p: p.min_p,
        seed: p.seed.unwrap_or_else(|| time_seed(0)),
    }
}

impl Generator for ModelGenerator {
    fn generate(
        &mut self,
        req: &GenerationRequest,
        emit: &mut dyn FnMut(GenerationEvent) -> Directive,
    ) -> Result<Outcome, GenerateError> {
        let prompt = &req.prompt_tokens;
        if prompt.is_empty() {
            return Err(GenerateError("empty prompt".into()));
        }
        let ctx = self.session.ctx();
        if prompt.len() > ctx {
            return Err(GenerateError(format!(
                "prompt of {} tokens does not fit the context of {ctx} tokens",
                prompt.len()
            )));
        }
        let mut usage = Usage {
            prompt_tokens: prompt.len() as u32,
            ..Usage::default()
        };
        let Some(cached) = self.sync_prompt(prompt, req, emit)? else {
            return Ok(Outcome {
                finish: EngineFinish::Cancelled,
                usage,
            });
        };
        usage.cached_tokens = cached as u32;
        if emit(GenerationEvent::Started {
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: usage.cached_tokens,
        }) == Directive::Stop
        {
            return Ok(Outcome {
                finish: EngineFinish::Stopped,
                usage,
            });
        }
        self.sampler.set_config(sampler_config(&req.sampling));
        let mut greedy_next = false;
        loop {
            if req.cancel.is_cancelled() {
                return Ok(Outcome {
                    finish: EngineFinish::Cancelled,
                    usage,
                });
            }
            if req.max_tokens == 0 {
                return Ok(Outcome {
                    finish: EngineFinish::Length,
                    usage,
                });
            }
            let logits = self.session.last_logits();
            let token = if greedy_next && req.greedy_dsml {
                argmax(logits)
            } else {
                self.sampler.sample(logits)
            };
            if token == self.eos {
                return Ok(Outcome {
                    finish: EngineFinish::Eos,
                    usage,
                });
            }
            usage.completion_tokens += 1;
            let bytes = self.tokenizer.token_bytes(token).to_vec();
            match emit(GenerationEvent::Token { id: token, bytes }) {
                Directive::Stop => {
                    return Ok(Outcome {
                        finish: EngineFinish::Stopped,
                        usage,
                    });
                }
                Directive::ContinueGreedy => greedy_next = true,
                Directive::Continue => greedy_next = false,
            }
            if usage.completion_tokens >= req.max_tokens || self.session.n_tokens() >= ctx {
                return Ok(Outcome {
                    finish: EngineFinish::Length,
                    usage,
                });
            }
            self.session
                .decode(token)
                .map_err(|e| GenerateError(e.to_string()))?;
        }
    }

    fn context_size(&self) -> u32 {
        u32::try_from(self.session.ctx()).unwrap_or(u32::MAX)
    }
}
