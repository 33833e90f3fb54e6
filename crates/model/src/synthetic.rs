//! Synthetic weights: random but valid tensors for any `Config`, with the tensor types of the
//! published q2/q4 files (model.md §4.3/§4.4), built in memory. They exist to measure speed at
//! real Flash dims (one or two full-width layers fit in RAM) and to smoke-test the forward
//! pass; the text such a model produces means nothing.
//!
//! Quantised tensors are random block bytes whose f16 scale fields are set so that every
//! matrix has an element RMS of `gain / sqrt(input width)`: a matvec of an RMS-normalised
//! input then yields outputs of RMS ≈ `gain`, which keeps activations finite and O(1)
//! through a layer. The scale for each format is calibrated by dequantising sample blocks
//! with `ds4_quant`, so the target holds whatever the code distribution of the format is.
//! Random blocks are used instead of running the quantisers because a Flash layer has
//! ~5.6 G expert weights: filling bytes takes seconds, quantising would take minutes.

use std::collections::HashMap;
use std::sync::Mutex;

use ds4_gguf::GgmlType;
use half::f16;

use crate::config::Config;
use crate::weights::{TensorSource, TensorView};
use crate::{Error, Result};

/// Routed expert types of the two published files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertTypes {
    /// IQ2_XXS gate/up, Q2_K down (the "q2" file; the only pair the CPU reference runs).
    Q2,
    /// Q4_K gate/up/down (the "q4" file).
    Q4,
}

impl ExpertTypes {
    pub fn gate_up(self) -> GgmlType {
        match self {
            ExpertTypes::Q2 => GgmlType::IQ2_XXS,
            ExpertTypes::Q4 => GgmlType::Q4_K,
        }
    }
    pub fn down(self) -> GgmlType {
        match self {
            ExpertTypes::Q2 => GgmlType::Q2_K,
            ExpertTypes::Q4 => GgmlType::Q4_K,
        }
    }
}

/// Flash's config (model.md §2) cut to the layers given by `compress_ratios` (0 = sliding,
/// 4 = CSA, otherwise HCA), with the first `n_hash_layers` routed by tid2eid and the
/// vocabulary set to `vocab` (129280 for the real head; smaller to save memory).
pub fn flash_config(compress_ratios: &[usize], n_hash_layers: usize, vocab: usize) -> Config {
    let n = compress_ratios.len();
    let flash = Config::flash();
    let clamp = flash.swiglu_clamp.first().copied().unwrap_or(10.0);
    Config {
        n_layer: n,
        compress_ratios: compress_ratios.to_vec(),
        swiglu_clamp: vec![clamp; n],
        n_hash_layers,
        vocab,
        n_tokens: vocab,
        ..flash
    }
}

/// The first `n_layer` layers of Flash, schedule and hash layers included.
pub fn flash_prefix(n_layer: usize) -> Config {
    let flash = Config::flash();
    let ratios: Vec<usize> = flash
        .compress_ratios
        .iter()
        .copied()
        .take(n_layer)
        .collect();
    let hash = flash.n_hash_layers.min(ratios.len());
    flash_config(&ratios, hash, flash.vocab)
}

/// One in-memory tensor.
#[derive(Debug, Clone)]
pub struct SyntheticTensor {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order, ne0 (the input width of a matrix) first.
    pub dims: Vec<u64>,
    pub data: Vec<u8>,
}

/// A complete random model for one `Config`, usable wherever a GGUF file is
/// (`Model::new(backend, config.shape(), &weights, options)`).
#[derive(Debug, Clone)]
pub struct SyntheticWeights {
    tensors: Vec<SyntheticTensor>,
    index: HashMap<String, usize>,
}

impl TensorSource for SyntheticWeights {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let t = self.tensors.get(*self.index.get(name)?)?;
        Some(TensorView {
            name: &t.name,
            ty: t.ty,
            dims: &t.dims,
            data: &t.data,
        })
    }
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Matrix: element RMS `gain / sqrt(ne0)`.
    Matrix { gain: f32 },
    /// Uniform in `center ± amp`.
    Uniform { center: f32, amp: f32 },
    /// `n_expert_used` distinct expert ids per token.
    Tid2Eid { n_expert: usize },
}

struct Spec {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    init: Init,
}

/// Bytes of work per generation job (whole blocks).
const JOB_BYTES: usize = 1 << 20;

