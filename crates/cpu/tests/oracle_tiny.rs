//! The CPU forward pass against transformers' logits (official rounding off).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ds4_cpu::CpuBackend;
use ds4_model::{ForwardOptions, Model, Session};

const TOL: f32 = 1e-4;
const SELF_TOL: f32 = 1e-5;

fn run(name: &str, seq: &str) {
    let (shape, tensors) = load_hf(name);
    let (tokens, want) = load_seq(name, seq);
    let vocab = shape.vocab;
    let model = Model::new(CpuBackend::new(&shape), shape, &tensors, ForwardOptions { official_rounding: false })
        .expect("model binds");
    let ctx = tokens.len() + 8;
    let mut results = Vec::new();
    for (label, chunk) in [("prefill", tokens.len()), ("chunk7", 7), ("decode", 1)] {
        let mut s = Session::new(&model, ctx, chunk).unwrap();
        let mut got = Vec::new();
        s.feed(&tokens, chunk, Some(&mut got)).unwrap();
        assert_eq!(got.len(), want.len());
        let (err, pos) = max_rel_err(&got, &want, vocab);
        eprintln!("{name}/{seq} {label}: max |Δ|/max|ref| = {err:.3e} (worst position {pos})");
        assert!(err < TOL, "{name}/{seq} {label}: rel err {err} at position {pos}");
        results.push((label, got));
    }
    for i in 1..results.len() {
        let (err, pos) = max_rel_err(&results[i].1, &results[0].1, vocab);
        eprintln!("{name}/{seq} {} vs prefill: {err:.3e}", results[i].0);
        assert!(err < SELF_TOL, "{} vs prefill: {err} at {pos}", results[i].0);
    }
}

#[test]
fn tiny_a_random() {
    run("tiny-a", "random");
}

#[test]
fn tiny_a_text() {
    run("tiny-a", "text");
}

#[test]
fn tiny_b_random() {
    run("tiny-b", "random");
}

#[test]
fn tiny_b_text() {
    run("tiny-b", "text");
}

/// The same model through a GGUF container (written with `GgufWriter`, read back with
/// `GgufFile`): the weights are bound zero-copy to the file bytes.
#[test]
fn tiny_a_text_through_gguf() {
    let (shape, tensors) = load_hf("tiny-a");
    let (tokens, want) = load_seq("tiny-a", "text");
    let mut w = ds4_gguf::GgufWriter::new();
    let mut names: Vec<&String> = tensors.map.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors.map[name];
        w.add_tensor(name, &t.dims, t.ty, t.data.clone()).unwrap();
    }
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let file = ds4_gguf::GgufFile::from_bytes(bytes).unwrap();
    let model = Model::new(CpuBackend::new(&shape), shape.clone(), &file, ForwardOptions { official_rounding: false })
        .expect("model binds to the GGUF");
    let mut s = Session::new(&model, tokens.len(), 7).unwrap();
    let mut got = Vec::new();
    s.feed(&tokens, 7, Some(&mut got)).unwrap();
    let (err, pos) = max_rel_err(&got, &want, shape.vocab);
    eprintln!("tiny-a/text via GGUF, chunk 7: {err:.3e} (position {pos})");
    assert!(err < TOL);
}
