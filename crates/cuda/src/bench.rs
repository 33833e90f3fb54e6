//! `ds4 bench --synthetic q2|q4`: the weight-streaming part of a decode step on
//! random weights generated on the device, at the real Flash dims and the
//! published tensor types (model.md §4.3, §4.4), captured in one CUDA graph.
//!
//! Included per layer: every matrix-vector product of a decode step (HC attn fn,
//! q_a, q_b, kv, attention compressor kv+gate, indexer compressor kv+gate (CSA),
//! indexer q_b + proj (CSA, only when ctx > 2048), o_a (grouped), o_b, HC ffn fn,
//! router, shared expert gate/up/down, 6 routed experts gate/up/down with the ids
//! on the device) and the activation quantisations that feed them; the output
//! head is timed separately once per token. Not included yet (they are not on
//! the GPU yet): attention over the KV cache, norms, RoPE, HC Sinkhorn/merge,
//! SwiGLU, top-k, compressor pooling, indexer scores, embedding lookup.

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use ds4_gguf::GgmlType;

use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::kernels::{
    ActBuf, ActKind, DevBuf, KV2Force, Kernels, Matvec, MvInput, MvSeg, matrix_bytes,
};
use crate::runtime::CudaRuntime;
use crate::{Error, Result};

/// Hidden size, HC width, and the other Flash dims used below (model.md §2).
const D: usize = 4096;
const HC: usize = 16384;
const HC_MIX: usize = 24;
const Q_LORA: usize = 1024;
const Q_DIM: usize = 32768;
const HEAD: usize = 512;
const O_GROUPS: usize = 8;
const O_LOW: usize = 8192;
const FFN: usize = 2048;
const N_EXPERTS: usize = 256;
const N_ACTIVE: usize = 6;
const VOCAB: usize = 129280;
const N_LAYERS: usize = 43;
const INDEXER_Q: usize = 8192;
const INDEXER_HEADS: usize = 64;
const INDEXER_COMPR: usize = 256;
/// Copy bandwidth measured on an H100 of this workplace (KINDS.md), for reference.
pub const H100_COPY_GBPS: f64 = 3000.0;

/// Which published file the synthetic weights imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synthetic {
    /// IQ2_XXS gate/up, Q2_K down.
    Q2,
    /// Q4_K gate/up/down.
    Q4,
}

impl Synthetic {
    fn expert_types(self) -> (GgmlType, GgmlType) {
        match self {
            Self::Q2 => (GgmlType::IQ2_XXS, GgmlType::Q2_K),
            Self::Q4 => (GgmlType::Q4_K, GgmlType::Q4_K),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Q2 => "q2",
            Self::Q4 => "q4",
        }
    }
}

/// Compression ratio of layer `il` (model.md §3).
pub fn compress_ratio(il: usize) -> usize {
    if il < 2 {
        0
    } else if il.is_multiple_of(2) {
        4
    } else {
        128
    }
}

/// One matvec of the step, for the byte count and the report.
#[derive(Debug, Clone)]
struct Op {
    name: &'static str,
    ty: GgmlType,
    k: usize,
    rows: usize,
    /// Matrices read (6 routed experts, 8 output groups, else 1).
    mats: usize,
}

impl Op {
    fn bytes(&self) -> usize {
        matrix_bytes(self.ty, self.k, self.rows) * self.mats
    }
}

/// The matvecs of layer `il`'s decode step.
fn layer_ops(il: usize, quant: Synthetic, with_indexer_q: bool) -> Vec<Op> {
    use GgmlType::*;
    let (gu, dn) = quant.expert_types();
    let op = |name, ty, k, rows, mats| Op {
        name,
        ty,
        k,
        rows,
        mats,
    };
    let mut v = vec![
        op("hc_attn_fn", F16, HC, HC_MIX, 1),
        op("attn_q_a", Q8_0, D, Q_LORA, 1),
        op("attn_q_b", Q8_0, Q_LORA, Q_DIM, 1),
        op("attn_kv", Q8_0, D, HEAD, 1),
    ];
    let ratio = compress_ratio(il);
    if ratio != 0 {
        let w = if ratio == 4 { 2 * HEAD } else { HEAD };
        v.push(op("attn_compressor_kv", F16, D, w, 1));
        v.push(op("attn_compressor_gate", F16, D, w, 1));
    }
    if ratio == 4 {
        v.push(op("indexer_compressor_kv", F16, D, INDEXER_COMPR, 1));
        v.push(op("indexer_compressor_gate", F16, D, INDEXER_COMPR, 1));
        if with_indexer_q {
            v.push(op("indexer.attn_q_b", F16, Q_LORA, INDEXER_Q, 1));
            v.push(op("indexer.proj", F16, D, INDEXER_HEADS, 1));
        }
    }
    v.extend([
        op("attn_output_a", Q8_0, D, Q_LORA, O_GROUPS),
        op("attn_output_b", Q8_0, O_LOW, D, 1),
        op("hc_ffn_fn", F16, HC, HC_MIX, 1),
        op("ffn_gate_inp", F16, D, N_EXPERTS, 1),
        op("ffn_gate_shexp", Q8_0, D, FFN, 1),
        op("ffn_up_shexp", Q8_0, D, FFN, 1),
        op("ffn_down_shexp", Q8_0, FFN, D, 1),
        op("ffn_gate_exps", gu, D, FFN, N_ACTIVE),
        op("ffn_up_exps", gu, D, FFN, N_ACTIVE),
        op("ffn_down_exps", dn, FFN, D, N_ACTIVE),
    ]);
    v
}

