//! Sessions on the tiny model: snapshot/restore and rewind are exact, memory estimates
//! match allocations, bad snapshots are refused; the quantised variant vs dequantised.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ds4_cpu::CpuBackend;
use ds4_gguf::{GgmlType, GgufFile, GgufWriter};
use ds4_model::{ForwardOptions, HostKv, KvStore, Model, Session};

/// A model of `file` on the CPU backend, default options.
fn cpu_model<'w>(shape: &ds4_model::ModelShape, file: &'w GgufFile) -> Model<'w, CpuBackend> {
    Model::new(
        CpuBackend::new(shape),
        shape.clone(),
        file,
        ForwardOptions::default(),
    )
    .unwrap()
}

fn tokens(n: usize) -> Vec<u32> {
    let (t, _) = load_seq("tiny-a", "text");
    t[..n].to_vec()
}

#[test]
fn snapshot_restore_and_rewind_are_exact() {
    let (shape, file) = load_gguf("tiny-a");
    let model = cpu_model(&shape, &file);
    let toks = tokens(90);
    let ctx = 128;
    // Reference: one session over everything, logits of every position.
    let mut full = Session::new(&model, ctx, 32).unwrap();
    let mut want = Vec::new();
    full.feed(&toks, 32, Some(&mut want)).unwrap();
    let vocab = shape.vocab;

    // Snapshot at a position aligned to nothing (37: not a multiple of 4 or 16).
    let mut s = Session::new(&model, ctx, 32).unwrap();
    s.feed(&toks[..37], 13, None).unwrap();
    let snap = s.snapshot().unwrap();
    assert_eq!(s.last_logits(), &want[36 * vocab..37 * vocab]);
    let mut r = Session::new(&model, ctx, 32).unwrap();
    r.restore(&snap).unwrap();
    assert_eq!(r.n_tokens(), 37);
    assert_eq!(r.last_logits(), s.last_logits());
    let mut got = Vec::new();
    r.feed(&toks[37..], 5, Some(&mut got)).unwrap();
    assert_eq!(got, want[37 * vocab..], "restored session diverged");

    // Rewind from the end to 53 and continue: same as never having gone further.
    let mut w = Session::new(&model, ctx, 32).unwrap();
    w.feed(&toks, 32, None).unwrap();
    w.rewind(53).unwrap();
    assert_eq!(w.n_tokens(), 53);
    assert_eq!(w.last_logits(), &want[52 * vocab..53 * vocab]);
    let mut got = Vec::new();
    w.feed(&toks[53..], 1, Some(&mut got)).unwrap();
    assert_eq!(got, want[53 * vocab..], "rewound session diverged");
}

/// The last logits live in backend host memory (`Backend::HostBuf`): decode, prefill,
/// snapshot/restore, rewind and failed restores keep them exactly as before (the last
/// position's row of `read_rows`, empty when there is no last position).
#[test]
fn last_logits_in_backend_host_memory() {
    use ds4_model::Backend;
    let (shape, file) = load_gguf("tiny-a");
    let model = cpu_model(&shape, &file);
    let vocab = shape.vocab;
    let toks = tokens(24);
    let ctx = 32;

    // The host buffer: zeroed, of the asked length.
    let be = &model.backend;
    let host = be.alloc_host(vocab).unwrap();
    assert_eq!(host.len(), vocab);
    assert!(host.iter().all(|&v| v == 0.0));

    // Reference: every position's logits, through `read_rows`.
    let mut full = Session::new(&model, ctx, 8).unwrap();
    let mut want = Vec::new();
    full.feed(&toks, 8, Some(&mut want)).unwrap();
    assert_eq!(full.last_logits(), &want[23 * vocab..24 * vocab]);

    let mut s = Session::new(&model, ctx, 8).unwrap();
    assert!(s.last_logits().is_empty());
    s.feed(&toks[..20], 8, None).unwrap();
    assert_eq!(s.last_logits(), &want[19 * vocab..20 * vocab]);
    let empty_snap = Session::new(&model, ctx, 8).unwrap().snapshot().unwrap();
    for (i, &t) in toks[20..].iter().enumerate() {
        let got = s.decode(t).unwrap().to_vec();
        let row = 20 + i;
        assert_eq!(
            got,
            &want[row * vocab..(row + 1) * vocab],
            "decode at {row}"
        );
        assert_eq!(s.last_logits(), &got[..]);
    }

    // Snapshot round trip, into a session that has other logits.
    let snap = s.snapshot().unwrap();
    let mut r = Session::new(&model, ctx, 8).unwrap();
    r.feed(&toks[..3], 8, None).unwrap();
    r.restore(&snap).unwrap();
    assert_eq!(r.last_logits(), &want[23 * vocab..24 * vocab]);
    assert_eq!(r.snapshot().unwrap(), snap);
    // A snapshot without logits empties them.
    r.restore(&empty_snap).unwrap();
    assert_eq!(r.n_tokens(), 0);
    assert!(r.last_logits().is_empty());
    // A failed restore leaves an empty session.
    r.restore(&snap).unwrap();
    assert!(r.restore(&snap[..snap.len() - 1]).is_err());
    assert_eq!(r.n_tokens(), 0);
    assert!(r.last_logits().is_empty());

    // Rewind: to a position (its logits), to 0 (none), then decode again.
    s.rewind(10).unwrap();
    assert_eq!(s.last_logits(), &want[9 * vocab..10 * vocab]);
    s.rewind(0).unwrap();
    assert!(s.last_logits().is_empty());
    assert!(s.snapshot().unwrap() == empty_snap);
    assert_eq!(s.decode(toks[0]).unwrap(), &want[..vocab]);
}

