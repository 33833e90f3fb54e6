//! `ds4 bench --synthetic q2|q4`: the whole model on the CUDA backend with random weights
//! at the real Flash dims and published tensor types, through the real forward pass
//! (`ds4_model::Session`): prefill in chunks and decode (recorded CUDA graphs) at context
//! frontiers.
//!
//! The q2 model does not fit one 80 GB card, so layers of the same kind share one set of
//! weights: four distinct layers are generated (sliding+hash, CSA+hash, CSA, HCA) and
//! every one of the 43 layers reads the set of its kind. Each layer's weights (~2 GB,
//! ~190 MB touched per decoded token) are far larger than the 50 MB L2, so every layer
//! still streams its weights from HBM: the traffic per token is that of the real model.

use std::sync::Arc;
use std::time::Instant;

use ds4_model::config::Config;
use ds4_model::kv::HostKv;
use ds4_model::synthetic::{ExpertTypes, SyntheticWeights, flash_config, flash_prefix};
use ds4_model::weights::{ModelWeights, TensorSource, TensorView};
use ds4_model::{ForwardOptions, Model, Session};

use crate::backend::{CudaBackend, CudaWeight};
use crate::runtime::CudaRuntime;
use crate::{Error, Result};

/// Most untimed decode steps before the timed ones (normally 3: run directly, recorded,
/// replayed; 3 more where the indexer starts to run just past the frontier).
const DECODE_WARM_MAX: usize = 8;

/// Options of the model benchmark.
#[derive(Debug, Clone)]
pub struct ModelBenchOpts {
    pub experts: ExpertTypes,
    /// Layers of the Flash schedule to run (43 = the whole model).
    pub layers: usize,
    /// Context frontiers (tokens), increasing.
    pub ctx: Vec<usize>,
    /// Prefill chunk (tokens).
    pub chunk: usize,
    /// Timed decode steps per frontier.
    pub gen_steps: usize,
    pub seed: u64,
    /// Time the decode steps that end at each frontier (the last one sees ctx tokens)
    /// instead of those just past it.
    pub decode_before: bool,
    /// Run the indexer where it is skipped by default (see `ForwardOptions`).
    pub always_index: bool,
}

/// One frontier's measurement.
#[derive(Debug, Clone)]
pub struct ModelBenchRow {
    pub ctx_tokens: usize,
    /// The last prefill chunk before the frontier (its speed is `prefill_tps`).
    pub prefill_tokens: usize,
    pub prefill_tps: f64,
    /// All prefill since the previous frontier.
    pub segment_tokens: usize,
    pub segment_tps: f64,
    pub gen_tokens: usize,
    pub gen_tps: f64,
    /// KV state at this context (f32 layout).
    pub kv_bytes: u64,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct ModelBenchReport {
    pub device: String,
    pub copy_gbps: f64,
    pub layers: usize,
    pub uploaded_bytes: usize,
    /// Weight bytes one decode step reads (6 of 256 experts per layer, head included).
    pub step_bytes: usize,
    pub rows: Vec<ModelBenchRow>,
}

impl ModelBenchRow {
    /// Achieved weight-streaming bandwidth of decode.
    pub fn gen_gbps(&self, step_bytes: usize) -> f64 {
        step_bytes as f64 * self.gen_tps / 1e9
    }
}

/// Layer `il` of the real model reads the prototype layer of its kind.
fn prototype_of(config: &Config, il: usize) -> Result<usize> {
    let ratio = config.compress_ratios.get(il).copied().unwrap_or(0);
    let hash = il < config.n_hash_layers;
    match (ratio, hash) {
        (0, true) => Ok(0),
        (4, true) => Ok(1),
        (4, false) => Ok(2),
        (r, false) if r > 4 => Ok(3),
        _ => Err(Error::Shape {
            what: "synthetic model",
            detail: format!("layer {il}: no prototype for ratio {ratio}, hash {hash}"),
        }),
    }
}

/// Serves the prototypes' tensors under every real layer's names.
struct SharedLayers<'a> {
    proto: &'a SyntheticWeights,
    map: Vec<usize>,
}

impl TensorSource for SharedLayers<'_> {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let Some(rest) = name.strip_prefix("blk.") else {
            return self.proto.tensor(name);
        };
        let (il, tail) = rest.split_once('.')?;
        let p = *self.map.get(il.parse::<usize>().ok()?)?;
        self.proto.tensor(&format!("blk.{p}.{tail}"))
    }
}

fn bytes(w: &CudaWeight) -> usize {
    w.data.len()
}

