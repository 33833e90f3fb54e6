//! CUDA backend of ds4 (cudarc, dynamically loaded: builds and runs without CUDA;
//! [`CudaRuntime::probe`] says why the GPU can't be used so the caller can fall
//! back to the CPU).
//!
//! * [`backend`]: [`CudaBackend`], the model's `Backend` on the GPU (every operation
//!   of the forward pass; decode steps recorded once as CUDA graphs and replayed).
//! * [`runtime`]: driver / device / NVRTC / cuBLAS detection and versions.
//! * [`compile`]: NVRTC compilation of `kernels/*.cu` for the device's arch, with
//!   an on-disk cubin cache.
//! * [`kernels`]: device buffers, activation quantisation and the quantized
//!   matrix-vector products (dense, batched, grouped, routed experts).
//! * [`attention`]: tensor-core attention with sinks (chunks and split-key decode).
//! * [`gemm`]: tensor-core matrix products for prefill chunks (dense and routed
//!   experts grouped by expert).
//! * [`selftest`]: GPU-vs-CPU checks of every kernel at full Flash dims.
//! * [`model_bench`]: `ds4 bench --synthetic`: the whole model with random weights.
//! * [`bench`]: the weight-streaming microbenchmark (`ds4 bench --streaming`).
//! * [`plan`]: the GPU memory planner (what goes where, does it fit).
//! * [`layout`]: weights rearranged at upload for the kernels (Q8_0, IQ2_XXS, Q2_K: per
//!   row, the codes of every block, then the scales).

pub mod attention;
pub mod attn_checks;
pub mod backend;
pub mod bench;
pub mod compile;
pub mod f16_checks;
pub mod fused_checks;
pub mod gemm;
pub mod kernels;
pub mod launch;
pub mod layout;
pub mod model_bench;
pub mod plan;
pub mod runtime;
pub mod selftest;
pub mod topk_checks;

pub use backend::{CudaBackend, CudaKv};
pub use kernels::{ActBuf, DevBuf, Kernels, Matvec};
pub use runtime::{CudaRuntime, DeviceInfo};

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CUDA driver found (libcuda could not be loaded)")]
    NoDriver,
    #[error("no CUDA device found (the driver reports {0} devices)")]
    NoDevice(i32),
    #[error("NVRTC not found (libnvrtc could not be loaded); install the CUDA 13 runtime compiler")]
    NoNvrtc,
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("NVRTC error: {0}")]
    Nvrtc(#[from] cudarc::nvrtc::result::NvrtcError),
    #[error("NVRTC failed to compile {file} for {arch}:\n{log}")]
    Compile {
        file: String,
        arch: String,
        log: String,
    },
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: String,
        source: std::io::Error,
    },
    #[error("unsupported shape for {what}: {detail}")]
    Shape { what: &'static str, detail: String },
    #[error("{0} is not supported by the CUDA matvec kernels")]
    Unsupported(ds4_gguf::GgmlType),
    #[error(transparent)]
    Quant(#[from] ds4_quant::Error),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Model(#[from] ds4_model::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
