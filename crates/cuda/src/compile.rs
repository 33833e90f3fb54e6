//! NVRTC compilation of the embedded kernel sources, cached on disk as cubins.
//!
//! The cache key is a 64-bit FNV-1a hash of the source, the options, the arch
//! and the NVRTC version, so any change recompiles. Cache directory:
//! `$DS4_CUBIN_CACHE`, else `$XDG_CACHE_HOME/ds4/cubin`, else `~/.cache/ds4/cubin`.

use std::ffi::{CString, c_char};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{Ptx, result as nvrtc, sys as nvrtc_sys};

use crate::{Error, Result};

/// A kernel source file embedded in the binary.
pub struct KernelSource {
    pub name: &'static str,
    pub src: &'static str,
}

/// Every kernel file (the CI NVRTC check compiles the same files).
pub const MATVEC: KernelSource = KernelSource {
    name: "matvec.cu",
    src: include_str!("../kernels/matvec.cu"),
};

/// Tensor-core prefill GEMMs (`crate::gemm`).
pub const GEMM: KernelSource = KernelSource {
    name: "gemm.cu",
    src: include_str!("../kernels/gemm.cu"),
};

/// The forward-pass operations other than the weight matvecs.
pub const OPS: KernelSource = KernelSource {
    name: "ops.cu",
    src: include_str!("../kernels/ops.cu"),
};

/// Tensor-core attention with sinks (`crate::attention`).
pub const ATTENTION: KernelSource = KernelSource {
    name: "attention.cu",
    src: include_str!("../kernels/attention.cu"),
};

/// Headers every kernel file may `#include "…"` (handed to NVRTC by name; the CI
/// check does the same from `kernels/*.cuh`).
pub const HEADERS: &[(&str, &str)] = &[
    (
        "iq2xxs_grid.cuh",
        include_str!("../kernels/iq2xxs_grid.cuh"),
    ),
    ("swiglu.cuh", include_str!("../kernels/swiglu.cuh")),
    ("pdl.cuh", include_str!("../kernels/pdl.cuh")),
    ("act_quad.cuh", include_str!("../kernels/act_quad.cuh")),
    ("att_merge.cuh", include_str!("../kernels/att_merge.cuh")),
    ("f16_dot.cuh", include_str!("../kernels/f16_dot.cuh")),
    ("route.cuh", include_str!("../kernels/route.cuh")),
    ("hc_split.cuh", include_str!("../kernels/hc_split.cuh")),
];

/// The compute capability of `stream`'s device and the loaded NVRTC's version: what
/// [`load_module`] needs when there is a stream but no [`crate::CudaRuntime`].
pub fn target_of(stream: &Arc<CudaStream>) -> Result<((i32, i32), (i32, i32))> {
    let sm = stream.context().compute_capability()?;
    let (mut maj, mut min) = (0i32, 0i32);
    // SAFETY: out-parameters; NVRTC is loaded (a runtime was probed to get a stream).
    unsafe { nvrtc_sys::nvrtcVersion(&mut maj, &mut min) }.result()?;
    Ok((sm, (maj, min)))
}

/// NVRTC target for a compute capability: Hopper gets the arch-specific sm_90a.
pub fn arch_for(sm: (i32, i32)) -> String {
    if sm.0 == 9 && sm.1 == 0 {
        "sm_90a".to_string()
    } else {
        format!("sm_{}{}", sm.0, sm.1)
    }
}

/// Options passed to NVRTC (mirrored by scripts/ci/nvrtc_check.py).
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
        "-lineinfo".to_string(),
    ];
    let cuda_home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".to_string());
    let inc = Path::new(&cuda_home).join("include");
    if inc.is_dir() {
        opts.push(format!("-I{}", inc.display()));
    }
    if crate::launch::trace::on() {
        opts.push("-DDS4_TRACE".to_string());
    }
    opts
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("DS4_CUBIN_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("ds4").join("cubin"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache").join("ds4").join("cubin"))
}