/// Weight bytes a decode step reads: every matrix once, `used / n_expert` of the routed
/// experts, the output head (norm vectors and the one embedding row are negligible).
pub fn decode_step_bytes(
    w: &ModelWeights<CudaWeight>,
    used: usize,
    n_expert: usize,
    indexer_runs: bool,
) -> usize {
    let mut total = bytes(&w.output) + bytes(&w.hc_head.fn_);
    for l in &w.layers {
        let a = &l.attn;
        total += bytes(&l.hc_attn.fn_) + bytes(&l.hc_ffn.fn_);
        total += bytes(&a.q_a) + bytes(&a.q_b) + bytes(&a.kv) + bytes(&a.out_a) + bytes(&a.out_b);
        if let Some(c) = &a.compressor {
            total += bytes(&c.kv) + bytes(&c.gate);
        }
        if let Some(ix) = &a.indexer {
            total += bytes(&ix.compressor.kv) + bytes(&ix.compressor.gate);
            if indexer_runs {
                total += bytes(&ix.q_b) + bytes(&ix.proj);
            }
        }
        let f = &l.ffn;
        total += bytes(&f.router) + bytes(&f.gate_sh) + bytes(&f.up_sh) + bytes(&f.down_sh);
        let experts = bytes(&f.gate_exps) + bytes(&f.up_exps) + bytes(&f.down_exps);
        total += experts * used / n_expert.max(1);
    }
    total
}

fn model_err(e: ds4_model::Error) -> Error {
    Error::Shape {
        what: "model bench",
        detail: e.to_string(),
    }
}

