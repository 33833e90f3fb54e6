//! One full-width synthetic DeepSeek V4 Flash layer (real dims, published types: Q8_0
//! attention/shared/head, F16 HC/compressor/indexer/router, IQ2_XXS gate/up + Q2_K down
//! experts, 256 experts), random weights. Reports CPU decode and prefill tokens/s for
//! that layer (a small 512-token vocabulary keeps the head out of the picture).
//! `cargo bench -p ds4-cpu --bench flash_layer`
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ds4_cpu::CpuBackend;
use ds4_gguf::GgmlType;
use ds4_model::shape::{LayerKind, ModelShape};
use ds4_model::{ForwardOptions, Model, Session};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn f16b(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Random tensor of `ty` with dims (ne0 first); block scales set to `scale`-ish values.
fn tensor(rng: &mut Rng, ty: GgmlType, dims: &[u64], scale: f32) -> Vec<u8> {
    let n: u64 = dims.iter().product();
    let bytes = ty.row_bytes(dims[0]).unwrap() * (n / dims[0]);
    let mut b = vec![0u8; bytes as usize];
    match ty {
        GgmlType::F32 => {
            for c in b.chunks_mut(4) {
                c.copy_from_slice(&(rng.f() * scale).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in b.chunks_mut(2) {
                c.copy_from_slice(&f16b(rng.f() * scale));
            }
        }
        GgmlType::Q8_0 => {
            rng.fill(&mut b);
            for blk in b.chunks_mut(34) {
                blk[..2].copy_from_slice(&f16b(scale / 127.0));
            }
        }
        GgmlType::Q2_K => {
            rng.fill(&mut b);
            for blk in b.chunks_mut(84) {
                blk[80..82].copy_from_slice(&f16b(scale / 8.0));
                blk[82..84].copy_from_slice(&f16b(scale / 16.0));
            }
        }
        GgmlType::IQ2_XXS => {
            rng.fill(&mut b);
            for blk in b.chunks_mut(66) {
                blk[..2].copy_from_slice(&f16b(scale / 16.0));
            }
        }
        GgmlType::I32 => {}
        other => panic!("{other:?}"),
    }
    b
}

fn flash_layer() -> (ModelShape, common::MemTensors) {
    let (e, ff, ne, hd, nh, ql, og, ol, vocab) = (4096u64, 2048u64, 256u64, 512u64, 64u64, 1024u64, 8u64, 1024u64, 512u64);
    let shape = ModelShape {
        n_layer: 1,
        n_embd: e as usize,
        vocab: vocab as usize,
        n_head: nh as usize,
        head_dim: hd as usize,
        n_rot: 64,
        q_lora_rank: ql as usize,
        o_groups: og as usize,
        o_lora_rank: ol as usize,
        n_expert: ne as usize,
        n_expert_used: 6,
        n_ff_exp: ff as usize,
        n_hash_layers: 0,
        sliding_window: 128,
        layer_kinds: vec![LayerKind::Csa { ratio: 4 }],
        indexer_heads: 64,
        indexer_dim: 128,
        indexer_top_k: 512,
        hc_mult: 4,
        hc_sinkhorn_iters: 20,
        hc_eps: 1e-6,
        rms_eps: 1e-6,
        rope_base: 10000.0,
        compress_rope_base: 160000.0,
        yarn_factor: 16.0,
        yarn_orig_ctx: 65536.0,
        yarn_beta_fast: 32.0,
        yarn_beta_slow: 1.0,
        expert_weights_scale: 1.5,
        expert_weights_norm: true,
        swiglu_clamp: vec![10.0],
    };
    use GgmlType::*;
    let list: Vec<(&str, GgmlType, Vec<u64>, f32)> = vec![
        ("token_embd.weight", F16, vec![e, vocab], 1.0),
        ("output.weight", Q8_0, vec![e, vocab], 0.05),
        ("output_norm.weight", F32, vec![e], 1.0),
        ("output_hc_fn.weight", F16, vec![4 * e, 4], 0.02),
        ("output_hc_base.weight", F32, vec![4], 0.5),
        ("output_hc_scale.weight", F32, vec![1], 1.0),
        ("blk.0.hc_attn_fn.weight", F16, vec![4 * e, 24], 0.02),
        ("blk.0.hc_attn_scale.weight", F32, vec![3], 1.0),
        ("blk.0.hc_attn_base.weight", F32, vec![24], 0.5),
        ("blk.0.attn_norm.weight", F32, vec![e], 1.0),
        ("blk.0.attn_q_a.weight", Q8_0, vec![e, ql], 0.05),
        ("blk.0.attn_q_a_norm.weight", F32, vec![ql], 1.0),
        ("blk.0.attn_q_b.weight", Q8_0, vec![ql, nh * hd], 0.05),
        ("blk.0.attn_kv.weight", Q8_0, vec![e, hd], 0.05),
        ("blk.0.attn_kv_a_norm.weight", F32, vec![hd], 1.0),
        ("blk.0.attn_sinks.weight", F32, vec![nh], 1.0),
        ("blk.0.attn_output_a.weight", Q8_0, vec![nh * hd / og, og * ol], 0.05),
        ("blk.0.attn_output_b.weight", Q8_0, vec![og * ol, e], 0.05),
        ("blk.0.attn_compressor_ape.weight", F16, vec![2 * hd, 4], 0.5),
        ("blk.0.attn_compressor_kv.weight", F16, vec![e, 2 * hd], 0.02),
        ("blk.0.attn_compressor_gate.weight", F16, vec![e, 2 * hd], 0.02),
        ("blk.0.attn_compressor_norm.weight", F32, vec![hd], 1.0),
        ("blk.0.indexer.attn_q_b.weight", F16, vec![ql, 64 * 128], 0.03),
        ("blk.0.indexer.proj.weight", F16, vec![e, 64], 0.02),
        ("blk.0.indexer_compressor_ape.weight", F16, vec![256, 4], 0.5),
        ("blk.0.indexer_compressor_kv.weight", F16, vec![e, 256], 0.02),
        ("blk.0.indexer_compressor_gate.weight", F16, vec![e, 256], 0.02),
        ("blk.0.indexer_compressor_norm.weight", F32, vec![128], 1.0),
        ("blk.0.hc_ffn_fn.weight", F16, vec![4 * e, 24], 0.02),
        ("blk.0.hc_ffn_scale.weight", F32, vec![3], 1.0),
        ("blk.0.hc_ffn_base.weight", F32, vec![24], 0.5),
        ("blk.0.ffn_norm.weight", F32, vec![e], 1.0),
        ("blk.0.ffn_gate_inp.weight", F16, vec![e, ne], 0.02),
        ("blk.0.exp_probs_b.bias", F32, vec![ne], 0.1),
        ("blk.0.ffn_gate_exps.weight", IQ2_XXS, vec![e, ff, ne], 0.05),
        ("blk.0.ffn_up_exps.weight", IQ2_XXS, vec![e, ff, ne], 0.05),
        ("blk.0.ffn_down_exps.weight", Q2_K, vec![ff, e, ne], 0.05),
        ("blk.0.ffn_gate_shexp.weight", Q8_0, vec![e, ff], 0.05),
        ("blk.0.ffn_up_shexp.weight", Q8_0, vec![e, ff], 0.05),
        ("blk.0.ffn_down_shexp.weight", Q8_0, vec![ff, e], 0.05),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut t = common::MemTensors::default();
    for (name, ty, dims, scale) in list {
        let data = tensor(&mut rng, ty, &dims, scale);
        t.insert(name, ty, dims, data);
    }
    (shape, t)
}

fn bench(c: &mut Criterion) {
    let (shape, tensors) = flash_layer();
    let model = Model::new(CpuBackend::new(&shape), shape.clone(), &tensors, ForwardOptions::default()).unwrap();
    let tokens: Vec<u32> = (0..1024u32).map(|i| (i * 7919) % 512).collect();
    let mut g = c.benchmark_group("flash-layer");
    g.sample_size(10);
    // Decode at position 1024 (256 CSA rows: the indexer keeps all of them).
    let mut base = Session::new(&model, 4096, 256).unwrap();
    base.feed(&tokens, 256, None).unwrap();
    let snap = base.snapshot().unwrap();
    g.throughput(Throughput::Elements(8));
    g.bench_function("decode 8 tokens at 1024", |b| {
        let mut s = Session::new(&model, 4096, 256).unwrap();
        b.iter(|| {
            s.restore(&snap).unwrap();
            for &t in &tokens[..8] {
                s.decode(t).unwrap();
            }
        })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("prefill 64 tokens at 1024, chunk 64", |b| {
        let mut s = Session::new(&model, 4096, 256).unwrap();
        b.iter(|| {
            s.restore(&snap).unwrap();
            s.feed(&tokens[..64], 64, None).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
