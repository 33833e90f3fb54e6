//! Stand-alone driver of the CUDA checks and bench (same code as `ds4 selftest
//! --cuda` / `ds4 bench --synthetic`), for GPU machines when the full `ds4`
//! binary can't be built.
//!   cuda_tool selftest
//!   cuda_tool bench q2|q4 LAYERS CTX[,CTX...] ITERS [CSV_PATH]
//!   cuda_tool bench-gemm [ITERS]   (prefill GEMMs, `bench::bench_gemm`)

use ds4_cuda::bench::{BenchOpts, Synthetic};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = ds4_cuda::CudaRuntime::probe(0)?;
    println!("{}", rt.summary());
    let t0 = std::time::Instant::now();
    let kernels = ds4_cuda::Kernels::load(&rt)?;
    println!("kernels ready in {:.2} s", t0.elapsed().as_secs_f64());
    match args.first().map(String::as_str) {
        Some("selftest") => {
            let results = ds4_cuda::selftest::run_kernel_checks(&kernels, |r| println!("{r}"))?;
            let failed = results.iter().filter(|r| !r.pass).count();
            println!("selftest: {} checks, {} failed", results.len(), failed);
            if failed > 0 {
                std::process::exit(1);
            }
        }
        Some("bench") => {
            let quant = match args.get(1).map(String::as_str) {
                Some("q4") => Synthetic::Q4,
                _ => Synthetic::Q2,
            };
            let layers = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
            let ctx = args
                .get(3)
                .map(|s| s.split(',').filter_map(|c| c.parse().ok()).collect())
                .unwrap_or_else(|| vec![2048]);
            let iters = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(50);
            let opts = BenchOpts {
                quant,
                layers,
                ctx,
                iters,
            };
            let report = ds4_cuda::bench::run(&rt, &kernels, &opts, |l| println!("{l}"))?;
            print!("{}", ds4_cuda::bench::render_text(&report, &opts));
            let csv = ds4_cuda::bench::render_csv(&report);
            print!("{csv}");
            if let Some(p) = args.get(5) {
                std::fs::write(p, &csv)?;
            }
        }
        Some("bench-gemm") => {
            let iters = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
            ds4_cuda::bench::bench_gemm(&rt, &kernels, iters, |l| println!("{l}"))?;
        }
        _ => {
            return Err(
                "usage: cuda_tool selftest | bench q2|q4 LAYERS CTX ITERS [CSV] | bench-gemm [ITERS]"
                    .into(),
            );
        }
    }
    Ok(())
}
