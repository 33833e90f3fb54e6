//! Kernel launches with programmatic dependent launch (PDL, Hopper and newer).
//!
//! A decode step is ~1,800 small kernels in a row; with PDL a kernel is launched while
//! its predecessor still runs, its blocks are placed and wait in `griddepcontrol.wait`
//! (the `PDL_WAIT` of the kernel files) until the predecessor has completed and its
//! writes are visible. That hides the launch gap and block ramp-up of each boundary.
//! Every kernel launched here must wait before it reads what an earlier kernel wrote:
//! the kernels of ops.cu and matvec.cu start with `PDL_WAIT()`. Kernels launched the
//! ordinary way (cudarc's builder) keep full stream order in both directions.
//! `DS4_CUDA_PDL=0` turns it off (A/B runs).

use std::ffi::c_void;
use std::marker::PhantomData;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig};

/// Arguments of one launch: addresses of values that outlive the launch call.
pub struct KernelArgs<'a> {
    ptrs: Vec<*mut c_void>,
    _values: PhantomData<&'a ()>,
}

impl<'a> KernelArgs<'a> {
    pub fn new() -> Self {
        Self {
            ptrs: Vec::with_capacity(20),
            _values: PhantomData,
        }
    }

    /// Appends one by-value kernel argument.
    pub fn arg<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.ptrs.push(v as *const T as *mut c_void);
        self
    }
}

impl Default for KernelArgs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// An A/B switch of the CUDA backend: on unless the variable is set to `0`.
pub fn env_switch(var: &str) -> bool {
    std::env::var(var).map_or(true, |v| v != "0")
}

/// Whether launches use PDL: on unless `DS4_CUDA_PDL=0`, and only where the device has
/// compute capability 9.0 or newer (`sm_major`).
pub fn pdl_enabled(sm_major: i32) -> bool {
    env_switch("DS4_CUDA_PDL") && sm_major >= 9
}

/// Kernel-name prefixes from `DS4_SKIP_KERNELS` (comma-separated): a timing diagnostic
/// only. Skipping a kernel class in a graph-replayed decode step and timing the step
/// tells what that class really costs inside the graph (isolated per-kernel profiles
/// miss PDL overlap and launch gaps). Results are wrong while it is set.
fn skipped_prefixes() -> &'static [String] {
    static SKIP: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SKIP.get_or_init(|| {
        let list: Vec<String> = std::env::var("DS4_SKIP_KERNELS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        if !list.is_empty() {
            tracing::warn!(
                "DS4_SKIP_KERNELS={}: these kernels are not launched, results are wrong (timing diagnostic)",
                list.join(",")
            );
        }
        list
    })
}

/// Whether `f` is one of the kernels `DS4_SKIP_KERNELS` names.
pub(crate) fn is_skipped(f: &CudaFunction) -> bool {
    let prefixes = skipped_prefixes();
    if prefixes.is_empty() {
        return false;
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver writes a pointer to a NUL-terminated name it owns for the
    // lifetime of the module; it is only read here.
    let ok =
        unsafe { sys::cuFuncGetName(&mut name, f.cu_function()) } == sys::CUresult::CUDA_SUCCESS;
    if !ok || name.is_null() {
        return false;
    }
    // SAFETY: non-null, NUL-terminated (see above).
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    prefixes.iter().any(|p| name.starts_with(p.as_str()))
}

/// Launches `f` on `stream`, as a programmatic dependent of the previous kernel when `pdl`.
///
/// # Safety
/// `args` must match the kernel's parameter list and every pointer argument must be valid
/// for what the kernel does with it; with `pdl`, the kernel must execute
/// `griddepcontrol.wait` before reading anything an earlier kernel wrote.
pub unsafe fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &mut KernelArgs<'_>,
    pdl: bool,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    if is_skipped(f) {
        return Ok(());
    }
    // SAFETY: a zeroed attribute is a valid "ignore" value; the id and the one union
    // field used are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(pdl),
    };
    // SAFETY: the caller guarantees the argument list; `config` and `attr` live until
    // the call returns (the driver copies them).
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            args.ptrs.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
    }
}
