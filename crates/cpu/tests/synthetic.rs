//! Synthetic (random, published-type) weights run through the CPU forward pass: logits stay
//! finite and O(1) at reduced dims for every layer kind, and token-by-token decode agrees
//! with a chunked prefill. (The model crate cannot run a forward pass itself: the only
//! backend lives here.)
#![allow(clippy::unwrap_used)]

use ds4_cpu::CpuBackend;
use ds4_model::synthetic::{ExpertTypes, SyntheticWeights, reduced_config};
use ds4_model::{ForwardOptions, Model, Session};

#[test]
fn synthetic_forward_gives_finite_logits() {
    let cfg = reduced_config();
    let shape = cfg.shape();
    let w = SyntheticWeights::generate(&cfg, ExpertTypes::Q2, 42).unwrap();
    let model = Model::new(
        CpuBackend::new(&shape),
        shape.clone(),
        &w,
        ForwardOptions::default(),
    )
    .unwrap();
    let tokens = [17u32, 301];
    let mut s = Session::new(&model, 64, 8).unwrap();
    let mut logits = Vec::new();
    s.feed(&tokens, 8, Some(&mut logits)).unwrap();
    assert_eq!(logits.len(), 2 * cfg.vocab);
    assert!(logits.iter().all(|v| v.is_finite()), "non-finite logits");
    for row in logits.chunks(cfg.vocab) {
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32).sqrt();
        assert!(
            (0.05..50.0).contains(&rms),
            "logit rms {rms} out of the sane range"
        );
    }
    assert_ne!(
        logits[..cfg.vocab],
        logits[cfg.vocab..],
        "both positions gave the same logits"
    );

    // Decode one token at a time: same logits as the chunk, up to quantisation noise.
    let mut d = Session::new(&model, 64, 8).unwrap();
    for (i, &t) in tokens.iter().enumerate() {
        let got = d.decode(t).unwrap();
        let want = &logits[i * cfg.vocab..(i + 1) * cfg.vocab];
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-3 * scale,
            "position {i}: decode differs from prefill by {diff} (max |logit| {scale})"
        );
    }
}

#[test]
fn q4_experts_also_run() {
    let cfg = reduced_config();
    let shape = cfg.shape();
    let w = SyntheticWeights::generate(&cfg, ExpertTypes::Q4, 43).unwrap();
    let model = Model::new(
        CpuBackend::new(&shape),
        shape.clone(),
        &w,
        ForwardOptions::default(),
    )
    .unwrap();
    let mut s = Session::new(&model, 64, 8).unwrap();
    s.feed(&[5, 6], 8, None).unwrap();
    assert!(s.last_logits().iter().all(|v| v.is_finite()));
}
