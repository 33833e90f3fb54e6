//! CPU speed of one full-width DeepSeek V4 Flash layer: real dims, published q2 types
//! (Q8_0 attention/shared/head, F16 HC/compressor/indexer/router, IQ2_XXS gate/up + Q2_K
//! down over 256 experts), random weights from `ds4_model::synthetic`. Report only.
//!
//! `cargo bench -p ds4-cpu --bench flash_layer`
//!
//! Each layer kind (CSA ratio 4, HCA ratio 128, sliding) is built as a one-layer model with
//! a 512-token vocabulary, so its time is the layer's; the real output head (Q8_0
//! [4096, 129280]) is timed on its own. Decode is one token at position 256 (window full,
//! 64 CSA rows); prefill is one 64-token chunk at the same position. The summary at the end
//! gives ms per layer per token, the weight bytes one decode step reads per layer and the
//! bandwidth that implies, and the 43-layer extrapolation 2 × SWA + 21 × CSA + 20 × HCA +
//! head. `DS4_BENCH_KINDS=csa,hca` limits the kinds (default: all three).
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use ds4_cpu::CpuBackend;
use ds4_gguf::GgmlType;
use ds4_model::synthetic::{ExpertTypes, SyntheticTensor, SyntheticWeights, flash_config};
use ds4_model::weights::{LayerWeights, TensorView};
use ds4_model::{Backend, ForwardOptions, Model, Session};

const BENCH_VOCAB: usize = 512;
const PROMPT: usize = 256;
const CHUNK: usize = 64;
const SEED: u64 = 0x5eed;

/// (name, compress ratio, layers of this kind in Flash).
const KINDS: [(&str, usize, usize); 3] = [("csa", 4, 21), ("hca", 128, 20), ("swa", 0, 2)];

/// Median seconds per iteration of each benchmark, from the timed calls (warm-up included).
#[derive(Default)]
struct Record(RefCell<BTreeMap<String, Vec<f64>>>);

impl Record {
    fn push(&self, key: &str, total: Duration, iters: u64) {
        let per = total.as_secs_f64() / iters.max(1) as f64;
        self.0
            .borrow_mut()
            .entry(key.to_string())
            .or_default()
            .push(per);
    }
    fn median(&self, key: &str) -> Option<f64> {
        let map = self.0.borrow();
        let mut v = map.get(key)?.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    }
}

/// Weight bytes one decode step reads in a layer: every tensor once, routed experts only for
/// the `n_used` selected ones, tid2eid one row.
fn layer_decode_bytes(
    l: &LayerWeights<ds4_cpu::CpuWeight<'_>>,
    n_used: usize,
    n_expert: usize,
) -> u64 {
    let b = |w: &ds4_cpu::CpuWeight<'_>| w.view.data.len() as u64;
    let a = &l.attn;
    let f = &l.ffn;
    let mut total = [
        &l.hc_attn.fn_,
        &l.hc_attn.scale,
        &l.hc_attn.base,
        &l.hc_ffn.fn_,
        &l.hc_ffn.scale,
        &l.hc_ffn.base,
    ]
    .iter()
    .map(|w| b(w))
    .sum::<u64>();
    total += [
        &a.norm,
        &a.q_a,
        &a.q_a_norm,
        &a.q_b,
        &a.kv,
        &a.kv_norm,
        &a.sinks,
        &a.out_a,
        &a.out_b,
    ]
    .iter()
    .map(|w| b(w))
    .sum::<u64>();
    if let Some(c) = &a.compressor {
        total += b(&c.kv) + b(&c.gate) + b(&c.norm) + b(&c.ape);
    }
    if let Some(ix) = &a.indexer {
        let c = &ix.compressor;
        total += b(&ix.q_b) + b(&ix.proj) + b(&c.kv) + b(&c.gate) + b(&c.norm) + b(&c.ape);
    }
    total += b(&f.norm) + b(&f.router) + f.bias.as_ref().map_or(0, b);
    total += f
        .tid2eid
        .as_ref()
        .map_or(0, |t| b(t) / t.view.n_rows().max(1) as u64);
    total += (b(&f.gate_exps) + b(&f.up_exps) + b(&f.down_exps)) * n_used as u64 / n_expert as u64;
    total += b(&f.gate_sh) + b(&f.up_sh) + b(&f.down_sh);
    total
}

