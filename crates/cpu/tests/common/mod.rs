//! Test support: converts a tiny transformers checkpoint (fixtures/tiny-model/NAME/hf) with
//! the real converter into GGUF bytes, opens them as a `GgufFile` (the weights the model
//! binds to), and reads the oracle's tokens and logits.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use ds4_convert::{ConvertOptions, OutType, convert_hf_to_bytes};
use ds4_gguf::GgufFile;
use ds4_model::config::Config;
use ds4_model::shape::ModelShape;

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tiny-model")
        .join(name)
}

/// `fixtures/tiny-model/NAME/hf` converted to a GGUF of `out_type`, and its shape as read
/// back from the GGUF metadata.
pub fn load_gguf_as(name: &str, out_type: OutType) -> (ModelShape, GgufFile) {
    let dir = fixture_dir(name).join("hf");
    let (bytes, _report) = convert_hf_to_bytes(
        &dir,
        &ConvertOptions {
            out_type,
            name: None,
        },
    )
    .unwrap();
    let file = GgufFile::from_bytes(bytes).unwrap();
    let shape = Config::from_gguf(&file).unwrap().shape();
    (shape, file)
}

/// `--type f32`: the checkpoint's values kept exactly where the published layout allows.
pub fn load_gguf(name: &str) -> (ModelShape, GgufFile) {
    load_gguf_as(name, OutType::F32)
}

pub fn load_seq(name: &str, seq: &str) -> (Vec<u32>, Vec<f32>) {
    let dir = fixture_dir(name);
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{seq}.tokens.json"))).unwrap())
            .unwrap();
    let tokens: Vec<u32> = t["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let raw = std::fs::read(dir.join(format!("{seq}.logits.f32"))).unwrap();
    let logits = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (tokens, logits)
}

/// max over positions of max|a−b| / max|ref| (per position), and the worst position.
pub fn max_rel_err(got: &[f32], want: &[f32], vocab: usize) -> (f32, usize) {
    let mut worst = (0.0f32, 0usize);
    for (p, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
        let d = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if d / scale > worst.0 {
            worst = (d / scale, p);
        }
    }
    worst
}
