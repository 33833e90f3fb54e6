//! `ds4 bench`: prefill and decode tokens/s at context frontiers.
//!
//! `-m FILE` measures a model file on the backend `--backend` picks (the GPU when it
//! fits, else the CPU). `--synthetic q2|q4` runs the whole model on the GPU with random
//! weights at the real Flash dims (no file needed) and also prints the weight bytes per
//! decoded token and the fraction of the measured copy bandwidth. `--streaming` runs the
//! older weight-streaming microbenchmark instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use ds4_cuda::bench::{BenchOpts, Synthetic};
use ds4_cuda::model_bench::{ModelBenchOpts, ModelBenchReport};
use ds4_model::synthetic::ExpertTypes;

use crate::plot::{BenchPoint, bench_csv, bench_svg};

/// Measure prefill and decode speed (a model file, or the synthetic Flash model on the GPU).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model file to measure.
    #[arg(short = 'm', long = "model", conflicts_with = "synthetic")]
    pub model: Option<PathBuf>,
    /// With -m: where the model runs (auto = the GPU when usable and the model fits, else
    /// the CPU; cuda fails with the reason when it cannot).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub backend: String,
    /// Random weights at the real Flash dims and the tensor types of the q2 or q4 file.
    #[arg(long, value_parser = ["q2", "q4"])]
    pub synthetic: Option<String>,
    /// Layers of the Flash schedule (43 = the whole model; layers of one kind share weights).
    #[arg(long, default_value_t = 43)]
    pub layers: usize,
    /// Context frontiers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,32768")]
    pub ctx: Vec<usize>,
    /// Prefill chunk (tokens).
    #[arg(long, default_value_t = 2048)]
    pub chunk: usize,
    /// Timed decode steps per frontier.
    #[arg(long = "gen", default_value_t = 64)]
    pub gen_steps: usize,
    /// Time the decode steps that end at each frontier (the last one sees ctx tokens;
    /// prefill stops that many steps short) instead of the steps just past it.
    #[arg(long)]
    pub decode_before: bool,
    /// Run the indexer even where it is skipped (while no token sees more than top_k
    /// compressed rows; the result is the same): for A/B timing.
    #[arg(long)]
    pub always_index: bool,
    /// Write the CSV (ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kv_bytes) here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write an SVG plot of prefill and decode tokens/s versus context here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Run the weight-streaming microbenchmark (matvecs only, one CUDA graph) instead.
    #[arg(long)]
    pub streaming: bool,
    /// Time only the routed-expert products of a decode step (gate+up, down), with
    /// every kernel variant that takes them (no model file; GPU).
    #[arg(long)]
    pub routed_only: bool,
    /// Timed graph replays per measurement of --streaming (median reported).
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

fn write_file(path: &PathBuf, text: &str) -> anyhow::Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.ctx.is_empty() || args.ctx.contains(&0) {
        bail!("bench: --ctx needs positive context sizes");
    }
    if let Some(path) = &args.model {
        return run_file(&args, path);
    }
    let quant = match args.synthetic.as_deref() {
        Some("q2") => Synthetic::Q2,
        Some("q4") => Synthetic::Q4,
        _ => bail!("bench: pass -m FILE (a model file) or --synthetic q2|q4 (no file, GPU)"),
    };
    let rt = ds4_cuda::CudaRuntime::probe(args.device).context("bench needs a CUDA device")?;
    println!("{}", rt.summary());
    if args.routed_only {
        let kernels = ds4_cuda::Kernels::load(&rt)?;
        ds4_cuda::bench::run_routed(&rt, &kernels, quant, args.iters, |l| println!("{l}"))?;
        return Ok(());
    }
    if args.streaming {
        let kernels = ds4_cuda::Kernels::load(&rt)?;
        let opts = BenchOpts {
            quant,
            layers: args.layers.min(24),
            ctx: args.ctx.clone(),
            iters: args.iters,
        };
        let report = ds4_cuda::bench::run(&rt, &kernels, &opts, |l| println!("{l}"))?;
        print!("{}", ds4_cuda::bench::render_text(&report, &opts));
        let csv = ds4_cuda::bench::render_csv(&report);
        print!("{csv}");
        if let Some(path) = &args.csv {
            write_file(path, &csv)?;
        }
        return Ok(());
    }
    let experts = match quant {
        Synthetic::Q2 => ExpertTypes::Q2,
        Synthetic::Q4 => ExpertTypes::Q4,
    };
    let opts = ModelBenchOpts {
        experts,
        layers: args.layers,
        ctx: args.ctx.clone(),
        chunk: args.chunk,
        gen_steps: args.gen_steps,
        seed: 20261126,
        decode_before: args.decode_before,
        always_index: args.always_index,
    };
    let report = ds4_cuda::model_bench::run(Arc::new(rt), &opts, |l| println!("{l}"))?;
    let points = points_of(&report);
    let csv = bench_csv(&points);
    println!(
        "# {} — synthetic {} ({} layers), {:.2} GB of weights per decoded token, copy {:.0} GB/s",
        report.device,
        quant.name(),
        report.layers,
        report.step_bytes as f64 / 1e9,
        report.copy_gbps
    );
    print!("{csv}");
    if let Some(path) = &args.csv {
        write_file(path, &csv)?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "ds4 synthetic {} ({} layers) on {}",
            quant.name(),
            report.layers,
            report.device
        );
        write_file(path, &bench_svg(&title, &points))?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

