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
        prefix_list(
            "DS4_SKIP_KERNELS",
            "these kernels are not launched, results are wrong (timing diagnostic)",
        )
    })
}

/// Kernel-name prefixes from `DS4_NO_PDL_KERNELS`: those kernels are launched without
/// PDL, so they are placed only once the kernel before them is complete (a timing
/// diagnostic of block placement; results stay right).
fn no_pdl_prefixes() -> &'static [String] {
    static LIST: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        prefix_list(
            "DS4_NO_PDL_KERNELS",
            "these kernels are launched without PDL (timing diagnostic)",
        )
    })
}

/// The comma-separated list in `var`, announced with `what` when not empty.
fn prefix_list(var: &str, what: &str) -> Vec<String> {
    let list: Vec<String> = std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    if !list.is_empty() {
        tracing::warn!("{var}={}: {what}", list.join(","));
    }
    list
}

/// Whether `f` is one of the kernels `DS4_SKIP_KERNELS` names.
pub(crate) fn is_skipped(f: &CudaFunction) -> bool {
    name_in(f, skipped_prefixes())
}

/// Whether `f`'s name starts with one of `prefixes`.
fn name_in(f: &CudaFunction, prefixes: &[String]) -> bool {
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
    if trace::on() {
        trace::note(stream, f.cu_function(), cfg.grid_dim, cfg.block_dim.0);
    }
    // SAFETY: a zeroed attribute is a valid "ignore" value; the id and the one union
    // field used are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let pdl = pdl && !name_in(f, no_pdl_prefixes());
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

/// `DS4_TRACE=1`: a timing diagnostic. Kernels are compiled with `DS4_TRACE` (pdl.cuh):
/// block 0 of every kernel notes when its `griddepcontrol.wait` returned, and the
/// launches made while a stream records a graph are listed here, so that
/// [`trace_report`] can print one replayed decode step kernel by kernel.
pub mod trace {
    use std::sync::{Arc, Mutex, OnceLock};

    use cudarc::driver::{CudaContext, CudaModule, CudaStream, DriverError, sys};

    /// Entries the device buffer holds (pdl.cuh's bound).
    const CAP: usize = 262143;

    pub fn on() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var("DS4_TRACE").is_ok_and(|v| v != "0"))
    }

    /// The device buffer: word 0 counts entries, then (time, shape) pairs.
    fn buffer() -> Result<u64, DriverError> {
        static BUF: OnceLock<u64> = OnceLock::new();
        if let Some(p) = BUF.get() {
            return Ok(*p);
        }
        let bytes = (2 + 2 * CAP) * 8;
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: plain allocation and clear of a buffer that is never freed (diagnostic).
        unsafe {
            sys::cuMemAlloc_v2(&mut p, bytes).result()?;
            sys::cuMemsetD8_v2(p, 0, bytes).result()?;
        }
        Ok(*BUF.get_or_init(|| p))
    }

    /// Points a module compiled with `DS4_TRACE` at the buffer.
    pub fn attach(ctx: &Arc<CudaContext>, m: &Arc<CudaModule>) -> Result<(), DriverError> {
        if !on() {
            return Ok(());
        }
        ctx.bind_to_thread()?;
        let p = buffer()?;
        let stream = ctx.default_stream();
        let Ok(mut g) = m.get_global("ds4_trace_ptr", &stream) else {
            return Ok(()); // a module without PDL kernels
        };
        stream.memcpy_htod(&p.to_le_bytes(), &mut g)?;
        stream.synchronize()
    }

    type Launch = (String, (u32, u32, u32), u32);
    fn log() -> &'static Mutex<Vec<Launch>> {
        static LOG: OnceLock<Mutex<Vec<Launch>>> = OnceLock::new();
        LOG.get_or_init(|| Mutex::new(Vec::new()))
    }

    /// Notes a launch made while `stream` records a graph.
    pub(crate) fn note(stream: &CudaStream, f: sys::CUfunction, grid: (u32, u32, u32), block: u32) {
        let mut st = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: queries of a live stream and function.
        unsafe {
            if sys::cuStreamIsCapturing(stream.cu_stream(), &mut st) != sys::CUresult::CUDA_SUCCESS
                || st != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE
            {
                return;
            }
            let mut name: *const std::ffi::c_char = std::ptr::null();
            if sys::cuFuncGetName(&mut name, f) != sys::CUresult::CUDA_SUCCESS || name.is_null() {
                return;
            }
            let name = std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned();
            if let Ok(mut l) = log().lock() {
                l.push((name, grid, block));
            }
        }
    }

    /// Clears the device entries (call with the device idle).
    pub fn reset() -> Result<(), DriverError> {
        let p = buffer()?;
        // SAFETY: the buffer is live and 8 bytes long at least.
        unsafe { sys::cuMemsetD8_v2(p, 0, 8).result() }
    }

    /// The entries since [`reset`] (call after a synchronize), in the order the waits
    /// returned: microseconds from the first, the gap to the next, the shape and the
    /// name of the recorded launch of that shape (the first unused one, in launch order).
    pub fn report() -> Result<String, DriverError> {
        let p = buffer()?;
        let mut words = vec![0u64; 2 + 2 * CAP];
        // SAFETY: `words` holds the whole buffer.
        unsafe {
            sys::cuMemcpyDtoH_v2(words.as_mut_ptr().cast(), p, words.len() * 8).result()?;
        }
        let n = (words[0] as usize).min(CAP);
        let mut ev: Vec<(u64, u64)> = (0..n)
            .map(|i| (words[2 + 2 * i], words[3 + 2 * i]))
            .collect();
        ev.sort_by_key(|e| e.0);
        // Per-block entries (bit 62) are printed as BLOCK lines and placement entries
        // (bit 63) as PLACED lines, neither matched to names.
        let (blocks, ev): (Vec<_>, Vec<_>) = ev.into_iter().partition(|e| (e.1 >> 62) & 1 != 0);
        let (placed, ev): (Vec<_>, Vec<_>) = ev.into_iter().partition(|e| e.1 >> 63 != 0);
        let launches = log().lock().map(|l| l.clone()).unwrap_or_default();
        // The recorded launches of the last graph: one per wait entry, the last of the log.
        let recorded = &launches[launches.len().saturating_sub(ev.len())..];
        let mut used = vec![false; recorded.len()];
        let mut cursor = 0usize;
        let mut out = String::from("TRACE t_us gap_us grid_x grid_y block name\n");
        let t0 = ev
            .first()
            .map_or(0, |e| e.0)
            .min(placed.first().map_or(u64::MAX, |e| e.0));
        for &(t, shape) in &placed {
            out.push_str(&format!(
                "PLACED {:.2} {} {} {}\n",
                (t - t0) as f64 / 1e3,
                shape & 0xfffff,
                (shape >> 20) & 0xfffff,
                (shape >> 40) & 0x7fffff
            ));
        }
        // Per-block entries (bit 62): BLOCK t_us what blocks block (count and linear index).
        for &(t, info) in &blocks {
            out.push_str(&format!(
                "BLOCK {:.2} {} {} {}\n",
                t.saturating_sub(t0) as f64 / 1e3,
                (info >> 56) & 0x3f,
                (info >> 20) & 0xfffff,
                info & 0xfffff
            ));
        }
        for (k, &(t, shape)) in ev.iter().enumerate() {
            let gx = (shape & 0xfffff) as u32;
            let gy = ((shape >> 20) & 0xfffff) as u32;
            let bx = (shape >> 40) as u32;
            let gap = ev.get(k + 1).map_or(0, |e| e.0 - t);
            // The first unused recorded launch of this shape at or after the cursor - 64.
            let from = cursor.saturating_sub(64);
            let name = (from..recorded.len())
                .find(|&j| {
                    !used[j]
                        && recorded[j].1.0 == gx
                        && recorded[j].1.1 == gy
                        && recorded[j].2 == bx
                })
                .map(|j| {
                    used[j] = true;
                    cursor = cursor.max(j);
                    recorded[j].0.as_str()
                })
                .unwrap_or("?");
            out.push_str(&format!(
                "TRACE {:.2} {:.2} {gx} {gy} {bx} {name}\n",
                (t - t0) as f64 / 1e3,
                gap as f64 / 1e3
            ));
        }
        Ok(out)
    }
}