/// Runs the benchmark; `log` receives progress lines.
pub fn run(
    rt: Arc<CudaRuntime>,
    opts: &ModelBenchOpts,
    mut log: impl FnMut(&str),
) -> Result<ModelBenchReport> {
    let layers = opts.layers.clamp(1, 43);
    let config = flash_prefix(layers);
    let shape = config.shape();
    let mut frontiers = opts.ctx.clone();
    frontiers.sort_unstable();
    frontiers.dedup();
    let max_ctx = frontiers.last().copied().unwrap_or(2048);
    let chunk = opts.chunk.max(1);
    let gen_steps = opts.gen_steps.max(1);

    // The backend's kernels also measure the copy bandwidth (loaded once).
    let backend = CudaBackend::new(rt.clone(), &shape)?;
    let copy_gbps = crate::bench::copy_bandwidth(&rt, backend.kernels(), 1 << 30)?;
    log(&format!(
        "device-to-device copy: {copy_gbps:.0} GB/s (bytes read + written)"
    ));

    let t0 = Instant::now();
    let proto_cfg = flash_config(&[0, 4, 4, 128], 2, config.vocab);
    let proto =
        SyntheticWeights::generate(&proto_cfg, opts.experts, opts.seed).map_err(model_err)?;
    log(&format!(
        "generated 4 prototype layers + embedding + head: {:.1} GB in {:.1} s",
        proto.total_bytes() as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    ));
    let map = (0..layers)
        .map(|il| prototype_of(&config, il))
        .collect::<Result<Vec<_>>>()?;
    let src = SharedLayers { proto: &proto, map };
    let t0 = Instant::now();
    let options = ForwardOptions {
        always_index: opts.always_index,
        ..Default::default()
    };
    let model = Model::new(backend, shape.clone(), &src, options).map_err(model_err)?;
    let uploaded_bytes = model.backend.uploaded_bytes();
    log(&format!(
        "uploaded {:.1} GB of distinct weights in {:.1} s ({layers} layers)",
        uploaded_bytes as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    ));
    let (used, ne) = (shape.n_expert_used, shape.n_expert);
    let step_bytes = decode_step_bytes(&model.weights, used, ne, true);
    let step_bytes_short = decode_step_bytes(&model.weights, used, ne, opts.always_index);
    log(&format!(
        "weights read per decoded token: {:.2} GB ({:.2} GB while no token sees more than {} compressed rows: the indexer {})",
        step_bytes as f64 / 1e9,
        step_bytes_short as f64 / 1e9,
        shape.indexer_top_k,
        if opts.always_index {
            "still runs (--always-index)"
        } else {
            "is skipped"
        }
    ));

    let total = max_ctx + (gen_steps + 2) * frontiers.len() + 8;
    let mut session = Session::new(&model, total, chunk).map_err(model_err)?;
    let mut rng = opts.seed | 1;
    let mut next_token = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % config.vocab as u64) as u32
    };
    let mut rows = Vec::new();
    for &ctx in &frontiers {
        let pos = session.n_tokens();
        if ctx <= pos {
            log(&format!("ctx {ctx}: already past it (at {pos}); skipped"));
            continue;
        }
        // Prefill up to the frontier, the last chunk ending exactly at it; with
        // decode_before, up to where the warm-up and timed decode steps end at it.
        let decode_steps = gen_steps + DECODE_WARM_MAX;
        let prefill_end = if opts.decode_before {
            if ctx < pos + decode_steps + 1 {
                log(&format!(
                    "ctx {ctx}: too close to the previous frontier ({pos}) for {decode_steps} decode steps before it; skipped"
                ));
                continue;
            }
            ctx - decode_steps
        } else {
            ctx
        };
        let seg: Vec<u32> = (pos..prefill_end).map(|_| next_token()).collect();
        let seg_start = Instant::now();
        let mut last = (0usize, 0.0f64);
        let mut at = 0;
        while at < seg.len() {
            let left = seg.len() - at;
            let take = if left > chunk && left < 2 * chunk {
                left - chunk
            } else {
                left.min(chunk)
            };
            let t = Instant::now();
            session
                .feed(&seg[at..at + take], chunk, None)
                .map_err(model_err)?;
            last = (take, t.elapsed().as_secs_f64());
            at += take;
        }
        let seg_s = seg_start.elapsed().as_secs_f64();
        // Decode: untimed steps until one is a replay of the recorded graph (the first
        // steps with new scratch run directly, the next is recorded: a one-time cost per
        // session that is not the steady decode rate).
        let mut tok = next_token();
        let warm_start = Instant::now();
        let mut warm_steps = 0;
        while warm_steps < DECODE_WARM_MAX {
            let replayed = model.backend.graph_stats().replayed;
            session.decode(tok).map_err(model_err)?;
            tok = next_token();
            warm_steps += 1;
            // A replay of the recording the timed steps will use (they must not cross
            // the position where the indexer starts to run; the first after it records).
            let next = session.n_tokens();
            let same_variant = model.indexers_skipped(next - 1, 1)
                == model.indexers_skipped(next + gen_steps - 1, 1);
            if model.backend.graph_stats().replayed > replayed && same_variant {
                break;
            }
        }
        if opts.decode_before {
            // Untimed replays until the timed steps end at the frontier.
            while session.n_tokens() + gen_steps < ctx {
                session.decode(tok).map_err(model_err)?;
                tok = next_token();
                warm_steps += 1;
            }
        }
        log(&format!(
            "ctx {ctx}: {warm_steps} untimed decode steps (direct, recording, first replay) took {:.1} ms",
            warm_start.elapsed().as_secs_f64() * 1e3
        ));
        // Positions of the timed steps, and the bytes their weights take.
        let first_timed = session.n_tokens();
        let last_timed = first_timed + gen_steps - 1;
        let step_bytes = if model.indexers_skipped(last_timed, 1) > 0 {
            step_bytes_short
        } else {
            step_bytes
        };
        let timed_before = model.backend.graph_stats();
        // Host phases of the timed steps only.
        let _ = crate::backend::host_profile::report();
        let t = Instant::now();
        for _ in 0..gen_steps {
            session.decode(tok).map_err(model_err)?;
            tok = next_token();
        }
        let gen_s = t.elapsed().as_secs_f64();
        let timed_after = model.backend.graph_stats();
        let timed = timed_after.timed - timed_before.timed;
        // The part of a step the host adds: token upload, graph launch, logits read.
        let device_ms =
            (timed > 0).then(|| (timed_after.timed_ms - timed_before.timed_ms) / timed as f64);
        let row = ModelBenchRow {
            ctx_tokens: ctx,
            prefill_tokens: last.0,
            prefill_tps: last.0 as f64 / last.1.max(1e-9),
            segment_tokens: seg.len(),
            segment_tps: seg.len() as f64 / seg_s.max(1e-9),
            gen_tokens: gen_steps,
            gen_tps: gen_steps as f64 / gen_s.max(1e-9),
            kv_bytes: HostKv::estimate_bytes(&shape, ctx) as u64,
        };
        log(&format!(
            "ctx {ctx}: prefill {:.0} tok/s (last chunk of {}), {:.0} tok/s over {} tokens; decode {:.1} tok/s = {:.2} ms/token, {:.0} GB/s = {:.1}% of copy",
            row.prefill_tps,
            row.prefill_tokens,
            row.segment_tps,
            row.segment_tokens,
            row.gen_tps,
            1e3 / row.gen_tps,
            row.gen_gbps(step_bytes),
            100.0 * row.gen_gbps(step_bytes) / copy_gbps
        ));
        if let Some(ms) = device_ms {
            log(&format!(
                "ctx {ctx}: decode step on the device {ms:.3} ms (graph replay, {timed} steps timed, positions {first_timed}..={last_timed}); the host adds {:.3} ms/token",
                1e3 / row.gen_tps - ms
            ));
        }
        if let Some(p) = crate::backend::host_profile::report() {
            log(&format!("ctx {ctx}: {p}"));
        }
        if crate::launch::trace::on() {
            // One more replayed step, its kernels noted (decode returns with the logits
            // read, so the device is idle before and after).
            crate::launch::trace::reset()?;
            session.decode(tok).map_err(model_err)?;
            log(&crate::launch::trace::report()?);
        }
        rows.push(row);
    }
    if let Some(p) = model.backend.profile_report() {
        log(&p);
    }
    let stats = model.backend.graph_stats();
    log(&format!(
        "decode steps: {} recorded, {} replayed",
        stats.recorded, stats.replayed
    ));
    Ok(ModelBenchReport {
        device: rt.device.name.clone(),
        copy_gbps,
        layers,
        uploaded_bytes,
        step_bytes,
        rows,
    })
}