/// Weight bytes a full 43-layer decode step reads through these matvecs, plus the head.
pub fn full_model_step_bytes(quant: Synthetic, ctx: usize) -> usize {
    let idx = ctx > 2048;
    let layers: usize = (0..N_LAYERS)
        .map(|il| {
            layer_ops(il, quant, idx)
                .iter()
                .map(Op::bytes)
                .sum::<usize>()
        })
        .sum();
    layers + matrix_bytes(GgmlType::Q8_0, D, VOCAB)
}

/// KV state bytes at `ctx` tokens as ds4 stores it (f32 rows, model.md §12):
/// raw 128-row windows, compressed rows and indexer rows. Computed, not allocated here.
pub fn kv_state_bytes(ctx: usize) -> usize {
    let csa = (2..N_LAYERS).filter(|&il| compress_ratio(il) == 4).count();
    let hca = (2..N_LAYERS)
        .filter(|&il| compress_ratio(il) == 128)
        .count();
    let raw = N_LAYERS * 128 * HEAD * 4;
    let comp = csa * (ctx / 4) * HEAD * 4 + hca * (ctx / 128) * HEAD * 4;
    let indexer = csa * (ctx / 4) * 128 * 4;
    raw + comp + indexer
}

/// Options of the synthetic benchmark.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    pub quant: Synthetic,
    pub layers: usize,
    pub ctx: Vec<usize>,
    /// Timed graph replays per measurement (median reported).
    pub iters: usize,
}

/// One context frontier's result.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub ctx: usize,
    pub layers: usize,
    pub step_bytes: usize,
    pub step_ms: f64,
    pub head_ms: f64,
    pub head_bytes: usize,
    pub full_bytes: usize,
    /// 43-layer step + head, scaled from the measured bandwidth.
    pub full_ms: f64,
    pub gen_tokens: usize,
    pub kv_bytes: usize,
}

impl BenchRow {
    pub fn gbps(&self) -> f64 {
        self.step_bytes as f64 / self.step_ms / 1e6
    }
    pub fn gen_tps(&self) -> f64 {
        1000.0 / self.full_ms
    }
}

/// Everything the bench prints.
pub struct BenchReport {
    pub copy_gbps: f64,
    pub rows: Vec<BenchRow>,
    pub layer_lines: Vec<String>,
    /// Per-op time and bandwidth on one CSA layer (quantisation included).
    pub op_lines: Vec<String>,
}

struct LayerWeights {
    il: usize,
    ops: Vec<(Op, DevBuf)>,
    ids: DevBuf,
}

/// Activation buffers shared by all layers (the step is sequential).
struct Scratch {
    x_f32: DevBuf,
    out: DevBuf,
    q8_0: Vec<(usize, usize, ActBuf)>,
    q8_k: Vec<(usize, usize, ActBuf)>,
}