/// Prefill up to each frontier (the last chunk timed on its own), then two untimed and
/// `--gen` timed greedy decode steps. Token ids are a fixed pseudo-random stream: the
/// speed does not depend on the text.
fn run_file(args: &Args, path: &Path) -> anyhow::Result<()> {
    if args.chunk == 0 {
        bail!("bench: --chunk must be at least 1");
    }
    if args.gen_steps == 0 {
        bail!("bench: --gen must be at least 1");
    }
    let mut ctxs = args.ctx.clone();
    ctxs.sort_unstable();
    ctxs.dedup();
    let warm = 2;
    // Each frontier continues the previous session, after its decode steps.
    let mut cap = 0usize;
    let mut prev_ctx = 0usize;
    for &c in &ctxs {
        if c <= cap {
            bail!(
                "bench: context frontiers must be more than --gen + {warm} tokens apart ({c} follows {prev_ctx})"
            );
        }
        prev_ctx = c;
        cap = c + args.gen_steps + warm;
    }
    let load = ds4_engine::live::LoadOptions {
        backend: crate::cmd::backend_pref(&args.backend),
        device: args.device,
        ctx: cap,
        chunk: args.chunk,
    };
    let t0 = Instant::now();
    let loaded =
        ds4_engine::live::LoadedModel::load_with(path, ds4_model::ForwardOptions::default(), &load)
            .with_context(|| format!("loading {}", path.display()))?;
    let backend = loaded.model.backend_name();
    println!(
        "ds4 bench: {} ({} layers, {:.1} MiB) on the {backend} backend, loaded in {:.2} s; session of {cap} tokens, chunk {}",
        path.display(),
        loaded.config.n_layer,
        loaded.file_bytes as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64(),
        args.chunk,
    );
    let vocab = loaded.model.shape().vocab as u64;
    let mut session = loaded.new_session(cap, args.chunk)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_token = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab) as u32
    };
    let argmax = |logits: &[f32]| -> u32 {
        let mut best = 0usize;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    let mut points = Vec::new();
    for &ctx in &ctxs {
        let start = session.n_tokens();
        let tokens: Vec<u32> = (start..ctx).map(|_| next_token()).collect();
        let last = tokens.len().min(args.chunk);
        let (head, tail) = tokens.split_at(tokens.len() - last);
        let t_seg = Instant::now();
        session.feed(head, args.chunk, None)?;
        let t_last = Instant::now();
        session.feed(tail, args.chunk, None)?;
        let prefill_s = t_last.elapsed().as_secs_f64();
        let segment_s = t_seg.elapsed().as_secs_f64();
        let mut tok = argmax(session.last_logits());
        for _ in 0..warm {
            tok = argmax(session.decode(tok)?);
        }
        let t_gen = Instant::now();
        for _ in 0..args.gen_steps {
            tok = argmax(session.decode(tok)?);
        }
        let gen_s = t_gen.elapsed().as_secs_f64();
        let point = BenchPoint {
            ctx_tokens: ctx,
            prefill_tokens: last,
            prefill_tps: last as f64 / prefill_s.max(1e-9),
            gen_tokens: args.gen_steps,
            gen_tps: args.gen_steps as f64 / gen_s.max(1e-9),
            kv_bytes: session.kv_bytes() as u64,
        };
        println!(
            "ctx {ctx}: prefill {:.0} tok/s (last chunk of {last}), {:.0} tok/s over {} tokens; decode {:.1} tok/s = {:.2} ms/token",
            point.prefill_tps,
            tokens.len() as f64 / segment_s.max(1e-9),
            tokens.len(),
            point.gen_tps,
            1e3 / point.gen_tps,
        );
        points.push(point);
    }
    let csv = bench_csv(&points);
    println!("# {} on the {backend} backend", path.display());
    print!("{csv}");
    if let Some(out) = &args.csv {
        write_file(out, &csv)?;
    }
    if let Some(out) = &args.plot {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        write_file(out, &bench_svg(&format!("ds4 {name} ({backend})"), &points))?;
        println!("plot written to {}", out.display());
    }
    Ok(())
}

fn points_of(r: &ModelBenchReport) -> Vec<BenchPoint> {
    r.rows
        .iter()
        .map(|row| BenchPoint {
            ctx_tokens: row.ctx_tokens,
            prefill_tokens: row.prefill_tokens,
            prefill_tps: row.prefill_tps,
            gen_tokens: row.gen_tokens,
            gen_tps: row.gen_tps,
            kv_bytes: row.kv_bytes,
        })
        .collect()
}