fn bench_kind(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rec: &Record,
    kind: &str,
    ratio: usize,
    bytes: &mut BTreeMap<String, u64>,
) {
    let cfg = flash_config(&[ratio], 0, BENCH_VOCAB);
    let t0 = Instant::now();
    let weights = SyntheticWeights::generate(&cfg, ExpertTypes::Q2, SEED).unwrap();
    eprintln!(
        "{kind}: generated {:.2} GB of synthetic weights in {:.1?}",
        weights.total_bytes() as f64 / 1e9,
        t0.elapsed()
    );
    let shape = cfg.shape();
    let model = Model::new(
        CpuBackend::new(&shape),
        shape.clone(),
        &weights,
        ForwardOptions::default(),
    )
    .unwrap();
    bytes.insert(
        kind.to_string(),
        layer_decode_bytes(
            &model.weights.layers[0],
            shape.n_expert_used,
            shape.n_expert,
        ),
    );
    let tokens: Vec<u32> = (0..PROMPT + CHUNK)
        .map(|i| ((i * 7919) % BENCH_VOCAB) as u32)
        .collect();
    let t0 = Instant::now();
    let mut base = Session::new(&model, PROMPT + CHUNK, CHUNK).unwrap();
    base.feed(&tokens[..PROMPT], CHUNK, None).unwrap();
    eprintln!(
        "{kind}: {PROMPT}-token setup prefill in {:.1?}",
        t0.elapsed()
    );
    assert!(
        base.last_logits().iter().all(|v| v.is_finite()),
        "{kind}: non-finite logits after prefill"
    );
    let snap = base.snapshot().unwrap();
    let mut s = Session::new(&model, PROMPT + CHUNK, CHUNK).unwrap();

    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    let key = format!("{kind} decode");
    g.bench_function(format!("{kind}: decode 1 token at {PROMPT}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                s.restore(&snap).unwrap();
                let t = Instant::now();
                black_box(s.decode(tokens[PROMPT]).unwrap());
                total += t.elapsed();
            }
            rec.push(&key, total, iters);
            total
        })
    });
    assert!(
        s.last_logits().iter().all(|v| v.is_finite()),
        "{kind}: non-finite decode logits"
    );

    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(CHUNK as u64));
    let key = format!("{kind} prefill");
    g.bench_function(
        format!("{kind}: prefill {CHUNK}-token chunk at {PROMPT}"),
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    s.restore(&snap).unwrap();
                    let t = Instant::now();
                    s.feed(&tokens[PROMPT..PROMPT + CHUNK], CHUNK, None)
                        .unwrap();
                    total += t.elapsed();
                }
                rec.push(&key, total, iters);
                total
            })
        },
    );
    assert!(
        s.last_logits().iter().all(|v| v.is_finite()),
        "{kind}: non-finite prefill logits"
    );
}

/// The real output head alone: Q8_0 [4096, 129280] matmul for 1 and CHUNK rows.
fn bench_head(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rec: &Record,
    bytes: &mut BTreeMap<String, u64>,
) {
    let flash = ds4_model::config::Config::flash();
    let (e, vocab) = (flash.n_embd, flash.vocab);
    let head = SyntheticTensor::random_matrix(
        "output.weight",
        GgmlType::Q8_0,
        &[e as u64, vocab as u64],
        1.0,
        SEED,
    )
    .unwrap();
    bytes.insert("head".into(), head.data.len() as u64);
    let shape = flash_config(&[0], 0, vocab).shape();
    let be = CpuBackend::new(&shape);
    let view = TensorView {
        name: &head.name,
        ty: head.ty,
        dims: &head.dims,
        data: &head.data,
    };
    let w = be.upload(&view).unwrap();
    let mut x = be.alloc_act(CHUNK, e).unwrap();
    for (i, v) in x.data.iter_mut().enumerate() {
        *v = ((i * 7919 % 2001) as f32 - 1000.0) / 577.0;
    }
    let mut out = be.alloc_act(CHUNK, vocab).unwrap();
    g.sampling_mode(SamplingMode::Flat);
    g.measurement_time(Duration::from_secs(3));
    for (n, label) in [(1usize, "decode"), (CHUNK, "prefill")] {
        g.throughput(Throughput::Elements(n as u64));
        let key = format!("head {label}");
        g.bench_function(format!("head: Q8_0 [{e}, {vocab}] x {n} rows"), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    be.matmul(&w, &x, n, &mut out).unwrap();
                }
                let total = t.elapsed();
                rec.push(&key, total, iters);
                total
            })
        });
        assert!(
            out.data[..n * vocab].iter().all(|v| v.is_finite()),
            "head: non-finite logits"
        );
    }
}

fn bench(c: &mut Criterion) {
    let rec = Record::default();
    let mut bytes = BTreeMap::new();
    let wanted = std::env::var("DS4_BENCH_KINDS").unwrap_or_else(|_| "csa,hca,swa".into());
    let mut g = c.benchmark_group("flash-layer-q2");
    g.sample_size(10);
    for (kind, ratio, _) in KINDS {
        if wanted.split(',').any(|k| k.trim() == kind) {
            bench_kind(&mut g, &rec, kind, ratio, &mut bytes);
        }
    }
    bench_head(&mut g, &rec, &mut bytes);
    g.finish();

    println!("\n== flash-layer-q2 summary (median per call; 1 token at position {PROMPT}) ==");
    println!(
        "{:<6} {:>14} {:>16} {:>18} {:>10}",
        "part", "decode ms", "prefill ms/tok", "weights MB/token", "GB/s"
    );
    let mut dec_total = 0.0;
    let mut pre_total = 0.0;
    let mut complete = true;
    for (kind, _, count) in KINDS.iter().copied().chain([("head", 0, 1)]) {
        let (Some(d), Some(p)) = (
            rec.median(&format!("{kind} decode")),
            rec.median(&format!("{kind} prefill")),
        ) else {
            complete = false;
            continue;
        };
        let p_tok = p / CHUNK as f64;
        let by = bytes.get(kind).copied().unwrap_or(0) as f64;
        println!(
            "{:<6} {:>14.2} {:>16.2} {:>18.1} {:>10.2}",
            kind,
            d * 1e3,
            p_tok * 1e3,
            by / 1e6,
            by / d / 1e9
        );
        dec_total += count as f64 * d;
        pre_total += count as f64 * p_tok;
    }
    if complete {
        println!(
            "43-layer extrapolation (2 SWA + 21 CSA + 20 HCA + head): decode {:.1} ms/token = {:.3} tokens/s; prefill {:.1} ms/token = {:.2} tokens/s",
            dec_total * 1e3,
            1.0 / dec_total,
            pre_total * 1e3,
            1.0 / pre_total
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
