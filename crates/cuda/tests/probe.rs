//! Without a GPU (CI), probing must fail with a clear error, never panic, so the
//! binary can fall back to the CPU. With a GPU it must describe the device.

use ds4_cuda::{CudaRuntime, Error};

#[test]
fn probe_reports_a_reason_or_a_device() {
    match CudaRuntime::probe(0) {
        Ok(rt) => {
            let s = rt.summary();
            assert!(s.contains("CUDA driver") && s.contains("NVRTC"), "{s}");
            assert!(rt.device.sm.0 >= 7, "{s}");
        }
        Err(e) => {
            assert!(
                matches!(e, Error::NoDriver | Error::NoDevice(_) | Error::NoNvrtc),
                "unexpected probe error: {e}"
            );
            assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn absurd_ordinal_is_no_device_not_a_panic() {
    if let Err(e) = CudaRuntime::probe(1_000_000) {
        assert!(
            matches!(e, Error::NoDriver | Error::NoDevice(_) | Error::NoNvrtc),
            "{e}"
        );
    } else {
        panic!("device 1000000 cannot exist");
    }
}