/// Compiles `src` for `arch` with NVRTC and returns the cubin.
pub fn compile_cubin(src: &KernelSource, arch: &str) -> Result<Vec<u8>> {
    let code = CString::new(src.src).map_err(|_| Error::Compile {
        file: src.name.to_string(),
        arch: arch.to_string(),
        log: "source contains a NUL byte".to_string(),
    })?;
    let name = CString::new(src.name).map_err(|_| Error::Compile {
        file: src.name.to_string(),
        arch: arch.to_string(),
        log: "bad file name".to_string(),
    })?;
    let cstr = |s: &str| {
        CString::new(s).map_err(|_| Error::Compile {
            file: src.name.to_string(),
            arch: arch.to_string(),
            log: "header contains a NUL byte".to_string(),
        })
    };
    let header_src = HEADERS
        .iter()
        .map(|(_, text)| cstr(text))
        .collect::<Result<Vec<_>>>()?;
    let header_name = HEADERS
        .iter()
        .map(|(n, _)| cstr(n))
        .collect::<Result<Vec<_>>>()?;
    let src_ptrs: Vec<*const c_char> = header_src.iter().map(|c| c.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_name.iter().map(|c| c.as_ptr()).collect();
    let mut prog = std::ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated string alive until this call
    // returns; NVRTC copies them.
    unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            &mut prog,
            code.as_ptr(),
            name.as_ptr(),
            HEADERS.len() as i32,
            src_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    }
    .result()?;
    let opts = nvrtc_options(arch);
    // SAFETY: `prog` is a live program until destroy_program below.
    unsafe {
        let compiled = nvrtc::compile_program(prog, &opts);
        let result = match compiled {
            Ok(()) => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
                let mut buf = vec![0u8; size];
                nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char).result()?;
                Ok(buf)
            }
            Err(_) => {
                let log = nvrtc::get_program_log(prog).unwrap_or_default();
                let bytes: Vec<u8> = log
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&b| b != 0)
                    .collect();
                Err(Error::Compile {
                    file: src.name.to_string(),
                    arch: arch.to_string(),
                    log: String::from_utf8_lossy(&bytes).into_owned(),
                })
            }
        };
        nvrtc::destroy_program(prog)?;
        result
    }
}

/// Kernel `name` of `m`, allowed `bytes` of dynamic shared memory (beyond the default
/// 48 KB a launch may not ask for more than the function was given).
pub fn load_with_smem(m: &Arc<CudaModule>, name: &str, bytes: usize) -> Result<CudaFunction> {
    let f = m.load_function(name)?;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )?;
    Ok(f)
}

/// Loads `src` as a module: from the cubin cache when present, else compiled
/// by NVRTC and written to the cache (a failed cache write is only logged).
pub fn load_module(
    ctx: &Arc<CudaContext>,
    src: &KernelSource,
    arch: &str,
    nvrtc_version: (i32, i32),
) -> Result<Arc<CudaModule>> {
    let opts = nvrtc_options(arch).join(" ");
    let ver = format!("{}.{}", nvrtc_version.0, nvrtc_version.1);
    // The headers are part of every program, so they are part of the key.
    let mut parts: Vec<&[u8]> = vec![
        src.src.as_bytes(),
        opts.as_bytes(),
        arch.as_bytes(),
        ver.as_bytes(),
    ];
    for (name, text) in HEADERS {
        parts.push(name.as_bytes());
        parts.push(text.as_bytes());
    }
    let key = fnv1a(&parts);
    let file = format!(
        "{}-{arch}-{key:016x}.cubin",
        src.name.trim_end_matches(".cu")
    );
    let cached = cache_dir().map(|d| d.join(&file));
    if let Some(path) = &cached
        && let Ok(bytes) = std::fs::read(path)
    {
        match ctx.load_module(Ptx::from_binary(bytes)) {
            Ok(m) => {
                tracing::debug!(path = %path.display(), "kernel cubin from cache");
                crate::launch::trace::attach(ctx, &m)?;
                return Ok(m);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached cubin rejected; recompiling")
            }
        }
    }
    let t0 = std::time::Instant::now();
    let cubin = compile_cubin(src, arch)?;
    tracing::info!(
        file = src.name,
        arch,
        ms = t0.elapsed().as_millis() as u64,
        bytes = cubin.len(),
        "NVRTC compiled kernels"
    );
    if let Some(path) = &cached
        && let Err(e) = write_atomic(path, &cubin)
    {
        tracing::warn!(error = %e, "could not write the kernel cache");
    }
    let m = ctx.load_module(Ptx::from_binary(cubin))?;
    crate::launch::trace::attach(ctx, &m)?;
    Ok(m)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |source| Error::Cache {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hopper_gets_the_arch_specific_target() {
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((8, 9)), "sm_89");
        assert_eq!(arch_for((12, 0)), "sm_120");
    }

    #[test]
    fn cache_key_changes_with_any_input() {
        let a = fnv1a(&[b"src", b"-O3"]);
        assert_ne!(a, fnv1a(&[b"src", b"-O2"]));
        assert_ne!(a, fnv1a(&[b"srcx", b"-O3"]));
        // Part boundaries matter: ("ab","c") is not ("a","bc").
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn options_name_the_arch() {
        assert!(
            nvrtc_options("sm_90a")
                .iter()
                .any(|o| o == "--gpu-architecture=sm_90a")
        );
    }
}
