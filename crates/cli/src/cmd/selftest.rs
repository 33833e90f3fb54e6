//! `ds4 selftest [--cuda]`: GPU-vs-CPU parity of every CUDA kernel on random
//! data at full Flash dims, with named tolerances; exits non-zero on failure.

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
    let results = ds4_cuda::selftest::run_kernel_checks(&kernels, |r| println!("{r}"))?;
    let failed = results.iter().filter(|r| !r.pass).count();
    println!(
        "selftest: {} checks, {} passed, {} failed (max_rel = max|gpu-cpu| / max|cpu|; act checks count mismatching elements)",
        results.len(),
        results.len() - failed,
        failed
    );
    if failed > 0 {
        bail!("selftest: {failed} kernel checks failed");
    }
    Ok(())
}