impl SyntheticWeights {
    /// Generates every tensor `config` needs, deterministically from `seed`. Experts use
    /// `experts`; everything else the published type of model.md §4.3 (Q8_0 attention,
    /// shared expert and head; F16 embedding, HC, compressors, indexer and router; F32
    /// norms, sinks, biases and HC scale/base; I32 tid2eid).
    pub fn generate(config: &Config, experts: ExpertTypes, seed: u64) -> Result<Self> {
        let problems = config.invariant_violations();
        if !problems.is_empty() {
            return Err(Error::Config(problems.join("; ")));
        }
        let tensors = build(&tensor_specs(config, experts)?, seed)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        tracing::debug!(tensors = tensors.len(), "synthetic weights generated");
        Ok(Self { tensors, index })
    }

    pub fn tensors(&self) -> &[SyntheticTensor] {
        &self.tensors
    }

    /// Bytes of all tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.len() as u64).sum()
    }
}

impl SyntheticTensor {
    /// One random matrix of `ty` (dims ne0 first) with element RMS `gain / sqrt(ne0)`, e.g.
    /// the output head on its own.
    pub fn random_matrix(
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        gain: f32,
        seed: u64,
    ) -> Result<Self> {
        let spec = Spec {
            name: name.to_string(),
            ty,
            dims: dims.to_vec(),
            init: Init::Matrix { gain },
        };
        build(std::slice::from_ref(&spec), seed)?
            .pop()
            .ok_or_else(|| Error::Config(format!("{name}: nothing generated")))
    }
}

/// Allocates and fills the tensors of `specs`, on all cores, deterministically from `seed`.
fn build(specs: &[Spec], seed: u64) -> Result<Vec<SyntheticTensor>> {
    let calib = Calibration::new(seed)?;
    let mut tensors: Vec<SyntheticTensor> = Vec::with_capacity(specs.len());
    for s in specs {
        let n: u64 = s.dims.iter().product();
        let bytes = s
            .dims
            .first()
            .and_then(|&ne0| s.ty.row_bytes(ne0).map(|r| r * (n / ne0.max(1))))
            .ok_or_else(|| Error::Config(format!("{}: {:?} rows of {:?}", s.name, s.ty, s.dims)))?;
        let len =
            usize::try_from(bytes).map_err(|_| Error::Config(format!("{}: too large", s.name)))?;
        tensors.push(SyntheticTensor {
            name: s.name.clone(),
            ty: s.ty,
            dims: s.dims.clone(),
            data: vec![0u8; len],
        });
    }
    // Cut every tensor into jobs of whole blocks; each job has its own seed, so the bytes
    // do not depend on the number of threads.
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for (t, s) in tensors.iter_mut().zip(specs) {
        let name_seed = seed ^ fnv1a(t.name.as_bytes());
        if let Init::Tid2Eid { n_expert } = s.init {
            fill_tid2eid(
                &mut t.data,
                s.dims.first().copied().unwrap_or(1) as usize,
                n_expert,
                name_seed,
            )?;
            continue;
        }
        let unit = t.ty.block_bytes() as usize;
        let per_job = (JOB_BYTES / unit).max(1) * unit;
        let ne0 = s.dims.first().copied().unwrap_or(1).max(1) as f32;
        for (ci, chunk) in t.data.chunks_mut(per_job).enumerate() {
            jobs.push(Job {
                data: chunk,
                ty: t.ty,
                init: s.init,
                ne0,
                seed: splitmix(name_seed ^ (ci as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            });
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len().max(1));
    let queue = Mutex::new(jobs.into_iter());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| {
                loop {
                    let job = match queue.lock() {
                        Ok(mut q) => q.next(),
                        Err(_) => None,
                    };
                    let Some(job) = job else { break };
                    if let Err(e) = job.run(&calib)
                        && let Ok(mut f) = failure.lock()
                    {
                        f.get_or_insert(e);
                    }
                }
            });
        }
    });
    match failure.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(tensors),
        Err(_) => Err(Error::Weights(
            "synthetic weights: a generator thread panicked".into(),
        )),
    }
}

