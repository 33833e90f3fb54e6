//! `ds4 bench -m FILE` on the committed tiny model, on the CPU backend.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn tiny() -> String {
    format!(
        "{}/../../fixtures/models/tiny-b-q8_0.gguf",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ds4"))
        .arg("bench")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn file_bench_writes_one_csv_row_per_frontier() {
    let dir = std::env::temp_dir().join(format!("ds4-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("bench.csv");
    let svg = dir.join("bench.svg");
    let out = bench(&[
        "-m",
        &tiny(),
        "--backend",
        "cpu",
        "--ctx",
        "100,48",
        "--chunk",
        "16",
        "--gen",
        "4",
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("on the CPU backend"), "{stdout}");
    let written = std::fs::read_to_string(&csv).unwrap();
    let mut lines = written.lines();
    assert_eq!(
        lines.next(),
        Some("ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kv_bytes")
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse::<f64>().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{written}");
    // Frontiers in increasing order, the last 16-token chunk timed, 4 decode steps.
    for (row, ctx) in rows.iter().zip([48.0, 100.0]) {
        assert_eq!(row[0], ctx);
        assert_eq!(row[1], 16.0);
        assert!(row[2] > 0.0 && row[2].is_finite(), "{written}");
        assert_eq!(row[3], 4.0);
        assert!(row[4] > 0.0 && row[4].is_finite(), "{written}");
        assert!(row[5] > 0.0, "{written}");
    }
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn frontiers_closer_than_the_decode_steps_are_refused() {
    let out = bench(&[
        "-m",
        &tiny(),
        "--backend",
        "cpu",
        "--ctx",
        "64,70",
        "--gen",
        "8",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("more than --gen + 2 tokens apart"),
        "{stderr}"
    );
}

#[test]
fn a_model_or_synthetic_weights_are_required() {
    let out = bench(&["--ctx", "64"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("pass -m FILE"));
}