impl Scratch {
    fn act(&self, kind: ActKind, k: usize, rows: usize) -> Result<&ActBuf> {
        let list = if kind == ActKind::Q8_0 {
            &self.q8_0
        } else {
            &self.q8_k
        };
        list.iter()
            .find(|(kk, rr, _)| *kk == k && *rr == rows)
            .map(|(_, _, a)| a)
            .ok_or(Error::Shape {
                what: "bench scratch",
                detail: format!("no {kind:?} activation of {rows}x{k}"),
            })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median time (ms) of `f` on the stream, `iters` runs after 3 warm-ups.
fn time_ms(rt: &CudaRuntime, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    rt.stream.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let a = rt
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let b = rt
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        b.synchronize()?;
        times.push(f64::from(a.elapsed_ms(&b)?));
    }
    Ok(median(times))
}

/// Device-to-device copy bandwidth (bytes read + written per second), in GB/s.
pub fn copy_bandwidth(rt: &CudaRuntime, kern: &Kernels, bytes: usize) -> Result<f64> {
    let a = DevBuf::zeros(&rt.stream, bytes)?;
    let b = DevBuf::zeros(&rt.stream, bytes)?;
    kern.synth_f32(a.ptr, (bytes / 4) as u64, 1.0, 7)?;
    let ms = time_ms(rt, 10, || {
        // SAFETY: both buffers hold `bytes` bytes and live until after the sync.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(b.ptr, a.ptr, bytes, rt.stream.cu_stream())
        }?;
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / ms / 1e6)
}

/// Slots, activation grouping and activation rows of an op.
fn op_layout(op: &Op) -> (usize, usize, usize) {
    if op.name.ends_with("_exps") {
        if op.name == "ffn_down_exps" {
            (N_ACTIVE, 1, N_ACTIVE)
        } else {
            (N_ACTIVE, N_ACTIVE, 1)
        }
    } else if op.mats > 1 {
        (op.mats, 1, op.mats)
    } else {
        (1, 1, 1)
    }
}

/// Quantizes the op's input (from the shared f32 scratch) on `stream`.
fn quantize_for(kern: &Kernels, stream: &Arc<CudaStream>, s: &Scratch, op: &Op) -> Result<()> {
    let kind = ActKind::for_weight(op.ty)?;
    if kind == ActKind::F32 {
        return Ok(());
    }
    let act = s.act(kind, op.k, op_layout(op).2)?;
    kern.quantize_on(stream, s.x_f32.ptr, act)
}

/// Launches the op's matvec on `stream`, reading the already quantized input;
/// output goes to the stream's own region `out_slot` of the scratch output.
fn matvec_for(
    kern: &Kernels,
    stream: &Arc<CudaStream>,
    s: &Scratch,
    op: &Op,
    w: &DevBuf,
    ids: &DevBuf,
    out_slot: usize,
) -> Result<()> {
    let (slots, x_group, act_rows) = op_layout(op);
    let routed = op.name.ends_with("_exps");
    let kind = ActKind::for_weight(op.ty)?;
    let input = match kind {
        ActKind::F32 => MvInput::F32(s.x_f32.ptr),
        _ => MvInput::Quant(s.act(kind, op.k, act_rows)?),
    };
    kern.matvec_on(
        stream,
        &Matvec {
            ty: op.ty,
            w: w.ptr,
            k: op.k,
            rows: op.rows,
            ntok: 1,
            slots,
            w_slot_stride: matrix_bytes(op.ty, op.k, op.rows) as u64,
            ids: if routed { ids.ptr } else { 0 },
            x_group,
            x: input,
            y: s.out.ptr + (out_slot * OUT_SLOT_BYTES) as u64,
        },
    )
}

/// Bytes of each stream's region of the scratch output.
const OUT_SLOT_BYTES: usize = VOCAB * 4;

/// Quantize + matvec of one op on the main stream (per-op timing, the head).
fn launch_op(kern: &Kernels, s: &Scratch, op: &Op, w: &DevBuf, ids: &DevBuf) -> Result<()> {
    quantize_for(kern, kern.stream(), s, op)?;
    matvec_for(kern, kern.stream(), s, op, w, ids, 0)
}

/// One layer's decode-step matvecs with the dependencies of the real step and
/// independent work on parallel graph branches:
///   main: hc_attn_fn, quant(xn) | fork | main: q_a, quant, q_b, indexer q_b;
///   b1: kv, indexer proj; b2: compressors (F16) | join | quant, o_a, quant,
///   o_b, hc_ffn_fn, quant(yn) | fork | main: router, routed gate, quant(mid),
///   routed down (after join with b2: routed up); b1: shared gate, up, quant,
///   down | join.
/// Each input is quantized once, as the real step does.
fn launch_layer(
    kern: &Kernels,
    streams: &[Arc<CudaStream>; 3],
    s: &Scratch,
    lw: &LayerWeights,
    with_indexer_q: bool,
) -> Result<()> {
    let [m, b1, b2] = streams;
    let get = |name: &str| lw.ops.iter().find(|(o, _)| o.name == name);
    let mv = |st: &Arc<CudaStream>, name: &str, slot: usize| -> Result<()> {
        if name.starts_with("indexer.") && !with_indexer_q {
            return Ok(());
        }
        match get(name) {
            Some((op, w)) => matvec_for(kern, st, s, op, w, &lw.ids, slot),
            None => Ok(()),
        }
    };
    let quant = |st: &Arc<CudaStream>, name: &str| -> Result<()> {
        match get(name) {
            Some((op, _)) => quantize_for(kern, st, s, op),
            None => Ok(()),
        }
    };
    let fork = |to: &[&Arc<CudaStream>]| -> Result<()> {
        let ev = m.record_event(None)?;
        for st in to {
            st.wait(&ev)?;
        }
        Ok(())
    };
    let join = |from: &[&Arc<CudaStream>]| -> Result<()> {
        for st in from {
            m.wait(&st.record_event(None)?)?;
        }
        Ok(())
    };
    // Attention half.
    mv(m, "hc_attn_fn", 0)?;
    quant(m, "attn_q_a")?; // xn, shared by q_a and kv
    fork(&[b1, b2])?;
    mv(m, "attn_q_a", 0)?;
    quant(m, "attn_q_b")?;
    mv(m, "attn_q_b", 0)?;
    mv(m, "indexer.attn_q_b", 0)?;
    mv(b1, "attn_kv", 1)?;
    mv(b1, "indexer.proj", 1)?;
    for name in [
        "attn_compressor_kv",
        "attn_compressor_gate",
        "indexer_compressor_kv",
        "indexer_compressor_gate",
    ] {
        mv(b2, name, 2)?;
    }
    join(&[b1, b2])?;
    quant(m, "attn_output_a")?;
    mv(m, "attn_output_a", 0)?;
    quant(m, "attn_output_b")?;
    mv(m, "attn_output_b", 0)?;
    // FFN half.
    mv(m, "hc_ffn_fn", 0)?;
    quant(m, "ffn_gate_shexp")?; // yn as Q8_0 (shared expert)
    quant(m, "ffn_gate_exps")?; // yn as Q8_K (routed experts)
    fork(&[b1])?;
    mv(m, "ffn_gate_inp", 0)?;
    fork(&[b2])?; // routed up needs the router's ids, as gate does
    mv(m, "ffn_gate_exps", 0)?;
    mv(b2, "ffn_up_exps", 2)?;
    join(&[b2])?;
    quant(m, "ffn_down_exps")?;
    mv(m, "ffn_down_exps", 0)?;
    mv(b1, "ffn_gate_shexp", 1)?;
    mv(b1, "ffn_up_shexp", 1)?;
    quant(b1, "ffn_down_shexp")?;
    mv(b1, "ffn_down_shexp", 1)?;
    join(&[b1])?;
    Ok(())
}

/// Runs the synthetic decode-step benchmark.
pub fn run(
    rt: &CudaRuntime,
    kern: &Kernels,
    opts: &BenchOpts,
    mut log: impl FnMut(&str),
) -> Result<BenchReport> {
    let stream = &rt.stream;
    let copy_gbps = copy_bandwidth(rt, kern, 1 << 30)?;
    log(&format!(
        "device-to-device copy: {copy_gbps:.0} GB/s (bytes read + written)"
    ));

    let any_indexer_q = opts.ctx.iter().any(|&c| c > 2048);
    let layers = opts.layers.max(1);
    // Spread the synthetic layers over the real schedule so the mix of SWA /
    // CSA / HCA layers matches the model's.
    let ils: Vec<usize> = (0..layers).map(|i| i * N_LAYERS / layers).collect();
    let mut weights = Vec::new();
    let mut seed = 1u64;
    for &il in &ils {
        let mut ops = Vec::new();
        for op in layer_ops(il, opts.quant, any_indexer_q) {
            // Routed experts: all 256 are resident, as in the real model.
            let n_mats = if op.name.ends_with("_exps") {
                N_EXPERTS
            } else {
                op.mats
            };
            let bytes = matrix_bytes(op.ty, op.k, op.rows) * n_mats;
            let buf = DevBuf::zeros(stream, bytes)?;
            let blocks = (bytes / op.ty.block_bytes() as usize) as u64;
            let n = if op.ty == GgmlType::F16 {
                (bytes / 2) as u64
            } else {
                blocks
            };
            kern.synth_weights(op.ty, buf.ptr, n, op.k, seed)?;
            seed += 1;
            ops.push((op, buf));
        }
        // Six distinct experts, spread over the tensor.
        let ids: Vec<i32> = (0..N_ACTIVE as i32)
            .map(|i| (i * 41 + il as i32 * 7) % N_EXPERTS as i32)
            .collect();
        let ids = DevBuf::from_bytes(stream, bytemuck::cast_slice(&ids))?;
        weights.push(LayerWeights { il, ops, ids });
    }
    let head = DevBuf::zeros(stream, matrix_bytes(GgmlType::Q8_0, D, VOCAB))?;
    kern.synth_weights(GgmlType::Q8_0, head.ptr, (D / 32 * VOCAB) as u64, D, 999)?;

    // Scratch: one f32 input big enough for every op, one output, activations.
    let x_f32 = DevBuf::zeros(stream, Q_DIM.max(HC).max(N_ACTIVE * FFN) * 4)?;
    kern.synth_f32(
        x_f32.ptr,
        (Q_DIM.max(HC).max(N_ACTIVE * FFN)) as u64,
        1.0,
        42,
    )?;
    let out = DevBuf::zeros(stream, 3 * OUT_SLOT_BYTES)?;
    let mut q8_0 = Vec::new();
    let mut q8_k = Vec::new();
    for (k, rows) in [(D, 1), (Q_LORA, 1), (D, O_GROUPS), (O_LOW, 1), (FFN, 1)] {
        q8_0.push((k, rows, ActBuf::new(stream, ActKind::Q8_0, k, rows)?));
    }
    for (k, rows) in [(D, 1), (FFN, N_ACTIVE)] {
        q8_k.push((k, rows, ActBuf::new(stream, ActKind::Q8K, k, rows)?));
    }
    let scratch = Scratch {
        x_f32,
        out,
        q8_0,
        q8_k,
    };
    stream.synchronize()?;

    let mut report = BenchReport {
        copy_gbps,
        rows: Vec::new(),
        layer_lines: Vec::new(),
        op_lines: Vec::new(),
    };
    for (i, lw) in weights.iter().enumerate() {
        let bytes: usize = lw.ops.iter().map(|(o, _)| o.bytes()).sum();
        if i < 3 || i + 1 == weights.len() {
            report.layer_lines.push(format!(
                "layer {:>2} (ratio {:>3}): {} matvecs, {:.1} MB of weights per token",
                lw.il,
                compress_ratio(lw.il),
                lw.ops.len(),
                bytes as f64 / 1e6
            ));
        }
    }

    let streams = [
        rt.stream.clone(),
        rt.ctx.new_stream()?,
        rt.ctx.new_stream()?,
    ];

    // Per-op figures for one CSA layer: 10 back-to-back copies of the op (its
    // quantisation included) in a graph, so launch gaps count as in the step.
    if let Some(lw) = weights.iter().find(|lw| compress_ratio(lw.il) == 4) {
        for (op, w) in &lw.ops {
            let g = capture(rt, || {
                for _ in 0..10 {
                    launch_op(kern, &scratch, op, w, &lw.ids)?;
                }
                Ok(())
            })?;
            let ms = time_ms(rt, opts.iters.min(20), || Ok(g.launch()?))? / 10.0;
            report.op_lines.push(format!(
                "{:<24} {:<7} {:>5}->{:<6} x{:<2} {:>8.2} MB {:>8.1} us {:>6.0} GB/s",
                op.name,
                op.ty.name(),
                op.k,
                op.rows,
                op.mats,
                op.bytes() as f64 / 1e6,
                ms * 1e3,
                op.bytes() as f64 / ms / 1e6
            ));
        }
    }

    // The output head, once per token.
    let head_op = Op {
        name: "output",
        ty: GgmlType::Q8_0,
        k: D,
        rows: VOCAB,
        mats: 1,
    };
    let head_graph = capture(rt, || launch_op(kern, &scratch, &head_op, &head, &head))?;
    // (Branch streams join the main one inside each layer's capture.)
    let head_ms = time_ms(rt, opts.iters, || Ok(head_graph.launch()?))?;
    let head_bytes = head_op.bytes();
    log(&format!(
        "output head Q8_0 4096->129280: {head_ms:.3} ms, {:.0} GB/s",
        head_bytes as f64 / head_ms / 1e6
    ));

    let mut ctxs = opts.ctx.clone();
    ctxs.sort_unstable();
    for &ctx in &ctxs {
        let with_idx = ctx > 2048;
        let keep = |op: &Op| with_idx || !op.name.starts_with("indexer.");
        let graph = capture(rt, || {
            for lw in &weights {
                launch_layer(kern, &streams, &scratch, lw, with_idx)?;
            }
            Ok(())
        })?;
        let step_ms = time_ms(rt, opts.iters, || Ok(graph.launch()?))?;
        let step_bytes: usize = weights
            .iter()
            .flat_map(|lw| {
                lw.ops
                    .iter()
                    .filter(|(o, _)| keep(o))
                    .map(|(o, _)| o.bytes())
            })
            .sum();
        let full_bytes = full_model_step_bytes(opts.quant, ctx);
        let layer_full_bytes = full_bytes - head_bytes;
        let full_ms = step_ms * layer_full_bytes as f64 / step_bytes as f64 + head_ms;
        report.rows.push(BenchRow {
            ctx,
            layers,
            step_bytes,
            step_ms,
            head_ms,
            head_bytes,
            full_bytes,
            full_ms,
            gen_tokens: opts.iters,
            kv_bytes: kv_state_bytes(ctx),
        });
    }
    Ok(report)
}

/// The human-readable report: what is included, per-layer figures, bandwidth.
pub fn render_text(report: &BenchReport, opts: &BenchOpts) -> String {
    let mut s = format!(
        "synthetic {}: {} layers spread over the 43-layer schedule, routed experts: 6 of 256 resident\n",
        opts.quant.name(),
        opts.layers
    );
    for l in &report.layer_lines {
        s.push_str(&format!("  {l}\n"));
    }
    s.push_str(
        "INCLUDED per layer: all weight matvecs of a decode step (HC fns, q_a, q_b, kv, compressors, \
         indexer compressors, indexer q_b/proj when ctx > 2048, o_a, o_b, router, shared expert, \
         6 routed experts) + their activation quantisation (each input once), with independent \
         matvecs on parallel graph branches (3 streams); output head timed separately.\n\
         NOT INCLUDED yet: attention over the KV cache, norms, RoPE, HC Sinkhorn/merge, SwiGLU, \
         top-k, compressor pooling, indexer scores, embedding. tok/s below is therefore the \
         weight-streaming bound of this code, not end-to-end decode.\n",
    );
    if !report.op_lines.is_empty() {
        s.push_str("per op (one CSA layer, each op alone, activation quantisation included):\n");
        for l in &report.op_lines {
            s.push_str(&format!("  {l}\n"));
        }
    }
    for r in &report.rows {
        s.push_str(&format!(
            "ctx {:>7}: {:.1} MB/step over {} layers in {:.3} ms ({:.3} ms/layer) = {:.0} GB/s = {:.1}% of measured copy ({:.0} GB/s), {:.1}% of {:.1} TB/s; \
             43-layer step + head: {:.2} GB/token -> {:.3} ms -> {:.1} tok/s\n",
            r.ctx,
            r.step_bytes as f64 / 1e6,
            r.layers,
            r.step_ms,
            r.step_ms / r.layers as f64,
            r.gbps(),
            100.0 * r.gbps() / report.copy_gbps,
            report.copy_gbps,
            100.0 * r.gbps() / H100_COPY_GBPS,
            H100_COPY_GBPS / 1000.0,
            r.full_bytes as f64 / 1e9,
            r.full_ms,
            r.gen_tps()
        ));
    }
    s
}

/// The CSV of issue 5. Prefill is not on the GPU yet (NA); kv_bytes is the KV
/// state size at that context computed from the layout (the bench reads no KV).
pub fn render_csv(report: &BenchReport) -> String {
    let mut csv =
        String::from("ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kv_bytes\n");
    for r in &report.rows {
        csv.push_str(&format!(
            "{},0,NA,{},{:.1},{}\n",
            r.ctx,
            r.gen_tokens,
            r.gen_tps(),
            r.kv_bytes
        ));
    }
    csv
}

/// Distinct sets of 6 experts the routed bench cycles through, so that successive
/// launches read different weights (6 experts' gate + up, 26 MB, would otherwise
/// stay in the 50 MB L2 and be timed from there).
const ROUTED_ID_SETS: usize = 42;
/// Launches per timed graph of the routed bench.
const ROUTED_LAUNCHES: usize = 42;

/// `ds4 bench --synthetic q2|q4 --routed-only`: the routed-expert products of one
/// decode step alone (gate + up as the step launches them, one two-segment launch
/// over 6 experts, and down), timed with every kernel that can take them: the
/// environment's default (also with rows from counters), the register kernels
/// (`KV2Force::Off`) and each version-2 variant of the type. Each graph holds
/// `ROUTED_LAUNCHES` launches, each on another set of 6 of the 256 resident experts;
/// one line per (product, kernel).
pub fn run_routed(
    rt: &CudaRuntime,
    kern: &Kernels,
    quant: Synthetic,
    iters: usize,
    mut log: impl FnMut(&str),
) -> Result<Vec<String>> {
    let stream = &rt.stream;
    let (gu, dn) = quant.expert_types();
    let mats = |ty: GgmlType, k: usize, rows: usize, seed: u64| -> Result<DevBuf> {
        let bytes = matrix_bytes(ty, k, rows) * N_EXPERTS;
        let buf = DevBuf::zeros(stream, bytes)?;
        kern.synth_weights(
            ty,
            buf.ptr,
            (bytes / ty.block_bytes() as usize) as u64,
            k,
            seed,
        )?;
        Ok(buf)
    };
    let gate = mats(gu, D, FFN, 11)?;
    let up = mats(gu, D, FFN, 12)?;
    let down = mats(dn, FFN, D, 13)?;
    // Set j: experts (7j + 41i) mod 256, distinct within a set.
    let ids: Vec<i32> = (0..ROUTED_ID_SETS as i32)
        .flat_map(|j| (0..N_ACTIVE as i32).map(move |i| (7 * j + 41 * i) % N_EXPERTS as i32))
        .collect();
    let ids = DevBuf::from_bytes(stream, bytemuck::cast_slice(&ids))?;
    let x = DevBuf::zeros(stream, N_ACTIVE * FFN.max(D) * 4)?;
    kern.synth_f32(x.ptr, (N_ACTIVE * FFN.max(D)) as u64, 1.0, 42)?;
    let act_d = ActBuf::new(stream, ActKind::for_weight(gu)?, D, 1)?;
    let act_f = ActBuf::new(stream, ActKind::for_weight(dn)?, FFN, N_ACTIVE)?;
    kern.quantize(x.ptr, &act_d)?;
    kern.quantize(x.ptr, &act_f)?;
    let out = DevBuf::zeros(stream, 2 * N_ACTIVE * D.max(2 * FFN) * 4)?;
    stream.synchronize()?;

    let gu_stride = matrix_bytes(gu, D, FFN);
    let dn_stride = matrix_bytes(dn, FFN, D);
    let ids_at = |l: usize| ids.ptr + (4 * N_ACTIVE * (l % ROUTED_ID_SETS)) as u64;
    let gate_up = |l: usize| -> Result<()> {
        let m = Matvec {
            ty: gu,
            w: gate.ptr,
            k: D,
            rows: FFN,
            ntok: 1,
            slots: N_ACTIVE,
            w_slot_stride: gu_stride as u64,
            ids: ids_at(l),
            x_group: N_ACTIVE,
            x: MvInput::Quant(&act_d),
            y: out.ptr,
        };
        let up_seg = MvSeg {
            w: up.ptr,
            rows: FFN,
            y: out.ptr + (N_ACTIVE * FFN * 4) as u64,
            ldy: FFN,
        };
        kern.matvec_segs(stream, &m, FFN, &[up_seg])
    };
    let down_mv = |l: usize| -> Result<()> {
        kern.matvec_on(
            stream,
            &Matvec {
                ty: dn,
                w: down.ptr,
                k: FFN,
                rows: D,
                ntok: 1,
                slots: N_ACTIVE,
                w_slot_stride: dn_stride as u64,
                ids: ids_at(l),
                x_group: 1,
                x: MvInput::Quant(&act_f),
                y: out.ptr,
            },
        )
    };
    type Launch<'a> = &'a dyn Fn(usize) -> Result<()>;
    let products: [(String, GgmlType, usize, usize, Launch); 2] = [
        (
            format!("gate+up {} {D}->2x{FFN} x{N_ACTIVE}", gu.name()),
            gu,
            D,
            2 * gu_stride * N_ACTIVE,
            &gate_up,
        ),
        (
            format!("down {} {FFN}->{D} x{N_ACTIVE}", dn.name()),
            dn,
            FFN,
            dn_stride * N_ACTIVE,
            &down_mv,
        ),
    ];
    let mut lines = Vec::new();
    for (name, ty, k, bytes, launch) in products {
        // (name, kernel choice, rows from counters)
        let mut kinds = vec![
            ("default".to_string(), KV2Force::Env, false),
            ("default, row counters".to_string(), KV2Force::Env, true),
            ("regs".to_string(), KV2Force::Off, false),
        ];
        kinds.extend(
            kern.k_v2_variants()
                .into_iter()
                .filter(|v| v.ty == ty && 2048 * v.ppl == k)
                .map(|v| (v.name(), KV2Force::Variant(v), false)),
        );
        for (kname, force, dyn_rows) in kinds {
            kern.force_k_v2(force);
            kern.force_k_v2_dyn(dyn_rows);
            let timed = capture(rt, || {
                for l in 0..ROUTED_LAUNCHES {
                    launch(l)?;
                }
                Ok(())
            })
            .and_then(|g| time_ms(rt, iters, || Ok(g.launch()?)));
            kern.force_k_v2(KV2Force::Env);
            kern.force_k_v2_dyn(false);
            let ms = timed? / ROUTED_LAUNCHES as f64;
            let line = format!(
                "{name:<32} {kname:<24} {:>8.2} MB {:>8.2} us {:>6.0} GB/s",
                bytes as f64 / 1e6,
                ms * 1e3,
                bytes as f64 / ms / 1e6
            );
            log(&line);
            lines.push(line);
        }
    }
    Ok(lines)
}

fn capture(rt: &CudaRuntime, f: impl FnOnce() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
    rt.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let body = f();
    let graph = rt.stream.end_capture(CUgraphInstantiate_flags(0));
    body?;
    let graph = graph?.ok_or(Error::Shape {
        what: "graph capture",
        detail: "captured an empty graph".into(),
    })?;
    graph.upload()?;
    Ok(graph)
}

// ---------------------------------------------------------------------------
// Prefill GEMM bench (`crate::gemm`).
// ---------------------------------------------------------------------------

/// One timed prefill GEMM.
#[derive(Debug, Clone)]
pub struct GemmBenchRow {
    pub name: &'static str,
    pub ty: GgmlType,
    pub k: usize,
    pub rows: usize,
    /// Tokens (dense) or slots (routed: tokens × 6).
    pub tokens: usize,
    pub ms: f64,
}

impl GemmBenchRow {
    /// Multiply-adds counted as 2 FLOP.
    pub fn tflops(&self) -> f64 {
        2.0 * (self.k * self.rows * self.tokens) as f64 / (self.ms * 1e-3) / 1e12
    }
}

/// Full-model prefill tokens/s these rates imply: 43 layers of the quantized
/// projections (the F16 ones, attention, norms, HC and the rest excluded; the
/// output head is only needed for the last token of a chunk).
pub fn gemm_prefill_estimate(rows: &[GemmBenchRow], routed: &[&str; 2]) -> Option<f64> {
    let rate = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.tflops() * 1e12)
    };
    let q8 = |k: usize, n: usize, name: &str| rate(name).map(|r| 2.0 * (k * n) as f64 / r);
    let per_layer = q8(D, Q_LORA, "q8_0 4096->1024")?
        + q8(D, HEAD, "q8_0 4096->1024")?
        + q8(Q_LORA, Q_DIM, "q8_0 1024->32768")?
        + q8(D * O_GROUPS, Q_LORA, "q8_0 4096->1024")?
        + q8(O_LOW, D, "q8_0 8192->4096")?
        + 2.0 * q8(D, FFN, "q8_0 4096->2048")?
        + q8(FFN, D, "q8_0 2048->4096")?
        + 2.0 * q8(D * N_ACTIVE, FFN, routed[0])?
        + q8(FFN * N_ACTIVE, D, routed[1])?;
    Some(1.0 / (N_LAYERS as f64 * per_layer))
}