#[test]
fn bad_snapshots_are_refused() {
    let (shape, file) = load_gguf("tiny-a");
    let model = cpu_model(&shape, &file);
    let mut s = Session::new(&model, 64, 8).unwrap();
    s.feed(&tokens(10), 8, None).unwrap();
    let snap = s.snapshot().unwrap();
    // Another context size.
    let mut other = Session::new(&model, 96, 8).unwrap();
    assert!(other.restore(&snap).is_err());
    // Truncated and corrupted.
    let mut same = Session::new(&model, 64, 8).unwrap();
    assert!(same.restore(&snap[..snap.len() - 3]).is_err());
    let mut bad = snap.clone();
    bad[0] = b'X';
    assert!(same.restore(&bad).is_err());
    // Another model (tiny-b): refused by the fingerprint.
    let (shape_b, file_b) = load_gguf("tiny-b");
    let model_b = Model::new(
        CpuBackend::new(&shape_b),
        shape_b,
        &file_b,
        ForwardOptions::default(),
    )
    .unwrap();
    let mut sb = Session::new(&model_b, 64, 8).unwrap();
    let err = sb.restore(&snap).unwrap_err();
    assert!(
        err.to_string().contains("model") || err.to_string().contains("vocab"),
        "{err}"
    );
    assert!(same.restore(&snap).is_ok());
}

#[test]
fn memory_estimate_matches_allocation() {
    let (shape, _) = load_gguf("tiny-a");
    for ctx in [1, 7, 16, 100, 4096] {
        let kv = HostKv::new(&shape, ctx);
        assert_eq!(
            kv.memory_bytes(),
            HostKv::estimate_bytes(&shape, ctx),
            "ctx {ctx}"
        );
    }
}

#[test]
fn context_overflow_and_bad_tokens_are_errors() {
    let (shape, file) = load_gguf("tiny-a");
    let model = cpu_model(&shape, &file);
    let mut s = Session::new(&model, 8, 4).unwrap();
    assert!(s.feed(&tokens(9), 4, None).is_err());
    assert!(s.feed(&[shape.vocab as u32], 1, None).is_err());
    s.feed(&tokens(8), 4, None).unwrap();
    assert!(s.decode(1).is_err());
}

