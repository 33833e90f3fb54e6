//! The CPU forward pass against transformers' logits (official rounding off), on the
//! checkpoint as `ds4 convert` writes it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ds4_convert::OutType;
use ds4_cpu::CpuBackend;
use ds4_model::{ForwardOptions, Model, Session};

const TOL: f32 = 1e-4;
const SELF_TOL: f32 = 1e-5;

fn run(name: &str, seq: &str) {
    let (shape, file) = load_gguf(name);
    let (tokens, want) = load_seq(name, seq);
    let vocab = shape.vocab;
    let model = Model::new(
        CpuBackend::new(&shape),
        shape,
        &file,
        ForwardOptions {
            official_rounding: false,
            ..Default::default()
        },
    )
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
        assert!(
            err < TOL,
            "{name}/{seq} {label}: rel err {err} at position {pos}"
        );
        results.push((label, got));
    }
    for i in 1..results.len() {
        let (err, pos) = max_rel_err(&results[i].1, &results[0].1, vocab);
        eprintln!("{name}/{seq} {} vs prefill: {err:.3e}", results[i].0);
        assert!(
            err < SELF_TOL,
            "{} vs prefill: {err} at {pos}",
            results[i].0
        );
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

/// The same checkpoint converted with `--type f16`: the F16 copies of the (F16) tiny-a
/// projections and experts are exact, so the F16 matmul path must meet the same bound.
#[test]
fn tiny_a_text_converted_f16() {
    let (shape, file) = load_gguf_as("tiny-a", OutType::F16);
    let (tokens, want) = load_seq("tiny-a", "text");
    let model = Model::new(
        CpuBackend::new(&shape),
        shape.clone(),
        &file,
        ForwardOptions {
            official_rounding: false,
            ..Default::default()
        },
    )
    .expect("model binds to the f16 GGUF");
    let mut s = Session::new(&model, tokens.len(), 7).unwrap();
    let mut got = Vec::new();
    s.feed(&tokens, 7, Some(&mut got)).unwrap();
    let (err, pos) = max_rel_err(&got, &want, shape.vocab);
    eprintln!("tiny-a/text converted f16, chunk 7: {err:.3e} (position {pos})");
    assert!(err < TOL);
}

/// Skipping the indexer while every token sees at most top_k compressed rows (the
/// default) gives the same logits, bit for bit, as running it (it would pick every row,
/// in order), in prefill, chunked prefill and decode, across the position where the
/// indexer starts to matter.
#[test]
fn indexer_skip_is_exact() {
    for name in ["tiny-a", "tiny-b"] {
        let (shape, file) = load_gguf(name);
        let (tokens, _) = load_seq(name, "random");
        let csa_ratio = shape
            .layer_kinds
            .iter()
            .filter(|k| k.is_csa())
            .map(|k| k.ratio())
            .min()
            .expect("the fixture has CSA layers");
        assert!(
            tokens.len() / csa_ratio > shape.indexer_top_k,
            "{name}: the sequence must reach the indexer's threshold"
        );
        let logits = |always_index: bool, chunk: usize| {
            let model = Model::new(
                CpuBackend::new(&shape),
                shape.clone(),
                &file,
                ForwardOptions {
                    official_rounding: true,
                    always_index,
                },
            )
            .expect("model binds");
            let mut s = Session::new(&model, tokens.len() + 8, chunk).unwrap();
            let mut got = Vec::new();
            s.feed(&tokens, chunk, Some(&mut got)).unwrap();
            got
        };
        for chunk in [tokens.len(), 7, 1] {
            let (skipped, indexed) = (logits(false, chunk), logits(true, chunk));
            assert_eq!(skipped.len(), indexed.len());
            let differ = skipped
                .iter()
                .zip(&indexed)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{name}, chunk {chunk}: {differ} logits differ");
        }
    }
}