/// Every tensor `ModelWeights::bind` reads, with its published type and how to draw it.
fn tensor_specs(c: &Config, experts: ExpertTypes) -> Result<Vec<Spec>> {
    use GgmlType::{F16, F32, I32, Q8_0};
    let u = |v: usize| v as u64;
    let (e, hc, mix, hd) = (u(c.n_embd), u(c.hc_dim()), u(c.hc_mix()), u(c.head_dim));
    let mut out = Vec::new();
    let mut add = |name: String, ty: GgmlType, dims: Vec<u64>, init: Init| {
        out.push(Spec {
            name,
            ty,
            dims,
            init,
        })
    };
    let matrix = Init::Matrix { gain: 1.0 };
    let norm = Init::Uniform {
        center: 1.0,
        amp: 0.1,
    };
    let hc_w = |add: &mut dyn FnMut(String, GgmlType, Vec<u64>, Init),
                prefix: &str,
                n_mix: u64,
                n_scale: u64| {
        add(format!("{prefix}_fn.weight"), F16, vec![hc, n_mix], matrix);
        add(
            format!("{prefix}_scale.weight"),
            F32,
            vec![n_scale],
            Init::Uniform {
                center: 0.5,
                amp: 0.1,
            },
        );
        add(
            format!("{prefix}_base.weight"),
            F32,
            vec![n_mix],
            Init::Uniform {
                center: 0.0,
                amp: 0.5,
            },
        );
    };
    add(
        "token_embd.weight".into(),
        F16,
        vec![e, u(c.vocab)],
        Init::Uniform {
            center: 0.0,
            amp: 3f32.sqrt(),
        },
    );
    add("output.weight".into(), Q8_0, vec![e, u(c.vocab)], matrix);
    add("output_norm.weight".into(), F32, vec![e], norm);
    hc_w(&mut add, "output_hc", u(c.hc_mult), 1);
    for il in 0..c.n_layer {
        let kind = c
            .layer_kind(il)
            .ok_or_else(|| Error::Config(format!("layer {il}: no compress ratio")))?;
        let n = |x: &str| format!("blk.{il}.{x}");
        hc_w(&mut add, &n("hc_attn"), mix, 3);
        hc_w(&mut add, &n("hc_ffn"), mix, 3);
        add(n("attn_norm.weight"), F32, vec![e], norm);
        add(
            n("attn_q_a.weight"),
            Q8_0,
            vec![e, u(c.q_lora_rank)],
            matrix,
        );
        add(n("attn_q_a_norm.weight"), F32, vec![u(c.q_lora_rank)], norm);
        add(
            n("attn_q_b.weight"),
            Q8_0,
            vec![u(c.q_lora_rank), u(c.q_dim())],
            matrix,
        );
        add(n("attn_kv.weight"), Q8_0, vec![e, hd], matrix);
        add(n("attn_kv_a_norm.weight"), F32, vec![hd], norm);
        add(
            n("attn_sinks.weight"),
            F32,
            vec![u(c.n_head)],
            Init::Uniform {
                center: 0.0,
                amp: 1.0,
            },
        );
        add(
            n("attn_output_a.weight"),
            Q8_0,
            vec![u(c.o_group_dim()), u(c.o_low_dim())],
            matrix,
        );
        add(
            n("attn_output_b.weight"),
            Q8_0,
            vec![u(c.o_low_dim()), e],
            matrix,
        );
        let ape = Init::Uniform {
            center: 0.0,
            amp: 0.5,
        };
        if kind.is_compressed() {
            let w = u(kind.coff()) * hd;
            add(
                n("attn_compressor_ape.weight"),
                F16,
                vec![w, u(kind.ratio())],
                ape,
            );
            add(n("attn_compressor_kv.weight"), F16, vec![e, w], matrix);
            add(n("attn_compressor_gate.weight"), F16, vec![e, w], matrix);
            add(n("attn_compressor_norm.weight"), F32, vec![hd], norm);
        }
        if kind.is_csa() {
            let id = u(c.indexer_dim);
            add(
                n("indexer.attn_q_b.weight"),
                F16,
                vec![u(c.q_lora_rank), u(c.indexer_q_dim())],
                matrix,
            );
            add(
                n("indexer.proj.weight"),
                F16,
                vec![e, u(c.indexer_heads)],
                matrix,
            );
            add(
                n("indexer_compressor_ape.weight"),
                F16,
                vec![2 * id, u(kind.ratio())],
                ape,
            );
            add(
                n("indexer_compressor_kv.weight"),
                F16,
                vec![e, 2 * id],
                matrix,
            );
            add(
                n("indexer_compressor_gate.weight"),
                F16,
                vec![e, 2 * id],
                matrix,
            );
            add(n("indexer_compressor_norm.weight"), F32, vec![id], norm);
        }
        let (ne, ff) = (u(c.n_expert), u(c.ffn_width));
        add(n("ffn_norm.weight"), F32, vec![e], norm);
        add(n("ffn_gate_inp.weight"), F16, vec![e, ne], matrix);
        if c.is_hash_layer(il) {
            add(
                n("ffn_gate_tid2eid.weight"),
                I32,
                vec![u(c.n_expert_used), u(c.vocab)],
                Init::Tid2Eid {
                    n_expert: c.n_expert,
                },
            );
        } else {
            add(
                n("exp_probs_b.bias"),
                F32,
                vec![ne],
                Init::Uniform {
                    center: 0.0,
                    amp: 0.05,
                },
            );
        }
        add(
            n("ffn_gate_exps.weight"),
            experts.gate_up(),
            vec![e, ff, ne],
            matrix,
        );
        add(
            n("ffn_up_exps.weight"),
            experts.gate_up(),
            vec![e, ff, ne],
            matrix,
        );
        add(
            n("ffn_down_exps.weight"),
            experts.down(),
            vec![ff, e, ne],
            matrix,
        );
        add(n("ffn_gate_shexp.weight"), Q8_0, vec![e, ff], matrix);
        add(n("ffn_up_shexp.weight"), Q8_0, vec![e, ff], matrix);
        add(n("ffn_down_shexp.weight"), Q8_0, vec![ff, e], matrix);
    }
    Ok(out)
}