/// Times the prefill GEMMs at 2048 tokens (routed: 2048 × 6 slots over 256
/// experts, ids uniformly random, distinct per token) on device-generated
/// random weights; the median of `iters` runs after warm-up. The activation
/// quantisation is not included (it runs once per input, not per product).
pub fn bench_gemm(
    rt: &CudaRuntime,
    kern: &Kernels,
    iters: usize,
    mut report: impl FnMut(&str),
) -> Result<Vec<GemmBenchRow>> {
    use crate::gemm::{Gemm, GemmKernels, GemmScratch, RoutedGemm};
    use GgmlType::*;
    const T: usize = 2048;
    let gk = GemmKernels::load(rt)?;
    let stream = &rt.stream;
    let mut out = Vec::new();
    let x = DevBuf::zeros(stream, T * N_ACTIVE * FFN.max(D) * 4)?;
    kern.synth_f32(x.ptr, (T * N_ACTIVE * FFN.max(D)) as u64, 1.0, 11)?;
    let y = DevBuf::zeros(stream, T * N_ACTIVE * Q_DIM.max(D) * 4)?;
    let weights = |ty: GgmlType, k: usize, rows: usize, mats: usize, seed| -> Result<DevBuf> {
        let bytes = matrix_bytes(ty, k, rows) * mats;
        let w = DevBuf::zeros(stream, bytes)?;
        let n_blocks = if ty == F16 {
            k * rows * mats
        } else {
            k * rows * mats / ty.block_elems() as usize
        };
        kern.synth_weights(ty, w.ptr, n_blocks as u64, k, seed)?;
        Ok(w)
    };
    let dense: [(&'static str, GgmlType, usize, usize); 6] = [
        ("q8_0 4096->1024", Q8_0, D, Q_LORA),
        ("q8_0 1024->32768", Q8_0, Q_LORA, Q_DIM),
        ("q8_0 8192->4096", Q8_0, O_LOW, D),
        ("q8_0 4096->2048", Q8_0, D, FFN),
        ("q8_0 2048->4096", Q8_0, FFN, D),
        ("f16 4096->1024", F16, D, 1024),
    ];
    for (i, (name, ty, k, rows)) in dense.into_iter().enumerate() {
        let w = weights(ty, k, rows, 1, 100 + i as u64)?;
        let act;
        let input = if ty == F16 {
            MvInput::F32(x.ptr)
        } else {
            act = ActBuf::new(stream, ActKind::for_weight(ty)?, k, T)?;
            kern.quantize(x.ptr, &act)?;
            MvInput::Quant(&act)
        };
        let g = Gemm {
            ty,
            w: w.ptr,
            k,
            rows,
            x: input,
            x_col0: 0,
            x_row_len: k,
            ntok: T,
            y: y.ptr,
            y_row_stride: rows,
            y_col0: 0,
        };
        let ms = time_ms(rt, iters, || gk.gemm(&g))?;
        let row = GemmBenchRow {
            name,
            ty,
            k,
            rows,
            tokens: T,
            ms,
        };
        report(&format!(
            "gemm {name:<28} {T} tok  {ms:8.3} ms  {:7.1} TFLOP/s",
            row.tflops()
        ));
        out.push(row);
    }
    // Baseline: today's prefill fallback, the batched matvec, on the first shape.
    {
        let w = weights(Q8_0, D, Q_LORA, 1, 99)?;
        let act = ActBuf::new(stream, ActKind::Q8_0, D, T)?;
        kern.quantize(x.ptr, &act)?;
        let m = Matvec {
            ty: Q8_0,
            w: w.ptr,
            k: D,
            rows: Q_LORA,
            ntok: T,
            slots: 1,
            w_slot_stride: 0,
            ids: 0,
            x_group: 1,
            x: MvInput::Quant(&act),
            y: y.ptr,
        };
        let ms = time_ms(rt, iters.min(5), || kern.matvec(&m))?;
        let row = GemmBenchRow {
            name: "matvec batched q8_0 4096->1024 (baseline)",
            ty: Q8_0,
            k: D,
            rows: Q_LORA,
            tokens: T,
            ms,
        };
        report(&format!(
            "{:<33} {T} tok  {ms:8.3} ms  {:7.1} TFLOP/s",
            row.name,
            row.tflops()
        ));
        out.push(row);
    }
    // Routed experts.
    let slots = T * N_ACTIVE;
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut ids: Vec<i32> = Vec::with_capacity(slots);
    while ids.len() < slots {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let e = (rng % N_EXPERTS as u64) as i32;
        let start = ids.len() / N_ACTIVE * N_ACTIVE;
        if !ids[start..].contains(&e) {
            ids.push(e);
        }
    }
    let ids_dev = DevBuf::from_bytes(stream, bytemuck::cast_slice(&ids))?;
    let scratch = GemmScratch::new(stream, slots, N_EXPERTS)?;
    let routed: [(&'static str, GgmlType, usize, usize, usize); 4] = [
        ("routed iq2_xxs gate 4096->2048", IQ2_XXS, D, FFN, N_ACTIVE),
        ("routed q2_k down 2048->4096", Q2_K, FFN, D, 1),
        ("routed q4_k gate 4096->2048", Q4_K, D, FFN, N_ACTIVE),
        ("routed q4_k down 2048->4096", Q4_K, FFN, D, 1),
    ];
    for (i, (name, ty, k, rows, x_group)) in routed.into_iter().enumerate() {
        let w = weights(ty, k, rows, N_EXPERTS, 200 + i as u64)?;
        let act = ActBuf::new(stream, ActKind::for_weight(ty)?, k, slots / x_group)?;
        kern.quantize(x.ptr, &act)?;
        let g = RoutedGemm {
            ty,
            w: w.ptr,
            w_expert_stride: matrix_bytes(ty, k, rows) as u64,
            n_expert: N_EXPERTS,
            k,
            rows,
            ids: ids_dev.ptr,
            n_slots: slots,
            x_group,
            x: &act,
            y: y.ptr,
        };
        let ms = time_ms(rt, iters, || gk.routed_gemm(&g, &scratch))?;
        let row = GemmBenchRow {
            name,
            ty,
            k,
            rows,
            tokens: slots,
            ms,
        };
        report(&format!(
            "gemm {name:<28} {slots} slots {ms:8.3} ms  {:7.1} TFLOP/s",
            row.tflops()
        ));
        out.push(row);
    }
    for (label, names) in [
        (
            "q2",
            [
                "routed iq2_xxs gate 4096->2048",
                "routed q2_k down 2048->4096",
            ],
        ),
        (
            "q4",
            ["routed q4_k gate 4096->2048", "routed q4_k down 2048->4096"],
        ),
    ] {
        if let Some(tps) = gemm_prefill_estimate(&out, &names) {
            report(&format!(
                "{label}: quantized projections of 43 layers at these rates -> {tps:.0} prefill tokens/s \
                 (F16 projections, attention, norms, HC, routing excluded)"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_the_spec() {
        assert_eq!(compress_ratio(0), 0);
        assert_eq!(compress_ratio(1), 0);
        assert_eq!(compress_ratio(2), 4);
        assert_eq!(compress_ratio(3), 128);
        assert_eq!(compress_ratio(42), 4);
    }

    #[test]
    fn q2_step_bytes_match_spec_section_14() {
        // model.md §14: 9.19 GB at ctx <= 2048, 9.56 GB beyond, of which the
        // ≈1.9 MB of norms/biases/embedding row are not matvec weights.
        let small = full_model_step_bytes(Synthetic::Q2, 2048) as f64 / 1e9;
        let large = full_model_step_bytes(Synthetic::Q2, 4096) as f64 / 1e9;
        assert!((small - 9.19).abs() < 0.02, "{small}");
        assert!((large - 9.56).abs() < 0.02, "{large}");
    }

    #[test]
    fn per_layer_q_b_bytes_match_the_tensor_table() {
        let ops = layer_ops(2, Synthetic::Q2, false);
        let qb = ops.iter().find(|o| o.name == "attn_q_b").map(Op::bytes);
        assert_eq!(qb, Some(35_651_584));
        let gate = ops
            .iter()
            .find(|o| o.name == "ffn_gate_exps")
            .map(Op::bytes);
        assert_eq!(gate, Some(6 * 2_162_688));
    }

    #[test]
    fn kv_bytes_grow_with_ctx() {
        assert_eq!(kv_state_bytes(0), 43 * 128 * 512 * 4);
        assert!(kv_state_bytes(32768) > kv_state_bytes(2048));
    }
}
