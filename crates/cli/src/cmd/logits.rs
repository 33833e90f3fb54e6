//! `ds4 logits`: logits of every position of a token sequence, as little-endian f32
//! [n_tokens × vocab] (for oracle comparisons and debugging).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use ds4_cpu::CpuBackend;
use ds4_model::{ForwardOptions, Model, Session};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model file.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// Prefill chunk size (default: the whole sequence at once).
    #[arg(long, conflicts_with = "decode")]
    pub chunk: Option<usize>,
    /// Feed the tokens one at a time (same as --chunk 1).
    #[arg(long)]
    pub decode: bool,
    /// The official FP8 KV / FP4 indexer rounding (transformers has none).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub official_rounding: String,
    /// Output file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let n = args.tokens.len();
    if n == 0 {
        bail!("--tokens is empty");
    }
    let chunk = if args.decode {
        1
    } else {
        args.chunk.unwrap_or(n).max(1)
    };
    let file = ds4_gguf::GgufFile::open(&args.model)
        .with_context(|| format!("opening {}", args.model.display()))?;
    let config = ds4_model::config::Config::from_gguf(&file).context("reading model metadata")?;
    let shape = config.shape();
    let opts = ForwardOptions {
        official_rounding: args.official_rounding == "on",
        ..Default::default()
    };
    let vocab = shape.vocab;
    let model =
        Model::new(CpuBackend::new(&shape), shape, &file, opts).context("binding weights")?;
    let mut session = Session::new(&model, n, chunk)?;
    tracing::info!(kv_bytes = session.kv_bytes(), "KV state for {n} tokens");
    let mut logits = Vec::with_capacity(n * vocab);
    let t0 = Instant::now();
    session.feed(&args.tokens, chunk, Some(&mut logits))?;
    let dt = t0.elapsed().as_secs_f64();
    tracing::info!(
        "{n} tokens in {dt:.3} s ({:.1} tokens/s, chunk {chunk})",
        n as f64 / dt
    );
    let mut bytes = Vec::with_capacity(logits.len() * 4);
    for v in &logits {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut f = std::fs::File::create(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    f.write_all(&bytes)?;
    Ok(())
}