/// Element RMS of each quantised format with d = 1 (and dmin = `dmin_ratio`), measured by
/// dequantising random sample blocks.
struct Calibration {
    q8_0: f32,
    q2_k: f32,
    q4_k: f32,
    iq2_xxs: f32,
}

/// dmin / d that centres random codes on zero on average: mean code × mean scale equals
/// the mean min (Q2_K: codes 0..3, Q4_K: codes 0..15; scales and mins share a range).
fn dmin_ratio(ty: GgmlType) -> f32 {
    match ty {
        GgmlType::Q2_K => 1.5,
        GgmlType::Q4_K => 7.5,
        _ => 0.0,
    }
}

impl Calibration {
    fn new(seed: u64) -> Result<Self> {
        let measure = |ty: GgmlType| -> Result<f32> {
            let blocks = 64usize;
            let bb = ty.block_bytes() as usize;
            let be = ty.block_elems() as usize;
            let mut data = vec![0u8; blocks * bb];
            let mut rng = Rng(splitmix(seed ^ u64::from(ty.id())));
            rng.fill_bytes(&mut data);
            let one = f16::ONE;
            let dmin = f16::from_f32(dmin_ratio(ty));
            for b in data.chunks_exact_mut(bb) {
                finish_block(ty, b, one, dmin);
            }
            let mut vals = vec![0f32; blocks * be];
            ds4_quant::dequantize_row(ty, &data, &mut vals)
                .map_err(|e| Error::Weights(e.to_string()))?;
            let ms = vals
                .iter()
                .map(|v| f64::from(*v) * f64::from(*v))
                .sum::<f64>()
                / vals.len() as f64;
            Ok(ms.sqrt() as f32)
        };
        Ok(Self {
            q8_0: measure(GgmlType::Q8_0)?,
            q2_k: measure(GgmlType::Q2_K)?,
            q4_k: measure(GgmlType::Q4_K)?,
            iq2_xxs: measure(GgmlType::IQ2_XXS)?,
        })
    }

    fn unit_rms(&self, ty: GgmlType) -> Option<f32> {
        match ty {
            GgmlType::Q8_0 => Some(self.q8_0),
            GgmlType::Q2_K => Some(self.q2_k),
            GgmlType::Q4_K => Some(self.q4_k),
            GgmlType::IQ2_XXS => Some(self.iq2_xxs),
            _ => None,
        }
    }
}

/// Sets the scale fields of one random block (layouts: model.md §5) and keeps Q8_0 codes in
/// −127..=127 as the quantiser would (the SIMD dots negate weight codes).
fn finish_block(ty: GgmlType, b: &mut [u8], d: f16, dmin: f16) {
    let put = |b: &mut [u8], at: usize, v: f16| {
        if let Some(dst) = b.get_mut(at..at + 2) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    };
    match ty {
        GgmlType::Q8_0 => {
            put(b, 0, d);
            for q in b.iter_mut().skip(2) {
                if *q == 0x80 {
                    *q = 0x81;
                }
            }
        }
        GgmlType::Q2_K => {
            put(b, 80, d);
            put(b, 82, dmin);
        }
        GgmlType::Q4_K => {
            put(b, 0, d);
            put(b, 2, dmin);
        }
        GgmlType::IQ2_XXS => put(b, 0, d),
        _ => {}
    }
}

