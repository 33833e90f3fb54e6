//! `ds4 inspect` on a tiny deepseek4 file written in-test: good, truncated, broken layout,
//! and a non-deepseek4 file.

#![allow(clippy::unwrap_used)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ds4_gguf::{GgmlType, GgufWriter, Value, ValueType};
use ds4_model::config::Config;
use ds4_model::layout::{TensorClass, expected_tensors};

fn tmp(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ds4-inspect-{}-{tag}.gguf", std::process::id()))
}

/// The §15 tiny model with zero weights (float experts), omitting `skip`.
fn write_tiny(path: &Path, skip: &str) {
    let cfg = Config::tiny();
    let mut w = GgufWriter::new();
    for (k, v) in cfg.to_metadata() {
        w.add_kv(&k, v);
    }
    let tokens = (0..cfg.vocab)
        .map(|i| Value::String(format!("t{i}")))
        .collect();
    w.add_kv(
        "tokenizer.ggml.tokens",
        Value::array(ValueType::String, tokens),
    );
    w.add_kv(
        "tokenizer.ggml.merges",
        Value::array(ValueType::String, vec![]),
    );
    for t in expected_tensors(&cfg).iter().filter(|t| t.name != skip) {
        let ty = match t.class {
            TensorClass::F32 => GgmlType::F32,
            TensorClass::TokenToExpert => GgmlType::I32,
            TensorClass::Q8 => GgmlType::Q8_0,
            _ => GgmlType::F16,
        };
        let rows: u64 = t.dims[1..].iter().product();
        let n = ty.row_bytes(t.dims[0]).unwrap() * rows;
        w.add_tensor(&t.name, &t.dims, ty, vec![0; n as usize])
            .unwrap();
    }
    w.write_file(path).unwrap();
}

fn inspect(path: &Path, json: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ds4"));
    cmd.arg("inspect").arg(path).env("RUST_BACKTRACE", "1");
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

#[test]
fn good_file_text_and_json() {
    let path = tmp("good");
    write_tiny(&path, "");
    let out = inspect(&path, false);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "GGUF v3, alignment 32",
        "deepseek4.block_count",
        "array[u32; 6] [0, 0, 4, 16, 4, 16]",
        "array[string; 512] [\"t0\", \"t1\"",
        "blk.2.indexer.proj.weight",
        "config: ok: 6 layers [S S C4 H16 C4 H16]",
        "layout: ok (0 errors, 0 warnings)",
        "deepseek4.block_count: 6 (Flash: 43)",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in:\n{stdout}");
    }

    let out = inspect(&path, true);
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = expected_tensors(&Config::tiny()).len();
    assert_eq!(doc["tensors"].as_array().unwrap().len(), n);
    assert_eq!(
        doc["totals"]["tensors"],
        serde_json::json!(doc["tensors"].as_array().unwrap().len())
    );
    assert_eq!(doc["deepseek4"]["ok"], serde_json::json!(true));
    assert_eq!(doc["version"], serde_json::json!(3));
    let meta = doc["metadata"].as_array().unwrap();
    let tokens = meta
        .iter()
        .find(|m| m["key"] == "tokenizer.ggml.tokens")
        .unwrap();
    assert_eq!(tokens["value"]["len"], serde_json::json!(512));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn truncated_file_fails_with_one_line() {
    let path = tmp("trunc");
    write_tiny(&path, "");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [10, 1000, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let out = inspect(&path, false);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "cut {cut}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "cut {cut}: {stderr}");
        assert!(
            stderr.contains("truncated") || stderr.contains("past the end"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_file(&path).unwrap();
    let out = inspect(&path, false);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn broken_layout_lists_the_problem() {
    let path = tmp("broken");
    write_tiny(&path, "blk.4.indexer_compressor_norm.weight");
    let out = inspect(&path, false);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("error: blk.4.indexer_compressor_norm.weight: missing"),
        "{stdout}"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn plain_gguf_has_no_model_section() {
    let path = tmp("plain");
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::String("llama".into()));
    w.add_tensor("x", &[4, 2], GgmlType::F32, vec![0; 32])
        .unwrap();
    w.write_file(&path).unwrap();
    let out = inspect(&path, false);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("x") && stdout.contains("[4, 2]") && stdout.contains("32 B"),
        "{stdout}"
    );
    assert!(!stdout.contains("deepseek4 validation"), "{stdout}");
    std::fs::remove_file(&path).unwrap();
}
