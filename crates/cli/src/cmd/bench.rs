//! `ds4 bench --synthetic q2|q4`: the whole model on the GPU with random weights at the
//! real Flash dims (no file needed): prefill and decode tokens/s at context frontiers,
//! weight bytes per decoded token and the fraction of the measured copy bandwidth.
//! `--streaming` runs the older weight-streaming microbenchmark instead.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use ds4_cuda::bench::{BenchOpts, Synthetic};
use ds4_cuda::model_bench::{ModelBenchOpts, ModelBenchReport};
use ds4_model::synthetic::ExpertTypes;

use crate::plot::{BenchPoint, bench_csv, bench_svg};

/// Measure prefill and decode speed on the GPU.
#[derive(clap::Args, Debug)]
pub struct Args {
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
    /// Write the CSV (ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kv_bytes) here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write an SVG plot of prefill and decode tokens/s versus context here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Run the weight-streaming microbenchmark (matvecs only, one CUDA graph) instead.
    #[arg(long)]
    pub streaming: bool,
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
    let quant = match args.synthetic.as_deref() {
        Some("q2") => Synthetic::Q2,
        Some("q4") => Synthetic::Q4,
        _ => bail!(
            "bench: pass --synthetic q2|q4 (benchmarking a model file is not implemented yet)"
        ),
    };
    if args.ctx.is_empty() || args.ctx.contains(&0) {
        bail!("bench: --ctx needs positive context sizes");
    }
    let rt = ds4_cuda::CudaRuntime::probe(args.device).context("bench needs a CUDA device")?;
    println!("{}", rt.summary());
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
