//! `ds4 serve`: the OpenAI- and Anthropic-compatible HTTP server.
//!
//! `--scripted FILE` serves pre-written completions (see `ds4_engine::scripted`) through
//! the full server path, for client integration testing without a model.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use ds4_engine::live::{LoadedModel, ModelGenerator, TokenizerCodec};
use ds4_engine::request::TextCodec;
use ds4_engine::scripted::{ByteCodec, Script, ScriptedGenerator};
use ds4_engine::worker::WorkerHandle;
use ds4_server::{AppState, ServerConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model GGUF file.
    #[arg(short = 'm', long = "model")]
    pub model: Option<PathBuf>,
    /// Address to bind (loopback unless told otherwise; `localhost` = 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0 = any free port; the bound address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Context size in tokens (default 32768 with a model; the KV state is allocated up front).
    #[arg(long)]
    pub ctx: Option<u32>,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
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
    /// Require this key as `Authorization: Bearer KEY` or `x-api-key: KEY`
    /// (default: the DS4_API_KEY environment variable, if set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Send permissive CORS headers and answer preflight requests.
    #[arg(long)]
    pub cors: bool,
    /// Serve scripted completions from this JSON file instead of a model.
    #[arg(long, value_name = "FILE")]
    pub scripted: Option<PathBuf>,
    /// Accept any model name (treated as deepseek-v4-flash) instead of answering 404.
    #[arg(long)]
    pub any_model: bool,
    /// Default generation limit when a request gives none.
    #[arg(long, default_value_t = 393_216)]
    pub max_tokens: u32,
    /// Largest accepted request body, in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_body_mib: usize,
}

/// Context when `--ctx` is not given.
const DEFAULT_CTX: usize = 32_768;

fn bind_ip(host: &str) -> anyhow::Result<IpAddr> {
    if host == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    host.parse()
        .with_context(|| format!("--host must be an IP address, got '{host}'"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (generator, codec): (Box<dyn ds4_engine::worker::Generator>, Arc<dyn TextCodec>) =
        match (&args.scripted, &args.model) {
            (Some(path), _) => {
                let mut script = Script::from_file(path)?;
                if let Some(ctx) = args.ctx {
                    script.context = ctx.max(2);
                }
                let codec: Arc<dyn TextCodec> = Arc::new(ByteCodec);
                (
                    Box::new(ScriptedGenerator::new(script, Arc::clone(&codec))),
                    codec,
                )
            }
            (None, Some(model)) => {
                let options = ds4_model::ForwardOptions {
                    official_rounding: args.official_rounding == "on",
                    ..Default::default()
                };
                let ctx = args.ctx.map_or(DEFAULT_CTX, |c| c.max(2) as usize);
                let load = ds4_engine::live::LoadOptions {
                    backend: crate::cmd::backend_pref(&args.backend),
                    device: args.device,
                    ctx,
                    chunk: args.chunk,
                };
                let loaded = LoadedModel::load_with(model, options, &load)
                    .with_context(|| format!("loading {}", model.display()))?;
                tracing::info!(
                    model = %model.display(),
                    layers = loaded.config.n_layer,
                    ctx,
                    kv_mib = loaded.kv_bytes(ctx) as f64 / f64::from(1 << 20),
                    backend = loaded.model.backend_name(),
                    "model loaded"
                );
                let generator = ModelGenerator::new(&loaded, ctx, args.chunk)?;
                let codec: Arc<dyn TextCodec> =
                    Arc::new(TokenizerCodec(Arc::clone(&loaded.tokenizer)));
                (Box::new(generator), codec)
            }
            (None, None) => {
                bail!("give a model with -m FILE (or --scripted FILE for client testing)")
            }
        };
    let worker = WorkerHandle::spawn(generator)?;
    let config = ServerConfig {
        api_key: args
            .api_key
            .clone()
            .or_else(|| std::env::var("DS4_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        cors: args.cors,
        max_body_bytes: args.max_body_mib << 20,
        default_max_tokens: args.max_tokens,
        accept_any_model: args.any_model,
        keepalive: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let state = AppState::new(worker, codec, config);
    let addr = SocketAddr::new(bind_ip(&args.host)?, args.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind {addr}"))?;
        let local = listener.local_addr()?;
        println!("ds4 serve: listening on http://{local}");
        tracing::info!(%local, context = state.worker.context_size(), "serving");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        ds4_server::serve(listener, state, shutdown)
            .await
            .context("server failed")
    })
}