/// Quantises the published-Q8_0 tensors to Q8_0 and the experts to Q2_K, and builds the
/// same model with those quantised weights dequantised to F32 (both as GGUF files with the
/// source's metadata).
fn quantised_pair(src: &GgufFile) -> (GgufFile, GgufFile) {
    let (mut q, mut dq) = (GgufWriter::new(), GgufWriter::new());
    for (key, value) in src.metadata() {
        q.add_kv(key, value.clone());
        dq.add_kv(key, value.clone());
    }
    for t in src.tensors() {
        let name = t.name.as_str();
        let data = src.tensor_data(t);
        let target = if name.ends_with("_exps.weight") {
            Some(GgmlType::Q2_K)
        } else if [
            "attn_q_a.weight",
            "attn_q_b.weight",
            "attn_kv.weight",
            "attn_output_a.weight",
            "attn_output_b.weight",
            "shexp.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
            || name == "output.weight"
        {
            Some(GgmlType::Q8_0)
        } else {
            None
        };
        match target {
            None => {
                q.add_tensor(name, &t.dims, t.ggml_type, data.to_vec())
                    .unwrap();
                dq.add_tensor(name, &t.dims, t.ggml_type, data.to_vec())
                    .unwrap();
            }
            Some(ty) => {
                let n: usize = t.dims.iter().product::<u64>() as usize;
                let mut f = vec![0.0f32; n];
                ds4_quant::dequantize_row(t.ggml_type, data, &mut f).unwrap();
                let k = t.dims[0] as usize;
                let mut qbytes = Vec::new();
                let mut back = Vec::with_capacity(n * 4);
                for row in f.chunks(k) {
                    let qr = ds4_quant::quantize_row(ty, row).unwrap();
                    let mut d = vec![0.0f32; k];
                    ds4_quant::dequantize_row(ty, &qr, &mut d).unwrap();
                    back.extend(d.iter().flat_map(|v| v.to_le_bytes()));
                    qbytes.extend(qr);
                }
                q.add_tensor(name, &t.dims, ty, qbytes).unwrap();
                dq.add_tensor(name, &t.dims, GgmlType::F32, back).unwrap();
            }
        }
    }
    let read = |w: GgufWriter| {
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        GgufFile::from_bytes(bytes).unwrap()
    };
    (read(q), read(dq))
}

#[test]
fn quantised_variant_vs_dequantised() {
    let (shape, file) = load_gguf("tiny-a");
    let (q, dq) = quantised_pair(&file);
    let toks = tokens(64);
    let opts = ForwardOptions {
        official_rounding: false,
        ..Default::default()
    };
    let run = |src: &GgufFile| {
        let m = Model::new(CpuBackend::new(&shape), shape.clone(), src, opts).unwrap();
        let mut s = Session::new(&m, 64, 64).unwrap();
        let mut out = Vec::new();
        s.feed(&toks, 64, Some(&mut out)).unwrap();
        out
    };
    let lq = run(&q);
    let ldq = run(&dq);
    let (err, pos) = max_rel_err(&lq, &ldq, shape.vocab);
    eprintln!(
        "tiny-a Q8_0 + Q2_K experts vs same weights dequantised: max |Δ|/max|ref| = {err:.3e} (position {pos})"
    );
    // Only activation quantisation (Q8_0 per 32, Q8_K per 256) separates the two.
    // (Random tiny weights amplify it: logits of a 6-layer HC stack.)
    let mean: f32 = lq.iter().zip(&ldq).map(|(a, b)| (a - b).abs()).sum::<f32>() / lq.len() as f32;
    let scale = ldq.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    eprintln!("mean |Δ| = {mean:.3e} (max |ref| {scale:.3})");
    assert!(err > 0.0 && err < 0.5, "{err}");
    // Same argmax at almost every position.
    let v = shape.vocab;
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0
    };
    let agree = lq
        .chunks(v)
        .zip(ldq.chunks(v))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    eprintln!("argmax agreement: {agree}/{}", toks.len());
    assert!(agree * 10 >= toks.len() * 8);
}

#[test]
fn official_rounding_changes_little() {
    let (shape, file) = load_gguf("tiny-a");
    let (toks, want) = load_seq("tiny-a", "text");
    let m = Model::new(
        CpuBackend::new(&shape),
        shape.clone(),
        &file,
        ForwardOptions::default(),
    )
    .unwrap();
    let mut s = Session::new(&m, toks.len(), 64).unwrap();
    let mut got = Vec::new();
    s.feed(&toks, 64, Some(&mut got)).unwrap();
    let (err, pos) = max_rel_err(&got, &want, shape.vocab);
    eprintln!("tiny-a/text official rounding ON vs transformers: {err:.3e} (position {pos})");
    assert!(err > 1e-4 && err < 0.5, "{err}");
}
