//! `ds4 plan -m FILE.gguf | --synthetic q2|q4 [--layers N] --ctx N [--chunk N]
//! [--free-gib X [--total-gib Y]] [--device N]`: what the GPU would hold for this model and
//! context, and whether it fits — without loading anything.
//!
//! Free memory comes from `--free-gib` when given (plan for another card), else from the
//! GPU. Exit status 1 when the plan does not fit (the numbers and what to do on stderr).

use std::path::PathBuf;

use anyhow::{Context, bail};
use ds4_cuda::plan::{DeviceMemory, MemoryPlan, TensorEntry, flash_tensor_list, gguf_tensor_list};
use ds4_gguf::GgufFile;
use ds4_model::config::Config;
use ds4_model::shape::ModelShape;
use ds4_model::synthetic::{ExpertTypes, flash_prefix};

/// Plan GPU memory for a model and context.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "synthetic"])))]
pub struct Args {
    /// The GGUF model file (only the header is read).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Plan the published Flash q2 or q4 file without having it.
    #[arg(long, value_parser = ["q2", "q4"])]
    pub synthetic: Option<String>,
    /// Layers of the synthetic model (the first N of the 43).
    #[arg(long, default_value_t = 43, requires = "synthetic")]
    pub layers: usize,
    /// Context size in tokens.
    #[arg(long, default_value_t = 32768)]
    pub ctx: usize,
    /// Prefill chunk in tokens.
    #[arg(long, default_value_t = 2048)]
    pub chunk: usize,
    /// Free GPU memory to plan against, in GiB (default: measured on the GPU).
    #[arg(long)]
    pub free_gib: Option<f64>,
    /// Total GPU memory in GiB, for the safety margin (default: --free-gib).
    #[arg(long, requires = "free_gib")]
    pub total_gib: Option<f64>,
    /// CUDA device ordinal to measure.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (what, shape, tensors) = model(&args)?;
    let (device_text, memory) = device_memory(&args)?;
    println!("model:  {what}");
    println!("device: {device_text}");
    let plan = MemoryPlan::new(&shape, &tensors, args.ctx, args.chunk, memory);
    print!("{plan}");
    if let Err(e) = plan.check() {
        eprintln!("ds4 plan: {e}");
        std::process::exit(1);
    }
    if let Some(max) = plan.max_ctx_that_fits() {
        println!("largest context that fits: {max} tokens");
    }
    Ok(())
}

fn model(args: &Args) -> anyhow::Result<(String, ModelShape, Vec<TensorEntry>)> {
    if let Some(path) = &args.model {
        let file =
            GgufFile::open(path).with_context(|| format!("plan: reading {}", path.display()))?;
        let cfg = Config::from_gguf(&file)
            .with_context(|| format!("plan: {} is not a usable deepseek4 file", path.display()))?;
        let tensors = gguf_tensor_list(&file);
        let what = format!(
            "{} ({} layers, {} tensors)",
            path.display(),
            cfg.n_layer,
            tensors.len()
        );
        return Ok((what, cfg.shape(), tensors));
    }
    let experts = match args.synthetic.as_deref() {
        Some("q2") => ExpertTypes::Q2,
        Some("q4") => ExpertTypes::Q4,
        other => bail!("plan: --synthetic must be q2 or q4, got {other:?}"),
    };
    if args.layers == 0 || args.layers > 43 {
        bail!("plan: --layers must be 1..=43, got {}", args.layers);
    }
    let cfg = flash_prefix(args.layers);
    let what = format!(
        "synthetic Flash {} ({} of 43 layers, published tensor types)",
        args.synthetic.as_deref().unwrap_or_default(),
        cfg.n_layer
    );
    Ok((what, cfg.shape(), flash_tensor_list(experts, args.layers)))
}

fn device_memory(args: &Args) -> anyhow::Result<(String, DeviceMemory)> {
    if let Some(free) = args.free_gib {
        let total = args.total_gib.unwrap_or(free);
        if !(free.is_finite() && free > 0.0 && total.is_finite() && total >= free) {
            bail!(
                "plan: --free-gib must be > 0 and --total-gib >= --free-gib (got {free}, {total})"
            );
        }
        let text = format!("--free-gib {free} (total {total} GiB)");
        return Ok((text, DeviceMemory::gib(free, total)));
    }
    match ds4_cuda::CudaRuntime::probe(args.device) {
        Ok(rt) => {
            let d = &rt.device;
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            let text = format!(
                "{} (device {}): {:.1} GiB free of {:.1} GiB",
                d.name,
                d.ordinal,
                gib(d.free_mem),
                gib(d.total_mem)
            );
            let memory = DeviceMemory {
                free: d.free_mem as u64,
                total: d.total_mem as u64,
            };
            Ok((text, memory))
        }
        Err(e) => bail!(
            "plan: cannot measure GPU memory ({e}); pass --free-gib X to plan for a card with X GiB free"
        ),
    }
}
