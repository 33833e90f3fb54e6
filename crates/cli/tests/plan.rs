//! `ds4 plan` on the committed tiny model and on the synthetic Flash q2 list.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use ds4_gguf::GgufFile;

fn tiny() -> String {
    format!(
        "{}/../../fixtures/models/tiny-b-q8_0.gguf",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ds4"))
        .arg("plan")
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn tiny_model_fits_and_counts_every_tensor_byte() {
    let out = plan(&["-m", &tiny(), "--ctx", "4096", "--free-gib", "2"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for want in [
        "routed experts",
        "KV state",
        "activations (chunk)",
        "CUDA context/cuBLAS/kernels",
        "of 2.0 GiB free",
        ": fits",
    ] {
        assert!(stdout.contains(want), "{want} missing:\n{stdout}");
    }
    // The weights line is the sum of the file's tensor sizes.
    let file = GgufFile::open(tiny()).unwrap();
    let bytes: u64 = file.tensors().iter().map(|t| t.n_bytes).sum();
    let want = format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64);
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("weights "))
        .unwrap();
    assert!(line.contains(&want), "{line} vs {want}");
    // With 2 GiB even Flash's full context fits the tiny model.
    assert!(
        stdout.contains("largest context that fits: 1048576 tokens"),
        "{stdout}"
    );
    let full = plan(&["-m", &tiny(), "--ctx", "1048576", "--free-gib", "2"]);
    assert!(full.status.success(), "{}", text(&full.stderr));
}

/// With 1 GiB the reported largest context is the frontier: it fits, one more token
/// does not, and the refusal names it.
#[test]
fn largest_context_is_the_frontier() {
    let at = |ctx: usize| plan(&["-m", &tiny(), "--ctx", &ctx.to_string(), "--free-gib", "1"]);
    let stdout = text(&at(4096).stdout);
    let max: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("largest context that fits: "))
        .and_then(|l| l.strip_suffix(" tokens"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(max > 4096 && max < 1 << 20, "{max}");
    assert!(at(max).status.success());
    let over = at(max + 1);
    assert_eq!(over.status.code(), Some(1));
    let err = text(&over.stderr);
    assert!(
        err.contains(&format!("the largest context that fits is {max} tokens")),
        "{err}"
    );
}

#[test]
fn too_little_memory_exits_1_with_the_numbers() {
    let out = plan(&["-m", &tiny(), "--ctx", "4096", "--free-gib", "0.5"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("does not fit"), "{err}");
    assert!(err.contains("0.5 GiB free"), "{err}");
    // The 768 MiB CUDA reserve alone exceeds 0.5 GiB.
    assert!(err.contains("no context fits"), "{err}");
    assert!(text(&out.stdout).contains("does NOT fit"));
}

/// The published q2 file (80.8 GiB of weights) cannot fit an 80 GB card at any context,
/// and fits a 141 GB one at 1M.
#[test]
fn synthetic_flash_q2() {
    let out = plan(&["--synthetic", "q2", "--ctx", "32768", "--free-gib", "78.1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("weights alone 80.8 GiB"), "{err}");
    assert!(err.contains("78.1 GiB free"), "{err}");
    let out = plan(&["--synthetic", "q2", "--ctx", "1048576", "--free-gib", "139"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains(": fits"), "{stdout}");
}

#[test]
fn free_memory_is_measured_or_asked_for() {
    let out = plan(&["-m", &tiny(), "--ctx", "4096"]);
    if out.status.success() {
        // A GPU is present: its free memory is shown.
        assert!(text(&out.stdout).contains("GiB free of"));
    } else {
        let err = text(&out.stderr);
        assert!(err.contains("--free-gib"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bad_arguments_are_errors() {
    let out = plan(&["--ctx", "4096", "--free-gib", "2"]);
    assert!(!out.status.success());
    let out = plan(&["-m", &tiny(), "--free-gib", "0"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--free-gib must be > 0"));
    let out = plan(&["-m", "/nonexistent.gguf", "--free-gib", "2"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent.gguf"));
}
