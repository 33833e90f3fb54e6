//! Finding the GPU: driver, device, NVRTC and cuBLAS, with versions.

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaStream};

use crate::{Error, Result};

/// What the device is.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub sm: (i32, i32),
    pub total_mem: usize,
    pub free_mem: usize,
    pub multiprocessors: i32,
    pub l2_bytes: i32,
}

/// A CUDA context and stream on one device, with the library versions found.
pub struct CudaRuntime {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub device: DeviceInfo,
    /// `cuDriverGetVersion`, e.g. 13000 for 13.0.
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
    /// cuBLAS (major, minor, patch) when libcublas loads.
    pub cublas_version: Option<(i32, i32, i32)>,
}

fn fmt_cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

impl CudaRuntime {
    /// Opens device `ordinal`, or says precisely what is missing.
    pub fn probe(ordinal: usize) -> Result<Self> {
        // cudarc panics when a library it needs is absent, so look first.
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count()?;
        if count <= ordinal as i32 {
            return Err(Error::NoDevice(count));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::NoNvrtc);
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream, raw pointers in launches: cudarc's per-buffer event
        // tracking would only add work (and nodes inside captured graphs).
        // SAFETY: every buffer is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        // A created stream: the legacy default stream cannot be captured into graphs.
        let stream = ctx.new_stream()?;
        let (free_mem, total_mem) = ctx.mem_get_info()?;
        let device = DeviceInfo {
            ordinal,
            name: ctx.name()?,
            sm: ctx.compute_capability()?,
            total_mem,
            free_mem,
            multiprocessors: ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            l2_bytes: ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
        };
        let mut driver_version = 0i32;
        // SAFETY: plain out-parameter call into the loaded driver.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }.result()?;
        let (mut maj, mut min) = (0i32, 0i32);
        // SAFETY: out-parameters; NVRTC is present (checked above).
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) }.result()?;
        let cublas_version = cublas_version();
        Ok(Self {
            ctx,
            stream,
            device,
            driver_version,
            nvrtc_version: (maj, min),
            cublas_version,
        })
    }

    /// One line per fact, for startup logs and `ds4 selftest`.
    pub fn summary(&self) -> String {
        let d = &self.device;
        let cublas = match self.cublas_version {
            Some((a, b, c)) => format!("{a}.{b}.{c}"),
            None => "not found".to_string(),
        };
        format!(
            "CUDA driver {}, NVRTC {}.{}, cuBLAS {}\ndevice {}: {} (sm_{}{}, {} SMs, L2 {} MiB, {:.1} GiB total, {:.1} GiB free)",
            fmt_cuda_version(self.driver_version),
            self.nvrtc_version.0,
            self.nvrtc_version.1,
            cublas,
            d.ordinal,
            d.name,
            d.sm.0,
            d.sm.1,
            d.multiprocessors,
            d.l2_bytes >> 20,
            d.total_mem as f64 / (1u64 << 30) as f64,
            d.free_mem as f64 / (1u64 << 30) as f64,
        )
    }
}

fn cublas_version() -> Option<(i32, i32, i32)> {
    use cudarc::cublas::sys;
    // SAFETY: dlopen probe, then property queries that need no handle.
    unsafe {
        if !sys::is_culib_present() {
            return None;
        }
        let mut v = [0i32; 3];
        let props = [
            sys::libraryPropertyType::MAJOR_VERSION,
            sys::libraryPropertyType::MINOR_VERSION,
            sys::libraryPropertyType::PATCH_LEVEL,
        ];
        for (out, p) in v.iter_mut().zip(props) {
            if sys::cublasGetProperty(p, out) != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return None;
            }
        }
        Some((v[0], v[1], v[2]))
    }
}