struct Job<'a> {
    data: &'a mut [u8],
    ty: GgmlType,
    init: Init,
    ne0: f32,
    seed: u64,
}

impl Job<'_> {
    fn run(self, calib: &Calibration) -> Result<()> {
        let mut rng = Rng(self.seed);
        let (center, amp) = match self.init {
            Init::Uniform { center, amp } => (center, amp),
            // Uniform in ±a has RMS a/√3.
            Init::Matrix { gain } => (0.0, gain / self.ne0.sqrt() * 3f32.sqrt()),
            Init::Tid2Eid { .. } => return Ok(()),
        };
        match self.ty {
            GgmlType::F32 => {
                for c in self.data.chunks_exact_mut(4) {
                    c.copy_from_slice(&(center + amp * rng.signed_unit()).to_le_bytes());
                }
            }
            GgmlType::F16 => {
                for c in self.data.chunks_exact_mut(2) {
                    c.copy_from_slice(
                        &f16::from_f32(center + amp * rng.signed_unit()).to_le_bytes(),
                    );
                }
            }
            ty => {
                let unit = calib.unit_rms(ty).filter(|u| *u > 0.0).ok_or_else(|| {
                    Error::Config(format!("synthetic weights: no generator for {ty:?}"))
                })?;
                let Init::Matrix { gain } = self.init else {
                    return Err(Error::Config(format!(
                        "synthetic weights: {ty:?} only for matrices"
                    )));
                };
                let d = gain / self.ne0.sqrt() / unit;
                let (d16, dmin16) = (f16::from_f32(d), f16::from_f32(d * dmin_ratio(ty)));
                rng.fill_bytes(self.data);
                for b in self.data.chunks_exact_mut(ty.block_bytes() as usize) {
                    finish_block(ty, b, d16, dmin16);
                }
            }
        }
        Ok(())
    }
}

/// Row t of tid2eid: `k` distinct expert ids.
fn fill_tid2eid(data: &mut [u8], k: usize, n_expert: usize, seed: u64) -> Result<()> {
    if k == 0 || k > n_expert || k > 64 {
        return Err(Error::Config(format!(
            "tid2eid: {k} experts per token out of {n_expert}"
        )));
    }
    let mut rng = Rng(seed);
    let mut row = [0i32; 64];
    for out in data.chunks_exact_mut(4 * k) {
        let mut filled = 0;
        while filled < k {
            let id = (rng.next_u64() % n_expert as u64) as i32;
            if !row[..filled].contains(&id) {
                row[filled] = id;
                filled += 1;
            }
        }
        for (dst, id) in out.chunks_exact_mut(4).zip(&row[..k]) {
            dst.copy_from_slice(&id.to_le_bytes());
        }
    }
    Ok(())
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64 stream: fast and good enough for filler data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [−1, 1).
    fn signed_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
    }
    fn fill_bytes(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        for (d, s) in tail.iter_mut().zip(last) {
            *d = s;
        }
    }
}

