//! `ds4 bench --synthetic q2|q4 [--layers N] [--ctx 2048,32768]`: decode-step
//! weight streaming on the GPU with random weights generated on the device.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use ds4_cuda::bench::{BenchOpts, Synthetic};

/// Measure decode speed on the GPU.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Random weights at the real Flash dims and the tensor types of the q2 or q4 file.
    #[arg(long, value_parser = ["q2", "q4"])]
    pub synthetic: Option<String>,
    /// Synthetic layers to build (spread over the real 43-layer schedule).
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Context frontiers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,32768")]
    pub ctx: Vec<usize>,
    /// Timed decode steps (graph replays) per frontier; the median is reported.
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// Also write the CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let quant = match args.synthetic.as_deref() {
        Some("q2") => Synthetic::Q2,
        Some("q4") => Synthetic::Q4,
        _ => bail!(
            "bench: only --synthetic q2|q4 runs for now (the model-file bench needs the GPU forward pass)"
        ),
    };
    if args.ctx.is_empty() {
        bail!("bench: --ctx needs at least one context size");
    }
    let rt = ds4_cuda::CudaRuntime::probe(args.device).context("bench needs a CUDA device")?;
    println!("{}", rt.summary());
    let kernels = ds4_cuda::Kernels::load(&rt)?;
    let opts = BenchOpts {
        quant,
        layers: args.layers,
        ctx: args.ctx.clone(),
        iters: args.iters,
    };
    let report = ds4_cuda::bench::run(&rt, &kernels, &opts, |l| println!("{l}"))?;
    print!("{}", ds4_cuda::bench::render_text(&report, &opts));
    let csv = ds4_cuda::bench::render_csv(&report);
    print!("{csv}");
    if let Some(path) = &args.csv {
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(csv.as_bytes())?;
    }
    Ok(())
}
