//! `ds4 selftest [--cuda]`: GPU-vs-CPU parity of every CUDA kernel on random
//! data at full Flash dims, then of the whole model on the tiny fixtures (logits of
//! every position for prefill, chunked prefill and decode, float and quantized
//! checkpoints), with named tolerances; exits non-zero on failure.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;

/// Check the CUDA kernels against the CPU reference.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Require the GPU checks (fail when no usable CUDA device is found).
    #[arg(long)]
    pub cuda: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// The repository's fixtures folder (tiny checkpoints for model parity).
    #[arg(long, default_value = "fixtures")]
    pub fixtures: PathBuf,
    /// Only the per-kernel checks.
    #[arg(long)]
    pub kernels_only: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = match ds4_cuda::CudaRuntime::probe(args.device) {
        Ok(rt) => rt,
        Err(e) if !args.cuda => {
            println!(
                "selftest: no usable CUDA device ({e}); GPU checks skipped (pass --cuda to require them)"
            );
            return Ok(());
        }
        Err(e) => bail!("selftest --cuda: {e}"),
    };
    println!("{}", rt.summary());
    let t0 = std::time::Instant::now();
    let kernels = ds4_cuda::Kernels::load(&rt)?;
    println!(
        "kernels ready in {:.2} s (NVRTC or cubin cache)",
        t0.elapsed().as_secs_f64()
    );
    let mut results = ds4_cuda::selftest::run_kernel_checks(&kernels, |r| println!("{r}"))?;
    let rt = Arc::new(rt);
    results.extend(ds4_cuda::fused_checks::run_fused_checks(&rt, |r| {
        println!("{r}")
    })?);
    let failed = results.iter().filter(|r| !r.pass).count();
    println!(
        "selftest: {} checks, {} passed, {} failed (max_rel = max|gpu-cpu| / max|cpu|; act checks count mismatching elements)",
        results.len(),
        results.len() - failed,
        failed
    );
    if args.kernels_only {
        if failed > 0 {
            bail!("selftest: {failed} kernel checks failed");
        }
        return Ok(());
    }
    let mut model_failed = 0;
    if args.fixtures.join("tiny-model").is_dir() {
        println!(
            "model parity: GPU vs CPU logits on {} (bound: {:.0e} for float checkpoints without \
             the official rounding; otherwise max({:.0e}, {} x the CPU's own change under a 1e-6 \
             perturbation); per-op checks {:.0e})",
            args.fixtures.join("tiny-model").display(),
            crate::parity::TOL_FLOAT,
            crate::parity::TOL_QUANT,
            crate::parity::SENSITIVITY_FACTOR,
            crate::parity::TOL_OP
        );
        let mut res = crate::parity::op_checks(&rt, &args.fixtures, |r| println!("{r}"))?;
        res.extend(crate::parity::run(&rt, &args.fixtures, |r| {
            println!("{r}")
        })?);
        res.extend(crate::parity::wide_heads(&rt, |r| println!("{r}"))?);
        model_failed = res.iter().filter(|r| !r.pass).count();
        println!(
            "model parity: {} comparisons, {} passed, {} failed",
            res.len(),
            res.len() - model_failed,
            model_failed
        );
    } else {
        println!(
            "model parity skipped: {} not found (run from the repository root or pass --fixtures)",
            args.fixtures.join("tiny-model").display()
        );
    }
    if failed > 0 || model_failed > 0 {
        bail!("selftest: {failed} kernel checks and {model_failed} model comparisons failed");
    }
    Ok(())
}