/// Reduced dims with every layer kind ([SWA hash, CSA hash, HCA, CSA]): small enough
/// for unit tests, with the published tensor types.
pub fn reduced_config() -> Config {
    Config {
        compress_ratios: vec![0, 4, 16, 4],
        n_layer: 4,
        n_hash_layers: 2,
        swiglu_clamp: vec![10.0; 4],
        ..Config::tiny()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::weights::ModelWeights;

    #[test]
    fn binds_with_published_types() {
        for experts in [ExpertTypes::Q2, ExpertTypes::Q4] {
            let cfg = reduced_config();
            let w = SyntheticWeights::generate(&cfg, experts, 7).unwrap();
            let mw = ModelWeights::bind(&w, &cfg.shape()).unwrap();
            assert_eq!(mw.token_embd.ty, GgmlType::F16);
            assert_eq!(mw.output.ty, GgmlType::Q8_0);
            assert_eq!(mw.hc_head.fn_.ty, GgmlType::F16);
            for (il, l) in mw.layers.iter().enumerate() {
                assert_eq!(l.ffn.gate_exps.ty, experts.gate_up());
                assert_eq!(l.ffn.up_exps.ty, experts.gate_up());
                assert_eq!(l.ffn.down_exps.ty, experts.down());
                assert_eq!(l.attn.q_b.ty, GgmlType::Q8_0);
                assert_eq!(l.ffn.gate_sh.ty, GgmlType::Q8_0);
                assert_eq!(l.ffn.router.ty, GgmlType::F16);
                assert_eq!(l.attn.sinks.ty, GgmlType::F32);
                assert_eq!(l.ffn.tid2eid.is_some(), il < 2);
                assert_eq!(l.ffn.bias.is_some(), il >= 2);
                assert_eq!(l.attn.indexer.is_some(), cfg.compress_ratios[il] == 4);
                if let Some(ix) = &l.attn.indexer {
                    assert_eq!(ix.q_b.ty, GgmlType::F16);
                }
            }
        }
    }

    #[test]
    fn tid2eid_rows_are_distinct_and_in_range() {
        let cfg = reduced_config();
        let w = SyntheticWeights::generate(&cfg, ExpertTypes::Q2, 3).unwrap();
        let t = w.tensor("blk.0.ffn_gate_tid2eid.weight").unwrap();
        let ids: Vec<i32> = t
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(ids.len(), cfg.n_expert_used * cfg.vocab);
        for row in ids.chunks(cfg.n_expert_used) {
            for (j, &a) in row.iter().enumerate() {
                assert!((0..cfg.n_expert as i32).contains(&a));
                assert!(!row[..j].contains(&a), "duplicate expert in {row:?}");
            }
        }
    }

    /// Every matrix dequantises to finite values with the intended RMS gain/√ne0, which is
    /// what keeps activations O(1); checks the scale calibration of each block format.
    #[test]
    fn matrices_have_the_target_rms() {
        for experts in [ExpertTypes::Q2, ExpertTypes::Q4] {
            let cfg = reduced_config();
            let w = SyntheticWeights::generate(&cfg, experts, 11).unwrap();
            let mut checked = 0;
            for t in w.tensors() {
                let matrix = t.dims.len() >= 2
                    && !matches!(t.ty, GgmlType::I32)
                    && t.name != "token_embd.weight";
                if !matrix || t.name.ends_with("_ape.weight") {
                    continue;
                }
                let ne0 = t.dims[0] as usize;
                let rows = (t.data.len() / t.ty.row_bytes(ne0 as u64).unwrap() as usize).min(64);
                let mut vals = vec![0f32; ne0 * rows];
                let nbytes = t.ty.row_bytes((ne0 * rows) as u64).unwrap() as usize;
                ds4_quant::dequantize_row(t.ty, &t.data[..nbytes], &mut vals).unwrap();
                assert!(vals.iter().all(|v| v.is_finite()), "{}: non-finite", t.name);
                let rms = (vals.iter().map(|v| v * v).sum::<f32>() / vals.len() as f32).sqrt();
                let want = 1.0 / (ne0 as f32).sqrt();
                assert!(
                    (rms / want - 1.0).abs() < 0.15,
                    "{} ({:?}): rms {rms}, want {want}",
                    t.name,
                    t.ty
                );
                checked += 1;
            }
            assert!(checked > 40, "only {checked} matrices checked");
        }
    }

    #[test]
    fn deterministic_in_the_seed() {
        let cfg = reduced_config();
        let a = SyntheticWeights::generate(&cfg, ExpertTypes::Q2, 5).unwrap();
        let b = SyntheticWeights::generate(&cfg, ExpertTypes::Q2, 5).unwrap();
        let c = SyntheticWeights::generate(&cfg, ExpertTypes::Q2, 6).unwrap();
        let name = "blk.1.ffn_down_exps.weight";
        assert_eq!(a.tensor(name).unwrap().data, b.tensor(name).unwrap().data);
        assert_ne!(a.tensor(name).unwrap().data, c.tensor(name).unwrap().data);
        assert_eq!(a.total_bytes(), b.total_bytes());
    }

    #[test]
    fn flash_configs_are_consistent() {
        let one = flash_config(&[4], 0, 1024);
        assert!(
            one.invariant_violations().is_empty(),
            "{:?}",
            one.invariant_violations()
        );
        assert_eq!(
            one.shape().layer_kinds,
            vec![crate::LayerKind::Csa { ratio: 4 }]
        );
        let p = flash_prefix(4);
        assert_eq!(p.compress_ratios, vec![0, 0, 4, 128]);
        assert_eq!(p.n_hash_layers, 3);
        assert_eq!(p.n_embd, 4096);
        assert!(p.invariant_violations().is_empty());
    }

    #[test]
    fn inconsistent_config_is_an_error() {
        let mut cfg = reduced_config();
        cfg.n_hash_layers = 9;
        let err = SyntheticWeights::generate(&cfg, ExpertTypes::Q2, 1).unwrap_err();
        assert!(err.to_string().contains("hash_layer_count"), "{err}");
    }
}
