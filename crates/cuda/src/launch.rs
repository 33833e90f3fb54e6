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

/// The decode main chain's stream, whose launches get the device's greatest priority
/// when `DS4_CUDA_PRIO=1` (side-branch kernels then yield multiprocessors to it; graphs
/// keep node priorities, see `graph_instantiate_flags`). 0: none registered.
static MAIN_STREAM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn priorities_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DS4_CUDA_PRIO").is_ok_and(|v| v == "1"))
}

/// Registers the stream whose kernels outrank the others' (see `MAIN_STREAM`).
pub fn set_main_stream(stream: &CudaStream) {
    MAIN_STREAM.store(stream.cu_stream() as usize, std::sync::atomic::Ordering::Relaxed);
}

/// Flags for instantiating a recorded decode step: node priorities honoured when
/// launch priorities are on.
pub fn graph_instantiate_flags() -> sys::CUgraphInstantiate_flags {
    if priorities_on() {
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
    } else {
        sys::CUgraphInstantiate_flags(0)
    }
}

fn greatest_priority() -> i32 {
    static P: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        let (mut least, mut greatest) = (0i32, 0i32);
        // SAFETY: two out-pointers to locals; the current context is bound by the caller.
        let ok = unsafe { sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest) }
            == sys::CUresult::CUDA_SUCCESS;
        if ok { greatest } else { 0 }
    })
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
    // SAFETY: zeroed attributes are valid "ignore" values; each one passed gets its id
    // and the one union field it uses set below.
    let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    let mut n_attrs = 0usize;
    if pdl {
        attrs[n_attrs].id =
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
        n_attrs += 1;
    }
    if priorities_on() {
        let main = MAIN_STREAM.load(std::sync::atomic::Ordering::Relaxed);
        attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY;
        attrs[n_attrs].value.priority = if main != 0 && stream.cu_stream() as usize == main {
            greatest_priority()
        } else {
            0
        };
        n_attrs += 1;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: attrs.as_mut_ptr(),
        numAttrs: n_attrs as u32,
    };
    // SAFETY: the caller guarantees the argument list; `config` and `attrs` live until
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
