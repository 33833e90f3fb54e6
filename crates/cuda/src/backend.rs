//! The CUDA implementation of `ds4_model::Backend`: weights uploaded once, activations and
//! the KV state resident on the device, every operation a kernel on one stream
//! (`kernels/matvec.cu` for weight products, `kernels/ops.cu` for the rest).
//!
//! Decode steps are recorded once into a CUDA graph per session and replayed: kernels read
//! the chunk's first position and token ids from device memory (`begin_chunk` uploads
//! them), so nothing in a step depends on host values, nothing allocates and nothing
//! synchronises until the logits are read.
//!
//! The host's share of a decode step is kept small: the token id and position go up
//! with one asynchronous copy from page-locked staging (`DecodeUpload`), the replay is
//! timed by a reused pair of events (`StepTiming`), and the logits come down with one
//! copy straight into the session's page-locked buffer (`read_rows_host` into a
//! [`PinnedF32`]), with no copy on the host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaStream, DeviceRepr, LaunchConfig,
    PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};
use ds4_gguf::GgmlType;
use ds4_model::backend::{
    Backend, CompKind, CompUpdate, KvStore, QueryHeads, RopeKind, RowRounding,
    attn_queries_separate,
};
use ds4_model::kv::HostKv;
use ds4_model::shape::{LayerKind, ModelShape};
use ds4_model::weights::{CompressorWeights, FfnWeights, HcWeights, TensorView};
use ds4_model::{Error as MError, Result as MResult};

use crate::compile;
use crate::gemm::{Gemm, GemmKernels, GemmScratch, RoutedGemm};
use crate::kernels::{
    ActBuf, ActKind, DevBuf, ExpertIds, FusedRoute, HcSplitJob, Kernels, MV_MAX_SEGS, Matvec,
    MvInput, MvPair, MvSeg,
};
use crate::launch::KernelArgs;
use crate::runtime::CudaRuntime;

/// Small float tensors (norms, sinks, biases, HC scale/base, ape) also get an f32 copy.
const DENSE_MAX_ELEMS: u64 = 1 << 17;
/// Largest read (f32 elements) staged through page-locked memory: a few rows of logits.
const PINNED_READ_MAX: usize = 1 << 20;
/// Threads of the per-row kernels (must be 128: the Hadamard butterflies use one per dim).
const ROW_THREADS: u32 = 128;
/// Dynamic shared memory the attention / indexer kernels may use.
const BIG_SMEM: usize = 200 * 1024;
/// Dynamic shared memory of an `idx_topk_v2` block: TK_SMEM_BYTES in ops.cu (which
/// asserts it holds the kernel's shared state).
const IDX_TOPK_V2_SMEM: u32 = 56 * 1024;
/// Chunks of at least this many tokens use the tensor-core GEMMs (gemm.cu) instead of
/// the batched matvec, which decodes every weight unit once per token.
const GEMM_MIN_TOKENS: usize = 16;
/// Routed products with at least this many (token, expert) slots group tokens by expert.
const ROUTED_GEMM_MIN_SLOTS: usize = 64;
/// Chunks up to this many tokens use the per-head attention kernel (keys split over
/// warps); longer ones the tiled kernel that shares key tiles between heads.
const ATT_DECODE_MAX_TOKENS: usize = 8;
/// Most HC mix rows `hc_mix_part` keeps in registers (HCM_ROWS in ops.cu).
const HC_MIX_MAX_ROWS: usize = 24;
/// Most tokens whose HC merge runs fused with the next mixes (`hc_post_mix`).
const HC_FUSE_MAX_TOKENS: usize = 8;
/// HC v3's column block, partial row stride and Gram entries per block (ops.cu
/// `HC3_COLS`, hc_split.cuh `HC_PART_STRIDE`, ops.cu `HC3_GRAM`).
const HC3_COLS: usize = 256;
const HC3_PART_STRIDE: usize = 25;
const HC3_GRAM: usize = 10;
/// Outputs per thread of `hc_pre_finish_norm` (HCF_MAX in ops.cu).
const HC_FINISH_MAX_PER_THREAD: usize = 16;
/// Compressed rows scored per block by `idx_scores` (`IDX_TILE` in ops.cu).
const IDX_TILE: usize = 32;
/// Compressed rows scored per block by `idx_scores_heads` (`IDXH_ROWS` in ops.cu), its
/// threads (`IDXH_THREADS`), and its shared memory: q (64 heads x 132 floats), the rows' keys, the per-head sums and
/// the head weights.
pub(crate) const IDXH_ROWS: usize = 16;
pub(crate) const IDXH_THREADS: u32 = 256;
pub(crate) const IDXH_SMEM_BYTES: u32 =
    ((64 * 132 + IDXH_ROWS * 128 + IDXH_ROWS * 64 + 64) * 4) as u32;
/// Tokens whose indexer scores are materialised at once (bounds the score scratch).
const IDX_TOKENS_PER_PASS: usize = 64;

fn be<E: std::fmt::Display>(e: E) -> MError {
    MError::Backend(e.to_string())
}

fn check(ok: bool, msg: impl FnOnce() -> String) -> MResult<()> {
    if ok {
        Ok(())
    } else {
        Err(MError::Backend(msg()))
    }
}

fn grid1(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).clamp(1, 65535 * 16), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Shape of the fused decode router + route kernel (`moe_router_route`, ops.cu
/// `RR_*`): Flash's router, 256 experts of 4096 inputs, on a cluster of 16 CTAs.
pub(crate) const ROUTER_FUSED_K: usize = 4096;
pub(crate) const ROUTER_FUSED_EXPERTS: usize = 256;
const ROUTER_FUSED_CLUSTER: u32 = 16;

/// A weight on the device. Identical host bytes are uploaded once and shared (synthetic
/// benchmark models reuse one layer's tensors for every layer of a kind).
pub struct CudaWeight {
    pub name: String,
    pub ty: GgmlType,
    pub k: usize,
    pub rows: usize,
    pub data: Arc<DevBuf>,
    pub dense: Option<Arc<DevBuf>>,
}

impl CudaWeight {
    fn dense_ptr(&self) -> MResult<u64> {
        self.dense
            .as_ref()
            .map(|d| d.ptr)
            .ok_or_else(|| MError::Backend(format!("{} is not a small float tensor", self.name)))
    }
    fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.k as u64).unwrap_or(0) as usize
    }
}

/// A row-major f32 matrix on the device.
pub struct CudaAct {
    pub buf: DevBuf,
    pub rows: usize,
    pub cols: usize,
}

/// Arguments of an indexer top-k launch (`CudaBackend::launch_idx_topk`): device
/// pointers and the kernel's i32 arguments; `tokens` blocks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IdxTopkArgs {
    /// f32 scores, `ld_scores` a token (at least the visible rows).
    pub scores: u64,
    pub ld_scores: i32,
    /// i32 position of the first token.
    pub pos_p: u64,
    /// Compression ratio: token at position p sees (p + 1) / ratio rows.
    pub ratio: i32,
    pub top_k: i32,
    /// i32 picks, `sel_k` a token.
    pub sel: u64,
    pub sel_k: i32,
    pub tokens: usize,
}

/// Per-token selected compressed-row indices (i32, −1 = none).
pub struct CudaIdx {
    pub buf: DevBuf,
    pub rows: usize,
    pub k: usize,
}

struct DevFrontier {
    ratio: usize,
    coff: usize,
    d_c: usize,
    kv: DevBuf,
    score: DevBuf,
}

struct DevRows {
    dim: usize,
    cap: usize,
    buf: DevBuf,
}

struct DevLayer {
    kind: LayerKind,
    raw_cap: usize,
    raw: DevBuf,
    comp: Option<(DevRows, DevFrontier)>,
    index: Option<(DevRows, DevFrontier)>,
}

/// A recorded decode step and what it was recorded for.
struct StepGraph {
    key: (u64, u64, u64),
    graph: CudaGraph,
}

/// Device time of replayed decode steps: events recorded around each graph launch.
/// One pair of events, made at the first timed step, is recorded again at every
/// step (after the previous step's time was read from it).
#[derive(Default)]
struct StepTiming {
    /// (before the launch, after it).
    events: Option<(CudaEvent, CudaEvent)>,
    /// Whether `events` hold a step whose time is not added yet.
    pending: bool,
    steps: u64,
    total_ms: f64,
}

impl StepTiming {
    /// Adds the pending step's time (waits for its end event).
    fn collect(&mut self) {
        if std::mem::take(&mut self.pending)
            && let Some((start, end)) = &self.events
            && let Ok(ms) = start.elapsed_ms(end)
        {
            self.steps += 1;
            self.total_ms += f64::from(ms);
        }
    }

    /// Times `launch` on `stream`; a step whose events cannot be made or recorded is
    /// not timed.
    fn around(&mut self, stream: &CudaStream, launch: impl FnOnce() -> MResult<()>) -> MResult<()> {
        self.collect();
        if self.events.is_none() {
            let ctx = stream.context();
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            if let (Ok(start), Ok(end)) = (ctx.new_event(flags), ctx.new_event(flags)) {
                self.events = Some((start, end));
            }
        }
        let started = self
            .events
            .as_ref()
            .is_some_and(|(start, _)| start.record(stream).is_ok());
        launch()?;
        if started && let Some((_, end)) = &self.events {
            self.pending = end.record(stream).is_ok();
        }
        Ok(())
    }
}

/// Host time of the decode step's phases (`DS4_HOST_PROFILE=1`, a diagnostic): token
/// upload, graph launch, waiting for the logits, copying them out; nanoseconds and calls.
pub(crate) mod host_profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    pub(crate) const PHASES: [&str; 5] = ["upload", "launch", "join", "wait+copy", "host copy"];
    static NS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
    static N: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
    pub(crate) fn on() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("DS4_HOST_PROFILE").is_ok_and(|v| v == "1"))
    }
    pub(crate) fn add(phase: usize, since: Option<std::time::Instant>) {
        if let Some(t) = since {
            NS[phase].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            N[phase].fetch_add(1, Ordering::Relaxed);
        }
    }
    pub(crate) fn start() -> Option<std::time::Instant> {
        on().then(std::time::Instant::now)
    }
    pub(crate) fn report() -> Option<String> {
        if !on() {
            return None;
        }
        let mut out = String::from("host profile (us per call):");
        for (i, name) in PHASES.iter().enumerate() {
            let n = N[i].swap(0, Ordering::Relaxed);
            let ns = NS[i].swap(0, Ordering::Relaxed);
            out.push_str(&format!(
                " {name} {:.1} ({n})",
                ns as f64 / 1e3 / n.max(1) as f64
            ));
        }
        Some(out)
    }
}

/// The KV state on the device, same layout as `HostKv` (f32 rows, frontiers).
pub struct CudaKv {
    stream: Arc<CudaStream>,
    fill: CudaFunction,
    shape: ModelShape,
    ctx: usize,
    layers: Vec<DevLayer>,
    graph: Option<StepGraph>,
    /// Key of the last unrecorded decode step (the first step allocates scratch, so it
    /// runs directly; the second is recorded).
    warm: Option<(u64, u64, u64)>,
}

// SAFETY: the graph and buffers are only used through `&mut CudaKv` / the backend's one
// stream; CUDA handles may be used from any thread of the process.
unsafe impl Send for CudaKv {}

fn fill_f32(stream: &Arc<CudaStream>, f: &CudaFunction, p: u64, n: usize, v: f32) -> MResult<()> {
    let n64 = n as i64;
    let mut b = stream.launch_builder(f);
    b.arg(&p).arg(&n64).arg(&v);
    // SAFETY: matches `fill_f32`.
    unsafe { b.launch(grid1(n, 256)) }.map_err(be)?;
    Ok(())
}

impl CudaKv {
    fn frontiers(&self) -> impl Iterator<Item = &DevFrontier> {
        self.layers.iter().flat_map(|l| {
            [l.comp.as_ref(), l.index.as_ref()]
                .into_iter()
                .flatten()
                .map(|(_, f)| f)
        })
    }

    /// Downloads the state valid after `n_pos` tokens into a `HostKv`.
    fn to_host(&self, n_pos: usize) -> MResult<HostKv> {
        let mut h = HostKv::new(&self.shape, self.ctx);
        for (hl, dl) in h.layers.iter_mut().zip(&self.layers) {
            dl_rows(&self.stream, &dl.raw, &mut hl.raw)?;
            for (d, hc, hf) in [
                (dl.comp.as_ref(), &mut hl.comp, &mut hl.comp_state),
                (dl.index.as_ref(), &mut hl.index, &mut hl.index_state),
            ] {
                let (Some((rows, fr)), Some(hc), Some(hf)) = (d, hc.as_mut(), hf.as_mut()) else {
                    continue;
                };
                hc.n = (n_pos / fr.ratio).min(hc.cap).min(rows.cap);
                let n = hc.n * hc.dim;
                dl_rows(&self.stream, &rows.buf, &mut hc.data[..n])?;
                dl_rows(&self.stream, &fr.kv, &mut hf.kv)?;
                dl_rows(&self.stream, &fr.score, &mut hf.score)?;
            }
        }
        Ok(h)
    }

    fn upload_host(&mut self, h: &HostKv, n_pos: usize) -> MResult<()> {
        let stream = self.stream.clone();
        let ul = |b: &mut DevBuf, v: &[f32]| -> MResult<()> {
            b.write_at(&stream, 0, bytemuck::cast_slice(v)).map_err(be)
        };
        for (dl_, hl) in self.layers.iter_mut().zip(&h.layers) {
            ul(&mut dl_.raw, &hl.raw)?;
            for (d, hc, hf) in [
                (dl_.comp.as_mut(), &hl.comp, &hl.comp_state),
                (dl_.index.as_mut(), &hl.index, &hl.index_state),
            ] {
                if let (Some((rows, fr)), Some(hc), Some(hf)) = (d, hc, hf) {
                    let n = (n_pos / fr.ratio).min(hc.n).min(rows.cap) * rows.dim;
                    ul(&mut rows.buf, &hc.data[..n])?;
                    ul(&mut fr.kv, &hf.kv)?;
                    ul(&mut fr.score, &hf.score)?;
                }
            }
        }
        Ok(())
    }
}

fn dl_rows(stream: &Arc<CudaStream>, b: &DevBuf, out: &mut [f32]) -> MResult<()> {
    if out.is_empty() {
        return Ok(());
    }
    b.read_at(stream, 0, bytemuck::cast_slice_mut(out))
        .map_err(be)
}

impl KvStore for CudaKv {
    fn memory_bytes(&self) -> usize {
        HostKv::estimate_bytes(&self.shape, self.ctx)
    }

    fn reset(&mut self) {
        // Errors here can only be a failed device (reported by the next real operation).
        for l in &self.layers {
            let _ = fill_f32(&self.stream, &self.fill, l.raw.ptr, l.raw.len() / 4, 0.0);
        }
        for f in self.frontiers() {
            let _ = fill_f32(&self.stream, &self.fill, f.kv.ptr, f.kv.len() / 4, 0.0);
            let _ = fill_f32(
                &self.stream,
                &self.fill,
                f.score.ptr,
                f.score.len() / 4,
                f32::NEG_INFINITY,
            );
        }
    }

    fn save(&self, n_pos: usize, out: &mut Vec<u8>) -> MResult<()> {
        self.to_host(n_pos)?.save(n_pos, out)
    }

    fn load(&mut self, n_pos: usize, bytes: &[u8]) -> MResult<usize> {
        let mut h = HostKv::new(&self.shape, self.ctx);
        let used = h.load(n_pos, bytes)?;
        self.upload_host(&h, n_pos)?;
        Ok(used)
    }
}

/// Kernels of ops.cu.
struct Ops {
    fill_f32: CudaFunction,
    to_f32: CudaFunction,
    copy_rows: CudaFunction,
    group_permute: CudaFunction,
    mv_float: CudaFunction,
    embed_rows: CudaFunction,
    rms_norm_seg: CudaFunction,
    hc_pre_finish: CudaFunction,
    hc_mix_part: CudaFunction,
    norm_rope: CudaFunction,
    qkv_norm_rope: CudaFunction,
    qkv_rope_qat_pair: CudaFunction,
    hc_post_mix: CudaFunction,
    hc_pre_finish_norm: CudaFunction,
    hc_pre_finish_split: CudaFunction,
    hc_pre_finish_v2: CudaFunction,
    hc_pre_finish_v2_t256: CudaFunction,
    hc_post_mix_v2: CudaFunction,
    hc_post_mix_v3: CudaFunction,
    hc_pre_finish_v3: CudaFunction,
    hc_split_v3: CudaFunction,
    hc_post: CudaFunction,
    hc_head_finish: CudaFunction,
    rope: CudaFunction,
    rope_quant_q8_0: CudaFunction,
    att_merge_rope_q8_0: CudaFunction,
    /// The lean merge for at most 32 splits and its block size (`DS4_MERGE_LEAN`: 512,
    /// 256, or 0 for none): fewer registers, so the output product's blocks fit beside.
    att_merge_lean: Option<(CudaFunction, u32)>,
    round_rows: CudaFunction,
    rope_qat: CudaFunction,
    comp_pool: CudaFunction,
    comp_steps: CudaFunction,
    comp_pool_chunk: CudaFunction,
    comp_frontier: CudaFunction,
    comp_finish: CudaFunction,
    idx_scores: CudaFunction,
    idx_scores_heads: CudaFunction,
    idx_topk: CudaFunction,
    idx_topk_v2: CudaFunction,
    /// `attention_N` for head_dim = 128·N (N = 1..4).
    attention: [CudaFunction; 4],
    kv_append: CudaFunction,
    moe_route: CudaFunction,
    /// Decode: the F16 router product and moe_route in one cluster launch (sm_90+).
    moe_router_route: Option<CudaFunction>,
    swiglu: CudaFunction,
    moe_sum: CudaFunction,
}

/// `moe_router_route` when the device can place its cluster: a cluster of 16 CTAs is
/// beyond the portable 8 (allowed per function), and each CTA takes a whole
/// multiprocessor. None (the two-launch path) where the driver refuses either.
fn router_route_kernel(func: CudaFunction) -> Option<CudaFunction> {
    use cudarc::driver::sys;
    if let Err(e) = func.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
        1,
    ) {
        tracing::warn!(
            "moe_router_route: no 16-CTA clusters ({e}); router and route stay two launches"
        );
        return None;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: ROUTER_FUSED_CLUSTER,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: 512,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: std::ptr::null_mut(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut clusters = 0i32;
    // SAFETY: `func` is a loaded kernel (its module lives as long as it) and `config`
    // lives until the call returns; the call only reads them.
    let r =
        unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, func.cu_function(), &config) };
    if r != sys::CUresult::CUDA_SUCCESS || clusters < 1 {
        tracing::warn!(
            "moe_router_route: cluster cannot be placed ({r:?}, {clusters} active); router and route stay two launches"
        );
        return None;
    }
    tracing::debug!("moe_router_route: up to {clusters} clusters of 16 resident");
    Some(func)
}

impl Ops {
    fn load(rt: &CudaRuntime) -> crate::Result<Self> {
        let arch = compile::arch_for(rt.device.sm);
        let m = compile::load_module(&rt.ctx, &compile::OPS, &arch, rt.nvrtc_version)?;
        let f = |name: &str| m.load_function(name);
        let big = |name: &str| compile::load_with_smem(&m, name, BIG_SMEM);
        Ok(Self {
            fill_f32: f("fill_f32")?,
            to_f32: f("to_f32")?,
            copy_rows: f("copy_rows")?,
            group_permute: f("group_permute")?,
            mv_float: f("mv_float")?,
            embed_rows: f("embed_rows")?,
            rms_norm_seg: f("rms_norm_seg")?,
            hc_pre_finish: f("hc_pre_finish")?,
            hc_mix_part: f("hc_mix_part")?,
            norm_rope: f("norm_rope")?,
            qkv_norm_rope: f("qkv_norm_rope")?,
            qkv_rope_qat_pair: f("qkv_rope_qat_pair")?,
            hc_post_mix: f("hc_post_mix")?,
            hc_pre_finish_norm: f("hc_pre_finish_norm")?,
            hc_pre_finish_split: f("hc_pre_finish_split")?,
            hc_pre_finish_v2: f("hc_pre_finish_v2")?,
            hc_pre_finish_v2_t256: f("hc_pre_finish_v2_t256")?,
            hc_post_mix_v2: f("hc_post_mix_v2")?,
            hc_post_mix_v3: f("hc_post_mix_v3")?,
            hc_pre_finish_v3: f("hc_pre_finish_v3")?,
            hc_split_v3: f("hc_split_v3")?,
            hc_post: f("hc_post")?,
            hc_head_finish: f("hc_head_finish")?,
            rope: f("rope")?,
            rope_quant_q8_0: f("rope_quant_q8_0")?,
            // Loads in one round trip (DS4_ATTN_MERGE_PRE=0: the original merge).
            att_merge_rope_q8_0: f(if crate::launch::env_switch("DS4_ATTN_MERGE_PRE") {
                "att_merge_rope_q8_0_pre"
            } else {
                "att_merge_rope_q8_0"
            })?,
            att_merge_lean: match merge_lean_threads() {
                0 => None,
                t => Some((f(&format!("att_merge_rope_q8_0_pre32_t{t}"))?, t)),
            },
            round_rows: big("round_rows")?,
            rope_qat: f("rope_qat")?,
            comp_pool: f("comp_pool")?,
            comp_steps: f("comp_steps")?,
            comp_pool_chunk: f("comp_pool_chunk")?,
            comp_frontier: f("comp_frontier")?,
            comp_finish: big("comp_finish")?,
            idx_scores: f("idx_scores")?,
            idx_scores_heads: f("idx_scores_heads")?,
            idx_topk: f("idx_topk")?,
            idx_topk_v2: big("idx_topk_v2")?,
            attention: [
                big("attention_1")?,
                big("attention_2")?,
                big("attention_3")?,
                big("attention_4")?,
            ],
            kv_append: f("kv_append")?,
            moe_route: f("moe_route")?,
            moe_router_route: if rt.device.sm.0 >= 9 {
                router_route_kernel(m.load_function("moe_router_route")?)
            } else {
                None
            },
            swiglu: f("swiglu")?,
            moe_sum: f("moe_sum")?,
        })
    }
}

/// Most attention splits `att_merge_rope_q8_0` merges (its lanes keep two weights each).
const MERGE_ROPE_MAX_SPLITS: usize = 64;
/// Most splits of the lean merges (`att_merge_rope_q8_0_pre32_t*`).
const MERGE_LEAN_MAX_SPLITS: usize = 32;

/// Block size of the lean merge (`DS4_MERGE_LEAN`: 512 by default, 256, or 0 for the
/// 64-split merge always).
fn merge_lean_threads() -> u32 {
    match std::env::var("DS4_MERGE_LEAN").as_deref() {
        Ok("0") => 0,
        Ok("256") => 256,
        _ => 512,
    }
}

/// Decode attention partials left unmerged for the RoPE + Q8_0 step (`attention_impl`).
#[derive(Debug, Clone, Copy)]
struct MergeSplits {
    part: u64,
    n_splits: usize,
    n_head: usize,
    sinks: u64,
}

/// A quantized copy of an activation that the next products of that activation may
/// read instead of quantizing it again: (input pointer, activation kind, width, rows).
/// The copy lives in the scratch buffer `Scratch::act(kind, width, rows)`.
type ReuseKey = (u64, u8, usize, usize);

/// Pending quantized copies: at most one per activation kind (Q8_0 and Q8_K), all of
/// the same input. Set by the operation that just wrote the input (a norm, the HC split,
/// SwiGLU, a product that quantized it for a second product of the same input):
/// setting replaces every older entry. A quantized product of a pending input uses and
/// drops its entry; a quantized product of any other input drops them all, so a copy
/// is only ever read by the products that directly follow its producer, before anything
/// can rewrite the input or the scratch buffer holding the copy. F16/F32 products
/// (the router between the FFN split and the experts) neither read nor drop them.
#[derive(Default)]
struct Pending([Option<ReuseKey>; 2]);

impl Pending {
    fn set(&mut self, key: ReuseKey) {
        self.0 = [Some(key), None];
    }
    fn set2(&mut self, a: ReuseKey, b: ReuseKey) {
        self.0 = [Some(a), Some(b)];
    }
    fn clear(&mut self) {
        self.0 = [None, None];
    }
    /// A quantized product is about to read `key`: true when its copy is pending (the
    /// entry is used up); otherwise every entry is dropped unless it belongs to the
    /// same input (the product's own quantisation overwrites only its kind's buffer).
    fn claim(&mut self, key: ReuseKey) -> bool {
        if let Some(slot) = self.0.iter_mut().find(|e| **e == Some(key)) {
            *slot = None;
            return true;
        }
        for e in &mut self.0 {
            if e.is_some_and(|(x, kind, _, _)| x != key.0 || kind == key.1) {
                *e = None;
            }
        }
        false
    }
    /// Something other than a product rewrote the activation at `x`.
    fn forget(&mut self, x: u64) {
        for e in &mut self.0 {
            if e.is_some_and(|(p, ..)| p == x) {
                *e = None;
            }
        }
    }
}

/// Device scratch that grows on demand. Growing bumps `epoch`, which invalidates
/// recorded steps (they hold the old addresses).
#[derive(Default)]
struct Scratch {
    epoch: u64,
    /// Quantized copies the next products may reuse (see `Pending`).
    reuse: Pending,
    f32s: HashMap<&'static str, DevBuf>,
    acts: HashMap<(u8, usize), ActBuf>,
}

fn kind_tag(k: ActKind) -> u8 {
    match k {
        ActKind::Q8_0 => 0,
        ActKind::Q8K => 1,
        ActKind::F32 => 2,
    }
}

impl Scratch {
    fn f32(&mut self, stream: &Arc<CudaStream>, name: &'static str, n: usize) -> MResult<u64> {
        let bytes = n.max(1) * 4;
        if let Some(b) = self.f32s.get(name)
            && b.len() >= bytes
        {
            return Ok(b.ptr);
        }
        let b = DevBuf::zeros(stream, bytes).map_err(be)?;
        let p = b.ptr;
        self.f32s.insert(name, b);
        self.epoch += 1;
        Ok(p)
    }

    fn act(
        &mut self,
        stream: &Arc<CudaStream>,
        kind: ActKind,
        k: usize,
        rows: usize,
    ) -> MResult<&ActBuf> {
        let key = (kind_tag(kind), k);
        let grow = self.acts.get(&key).is_none_or(|a| a.rows < rows);
        if grow {
            let a = ActBuf::new(stream, kind, k, rows.max(1)).map_err(be)?;
            self.acts.insert(key, a);
            self.epoch += 1;
        }
        self.acts
            .get(&key)
            .ok_or_else(|| MError::Backend("activation scratch missing".into()))
    }
}

/// Where the HC split's Sinkhorn (post, comb) runs for hc = 4 (`CudaBackend::hc_split`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HcSplit {
    /// hc_pre_finish_norm: one block per token, the Sinkhorn before the collapse.
    OneBlock = 0,
    /// hc_pre_finish_split: a second block per token beside the collapse.
    TwoBlocks = 1,
    /// Decode (one token): hc_pre_finish_split's split block alone on the side
    /// branch, joined before post/comb are read; other batches as `TwoBlocks`.
    Side = 2,
}

/// The MoE outputs the fused HC merge sums in place of moe_sum: `routed` holds n·k rows
/// of n_embd (route weights applied), `shared` n rows of n_embd (device pointers into
/// scratch, valid until the next MoE).
#[derive(Clone, Copy, Debug)]
struct MoeParts {
    routed: u64,
    shared: u64,
    k: usize,
}

/// Device pointers of y's quantized copies written by `hc_pre_finish_norm` (0: none)
/// and the pending entries they become.
#[derive(Default, Clone, Copy)]
struct YQuant {
    q0: (u64, u64),
    qk: (u64, u64, u64),
    keys: [Option<ReuseKey>; 2],
}

impl YQuant {
    /// The five pointers the HC finish kernels take (Q8_0 codes, scales; Q8_K codes,
    /// scales, sums; 0 for none), in that order.
    fn push_args<'a>(&'a self, b: &mut KernelArgs<'a>) {
        b.arg(&self.q0.0)
            .arg(&self.q0.1)
            .arg(&self.qk.0)
            .arg(&self.qk.1)
            .arg(&self.qk.2);
    }
}

/// The FFN input norm (GGUF `blk.N.ffn_norm.weight`): its normed output feeds the
/// routed experts (Q8_K) as well as the shared expert (Q8_0). Any other norm's output
/// gets the Q8_0 copy only; a wrong guess costs a quantisation kernel, never a result.
fn is_ffn_norm(norm: &CudaWeight) -> bool {
    norm.name.ends_with("ffn_norm.weight")
}

/// A tensor's bytes on the device, and its f32 copy for small float tensors.
type Uploaded = (Arc<DevBuf>, Option<Arc<DevBuf>>);

/// Token ids and positions of the current chunk on the device.
struct ChunkBufs {
    tokens: DevBuf,
    pos: DevBuf,
    /// Set by a decode chunk (one token): its id and position are read from
    /// `DecodeUpload::dev` instead (device pointers to the id and to the position).
    decode: Option<(u64, u64)>,
}

/// Page-locked host memory of `len` values, zeroed at allocation and addressed
/// directly (no event wait per access, unlike `PinnedHostSlice::as_slice`): every
/// device write into it is waited for before the `&mut` borrow that issued it ends
/// (`read_rows_host`), and the one buffer the device reads from asynchronously (the
/// decode staging) is only written once no copy from it can be pending
/// (`DecodeUpload::upload`).
pub struct PinnedHost<T> {
    /// The allocation (freed on drop).
    _mem: PinnedHostSlice<T>,
    ptr: *mut T,
    len: usize,
}

/// The CUDA backend's `Backend::HostBuf`: a session's last logits, in page-locked
/// memory that `read_rows_host` copies into directly.
pub type PinnedF32 = PinnedHost<f32>;

// SAFETY: the memory is owned by `_mem` (itself Send and Sync) and only reached through
// `&self` / `&mut self`; `ptr` is a cached address of it.
unsafe impl<T: Send> Send for PinnedHost<T> {}
// SAFETY: as for Send: shared access only hands out `&[T]`.
unsafe impl<T: Sync> Sync for PinnedHost<T> {}

impl<T: DeviceRepr + ValidAsZeroBits> PinnedHost<T> {
    fn zeroed(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, cudarc::driver::DriverError> {
        // Cacheable (flags 0, not write-combined): the host reads it back.
        // SAFETY: the memory is zeroed below before anything reads it.
        let mut mem = unsafe { ctx.alloc_pinned_with_flags::<T>(len.max(1), 0) }?;
        let ptr = mem.as_mut_ptr()?;
        // SAFETY: `ptr` starts `len.max(1)` values of fresh host memory that no copy uses
        // yet; all-zero bytes are a valid `T` (ValidAsZeroBits).
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(Self {
            _mem: mem,
            ptr,
            len,
        })
    }
}

impl<T> std::ops::Deref for PinnedHost<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` addresses `len` initialised values owned by `_mem` for as long as
        // `self` lives; the device writes them only in copies that are waited for before
        // the `&mut self` borrow that issued them ends (see the type's comment).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> std::ops::DerefMut for PinnedHost<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for Deref; `&mut self` makes the borrow unique on the host, and no
        // device copy reads or writes the memory while it is written (type's comment).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Bytes of `DecodeUpload::dev`: the id and the position, then zeros (a kernel that
/// reads a little past a one-token chunk stays inside the allocation).
const DECODE_UPLOAD_BYTES: usize = 256;

/// A decode chunk's token id and position: written to page-locked staging, then one
/// asynchronous copy on the main stream to `dev` (`[id, pos]` as i32).
///
/// Invariant: the staging is only overwritten once every copy from it is known to be
/// done. `enqueued` counts the copies issued, `synced` how many of them a
/// synchronisation of the main stream has waited for (the logits read of every step
/// performs one, see `note_synced`); with a copy possibly pending, `upload` first
/// synchronises the stream itself, and dropping this waits for a pending copy before
/// the staging is freed.
struct DecodeUpload {
    stream: Arc<CudaStream>,
    staging: Mutex<PinnedHost<i32>>,
    dev: DevBuf,
    enqueued: AtomicU64,
    synced: AtomicU64,
}

impl DecodeUpload {
    fn new(stream: &Arc<CudaStream>) -> crate::Result<Self> {
        Ok(Self {
            stream: stream.clone(),
            staging: Mutex::new(PinnedHost::zeroed(stream.context(), 2)?),
            dev: DevBuf::zeros(stream, DECODE_UPLOAD_BYTES)?,
            enqueued: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        })
    }

    /// Device pointers to the id and to the position.
    fn ptrs(&self) -> (u64, u64) {
        (self.dev.ptr, self.dev.ptr + 4)
    }

    /// Issues the copy of `[id, pos]` to `dev` (stream-ordered, not waited for).
    fn upload(&self, id: i32, pos: i32) -> MResult<()> {
        let mut staging = self
            .staging
            .lock()
            .map_err(|_| MError::Backend("decode staging poisoned".into()))?;
        let issued = self.enqueued.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) < issued {
            // No synchronisation since the last copy (no logits read in between): it may
            // still be pending; wait for it before overwriting its source.
            self.stream.synchronize().map_err(be)?;
            self.synced.fetch_max(issued, Ordering::AcqRel);
        }
        staging[0] = id;
        staging[1] = pos;
        self.stream.context().bind_to_thread().map_err(be)?;
        // SAFETY: `dev` holds DECODE_UPLOAD_BYTES ≥ 8 bytes. The source is page-locked
        // memory that stays allocated until the copy is done (dropping `self` waits for
        // it) and is not written again before a synchronisation covers this copy (the
        // check above; `enqueued` is raised below, while the staging is still locked).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                self.dev.ptr,
                &staging[..2],
                self.stream.cu_stream(),
            )
        }
        .map_err(be)?;
        self.enqueued.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The copies issued so far: read before a synchronisation of `stream`, then passed
    /// to `note_synced` once it returned.
    fn issued(&self) -> u64 {
        self.enqueued.load(Ordering::Acquire)
    }

    /// `stream` was synchronised after `issued` copies had been issued: those are done
    /// (when it is the main stream, which the copies go on).
    fn note_synced(&self, stream: &Arc<CudaStream>, issued: u64) {
        if Arc::ptr_eq(stream, &self.stream) {
            self.synced.fetch_max(issued, Ordering::AcqRel);
        }
    }
}

impl Drop for DecodeUpload {
    fn drop(&mut self) {
        if *self.synced.get_mut() < *self.enqueued.get_mut() {
            // A copy may still read the staging: let it finish before it is freed.
            let _ = self.stream.synchronize();
        }
    }
}

/// Seconds and calls per (operation, decode step?).
type OpProfile = HashMap<(&'static str, bool), (f64, u64)>;

/// Times one operation when profiling (see `CudaBackend::profile`).
struct ProfGuard<'a> {
    be: &'a CudaBackend,
    name: &'static str,
    decode: bool,
    start: std::time::Instant,
}

impl Drop for ProfGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = &self.be.profile {
            let _ = self.be.rt.stream.synchronize();
            if let Ok(mut m) = p.lock() {
                let e = m.entry((self.name, self.decode)).or_insert((0.0, 0));
                e.0 += self.start.elapsed().as_secs_f64();
                e.1 += 1;
            }
        }
    }
}

/// Statistics of recorded-step use (for benchmarks and logs).
#[derive(Debug, Default, Clone, Copy)]
pub struct GraphStats {
    pub recorded: u64,
    pub replayed: u64,
    /// Replayed steps timed on the device (events around the graph) and their total
    /// milliseconds: the step's GPU time without the host's part (token upload, logits
    /// download, sampling, graph launch).
    pub timed: u64,
    pub timed_ms: f64,
}

pub struct CudaBackend {
    rt: Arc<CudaRuntime>,
    kernels: Kernels,
    gemm: GemmKernels,
    /// Tensor-core attention (head_dim 256/512; else the SIMT kernels of `ops`).
    attn: crate::attention::AttentionKernels,
    /// Decode: the attention kernel appends the raw KV row to the ring, so
    /// `kv_append_raw` launches nothing (`DS4_ATTN_KV_APPEND=0`: the kv_append kernel).
    attn_kv_append: bool,
    /// Layer + 1 whose ring the last attention launch appended to (0: none); the
    /// `kv_append_raw` that follows for that layer takes it and skips its launch.
    ring_appended: AtomicUsize,
    /// Decode: each compressor step is one `comp_steps` launch (`DS4_COMP_FUSE=0`:
    /// comp_pool + comp_finish).
    comp_fuse: bool,
    /// Decode, CSA layers: the attention and indexer compressor steps as one launch
    /// of two blocks (`comp_steps`) instead of two in a row (`DS4_COMP_PAIR=0`: two).
    comp_pair: bool,
    /// Decode: the attention's split partials are merged by the RoPE + Q8_0 kernel of
    /// o_a (`DS4_ATTN_MERGE_ROPE=0`: att_combine, then rope_quant_q8_0).
    attn_merge_rope: bool,
    /// The indexer queries' RoPE and official rounding in one kernel (`rope_qat`;
    /// `DS4_IDX_ROPE_QAT=0`: rope, then round_rows).
    idx_rope_qat: bool,
    /// Decode, CSA layers: q_b and the indexer's q_b as one launch (`mv_pair_*`),
    /// then qkv_norm_rope and rope_qat as one (`qkv_rope_qat_pair`), on the main
    /// chain (`DS4_QB_PAIR=0`: four launches, the indexer's two on the side branch).
    qb_pair: std::sync::atomic::AtomicBool,
    /// Routed-GEMM grouping buffers and the (slots, experts) they were sized for.
    gemm_scratch: Mutex<Option<(GemmScratch, usize, usize)>>,
    ops: Ops,
    shape: ModelShape,
    rope_plain: DevBuf,
    rope_comp: DevBuf,
    /// The chunk's token ids and positions (i32 each) read by the kernels.
    chunk: Mutex<ChunkBufs>,
    /// A decode chunk's id and position, uploaded from page-locked staging.
    decode_up: DecodeUpload,
    scratch: Mutex<Scratch>,
    uploads: Mutex<HashMap<(usize, usize), Uploaded>>,
    /// Record decode steps into CUDA graphs (on by default; off while profiling).
    pub use_graphs: bool,
    /// `DS4_CUDA_PROFILE=1`: per-operation wall time (the stream is synchronised after
    /// every operation, so totals are slower than unprofiled runs).
    profile: Option<Mutex<OpProfile>>,
    recorded: AtomicU64,
    replayed: AtomicU64,
    /// Events around the last replayed step (read at the next replay or by
    /// `graph_stats`) and the totals of the steps read so far.
    step_timing: Mutex<StepTiming>,
    /// Page-locked staging for small device-to-host reads (the decode logits): a
    /// pageable destination makes the driver stage the copy itself, in pieces
    /// (`DS4_PINNED_READ=0`: read into the destination directly).
    pinned_read: Option<Mutex<Option<PinnedHostSlice<u8>>>>,
    /// Fused decode steps, on unless `DS4_HC_FUSE=0` / `DS4_NORM_QUANT=0` (A/B runs).
    fuse_hc_post: bool,
    fuse_norm_quant: bool,
    /// hc = 4: how the HC split's Sinkhorn (post, comb) runs beside the collapse, an
    /// `HcSplit` as u8: `DS4_HC_SPLIT_BLOCK=0` one block per token does both
    /// (hc_pre_finish_norm); by default a second block of the same launch
    /// (hc_pre_finish_split); `DS4_HC_SINKHORN_SIDE=1`: decode runs it on the side
    /// branch, off the main chain (H100 2K: 150.5 tok/s against 158.6 for two blocks,
    /// the side stream then delays the compressors and the shared expert).
    hc_split: std::sync::atomic::AtomicU8,
    /// The HC step's second kernels (`hc_post_mix_v2`, `hc_pre_finish_v2` for the two
    /// roles of hc_pre_finish_split): same grids and bit-identical outputs, less work
    /// repeated per thread on the SM's narrow pipes. On unless `DS4_HC_FIN_V2=0`.
    hc_fin_v2: std::sync::atomic::AtomicBool,
    /// With `hc_fin_v2`, decode's split + collapse on 256-thread blocks
    /// (`hc_pre_finish_v2_t256`, the 1024-thread launch's sums; half of an SM's
    /// registers instead of all) only with `DS4_HC_FIN_256=1` (not yet measured).
    hc_fin_256: std::sync::atomic::AtomicBool,
    /// Decode's HC step as `hc_post_mix_v3` + `hc_pre_finish_v3` (the norm from the
    /// streams' Gram matrix, the collapse on every column block), its split (post,
    /// comb) deferred to a kernel off the main chain (`hc_pending`); off with
    /// `DS4_HC_V3=0`.
    hc_v3: std::sync::atomic::AtomicBool,
    /// The deferred split of the last v3 step, until a kernel carries it (the TMA
    /// product attn_output_a's waiting warp, the shared expert's SwiGLU on the side
    /// branch) or `hc_settle` launches it before post/comb are next read or written.
    hc_pending: Mutex<Option<HcSplitJob>>,
    /// Kernels on the way carry the deferred split (`DS4_HC_CARRY=0`: it is launched on
    /// its own before the next merge, for A/B runs).
    hc_carry: bool,
    /// Decode FFN sublayer: the HC merge sums the experts' outputs itself (no moe_sum
    /// kernel; `DS4_MOE_SUM_FOLD=0`: moe_sum writes the sublayer output first).
    moe_sum_fold: bool,
    /// Set by `moe_hc_post_pre_norm` around its `moe` call: the MoE then leaves its
    /// outputs in `moe_parts` instead of running moe_sum.
    fold_moe_sum: std::sync::atomic::AtomicBool,
    moe_parts: Mutex<Option<MoeParts>>,
    /// Decode: the shared expert runs on `side`, a branch beside the router and the
    /// routed experts (`DS4_MOE_BRANCH=0`: one chain, for A/B runs). While `on_side` is
    /// set, `stream()` is the side stream.
    moe_branch: bool,
    /// Decode: the router product and the expert choice in one launch
    /// (`moe_router_route`) only with `DS4_ROUTE_FUSE=1`; by default the F16 matvec,
    /// then moe_route. Measured neutral on the H100 (2K: 156.1/156.4 fused, 156.8/155.2
    /// not): its 16-CTA cluster needs 16 nearly free SMs to start.
    route_fuse: std::sync::atomic::AtomicBool,
    /// Decode: the routed gate/up product chooses its experts itself from the router
    /// logits (`ExpertIds::Choose`: no moe_route launch between them; `DS4_MOE_CHOOSE=0`:
    /// moe_route, for A/B runs).
    moe_choose: bool,
    /// Decode: the routed down product reads its expert ids before its PDL wait and
    /// loads its first weights under the SwiGLU before it, which releases it only after
    /// its own wait (`ExpertIds::Early`; off with `DS4_DOWN_EARLY=0`).
    down_early: bool,
    /// Decode: attn_output_a writes attn_output_b's Q8_0 input itself
    /// (`Kernels::matvec_quant_out`; off with `DS4_OA_QUANT=0`).
    oa_quant: bool,
    /// Decode: the compressors run on the side branch forward.rs marks
    /// (`Backend::branch_begin`; `DS4_ATTN_BRANCH=0`: one chain).
    /// Indexer scores with the heads in parallel (`idx_scores_heads`); `DS4_IDX_HEADS=0`
    /// keeps the row-per-thread kernel (A/B runs).
    idx_heads: bool,
    /// qkv_norm_rope's KV rounding in registers (`DS4_QKV_ROUND_REGS=0`: on a shared
    /// copy of the row, the older form).
    qkv_round_regs: std::sync::atomic::AtomicBool,
    /// Indexer top-k by `idx_topk_v2` (keys in registers, range-spread select bins,
    /// bucket-rank order); `DS4_IDX_TOPK_V2=0` keeps `idx_topk` (A/B runs).
    idx_topk_v2: bool,
    attn_branch: bool,
    /// Decode: a second side branch of a layer (the indexer query) continues on the
    /// side stream only with `DS4_SIDE_CONTINUE=1`. Off by default: on the H100 the
    /// side stream, already busy with the compressors, then becomes the longer chain
    /// (154.6 vs 157.4 tok/s at 2K).
    side_continue: bool,
    /// Whether the side stream has work the main stream has not joined yet.
    side_pending: std::sync::atomic::AtomicBool,
    side: Arc<CudaStream>,
    on_side: std::sync::atomic::AtomicBool,
}

impl CudaBackend {
    /// Compiles/loads the kernels and prepares the constant tables for `shape`.
    pub fn new(rt: Arc<CudaRuntime>, shape: &ModelShape) -> crate::Result<Self> {
        let kernels = Kernels::load(&rt)?;
        let gemm = GemmKernels::load(&rt)?;
        let attn = crate::attention::AttentionKernels::load(&rt)?;
        let ops = Ops::load(&rt)?;
        let profiling = std::env::var("DS4_CUDA_PROFILE").is_ok_and(|v| v == "1");
        let s = &rt.stream;
        let rope_plain = DevBuf::from_f32(s, &shape.rope_plain().freqs)?;
        let rope_comp = DevBuf::from_f32(s, &shape.rope_compress().freqs)?;
        let chunk = Mutex::new(ChunkBufs {
            tokens: DevBuf::zeros(s, 4 * 64)?,
            pos: DevBuf::zeros(s, 4 * 64)?,
            decode: None,
        });
        let decode_up = DecodeUpload::new(s)?;
        Ok(Self {
            kernels,
            gemm,
            attn,
            attn_kv_append: crate::launch::env_switch("DS4_ATTN_KV_APPEND"),
            ring_appended: AtomicUsize::new(0),
            comp_fuse: crate::launch::env_switch("DS4_COMP_FUSE"),
            comp_pair: crate::launch::env_switch("DS4_COMP_PAIR"),
            attn_merge_rope: crate::launch::env_switch("DS4_ATTN_MERGE_ROPE"),
            idx_rope_qat: crate::launch::env_switch("DS4_IDX_ROPE_QAT"),
            qb_pair: std::sync::atomic::AtomicBool::new(crate::launch::env_switch("DS4_QB_PAIR")),
            gemm_scratch: Mutex::new(None),
            ops,
            shape: shape.clone(),
            rope_plain,
            rope_comp,
            chunk,
            decode_up,
            scratch: Mutex::new(Scratch::default()),
            uploads: Mutex::new(HashMap::new()),
            use_graphs: !profiling,
            fuse_hc_post: crate::launch::env_switch("DS4_HC_FUSE"),
            fuse_norm_quant: crate::launch::env_switch("DS4_NORM_QUANT"),
            hc_split: std::sync::atomic::AtomicU8::new(if !crate::launch::env_switch(
                "DS4_HC_SPLIT_BLOCK",
            ) {
                HcSplit::OneBlock
            } else if std::env::var("DS4_HC_SINKHORN_SIDE").map_or(true, |v| v != "1") {
                HcSplit::TwoBlocks
            } else {
                HcSplit::Side
            } as u8),
            hc_fin_v2: std::sync::atomic::AtomicBool::new(crate::launch::env_switch(
                "DS4_HC_FIN_V2",
            )),
            hc_fin_256: std::sync::atomic::AtomicBool::new(
                std::env::var("DS4_HC_FIN_256").is_ok_and(|v| v == "1"),
            ),
            hc_v3: std::sync::atomic::AtomicBool::new(crate::launch::env_switch("DS4_HC_V3")),
            hc_pending: Mutex::new(None),
            hc_carry: crate::launch::env_switch("DS4_HC_CARRY"),
            moe_sum_fold: crate::launch::env_switch("DS4_MOE_SUM_FOLD"),
            fold_moe_sum: std::sync::atomic::AtomicBool::new(false),
            moe_parts: Mutex::new(None),
            moe_branch: crate::launch::env_switch("DS4_MOE_BRANCH"),
            route_fuse: std::sync::atomic::AtomicBool::new(
                std::env::var("DS4_ROUTE_FUSE").is_ok_and(|v| v == "1"),
            ),
            moe_choose: crate::launch::env_switch("DS4_MOE_CHOOSE"),
            down_early: crate::launch::env_switch("DS4_DOWN_EARLY"),
            oa_quant: crate::launch::env_switch("DS4_OA_QUANT"),
            attn_branch: crate::launch::env_switch("DS4_ATTN_BRANCH"),
            side_continue: std::env::var("DS4_SIDE_CONTINUE").is_ok_and(|v| v == "1"),
            idx_heads: crate::launch::env_switch("DS4_IDX_HEADS"),
            qkv_round_regs: std::sync::atomic::AtomicBool::new(crate::launch::env_switch(
                "DS4_QKV_ROUND_REGS",
            )),
            idx_topk_v2: crate::launch::env_switch("DS4_IDX_TOPK_V2"),
            side_pending: std::sync::atomic::AtomicBool::new(false),
            side: rt.ctx.new_stream()?,
            on_side: std::sync::atomic::AtomicBool::new(false),
            profile: profiling.then(|| Mutex::new(HashMap::new())),
            recorded: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            step_timing: Mutex::new(StepTiming::default()),
            pinned_read: crate::launch::env_switch("DS4_PINNED_READ").then(|| Mutex::new(None)),
            rt,
        })
    }

    /// Selftest: qkv_norm_rope's KV rounding in registers (true) or on a shared copy;
    /// returns the previous setting.
    pub(crate) fn set_qkv_round_regs(&self, on: bool) -> bool {
        self.qkv_round_regs.swap(on, Ordering::Relaxed)
    }

    /// Selftest: where the HC split's Sinkhorn runs (the environment picks it
    /// otherwise), so that one run checks every form.
    pub(crate) fn set_hc_split(&self, mode: HcSplit) {
        self.hc_split.store(mode as u8, Ordering::Relaxed);
    }

    /// Selftest: the HC step's kernels, second version or first (`DS4_HC_FIN_V2`), so
    /// that one run compares them.
    pub(crate) fn set_hc_fin_v2(&self, on: bool) {
        self.hc_fin_v2.store(on, Ordering::Relaxed);
    }

    pub(crate) fn hc_fin_v2(&self) -> bool {
        self.hc_fin_v2.load(Ordering::Relaxed)
    }

    /// Selftest: decode's HC split + collapse on 256 threads (`DS4_HC_FIN_256`).
    pub(crate) fn set_hc_fin_256(&self, on: bool) {
        self.hc_fin_256.store(on, Ordering::Relaxed);
    }

    pub(crate) fn hc_fin_256(&self) -> bool {
        self.hc_fin_256.load(Ordering::Relaxed)
    }

    /// Selftest: decode's HC step v3 on or off; returns the previous setting.
    pub(crate) fn set_hc_v3(&self, on: bool) -> bool {
        self.hc_v3.swap(on, Ordering::Relaxed)
    }

    fn pending_split(&self) -> MResult<MutexGuard<'_, Option<HcSplitJob>>> {
        self.hc_pending
            .lock()
            .map_err(|_| MError::Backend("hc_pending poisoned".into()))
    }

    /// `launch` with the deferred split to carry (when `can` and `DS4_HC_CARRY` allow
    /// it): the split stays pending unless `launch` returns true (it launched a kernel
    /// carrying it).
    fn carry_split(
        &self,
        can: bool,
        launch: impl FnOnce(Option<&HcSplitJob>) -> MResult<bool>,
    ) -> MResult<bool> {
        let job = if can && self.hc_carry {
            self.pending_split()?.take()
        } else {
            None
        };
        let launched = launch(job.as_ref());
        if job.is_some() && !matches!(launched, Ok(true)) {
            *self.pending_split()? = job;
        }
        launched
    }

    /// Makes post/comb of the last v3 step if no kernel has carried its split yet:
    /// before anything reads or writes them.
    pub(crate) fn hc_settle(&self) -> MResult<()> {
        let Some(job) = self.pending_split()?.take() else {
            return Ok(());
        };
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(&self.ops.hc_split_v3, cfg, |b| {
            b.arg(&job);
        })
    }

    pub(crate) fn hc_split(&self) -> HcSplit {
        match self.hc_split.load(Ordering::Relaxed) {
            0 => HcSplit::OneBlock,
            1 => HcSplit::TwoBlocks,
            _ => HcSplit::Side,
        }
    }

    /// Selftest: the fused merge + next split of the FFN sublayer that sums the MoE's
    /// outputs itself (`routed`: n·k rows, `shared`: n rows, both n_embd wide); `sub`
    /// only sets the shape and is not read.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn hc_post_pre_norm_moe(
        &self,
        routed: &CudaAct,
        shared: &CudaAct,
        k: usize,
        sub: &CudaAct,
        n: usize,
        s: &ModelShape,
        state: &mut CudaAct,
        next: &HcWeights<CudaWeight>,
        norm: &CudaWeight,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<()> {
        let e = s.n_embd;
        check(
            routed.cols == e && routed.rows >= n * k && shared.cols == e && shared.rows >= n,
            || "hc_post_pre_norm_moe: bad shapes".into(),
        )?;
        let parts = MoeParts {
            routed: routed.buf.ptr,
            shared: shared.buf.ptr,
            k,
        };
        self.hc_post_pre_norm_with(sub, Some(parts), n, s, state, next, norm, y, post, comb)
    }

    pub fn runtime(&self) -> &Arc<CudaRuntime> {
        &self.rt
    }

    /// The weight-product kernels (matvec.cu), e.g. for bandwidth measurements.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    fn prof(&self, name: &'static str, n: usize) -> Option<ProfGuard<'_>> {
        self.profile.as_ref()?;
        let _ = self.rt.stream.synchronize();
        Some(ProfGuard {
            be: self,
            name,
            decode: n == 1,
            start: std::time::Instant::now(),
        })
    }

    /// Per-operation totals when `DS4_CUDA_PROFILE=1`, largest first.
    pub fn profile_report(&self) -> Option<String> {
        let p = self.profile.as_ref()?.lock().ok()?;
        let mut v: Vec<_> = p
            .iter()
            .map(|(&(k, dec), &(t, n))| {
                (
                    format!("{k} [{}]", if dec { "decode" } else { "chunk" }),
                    t,
                    n,
                )
            })
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = v.iter().map(|x| x.1).sum();
        let mut out = format!("operation profile (synchronised; total {:.3} s)\n", total);
        for (k, t, n) in v {
            out.push_str(&format!(
                "  {k:<28} {:>9.3} ms {:>5.1}%  {n:>7} calls  {:>8.1} us/call\n",
                t * 1e3,
                100.0 * t / total.max(1e-12),
                t * 1e6 / n.max(1) as f64
            ));
        }
        Some(out)
    }

    pub fn graph_stats(&self) -> GraphStats {
        let (timed, timed_ms) = match self.step_timing.lock() {
            Ok(mut t) => {
                t.collect();
                (t.steps, t.total_ms)
            }
            Err(_) => (0, 0.0),
        };
        GraphStats {
            recorded: self.recorded.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            timed,
            timed_ms,
        }
    }

    /// Bytes of distinct weight data uploaded so far.
    pub fn uploaded_bytes(&self) -> usize {
        self.uploads
            .lock()
            .map(|u| {
                u.values()
                    .map(|(d, f)| d.len() + f.as_ref().map_or(0, |f| f.len()))
                    .sum()
            })
            .unwrap_or(0)
    }

    fn stream(&self) -> &Arc<CudaStream> {
        if self.on_side.load(Ordering::Relaxed) {
            &self.side
        } else {
            &self.rt.stream
        }
    }

    /// From here on `stream()` is the side stream, which starts where the main one is.
    fn fork_side(&self) -> MResult<()> {
        if self.on_side.load(Ordering::Relaxed) {
            return Err(MError::Backend("side branches do not nest".into()));
        }
        let forked = self.rt.stream.record_event(None).map_err(be)?;
        self.side.wait(&forked).map_err(be)?;
        self.on_side.store(true, Ordering::Relaxed);
        self.side_pending.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Back on the main stream, which waits for any side work (end of a step).
    fn end_branches(&self) -> MResult<()> {
        self.on_side.store(false, Ordering::Relaxed);
        self.join_side()
    }

    /// Makes the main stream wait for everything issued on the side stream.
    fn join_side(&self) -> MResult<()> {
        if self.side_pending.swap(false, Ordering::Relaxed) {
            self.rt.stream.join(&self.side).map_err(be)?;
        }
        Ok(())
    }

    fn scratch(&self) -> MResult<MutexGuard<'_, Scratch>> {
        self.scratch
            .lock()
            .map_err(|_| MError::Backend("scratch poisoned".into()))
    }

    fn launch<'a>(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: impl FnOnce(&mut KernelArgs<'a>),
    ) -> MResult<()> {
        let mut b = KernelArgs::new();
        args(&mut b);
        // SAFETY: every call site passes the argument list of the named kernel in ops.cu,
        // with pointers to buffers sized for the launch (checked by the callers); every
        // ops.cu kernel starts with PDL_START (waits for its predecessors).
        unsafe { crate::launch::launch(self.stream(), f, cfg, &mut b, self.kernels.pdl()) }
            .map_err(be)?;
        Ok(())
    }

    /// qkv_norm_rope's `round_kv` argument: 0 none, 1 on a shared copy, 2 in registers.
    fn qkv_round_mode(&self, round_kv: bool) -> i32 {
        match (round_kv, self.qkv_round_regs.load(Ordering::Relaxed)) {
            (false, _) => 0,
            // Registers: a thread's 4 dims never straddle the FP8 part's end.
            (true, true) if self.shape.n_nope().is_multiple_of(4) => 2,
            (true, _) => 1,
        }
    }

    /// `Backend::compressor_update`; with `defer`, a decode step that would be one
    /// `comp_steps` block is added to `defer` for the caller to launch, and anything
    /// else is launched as usual.
    #[allow(clippy::too_many_arguments)]
    fn compressor_update_into(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        which: CompKind,
        w: &CompressorWeights<CudaWeight>,
        proj_kv: &CudaAct,
        proj_score: &CudaAct,
        n: usize,
        pos0: usize,
        official: bool,
        defer: Option<&mut Vec<CompStepArgs>>,
    ) -> MResult<()> {
        let _prof = self.prof("compressor_update", n);
        let l = kv
            .layers
            .get_mut(layer)
            .ok_or_else(|| MError::Backend("layer out of range".into()))?;
        let slot = match which {
            CompKind::Attn => l.comp.as_mut(),
            CompKind::Indexer => l.index.as_mut(),
        };
        let Some((rows, fr)) = slot else {
            return Err(MError::Backend(format!(
                "layer {layer} has no {which:?} compressor state"
            )));
        };
        let (r, coff, dc) = (fr.ratio, fr.coff, fr.d_c);
        let wdt = coff * dc;
        check(
            proj_kv.cols >= wdt && proj_kv.cols == proj_score.cols,
            || format!("compressor layer {layer}: bad shapes"),
        )?;
        check((pos0 + n) / r <= rows.cap, || {
            format!("compressor layer {layer}: context full")
        })?;
        let (ape, norm) = (w.ape.dense_ptr()?, w.norm.dense_ptr()?);
        check(w.ape.k * w.ape.rows == r * wdt, || {
            format!("compressor layer {layer}: ape shape")
        })?;
        if n == 0 {
            return Ok(());
        }
        let (kp, sp, ld, n32, pp, r32, c32, dc32, fk, fs, rp) = (
            proj_kv.buf.ptr,
            proj_score.buf.ptr,
            proj_kv.cols as i32,
            n as i32,
            self.chunk_ptrs()?.1,
            r as i32,
            coff as i32,
            dc as i32,
            fr.kv.ptr,
            fr.score.ptr,
            rows.buf.ptr,
        );
        let mode: i32 = match (official, which) {
            (false, _) => 0,
            (true, CompKind::Attn) => 1,
            (true, CompKind::Indexer) => 2,
        };
        check(mode != 2 || dc.is_multiple_of(128), || {
            "indexer rows must be multiples of 128".into()
        })?;
        let (fq, nr, eps) = (
            self.rope_comp.ptr,
            self.shape.n_rot.min(dc) as i32,
            self.shape.rms_eps,
        );
        // Decode: pool and finish in one block of dc threads (comp_steps).
        if n == 1
            && self.comp_fuse
            && dc.is_multiple_of(128)
            && dc <= 512
            && (mode != 2 || dc == 128)
        {
            let step = CompStepArgs {
                kv: kp,
                score: sp,
                pos_p: pp,
                ape,
                fr_kv: fk,
                fr_score: fs,
                rows: rp,
                norm_w: norm,
                freqs: fq,
                r: r32,
                coff: c32,
                dc: dc32,
                n_rot: nr,
                eps,
                mode,
            };
            return match defer {
                Some(d) => {
                    d.push(step);
                    Ok(())
                }
                None => self.launch_comp_steps(&[step]),
            };
        }
        let tiles = (dc as u32).div_ceil(128);
        // One token: the sequential walk is a single step. A chunk: every closing row in
        // parallel from the old frontier, then the new frontier (comp_frontier).
        let (pool, rows_y) = if n == 1 {
            (&self.ops.comp_pool, 1)
        } else {
            (&self.ops.comp_pool_chunk, (n / r + 1) as u32)
        };
        let cfg = LaunchConfig {
            grid_dim: (tiles, rows_y, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(pool, cfg, |b| {
            b.arg(&kp)
                .arg(&sp)
                .arg(&ld)
                .arg(&n32)
                .arg(&pp)
                .arg(&ape)
                .arg(&r32)
                .arg(&c32)
                .arg(&dc32)
                .arg(&fk)
                .arg(&fs)
                .arg(&rp);
        })?;
        if n > 1 {
            let cfg = LaunchConfig {
                grid_dim: (tiles, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(&self.ops.comp_frontier, cfg, |b| {
                b.arg(&kp)
                    .arg(&sp)
                    .arg(&ld)
                    .arg(&n32)
                    .arg(&pp)
                    .arg(&ape)
                    .arg(&r32)
                    .arg(&c32)
                    .arg(&dc32)
                    .arg(&fk)
                    .arg(&fs);
            })?;
        }
        // At most n/r + 1 rows close in a chunk of n; surplus blocks exit.
        let cfg = LaunchConfig {
            grid_dim: ((n / r + 1) as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (dc * 4) as u32,
        };
        self.launch(&self.ops.comp_finish, cfg, |b| {
            b.arg(&rp)
                .arg(&dc32)
                .arg(&n32)
                .arg(&pp)
                .arg(&r32)
                .arg(&norm)
                .arg(&fq)
                .arg(&nr)
                .arg(&eps)
                .arg(&mode);
        })
    }

    /// `Backend::compressor_updates`; with `pair`, two decode steps that are one
    /// `comp_steps` block each run as one launch (returns whether they did).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn compressor_updates_with(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        updates: &[CompUpdate<'_, CudaWeight, CudaAct>],
        n: usize,
        pos0: usize,
        official: bool,
        pair: bool,
    ) -> MResult<bool> {
        let mut steps: Vec<CompStepArgs> = Vec::with_capacity(2);
        let defer = pair && n == 1 && updates.len() == 2;
        for u in updates {
            self.compressor_update_into(
                kv,
                layer,
                u.which,
                u.w,
                u.proj_kv,
                u.proj_score,
                n,
                pos0,
                official,
                defer.then_some(&mut steps),
            )?;
        }
        self.launch_comp_steps(&steps)?;
        Ok(steps.len() == 2)
    }

    /// Decode compressor steps (none, one or two) as one `comp_steps` launch: a block
    /// of the larger dc threads per step.
    fn launch_comp_steps(&self, steps: &[CompStepArgs]) -> MResult<()> {
        let (c0, c1) = match *steps {
            [] => return Ok(()),
            [c0] => (c0, CompStepArgs::default()),
            [c0, c1] => (c0, c1),
            _ => {
                return Err(MError::Backend(
                    "at most two compressor steps a launch".into(),
                ));
            }
        };
        let threads = c0.dc.max(c1.dc) as u32;
        let cfg = LaunchConfig {
            grid_dim: (steps.len() as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: threads * 4,
        };
        self.launch(&self.ops.comp_steps, cfg, |b| {
            b.arg(&c0).arg(&c1);
        })
    }

    /// `Backend::attn_queries` of one token in two launches (`DS4_QB_PAIR`): q_b and
    /// the indexer's q_b as one grid, then qkv_norm_rope and rope_qat as one, the
    /// same kernel bodies as the four launches. Ok(false), nothing launched, when the
    /// shapes or types do not take the pairs (the caller runs the four steps).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn_queries_paired(
        &self,
        q_b: &CudaWeight,
        ix_q_b: &CudaWeight,
        qr: &CudaAct,
        kv_norm: &CudaWeight,
        h: QueryHeads,
        q: &mut CudaAct,
        iq: &mut CudaAct,
        kv: &mut CudaAct,
    ) -> MResult<bool> {
        let (k, hd, n_rot) = (qr.cols, h.head_dim, self.shape.n_rot);
        // The four launches' own conditions: the Q8_0 / F16 matvecs of one row, the
        // fused qkv_norm_rope (128-thread blocks here) and rope_qat (official only).
        let fits = q_b.ty == GgmlType::Q8_0
            && ix_q_b.ty == GgmlType::F16
            && q_b.k == k
            && ix_q_b.k == k
            && q.cols >= q_b.rows
            && iq.cols >= ix_q_b.rows
            && q.rows.min(iq.rows).min(kv.rows).min(qr.rows) >= 1
            && self.fuse_norm_quant
            && (hd / 4).next_multiple_of(32) == 128
            && hd.is_multiple_of(4)
            && n_rot.is_multiple_of(4)
            && n_rot <= hd
            && q.cols.is_multiple_of(hd)
            && kv.cols == hd
            && kv_norm.k * kv_norm.rows == hd
            && self.idx_rope_qat
            && h.official
            && h.indexer_dim == 128
            && iq.cols.is_multiple_of(128)
            && n_rot <= 128;
        if !fits {
            return Ok(false);
        }
        let _prof = self.prof("qb pair", 1);
        {
            // q_b's input is qr's Q8_0 copy, pending from the norm (else made here).
            let kind = ActKind::Q8_0;
            let key = (qr.buf.ptr, kind_tag(kind), k, 1);
            let mut sc = self.scratch()?;
            let reuse = sc.reuse.claim(key);
            let act = sc.act(self.stream(), kind, k, 1)?;
            if !reuse {
                self.kernels
                    .quantize_rows(self.stream(), qr.buf.ptr, act, 1)
                    .map_err(be)?;
            }
            let q8 = [MvSeg {
                w: q_b.data.ptr,
                rows: q_b.rows,
                y: q.buf.ptr,
                ldy: q.cols,
            }];
            let f16 = [MvSeg {
                w: ix_q_b.data.ptr,
                rows: ix_q_b.rows,
                y: iq.buf.ptr,
                ldy: iq.cols,
            }];
            let pair = MvPair {
                k,
                ntok: 1,
                act,
                x: qr.buf.ptr,
                q8: &q8,
                f16: &f16,
            };
            if !self.kernels.matvec_pair(self.stream(), &pair).map_err(be)? {
                // No compiled pair for these picks: the copy stays for q_b's own launch.
                sc.reuse.set(key);
                return Ok(false);
            }
        }
        self.wrote(q)?;
        self.wrote(kv)?;
        self.wrote(iq)?;
        let n_qkv = q.cols / hd + 1;
        let cfg = LaunchConfig {
            grid_dim: ((n_qkv + iq.cols / 128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (hd.max(128) * 4) as u32,
        };
        let (qp, ldq, kp, ldk, wp, hd32, nr, fr, pp, rk, nn) = (
            q.buf.ptr,
            q.cols as i32,
            kv.buf.ptr,
            kv.cols as i32,
            kv_norm.dense_ptr()?,
            hd as i32,
            n_rot as i32,
            self.freqs(h.rope),
            self.chunk_ptrs()?.1,
            self.qkv_round_mode(h.official),
            self.shape.n_nope() as i32,
        );
        let (nq, ixp, ldix, ixfr) = (
            n_qkv as i32,
            iq.buf.ptr,
            iq.cols as i32,
            self.freqs(RopeKind::Compress),
        );
        self.launch(&self.ops.qkv_rope_qat_pair, cfg, |b| {
            b.arg(&qp)
                .arg(&ldq)
                .arg(&kp)
                .arg(&ldk)
                .arg(&wp)
                .arg(&hd32)
                .arg(&h.eps)
                .arg(&nr)
                .arg(&fr)
                .arg(&pp)
                .arg(&rk)
                .arg(&nn)
                .arg(&nq)
                .arg(&ixp)
                .arg(&ldix)
                .arg(&ixfr);
        })?;
        Ok(true)
    }

    fn freqs(&self, kind: RopeKind) -> u64 {
        match kind {
            RopeKind::Plain => self.rope_plain.ptr,
            RopeKind::Compress => self.rope_comp.ptr,
        }
    }

    /// y[t·ldy + r] = W[r]·x[t] for t < n (x rows `ldx` floats apart).
    #[allow(clippy::too_many_arguments)]
    fn matmul_raw(
        &self,
        w: &CudaWeight,
        row0: usize,
        rows: usize,
        x: u64,
        ldx: usize,
        n: usize,
        y: u64,
        ldy: usize,
    ) -> MResult<()> {
        let k = w.k;
        let wptr = w.data.ptr + (row0 * w.row_bytes()) as u64;
        match w.ty {
            GgmlType::Q8_0 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
                let kind = ActKind::for_weight(w.ty).map_err(be)?;
                let mut sc = self.scratch()?;
                let xin = if ldx != k {
                    let tmp = sc.f32(self.stream(), "mm_in", n * k)?;
                    self.copy_rows(x, ldx, tmp, k, n, k)?;
                    tmp
                } else {
                    x
                };
                let reuse = sc.reuse.claim((x, kind_tag(kind), k, n)) && ldx == k;
                let act = sc.act(self.stream(), kind, k, n)?;
                if !reuse {
                    self.kernels
                        .quantize_rows(self.stream(), xin, act, n)
                        .map_err(be)?;
                }
                self.dense_product(w, wptr, rows, MvInput::Quant(act), k, n, y, ldy)
            }
            GgmlType::F16 if k.is_multiple_of(8) && k <= 16384 && ldx == k => {
                self.dense_product(w, wptr, rows, MvInput::F32(x), ldx, n, y, ldy)
            }
            GgmlType::F32
                if n >= GEMM_MIN_TOKENS
                    && self.try_gemm(&dense_gemm(
                        w,
                        wptr,
                        rows,
                        MvInput::F32(x),
                        ldx,
                        n,
                        y,
                        ldy,
                    ))? =>
            {
                Ok(())
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                self.mv_float(w, wptr, 0, 0, x, ldx, rows, n, 1, 1, y, ldy)
            }
            other => Err(MError::Backend(format!(
                "{}: {} weights are not supported on the GPU",
                w.name,
                other.name()
            ))),
        }
    }

    /// A dense product on the tensor cores for chunks (when the GEMM takes the shape),
    /// else the (batched) matvec.
    #[allow(clippy::too_many_arguments)]
    fn dense_product(
        &self,
        w: &CudaWeight,
        wptr: u64,
        rows: usize,
        x: MvInput<'_>,
        x_row_len: usize,
        n: usize,
        y: u64,
        ldy: usize,
    ) -> MResult<()> {
        if n >= GEMM_MIN_TOKENS
            && self.try_gemm(&dense_gemm(w, wptr, rows, x, x_row_len, n, y, ldy))?
        {
            return Ok(());
        }
        let m = Matvec {
            ty: w.ty,
            w: wptr,
            k: w.k,
            rows,
            ntok: n,
            slots: 1,
            w_slot_stride: 0,
            ids: 0,
            x_group: 1,
            x,
            y,
        };
        self.kernels.matvec_ld(self.stream(), &m, ldy).map_err(be)
    }

    #[allow(clippy::too_many_arguments)]
    fn mv_float(
        &self,
        w: &CudaWeight,
        wptr: u64,
        slot_stride: u64,
        ids: u64,
        x: u64,
        ldx: usize,
        rows: usize,
        ntok: usize,
        slots: usize,
        x_group: usize,
        y: u64,
        ldy: usize,
    ) -> MResult<()> {
        let ty: i32 = match w.ty {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::BF16 => 2,
            other => {
                return Err(MError::Backend(format!(
                    "mv_float: {} is not a float type",
                    other.name()
                )));
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, slots as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (stride, ldx, k, rows, ntok, xg, ldy) = (
            slot_stride as i64,
            ldx as i32,
            w.k as i32,
            rows as i32,
            ntok as i32,
            x_group as i32,
            ldy as i32,
        );
        self.launch(&self.ops.mv_float, cfg, |b| {
            b.arg(&wptr)
                .arg(&ty)
                .arg(&stride)
                .arg(&ids)
                .arg(&x)
                .arg(&ldx)
                .arg(&k)
                .arg(&rows)
                .arg(&ntok)
                .arg(&xg)
                .arg(&y)
                .arg(&ldy);
        })
    }

    fn copy_rows(
        &self,
        src: u64,
        lds: usize,
        dst: u64,
        ldd: usize,
        rows: usize,
        cols: usize,
    ) -> MResult<()> {
        if rows == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((cols as u32).div_ceil(256).max(1), rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (lds, ldd, r, c) = (lds as i32, ldd as i32, rows as i32, cols as i32);
        self.launch(&self.ops.copy_rows, cfg, |b| {
            b.arg(&src).arg(&lds).arg(&dst).arg(&ldd).arg(&r).arg(&c);
        })
    }

    /// Routed / grouped products: slot s uses matrix `ids[s]` (or s), activation row
    /// s / x_group, output row s (ntok = 1).
    #[allow(clippy::too_many_arguments)]
    fn matmul_slots(
        &self,
        w: &CudaWeight,
        rows: usize,
        ids: u64,
        slots: usize,
        x_group: usize,
        x: u64,
        y: u64,
    ) -> MResult<()> {
        self.matmul_slots_with(w, rows, ids, slots, x_group, x, y, ExpertIds::AfterWait)
    }

    /// [`Self::matmul_slots`] whose routed decode product learns its experts as `experts`
    /// says (anything but `AfterWait` only where `Kernels::routed_fast` holds).
    #[allow(clippy::too_many_arguments)]
    fn matmul_slots_with(
        &self,
        w: &CudaWeight,
        rows: usize,
        ids: u64,
        slots: usize,
        x_group: usize,
        x: u64,
        y: u64,
        experts: ExpertIds,
    ) -> MResult<()> {
        let k = w.k;
        let stride = (w.row_bytes() * rows) as u64;
        match w.ty {
            GgmlType::Q8_0 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
                let kind = ActKind::for_weight(w.ty).map_err(be)?;
                let n_act = slots.div_ceil(x_group);
                let mut sc = self.scratch()?;
                let routed = slots >= ROUTED_GEMM_MIN_SLOTS && ids != 0;
                let n_expert = w.rows / rows.max(1);
                let mut gs = self
                    .gemm_scratch
                    .lock()
                    .map_err(|_| MError::Backend("gemm scratch poisoned".into()))?;
                if routed && gs.as_ref().is_none_or(|g| g.1 < slots || g.2 < n_expert) {
                    let cap = slots.next_power_of_two();
                    *gs = Some((
                        GemmScratch::new(self.stream(), cap, n_expert).map_err(be)?,
                        cap,
                        n_expert,
                    ));
                    sc.epoch += 1;
                }
                let reuse = sc.reuse.claim((x, kind_tag(kind), k, n_act));
                let act = sc.act(self.stream(), kind, k, n_act)?;
                if !reuse {
                    self.kernels
                        .quantize_rows(self.stream(), x, act, n_act)
                        .map_err(be)?;
                }
                if routed {
                    let scratch = gs
                        .as_ref()
                        .map(|g| &g.0)
                        .ok_or_else(|| MError::Backend("gemm scratch missing".into()))?;
                    let g = RoutedGemm {
                        ty: w.ty,
                        w: w.data.ptr,
                        w_expert_stride: stride,
                        n_expert,
                        k,
                        rows,
                        ids,
                        n_slots: slots,
                        x_group,
                        x: act,
                        y,
                    };
                    match self.gemm.routed_gemm(&g, scratch) {
                        Ok(()) => return Ok(()),
                        Err(crate::Error::Shape { .. }) => {}
                        Err(e) => return Err(be(e)),
                    }
                }
                let m = Matvec {
                    ty: w.ty,
                    w: w.data.ptr,
                    k,
                    rows,
                    ntok: 1,
                    slots,
                    w_slot_stride: stride,
                    ids,
                    x_group,
                    x: MvInput::Quant(act),
                    y,
                };
                self.kernels
                    .matvec_routed(self.stream(), &m, rows, &[], experts)
                    .map_err(be)
            }
            _ => self.mv_float(
                w, w.data.ptr, stride, ids, x, k, rows, 1, slots, x_group, y, rows,
            ),
        }
    }

    /// Decode: the grouped Q8_0 product of one token (attn_output_a) through the TMA
    /// kernel that also writes the Q8_0 copy of its output, left pending for the next
    /// product of `out` (attn_output_b: no quantising launch between them;
    /// `DS4_OA_QUANT=0`: a quant_act_q8_0 launch). False, launching nothing, where that
    /// does not apply.
    fn grouped_quant_out(
        &self,
        w: &CudaWeight,
        per: usize,
        groups: usize,
        x: u64,
        out: &CudaAct,
    ) -> MResult<bool> {
        let (k, total) = (w.k, per * groups);
        if !self.oa_quant
            || w.ty != GgmlType::Q8_0
            || out.cols != total
            || k == total
            || !self.kernels.has_tma(k)
        {
            return Ok(false);
        }
        let (kind, tag) = (ActKind::Q8_0, kind_tag(ActKind::Q8_0));
        let mut sc = self.scratch()?;
        sc.act(self.stream(), kind, k, groups)?;
        sc.act(self.stream(), kind, total, 1)?;
        let reuse = sc.reuse.claim((x, tag, k, groups));
        let missing = || MError::Backend("activation scratch missing".into());
        let act_in = sc.acts.get(&(tag, k)).ok_or_else(missing)?;
        let act_out = sc.acts.get(&(tag, total)).ok_or_else(missing)?;
        if !reuse {
            self.kernels
                .quantize_rows(self.stream(), x, act_in, groups)
                .map_err(be)?;
        }
        let m = Matvec {
            ty: w.ty,
            w: w.data.ptr,
            k,
            rows: per,
            ntok: 1,
            slots: groups,
            w_slot_stride: (w.row_bytes() * per) as u64,
            ids: 0,
            x_group: 1,
            x: MvInput::Quant(act_in),
            y: out.buf.ptr,
        };
        // attn_output_a carries a deferred HC split on its waiting warp.
        let taken = self.carry_split(self.kernels.tma_carries_split(), |job| {
            self.kernels
                .matvec_quant_out(self.stream(), &m, act_out, job)
                .map_err(be)
        })?;
        if !taken {
            // The input copy is made: the plain product reads it.
            self.kernels.matvec_ld(self.stream(), &m, per).map_err(be)?;
            return Ok(true);
        }
        sc.reuse.set((out.buf.ptr, tag, total, 1));
        Ok(true)
    }

    /// Grouped projection of a chunk on the tensor cores, straight from the token-major
    /// input (each group reads its column slice); false when the shape is not taken.
    fn grouped_gemm(
        &self,
        w: &CudaWeight,
        x: &CudaAct,
        n: usize,
        groups: usize,
        out: &mut CudaAct,
    ) -> MResult<bool> {
        let (k, per) = (w.k, w.rows / groups);
        let kind = match ActKind::for_weight(w.ty) {
            Ok(k @ (ActKind::Q8_0 | ActKind::Q8K)) => k,
            _ => return Ok(false),
        };
        let mut sc = self.scratch()?;
        let reuse = sc.reuse.claim((x.buf.ptr, kind_tag(kind), k * groups, n));
        let act = sc.act(self.stream(), kind, k * groups, n)?;
        if !reuse {
            self.kernels
                .quantize_rows(self.stream(), x.buf.ptr, act, n)
                .map_err(be)?;
        }
        for g in 0..groups {
            let ok = self.try_gemm(&Gemm {
                ty: w.ty,
                w: w.data.ptr + (g * per * w.row_bytes()) as u64,
                k,
                rows: per,
                x: MvInput::Quant(act),
                x_col0: g * k,
                x_row_len: k * groups,
                ntok: n,
                y: out.buf.ptr,
                y_row_stride: out.cols,
                y_col0: g * per,
            })?;
            if !ok {
                // All groups share one shape: only the first can be refused.
                if g == 0 {
                    return Ok(false);
                }
                return Err(MError::Backend(format!(
                    "{}: tensor-core GEMM refused group {g} after accepting group 0",
                    w.name
                )));
            }
        }
        Ok(true)
    }

    /// Small-batch products of several matrices of `w`'s type and width over one input,
    /// as one quantisation (none for F16) and one matvec launch: `parts` are the
    /// matrices (weights, rows, output, output row stride). Slots as in `matmul_slots`
    /// (ids 0: dense, `slots` 1, ntok = act_rows). False (nothing launched) when `w`'s
    /// type has no such matvec.
    #[allow(clippy::too_many_arguments)]
    fn fused_matvec(
        &self,
        w: &CudaWeight,
        parts: &[MvSeg],
        x: u64,
        act_rows: usize,
        ntok: usize,
        slots: usize,
        ids: u64,
        x_group: usize,
        experts: ExpertIds,
    ) -> MResult<bool> {
        let kind = match ActKind::for_weight(w.ty) {
            Ok(k @ (ActKind::Q8_0 | ActKind::Q8K)) => Some(k),
            _ if w.ty == GgmlType::F16
                && w.k.is_multiple_of(8)
                && w.k <= 16384
                && slots == 1
                && ids == 0 =>
            {
                None
            }
            _ => return Ok(false),
        };
        let Some((first, extra)) = parts.split_first() else {
            return Ok(true);
        };
        let k = w.k;
        // The scratch stays locked while its quantized input is in use.
        let mut sc = self.scratch()?;
        let xin = match kind {
            Some(kind) => {
                let reuse = sc.reuse.claim((x, kind_tag(kind), k, act_rows));
                let act = sc.act(self.stream(), kind, k, act_rows)?;
                if !reuse {
                    self.kernels
                        .quantize_rows(self.stream(), x, act, act_rows)
                        .map_err(be)?;
                }
                MvInput::Quant(act)
            }
            None => MvInput::F32(x),
        };
        let m = Matvec {
            ty: w.ty,
            w: first.w,
            k,
            rows: first.rows,
            ntok,
            slots,
            w_slot_stride: (w.row_bytes() * first.rows) as u64,
            ids,
            x_group,
            x: xin,
            y: first.y,
        };
        self.kernels
            .matvec_routed(self.stream(), &m, first.ldy, extra, experts)
            .map_err(be)?;
        Ok(true)
    }

    /// Decode: SwiGLU of `rows` rows (gate `g`, up `u`) quantized straight into the
    /// activation buffer the next product with `down` reads, marked for reuse (the f32
    /// result at `mid` is not written). False when the product would not read it there.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_into_act(
        &self,
        down: &CudaWeight,
        g: u64,
        u: u64,
        rows: usize,
        wts: u64,
        clamp: f32,
        mid: u64,
        late_release: bool,
        split: Option<&HcSplitJob>,
    ) -> MResult<bool> {
        let kind = match ActKind::for_weight(down.ty) {
            Ok(k @ (ActKind::Q8_0 | ActKind::Q8K)) => k,
            _ => return Ok(false),
        };
        let ff = down.k;
        let bw = if kind == ActKind::Q8K { 256 } else { 32 };
        if rows >= GEMM_MIN_TOKENS || !ff.is_multiple_of(bw) {
            return Ok(false);
        }
        let mut sc = self.scratch()?;
        let act = sc.act(self.stream(), kind, ff, rows)?;
        self.kernels
            .swiglu_quant(
                self.stream(),
                g,
                u,
                rows,
                wts,
                clamp,
                act,
                late_release,
                split,
            )
            .map_err(be)?;
        sc.reuse.set((mid, kind_tag(kind), ff, rows));
        Ok(true)
    }

    /// Lets the next product of `x` (rows × k) with weights of `w`'s type reuse the
    /// quantized copy the previous product made.
    fn allow_reuse(&self, x: u64, w: &CudaWeight, k: usize, rows: usize) -> MResult<()> {
        if let Ok(kind) = ActKind::for_weight(w.ty)
            && kind != ActKind::F32
        {
            self.scratch()?.reuse.set((x, kind_tag(kind), k, rows));
        }
        Ok(())
    }

    /// Runs `g` on the tensor cores; false when the GEMM kernels do not take this shape
    /// (the caller then uses the matvec).
    fn try_gemm(&self, g: &Gemm) -> MResult<bool> {
        match self.gemm.gemm(g) {
            Ok(()) => Ok(true),
            Err(crate::Error::Shape { .. }) => Ok(false),
            Err(e) => Err(be(e)),
        }
    }

    /// HC split + collapse (+ the sublayer's input RMSNorm) from mixes computed over K
    /// slices by many blocks (`hc_mix_part`); false when the shape is not taken
    /// (F16 `fn` of at most 24 rows, K a multiple of 128, n_embd ≤ 16 per thread).
    #[allow(clippy::too_many_arguments)]
    fn hc_pre_split(
        &self,
        w: &HcWeights<CudaWeight>,
        state: &CudaAct,
        n: usize,
        s: &ModelShape,
        norm: Option<&CudaWeight>,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<bool> {
        // A split still running on the side branch reads the partial mixes and writes
        // post/comb: it ends before they are rewritten.
        self.join_side()?;
        let (hc, e, nm) = (s.hc_mult, s.n_embd, s.hc_mix());
        let k = hc * e;
        let threads = if n == 1 { 1024 } else { 256 };
        if w.fn_.ty != GgmlType::F16
            || nm > HC_MIX_MAX_ROWS
            || !k.is_multiple_of(128)
            || e > HC_FINISH_MAX_PER_THREAD * threads
            || !e.is_multiple_of(4)
            || !y.cols.is_multiple_of(4)
            || state.cols != k
        {
            return Ok(false);
        }
        let norm_ptr = match norm {
            Some(nw) => {
                check(nw.k * nw.rows == e, || "hc_pre: norm weight length".into())?;
                nw.dense_ptr()?
            }
            None => 0,
        };
        // Few tokens: one warp per (token, 128-wide slice); chunks: 8 tokens per block
        // and as many slices as fill about two waves.
        let tt = if n >= 8 { 8 } else { 1 };
        let np = if tt == 1 {
            k / 128
        } else {
            let tiles = n.div_ceil(8);
            let mut p = 1usize;
            while p * 2 <= (264 / tiles).max(1) && (k / 128).is_multiple_of(p * 2) {
                p *= 2;
            }
            p
        };
        let kslice = k / np;
        let part = self
            .scratch()?
            .f32(self.stream(), "hc_part", np * n * (nm + 1))?;
        let cfg = LaunchConfig {
            grid_dim: (np as u32, n.div_ceil(tt) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (fnp, nm32, sp, lds, k32, n32, ks32, tt32) = (
            w.fn_.data.ptr,
            nm as i32,
            state.buf.ptr,
            state.cols as i32,
            k as i32,
            n as i32,
            kslice as i32,
            tt as i32,
        );
        self.launch(&self.ops.hc_mix_part, cfg, |b| {
            b.arg(&fnp)
                .arg(&nm32)
                .arg(&sp)
                .arg(&lds)
                .arg(&k32)
                .arg(&n32)
                .arg(&ks32)
                .arg(&tt32)
                .arg(&part);
        })?;
        let quant = self.y_quant(norm, y, n, s.n_embd)?;
        self.hc_finish(w, state, n, s, norm_ptr, quant, part, np, y, post, comb)?;
        Ok(true)
    }

    /// Whether decode's HC step runs as v3 (`hc_step_v3`): one token, hc = 4 with 24
    /// mix rows, whole 256-column blocks, post/comb float4-aligned.
    #[allow(clippy::too_many_arguments)]
    fn hc_v3_fits(
        &self,
        sub: &CudaAct,
        n: usize,
        s: &ModelShape,
        state: &CudaAct,
        next: &HcWeights<CudaWeight>,
        y: &CudaAct,
        post: &CudaAct,
        comb: &CudaAct,
    ) -> bool {
        self.hc_v3.load(Ordering::Relaxed)
            && n == 1
            && s.hc_mix() == 24
            && s.n_embd.is_multiple_of(HC3_COLS)
            && y.cols >= s.n_embd
            && post.buf.ptr.is_multiple_of(16)
            && comb.buf.ptr.is_multiple_of(16)
            && self.hc_post_fusable(sub, n, s, state, next, y)
    }

    /// Decode's HC step v3: `hc_post_mix_v3` merges the sublayer output (`sub`, or the
    /// experts' outputs `moe` summed) with post/comb and leaves the next mixes and the
    /// Gram partials of every 256-column block; `hc_pre_finish_v3` makes y (normed, with
    /// its quantized copies) from them. The split of the new mixes is left pending.
    #[allow(clippy::too_many_arguments)]
    fn hc_step_v3(
        &self,
        sub: &CudaAct,
        moe: Option<MoeParts>,
        s: &ModelShape,
        state: &mut CudaAct,
        next: &HcWeights<CudaWeight>,
        norm: &CudaWeight,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<()> {
        let _prof = self.prof("hc_step_v3", 1);
        self.wrote(state)?;
        let e = s.n_embd;
        check(norm.k * norm.rows == e, || {
            "hc_pre: norm weight length".into()
        })?;
        let norm_ptr = norm.dense_ptr()?;
        let np = e / HC3_COLS;
        // Partial rows (floats), then the Gram partials (f64, 8-byte aligned).
        let rows_f = (np * HC3_PART_STRIDE).next_multiple_of(2);
        let part = self
            .scratch()?
            .f32(self.stream(), "hc3_part", rows_f + 2 * np * HC3_GRAM)?;
        let gram = part + 4 * rows_f as u64;
        let (routed, shared, k_routed) = match moe {
            Some(m) => (m.routed, m.shared, as_i32(m.k, "n_expert_used")?),
            None => (0u64, 0u64, 0i32),
        };
        let (sbp, pp, cp, xp, e32, fnp) = (
            sub.buf.ptr,
            post.buf.ptr,
            comb.buf.ptr,
            state.buf.ptr,
            e as i32,
            next.fn_.data.ptr,
        );
        let cfg = |blocks: usize, threads: u32| LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(&self.ops.hc_post_mix_v3, cfg(np, 256), |b| {
            b.arg(&sbp)
                .arg(&routed)
                .arg(&shared)
                .arg(&k_routed)
                .arg(&pp)
                .arg(&cp)
                .arg(&xp)
                .arg(&e32)
                .arg(&fnp)
                .arg(&part)
                .arg(&gram);
        })?;
        let quant = self.y_quant(Some(norm), y, 1, e)?;
        let (sc, bs) = (next.scale.dense_ptr()?, next.base.dense_ptr()?);
        let (np32, he, re, yp) = (np as i32, s.hc_eps, s.rms_eps, y.buf.ptr);
        self.launch(&self.ops.hc_pre_finish_v3, cfg(np, 64), |b| {
            b.arg(&xp)
                .arg(&e32)
                .arg(&part)
                .arg(&gram)
                .arg(&np32)
                .arg(&sc)
                .arg(&bs)
                .arg(&he)
                .arg(&re)
                .arg(&norm_ptr)
                .arg(&re)
                .arg(&yp);
            quant.push_args(b);
        })?;
        self.set_y_reuse(&quant, y)?;
        *self.pending_split()? = Some(HcSplitJob {
            part,
            scale3: sc,
            base: bs,
            post: pp,
            comb: cp,
            np: np32,
            e: e32,
            iters: s.hc_sinkhorn_iters as i32,
            hc_eps: he,
            rms_eps: re,
        });
        Ok(())
    }

    /// Whether `hc_post_pre_norm` runs as one fused merge + mixes pass (`hc_post_mix`).
    /// Decode: one pass over the state merges and sums the next mixes per column block.
    /// Chunks keep hc_mix_part, which reuses each weight slice over 8 tokens.
    fn hc_post_fusable(
        &self,
        sub: &CudaAct,
        n: usize,
        s: &ModelShape,
        state: &CudaAct,
        next: &HcWeights<CudaWeight>,
        y: &CudaAct,
    ) -> bool {
        let (hc, e, nm) = (s.hc_mult, s.n_embd, s.hc_mix());
        self.fuse_hc_post
            && n > 0
            && n <= HC_FUSE_MAX_TOKENS
            && hc == 4
            && next.fn_.ty == GgmlType::F16
            && nm <= HC_MIX_MAX_ROWS
            && next.fn_.rows == nm
            && next.fn_.k == hc * e
            && state.cols == hc * e
            && sub.cols >= e
            && e.is_multiple_of(4)
            && y.cols.is_multiple_of(4)
            && e <= HC_FINISH_MAX_PER_THREAD * 256
    }

    /// `Backend::hc_post_pre_norm`; with `moe`, the sublayer output is the sum of the
    /// MoE's routed and shared outputs, summed by the fused merge (`sub` is not read).
    #[allow(clippy::too_many_arguments)]
    fn hc_post_pre_norm_with(
        &self,
        sub: &CudaAct,
        moe: Option<MoeParts>,
        n: usize,
        s: &ModelShape,
        state: &mut CudaAct,
        next: &HcWeights<CudaWeight>,
        norm: &CudaWeight,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<()> {
        // post/comb may come from a split on the side branch (HcSplit::Side) or be
        // still to make (a deferred v3 split).
        self.join_side()?;
        self.hc_settle()?;
        let (hc, e, nm) = (s.hc_mult, s.n_embd, s.hc_mix());
        if self.hc_v3_fits(sub, n, s, state, next, y, post, comb) {
            return self.hc_step_v3(sub, moe, s, state, next, norm, y, post, comb);
        }
        if !self.hc_post_fusable(sub, n, s, state, next, y) {
            if moe.is_some() {
                return Err(MError::Backend(
                    "hc_post_pre_norm: expert outputs given to an unfused merge".into(),
                ));
            }
            self.hc_post(sub, post, comb, n, hc, state)?;
            return self.hc_pre_norm(next, state, n, s, norm, y, post, comb);
        }
        let _prof = self.prof("hc_post+pre", n);
        self.wrote(state)?;
        check(norm.k * norm.rows == e, || {
            "hc_pre: norm weight length".into()
        })?;
        let norm_ptr = norm.dense_ptr()?;
        let np = e.div_ceil(64);
        let part = self
            .scratch()?
            .f32(self.stream(), "hc_part", np * n * (nm + 1))?;
        let cfg = LaunchConfig {
            grid_dim: (np as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (routed, shared, k_routed) = match moe {
            Some(m) => (m.routed, m.shared, as_i32(m.k, "n_expert_used")?),
            None => (0u64, 0u64, 0i32),
        };
        let (sbp, lds_sub, pp, cp, e32, xp, ldx, fnp, nm32) = (
            sub.buf.ptr,
            sub.cols as i32,
            post.buf.ptr,
            comb.buf.ptr,
            e as i32,
            state.buf.ptr,
            state.cols as i32,
            next.fn_.data.ptr,
            nm as i32,
        );
        // hc_post_mix_v2 reads post and comb rows as float4.
        let post_mix = if self.hc_fin_v2() && pp.is_multiple_of(16) && cp.is_multiple_of(16) {
            &self.ops.hc_post_mix_v2
        } else {
            &self.ops.hc_post_mix
        };
        self.launch(post_mix, cfg, |b| {
            b.arg(&sbp)
                .arg(&lds_sub)
                .arg(&pp)
                .arg(&cp)
                .arg(&e32)
                .arg(&xp)
                .arg(&ldx)
                .arg(&fnp)
                .arg(&nm32)
                .arg(&part)
                .arg(&routed)
                .arg(&shared)
                .arg(&k_routed);
        })?;
        let quant = self.y_quant(Some(norm), y, n, e)?;
        self.hc_finish(next, state, n, s, norm_ptr, quant, part, np, y, post, comb)
    }

    /// The quantized copies of the normed HC output y (n rows of n_embd) that
    /// `hc_pre_finish_norm` writes for the next products: Q8_0 for the attention
    /// projections and the shared expert, and Q8_K for the routed experts after the FFN
    /// norm. Small batches only (chunks quantize in the products), y rows contiguous.
    fn y_quant(
        &self,
        norm: Option<&CudaWeight>,
        y: &CudaAct,
        n: usize,
        e: usize,
    ) -> MResult<YQuant> {
        let mut q = YQuant::default();
        let Some(norm) = norm else {
            return Ok(q);
        };
        if !self.fuse_norm_quant || n >= GEMM_MIN_TOKENS || y.cols != e || !e.is_multiple_of(128) {
            return Ok(q);
        }
        let mut sc = self.scratch()?;
        let a = sc.act(self.stream(), ActKind::Q8_0, e, n)?;
        q.q0 = (a.qs.ptr, a.d.ptr);
        q.keys[0] = Some((y.buf.ptr, kind_tag(ActKind::Q8_0), e, n));
        if is_ffn_norm(norm) && e.is_multiple_of(256) {
            let a = sc.act(self.stream(), ActKind::Q8K, e, n)?;
            q.qk = (a.qs.ptr, a.d.ptr, a.bsums.ptr);
            q.keys[1] = Some((y.buf.ptr, kind_tag(ActKind::Q8K), e, n));
        }
        Ok(q)
    }

    /// The HC split, collapse and optional input norm (`norm_ptr`, 0 for none) of
    /// `hc_pre_finish_norm`, from `np` partial mixes at `part`; with `quant`, y's
    /// quantized copies too, pending for the next products.
    #[allow(clippy::too_many_arguments)]
    fn hc_finish(
        &self,
        w: &HcWeights<CudaWeight>,
        state: &CudaAct,
        n: usize,
        s: &ModelShape,
        norm_ptr: u64,
        quant: YQuant,
        part: u64,
        np: usize,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<()> {
        let (hc, e) = (s.hc_mult, s.n_embd);
        let (sc, bs) = (w.scale.dense_ptr()?, w.base.dense_ptr()?);
        // hc = 4: the Sinkhorn beside the collapse (HcSplit).
        let mode = if hc == 4 && s.hc_mix() == 24 {
            self.hc_split()
        } else {
            HcSplit::OneBlock
        };
        let v2 = self.hc_fin_v2();
        // hc_pre_finish_v2_t256: the one-token launch's sums on 256 threads (e <= 4·1024).
        let t256 = v2 && self.hc_fin_256() && mode != HcSplit::OneBlock && n == 1 && e <= 4 * 1024;
        let threads: u32 = if n == 1 && !t256 { 1024 } else { 256 };
        let side = mode == HcSplit::Side
            && n == 1
            && self.profile.is_none()
            && !self.on_side.load(Ordering::Relaxed);
        let (sp, lds, n32) = (state.buf.ptr, state.cols as i32, n as i32);
        let (np32, hc32, e32, it, he, re) = (
            np as i32,
            hc as i32,
            e as i32,
            s.hc_sinkhorn_iters as i32,
            s.hc_eps,
            s.rms_eps,
        );
        let (yp, ldy, pp, cp) = (y.buf.ptr, y.cols as i32, post.buf.ptr, comb.buf.ptr);
        // `roles`: None for hc_pre_finish_norm, else (blocks per token, first role) of
        // hc_pre_finish_split.
        let run = |roles: Option<(u32, i32)>, threads: u32| {
            let (kernel, grid_dim) = match roles {
                Some((blocks, _)) => (
                    if t256 {
                        &self.ops.hc_pre_finish_v2_t256
                    } else if v2 {
                        &self.ops.hc_pre_finish_v2
                    } else {
                        &self.ops.hc_pre_finish_split
                    },
                    (blocks, n as u32, 1),
                ),
                None => (&self.ops.hc_pre_finish_norm, (n as u32, 1, 1)),
            };
            let cfg = LaunchConfig {
                grid_dim,
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let first_role = roles.map_or(0, |r| r.1);
            self.launch(kernel, cfg, |b| {
                b.arg(&sp)
                    .arg(&lds)
                    .arg(&part)
                    .arg(&np32)
                    .arg(&n32)
                    .arg(&sc)
                    .arg(&bs)
                    .arg(&hc32)
                    .arg(&e32)
                    .arg(&it)
                    .arg(&he)
                    .arg(&re)
                    .arg(&norm_ptr)
                    .arg(&re)
                    .arg(&yp)
                    .arg(&ldy)
                    .arg(&pp)
                    .arg(&cp);
                quant.push_args(b);
                if roles.is_some() {
                    b.arg(&first_role);
                }
            })
        };
        match mode {
            HcSplit::OneBlock => run(None, threads)?,
            HcSplit::TwoBlocks => run(Some((2, 0)), threads)?,
            HcSplit::Side if !side => run(Some((2, 0)), threads)?,
            HcSplit::Side => {
                // The split block on the side branch (it reads the partial mixes the
                // main chain has written so far); post/comb are next read by the
                // following merge, which joins the branch first. Off the main chain
                // its latency matters less than its footprint beside the matvecs:
                // 256 threads (a 1024-thread block would need a whole SM's registers).
                self.fork_side()?;
                let r = run(Some((1, 1)), 256);
                self.on_side.store(false, Ordering::Relaxed);
                r?;
                run(Some((1, 0)), threads)?;
            }
        }
        self.set_y_reuse(&quant, y)
    }

    /// y's quantized copies (`quant`) are pending for the next products of y (or none).
    fn set_y_reuse(&self, quant: &YQuant, y: &CudaAct) -> MResult<()> {
        let mut sc = self.scratch()?;
        match quant.keys {
            [Some(a), Some(b)] => sc.reuse.set2(a, b),
            [Some(a), None] | [None, Some(a)] => sc.reuse.set(a),
            [None, None] => sc.reuse.forget(y.buf.ptr),
        }
        Ok(())
    }

    /// An operation other than a product rewrote `x`: no quantized copy of it stays
    /// pending.
    fn wrote(&self, x: &CudaAct) -> MResult<()> {
        self.scratch()?.reuse.forget(x.buf.ptr);
        Ok(())
    }

    fn hc_mixes(&self, fn_: &CudaWeight, state: &CudaAct, n: usize, rows: usize) -> MResult<u64> {
        let mixes = self.scratch()?.f32(self.stream(), "hc_mix", n * rows)?;
        self.matmul_raw(fn_, 0, rows, state.buf.ptr, state.cols, n, mixes, rows)?;
        Ok(mixes)
    }
}

/// `y[t·ldy + r] = W[r] · x[t]` as a tensor-core product description.
#[allow(clippy::too_many_arguments)]
fn dense_gemm<'a>(
    w: &CudaWeight,
    wptr: u64,
    rows: usize,
    x: MvInput<'a>,
    x_row_len: usize,
    n: usize,
    y: u64,
    ldy: usize,
) -> Gemm<'a> {
    Gemm {
        ty: w.ty,
        w: wptr,
        k: w.k,
        rows,
        x,
        x_col0: 0,
        x_row_len,
        ntok: n,
        y,
        y_row_stride: ldy,
        y_col0: 0,
    }
}

fn as_i32(v: usize, what: &str) -> MResult<i32> {
    i32::try_from(v).map_err(|_| MError::Backend(format!("{what} = {v} exceeds i32")))
}

impl CudaBackend {
    /// `Backend::attention`; a decode launch of at most `defer_merge_up_to` splits
    /// leaves its split partials unmerged and returns (scratch pointer, split count):
    /// the caller merges them (`att_merge_rope_q8_0`) and `out` is not written.
    #[allow(clippy::too_many_arguments)]
    fn attention_impl(
        &self,
        kv: &CudaKv,
        layer: usize,
        q: &CudaAct,
        rows: &CudaAct,
        sinks: &CudaWeight,
        sel: Option<&CudaIdx>,
        n: usize,
        pos_end: usize,
        out: &mut CudaAct,
        defer_merge_up_to: usize,
    ) -> MResult<Option<(u64, usize)>> {
        let _prof = self.prof("attention", n);
        self.wrote(out)?;
        let s = &self.shape;
        let l = kv
            .layers
            .get(layer)
            .ok_or_else(|| MError::Backend("layer out of range".into()))?;
        let (hd, nh) = (s.head_dim, s.n_head);
        check(
            q.cols == nh * hd && rows.cols == hd && sinks.k * sinks.rows == nh,
            || "attention: bad shapes".into(),
        )?;
        let ratio = l.kind.ratio();
        let comp_ptr = l.comp.as_ref().map_or(0, |(c, _)| c.buf.ptr);
        check(hd.is_multiple_of(128) && hd <= 512, || {
            format!("attention: head_dim {hd} must be a multiple of 128, at most 512")
        })?;
        if n == 0 {
            return Ok(None);
        }
        // The keys planned for: every cached compressed row, or where a layer with an
        // indexer attends without a selection (the indexer skipped: no token of the
        // chunk sees more than top_k rows, the forward's rule), top_k of them, the
        // same split plan as with the indexer's picks.
        let mut comp_cap = l.comp.as_ref().map_or(0, |(c, _)| c.cap);
        if sel.is_none() && l.index.is_some() && ratio > 0 {
            let top_k = s.indexer_top_k;
            check(pos_end / ratio <= top_k, || {
                format!(
                    "attention: layer {layer} without the indexer's picks at position {pos_end} \
                     (more than {top_k} compressed rows)"
                )
            })?;
            comp_cap = comp_cap.min(top_k);
        }
        if self.attn.handles(nh, hd) {
            let mut a = crate::attention::AttnLaunch {
                q: q.buf.ptr,
                ld_q: q.cols,
                rows: rows.buf.ptr,
                ld_rows: rows.cols,
                ring: l.raw.ptr,
                ring_cap: l.raw_cap,
                comp: comp_ptr,
                comp_cap,
                ratio,
                sel: sel.map_or(0, |sl| sl.buf.ptr),
                sel_k: sel.map_or(0, |sl| sl.k),
                sinks: sinks.dense_ptr()?,
                window: s.sliding_window,
                pos: self.chunk_ptrs()?.1,
                n_head: nh,
                head_dim: hd,
                n_tokens: n,
                out: out.buf.ptr,
                ld_out: out.cols,
                scratch: 0,
                scratch_bytes: 0,
                ring_append: n == 1 && self.attn_kv_append,
            };
            a.scratch_bytes = crate::attention::scratch_bytes(nh, hd, n, a.max_keys());
            if a.scratch_bytes > 0 {
                a.scratch = self.scratch()?.f32(
                    self.stream(),
                    "attn_split",
                    a.scratch_bytes.div_ceil(4),
                )?;
            }
            let unmerged = self
                .attn
                .launch_unmerged(self.stream(), &a, defer_merge_up_to)
                .map_err(be)?;
            if a.ring_append {
                self.ring_appended.store(layer + 1, Ordering::Relaxed);
            }
            return Ok(unmerged.map(|ns| (a.scratch, ns)));
        }
        // Heads per block of the tiled kernel: as many as share one key tile, up to 8.
        let hb = [8usize, 4, 2, 1]
            .into_iter()
            .find(|&h| nh.is_multiple_of(h))
            .unwrap_or(1);
        let decode = n <= ATT_DECODE_MAX_TOKENS;
        let hb = if decode { 1 } else { hb };
        let merge_smem = 8 * (2 + hd) * 4;
        let tile_smem = if decode { 0 } else { 32 * (hd + 4) * 4 };
        let cfg = LaunchConfig {
            grid_dim: ((nh / hb) as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: merge_smem.max(hb * hd * 4 + tile_smem) as u32,
        };
        let (selp, sk) = match sel {
            Some(sl) => (sl.buf.ptr, sl.k as i32),
            None => (0u64, 0i32),
        };
        let (qp, ldq, rp, ldr, ring, rc, cp, r32, sp, win, pp, op, ldo, hb32) = (
            q.buf.ptr,
            q.cols as i32,
            rows.buf.ptr,
            rows.cols as i32,
            l.raw.ptr,
            l.raw_cap as i32,
            comp_ptr,
            ratio as i32,
            sinks.dense_ptr()?,
            s.sliding_window as i32,
            self.chunk_ptrs()?.1,
            out.buf.ptr,
            out.cols as i32,
            hb as i32,
        );
        let tiled = (!decode) as i32;
        let f = &self.ops.attention[hd / 128 - 1];
        self.launch(f, cfg, |b| {
            b.arg(&qp)
                .arg(&ldq)
                .arg(&rp)
                .arg(&ldr)
                .arg(&ring)
                .arg(&rc)
                .arg(&cp)
                .arg(&r32)
                .arg(&selp)
                .arg(&sk)
                .arg(&sp)
                .arg(&win)
                .arg(&pp)
                .arg(&hb32)
                .arg(&tiled)
                .arg(&op)
                .arg(&ldo);
        })?;
        Ok(None)
    }
}

impl CudaBackend {
    /// Whether `rope_inverse_grouped` of `x` takes the RoPE + Q8_0 kernel (decode, Q8_0
    /// weights).
    fn rope_quant_fusable(
        &self,
        x: &CudaAct,
        n: usize,
        head_dim: usize,
        w: &CudaWeight,
        groups: usize,
    ) -> bool {
        let n_rot = self.shape.n_rot;
        self.fuse_norm_quant
            && n == 1
            && ActKind::for_weight(w.ty).ok() == Some(ActKind::Q8_0)
            && groups > 0
            && x.cols == w.k * groups
            && w.k.is_multiple_of(32)
            && head_dim > 0
            && x.cols.is_multiple_of(head_dim)
            && n_rot <= head_dim
            && n_rot.is_multiple_of(2)
            && head_dim.is_multiple_of(2)
    }

    /// `Backend::rope_inverse_grouped`; with `merge`, x holds no values yet: the kernel
    /// merges the attention's split partials first (only where `rope_quant_fusable`).
    #[allow(clippy::too_many_arguments)]
    fn rope_inverse_grouped_impl(
        &self,
        x: &mut CudaAct,
        n: usize,
        head_dim: usize,
        kind: RopeKind,
        pos0: usize,
        w: &CudaWeight,
        groups: usize,
        out: &mut CudaAct,
        merge: Option<MergeSplits>,
    ) -> MResult<()> {
        // Decode with Q8_0 weights: the grouped product (one token: slots over the
        // groups of the row) reads the Q8_0 copy that the RoPE kernel writes.
        let n_rot = self.shape.n_rot;
        let fused = self.rope_quant_fusable(x, n, head_dim, w, groups);
        if merge.is_some() && !fused {
            return Err(MError::Backend(
                "attention partials left for a RoPE step that cannot merge them".into(),
            ));
        }
        if !fused {
            self.rope(x, n, head_dim, kind, pos0, true)?;
            return self.matmul_grouped(w, x, n, groups, out);
        }
        {
            let _prof = self.prof("rope+quant", n);
            let mut sc = self.scratch()?;
            let act = sc.act(self.stream(), ActKind::Q8_0, w.k, groups)?;
            let cfg = LaunchConfig {
                grid_dim: ((x.cols / 32).div_ceil(8) as u32, n as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (xp, cols, hd, nr, fr, pp, inv, qs, d) = (
                x.buf.ptr,
                x.cols as i32,
                head_dim as i32,
                n_rot as i32,
                self.freqs(kind),
                self.chunk_ptrs()?.1,
                1i32,
                act.qs.ptr,
                act.d.ptr,
            );
            if let Some(m) = merge {
                check(
                    m.n_splits <= MERGE_ROPE_MAX_SPLITS && x.cols == m.n_head * head_dim,
                    || "attention merge: bad shapes".into(),
                )?;
                let (part, ns, nh, sk) = (m.part, m.n_splits as i32, m.n_head as i32, m.sinks);
                let (func, cfg) = match &self.ops.att_merge_lean {
                    // Whole heads or half heads a block (head_dim a multiple of the block).
                    Some((f, t))
                        if m.n_splits <= MERGE_LEAN_MAX_SPLITS
                            && head_dim.is_multiple_of(*t as usize) =>
                    {
                        let cfg = LaunchConfig {
                            grid_dim: ((x.cols / *t as usize) as u32, n as u32, 1),
                            block_dim: (*t, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        (f, cfg)
                    }
                    _ => (&self.ops.att_merge_rope_q8_0, cfg),
                };
                self.launch(func, cfg, |b| {
                    b.arg(&part)
                        .arg(&ns)
                        .arg(&nh)
                        .arg(&sk)
                        .arg(&xp)
                        .arg(&cols)
                        .arg(&hd)
                        .arg(&nr)
                        .arg(&fr)
                        .arg(&pp)
                        .arg(&inv)
                        .arg(&qs)
                        .arg(&d);
                })?;
            } else {
                self.launch(&self.ops.rope_quant_q8_0, cfg, |b| {
                    b.arg(&xp)
                        .arg(&cols)
                        .arg(&hd)
                        .arg(&nr)
                        .arg(&fr)
                        .arg(&pp)
                        .arg(&inv)
                        .arg(&qs)
                        .arg(&d);
                })?;
            }
            sc.reuse
                .set((x.buf.ptr, kind_tag(ActKind::Q8_0), w.k, groups));
        }
        self.matmul_grouped(w, x, n, groups, out)
    }
}

impl<'w> Backend<'w> for CudaBackend {
    type Weight = CudaWeight;
    type Act = CudaAct;
    type Idx = CudaIdx;
    type Kv = CudaKv;
    type HostBuf = PinnedF32;

    fn upload(&self, t: &TensorView<'w>) -> MResult<CudaWeight> {
        let key = (t.data.as_ptr() as usize, t.data.len());
        let n_elems: u64 = t.dims.iter().product();
        if t.name.ends_with("tid2eid") {
            // The routing kernel trusts the table: check it here, once.
            let ne = self.shape.n_expert;
            for c in t.data.chunks_exact(4) {
                let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if v < 0 || v as usize >= ne {
                    return Err(MError::Backend(format!(
                        "{}: expert id {v} out of range (n_expert {ne})",
                        t.name
                    )));
                }
            }
        }
        let mut up = self
            .uploads
            .lock()
            .map_err(|_| MError::Backend("upload table poisoned".into()))?;
        let (data, dense) = match up.get(&key) {
            Some((d, f)) => (d.clone(), f.clone()),
            None => {
                let bytes = crate::layout::to_gpu(t.ty, t.data, t.row_len()).map_err(be)?;
                let data = Arc::new(DevBuf::from_bytes(self.stream(), &bytes).map_err(be)?);
                let dense = match t.ty {
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16
                        if n_elems <= DENSE_MAX_ELEMS =>
                    {
                        if t.ty == GgmlType::F32 {
                            Some(data.clone())
                        } else {
                            let out =
                                DevBuf::zeros(self.stream(), n_elems as usize * 4).map_err(be)?;
                            let ty: i32 = if t.ty == GgmlType::F16 { 1 } else { 2 };
                            let n = n_elems as i64;
                            let (src, dst) = (data.ptr, out.ptr);
                            self.launch(&self.ops.to_f32, grid1(n_elems as usize, 256), |b| {
                                b.arg(&src).arg(&ty).arg(&n).arg(&dst);
                            })?;
                            Some(Arc::new(out))
                        }
                    }
                    _ => None,
                };
                up.insert(key, (data.clone(), dense.clone()));
                (data, dense)
            }
        };
        Ok(CudaWeight {
            name: t.name.to_string(),
            ty: t.ty,
            k: t.row_len(),
            rows: t.n_rows(),
            data,
            dense,
        })
    }

    fn branch_begin(&self, n: usize) -> MResult<()> {
        // Decode steps only: a chunk's GEMMs fill the GPU on their own. A continuation
        // (side work not yet joined) only with DS4_SIDE_CONTINUE=1.
        let continuation = self.side_pending.load(Ordering::Relaxed);
        if n == 1
            && self.attn_branch
            && self.profile.is_none()
            && (!continuation || self.side_continue)
        {
            self.fork_side()?;
        }
        Ok(())
    }

    fn branch_end(&self) -> MResult<()> {
        self.on_side.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn branch_join(&self) -> MResult<()> {
        self.join_side()
    }

    fn alloc_act(&self, rows: usize, cols: usize) -> MResult<CudaAct> {
        Ok(CudaAct {
            buf: DevBuf::zeros(self.stream(), rows.max(1) * cols.max(1) * 4).map_err(be)?,
            rows,
            cols,
        })
    }

    fn alloc_idx(&self, rows: usize, k: usize) -> MResult<CudaIdx> {
        Ok(CudaIdx {
            buf: DevBuf::zeros(self.stream(), rows.max(1) * k.max(1) * 4).map_err(be)?,
            rows,
            k,
        })
    }

    fn alloc_kv(&self, s: &ModelShape, ctx: usize) -> MResult<CudaKv> {
        let st = self.stream();
        let raw_cap = s.sliding_window.min(ctx.max(1));
        let z = |floats: usize| DevBuf::zeros(st, floats.max(1) * 4).map_err(be);
        let frontier = |ratio: usize, coff: usize, d_c: usize| -> MResult<DevFrontier> {
            let n = coff * ratio * coff * d_c;
            Ok(DevFrontier {
                ratio,
                coff,
                d_c,
                kv: z(n)?,
                score: z(n)?,
            })
        };
        let mut layers = Vec::with_capacity(s.n_layer);
        for &kind in &s.layer_kinds {
            let r = kind.ratio();
            let cap = ctx.checked_div(r).map_or(0, |c| c + 1);
            let comp = if kind.is_compressed() {
                Some((
                    DevRows {
                        dim: s.head_dim,
                        cap,
                        buf: z(cap * s.head_dim)?,
                    },
                    frontier(r, kind.coff(), s.head_dim)?,
                ))
            } else {
                None
            };
            let index = if kind.is_csa() {
                Some((
                    DevRows {
                        dim: s.indexer_dim,
                        cap,
                        buf: z(cap * s.indexer_dim)?,
                    },
                    frontier(r, 2, s.indexer_dim)?,
                ))
            } else {
                None
            };
            layers.push(DevLayer {
                kind,
                raw_cap,
                raw: z(raw_cap * s.head_dim)?,
                comp,
                index,
            });
        }
        let mut kv = CudaKv {
            stream: st.clone(),
            fill: self.ops.fill_f32.clone(),
            shape: s.clone(),
            ctx,
            layers,
            graph: None,
            warm: None,
        };
        kv.reset();
        Ok(kv)
    }

    fn embed(
        &self,
        table: &CudaWeight,
        tokens: &[u32],
        hc_mult: usize,
        out: &mut CudaAct,
    ) -> MResult<()> {
        let _prof = self.prof("embed", tokens.len());
        self.wrote(out)?;
        // A forward pass starts here: a split still pending belongs to a step that did
        // not finish (an error), and its buffers may be another session's.
        *self.pending_split()? = None;
        let e = table.k;
        let ty: i32 = match table.ty {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::BF16 => 2,
            other => {
                return Err(MError::Backend(format!(
                    "token embedding of type {} is not supported on the GPU",
                    other.name()
                )));
            }
        };
        let n = tokens.len();
        check(out.cols == e * hc_mult && out.rows >= n, || {
            "embed: bad output shape".into()
        })?;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(MError::Token {
                token: t,
                vocab: table.rows,
            });
        }
        let tok = self.chunk_ptrs()?.0;
        let cfg = LaunchConfig {
            grid_dim: ((e as u32).div_ceil(256), n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (tp, e32, hc, op, ld) = (
            table.data.ptr,
            e as i32,
            hc_mult as i32,
            out.buf.ptr,
            out.cols as i32,
        );
        self.launch(&self.ops.embed_rows, cfg, |b| {
            b.arg(&tp)
                .arg(&ty)
                .arg(&e32)
                .arg(&tok)
                .arg(&hc)
                .arg(&op)
                .arg(&ld);
        })
    }

    fn matmul(&self, w: &CudaWeight, x: &CudaAct, n: usize, out: &mut CudaAct) -> MResult<()> {
        let _prof = self.prof(
            match w.ty {
                GgmlType::Q8_0 => "matmul Q8_0",
                GgmlType::F16 => "matmul F16",
                _ => "matmul other",
            },
            n,
        );
        check(
            x.cols >= w.k && out.cols >= w.rows && n <= x.rows.min(out.rows),
            || {
                format!(
                    "matmul {}: x {} cols, out {} cols, weight [{}, {}]",
                    w.name, x.cols, out.cols, w.k, w.rows
                )
            },
        )?;
        self.matmul_raw(w, 0, w.rows, x.buf.ptr, x.cols, n, out.buf.ptr, out.cols)
    }

    fn matmul_multi(
        &self,
        ws: &[&CudaWeight],
        x: &CudaAct,
        n: usize,
        outs: &mut [&mut CudaAct],
    ) -> MResult<()> {
        let Some(first) = ws.first() else {
            return Ok(());
        };
        check(ws.len() == outs.len(), || {
            format!("matmul_multi: {} weights, {} outputs", ws.len(), outs.len())
        })?;
        for (w, out) in ws.iter().zip(outs.iter()) {
            check(
                x.cols >= w.k && out.cols >= w.rows && n <= x.rows.min(out.rows),
                || {
                    format!(
                        "matmul {}: x {} cols, out {} cols, weight [{}, {}]",
                        w.name, x.cols, out.cols, w.k, w.rows
                    )
                },
            )?;
        }
        // Decode-sized inputs: one launch over every matrix (one quantisation).
        if ws.iter().all(|w| w.ty == first.ty && w.k == first.k)
            && n < GEMM_MIN_TOKENS
            && ws.len() <= MV_MAX_SEGS
            && x.cols == first.k
        {
            let _prof = self.prof("matmul multi", n);
            let parts: Vec<MvSeg> = ws
                .iter()
                .zip(outs.iter())
                .map(|(w, o)| MvSeg {
                    w: w.data.ptr,
                    rows: w.rows,
                    y: o.buf.ptr,
                    ldy: o.cols,
                })
                .collect();
            if self.fused_matvec(
                first,
                &parts,
                x.buf.ptr,
                n,
                n,
                1,
                0,
                1,
                ExpertIds::AfterWait,
            )? {
                return Ok(());
            }
        }
        // Chunks: one product each, sharing the quantized input when the types agree.
        for (i, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
            if i > 0 && w.ty == ws[i - 1].ty && w.k == ws[i - 1].k && x.cols == w.k {
                self.allow_reuse(x.buf.ptr, w, w.k, n)?;
            }
            let r = self.matmul(w, x, n, out);
            self.scratch()?.reuse.clear();
            r?;
        }
        Ok(())
    }

    fn matmul_grouped(
        &self,
        w: &CudaWeight,
        x: &CudaAct,
        n: usize,
        groups: usize,
        out: &mut CudaAct,
    ) -> MResult<()> {
        let _prof = self.prof("matmul_grouped", n);
        let (k, rows) = (w.k, w.rows);
        check(
            groups > 0 && rows.is_multiple_of(groups) && x.cols == k * groups,
            || format!("grouped matmul {}: bad shapes", w.name),
        )?;
        let per = rows / groups;
        if n == 1 {
            if self.grouped_quant_out(w, per, groups, x.buf.ptr, out)? {
                return Ok(());
            }
            // One token: the input row already is group-major.
            return self.matmul_slots(w, per, 0, groups, 1, x.buf.ptr, out.buf.ptr);
        }
        if n >= GEMM_MIN_TOKENS && self.grouped_gemm(w, x, n, groups, out)? {
            return Ok(());
        }
        let (gin, gout) = {
            let mut sc = self.scratch()?;
            (
                sc.f32(self.stream(), "grp_in", n * groups * k)?,
                sc.f32(self.stream(), "grp_out", n * rows)?,
            )
        };
        let permute = |src: u64, dst: u64, width: usize, ld: usize, to_gm: i32| {
            let cfg = LaunchConfig {
                grid_dim: ((width as u32).div_ceil(256), n as u32, groups as u32),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n32, g32, w32, ld32) = (n as i32, groups as i32, width as i32, ld as i32);
            self.launch(&self.ops.group_permute, cfg, |b| {
                b.arg(&src)
                    .arg(&dst)
                    .arg(&n32)
                    .arg(&g32)
                    .arg(&w32)
                    .arg(&ld32)
                    .arg(&to_gm);
            })
        };
        permute(x.buf.ptr, gin, k, x.cols, 1)?;
        // Group g: its matrix slice times its n rows, as one batched product per group.
        for g in 0..groups {
            self.matmul_raw(
                w,
                g * per,
                per,
                gin + (g * n * k * 4) as u64,
                k,
                n,
                gout + (g * n * per * 4) as u64,
                per,
            )?;
        }
        permute(gout, out.buf.ptr, per, out.cols, 0)
    }

    fn rms_norm(
        &self,
        x: &mut CudaAct,
        w: Option<&CudaWeight>,
        n: usize,
        seg: usize,
        eps: f32,
    ) -> MResult<()> {
        let _prof = self.prof("rms_norm", n);
        check(seg > 0 && x.cols.is_multiple_of(seg), || {
            "rms_norm: bad shapes".into()
        })?;
        let wp = match w {
            Some(w) => {
                check(w.k * w.rows == seg, || "rms_norm: weight length".into())?;
                w.dense_ptr()?
            }
            None => 0,
        };
        if n == 0 {
            return Ok(());
        }
        // Decode, whole-row norm: also write the Q8_0 copy the next Q8_0 product of this
        // row reads (q_a_norm → q_b), marked for reuse; the f32 row is still written.
        if self.fuse_norm_quant
            && seg == x.cols
            && n < GEMM_MIN_TOKENS
            && seg.is_multiple_of(128)
            && seg <= 4096
        {
            let mut sc = self.scratch()?;
            let act = sc.act(self.stream(), ActKind::Q8_0, seg, n)?;
            self.kernels
                .norm_quant_q8_0(self.stream(), x.buf.ptr, wp, seg, n, eps, act)
                .map_err(be)?;
            sc.reuse.set((x.buf.ptr, kind_tag(ActKind::Q8_0), seg, n));
            return Ok(());
        }
        self.wrote(x)?;
        // About four elements per thread: the loops are latency-bound, not arithmetic.
        let threads = (seg / 4).next_multiple_of(32).clamp(128, 1024) as u32;
        let cfg = LaunchConfig {
            grid_dim: ((x.cols / seg) as u32, n as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (xp, ld, seg32) = (x.buf.ptr, x.cols as i32, seg as i32);
        self.launch(&self.ops.rms_norm_seg, cfg, |b| {
            b.arg(&xp).arg(&ld).arg(&wp).arg(&seg32).arg(&eps);
        })
    }

    fn hc_pre(
        &self,
        w: &HcWeights<CudaWeight>,
        state: &CudaAct,
        n: usize,
        s: &ModelShape,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<()> {
        let _prof = self.prof("hc_pre", n);
        self.join_side()?;
        // A deferred split must not land on the post/comb this split writes.
        self.hc_settle()?;
        let (hc, e, nm) = (s.hc_mult, s.n_embd, s.hc_mix());
        check(
            hc <= 16 && w.fn_.rows == nm && w.fn_.k == hc * e && state.cols == hc * e,
            || "hc_pre: bad weights".into(),
        )?;
        if n == 0 || self.hc_pre_split(w, state, n, s, None, y, post, comb)? {
            return Ok(());
        }
        let mixes = self.hc_mixes(&w.fn_, state, n, nm)?;
        self.wrote(y)?;
        let (sc, bs) = (w.scale.dense_ptr()?, w.base.dense_ptr()?);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (if n == 1 { 1024 } else { 256 }, 1, 1),
            shared_mem_bytes: 0,
        };
        let (sp, lds, ldm, hc32, e32, it, he, re) = (
            state.buf.ptr,
            state.cols as i32,
            nm as i32,
            hc as i32,
            e as i32,
            s.hc_sinkhorn_iters as i32,
            s.hc_eps,
            s.rms_eps,
        );
        let (yp, ldy, pp, cp) = (y.buf.ptr, y.cols as i32, post.buf.ptr, comb.buf.ptr);
        self.launch(&self.ops.hc_pre_finish, cfg, |b| {
            b.arg(&sp)
                .arg(&lds)
                .arg(&mixes)
                .arg(&ldm)
                .arg(&sc)
                .arg(&bs)
                .arg(&hc32)
                .arg(&e32)
                .arg(&it)
                .arg(&he)
                .arg(&re)
                .arg(&yp)
                .arg(&ldy)
                .arg(&pp)
                .arg(&cp);
        })
    }

    fn hc_pre_norm(
        &self,
        w: &HcWeights<CudaWeight>,
        state: &CudaAct,
        n: usize,
        s: &ModelShape,
        norm: &CudaWeight,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<()> {
        {
            let _prof = self.prof("hc_pre", n);
            self.hc_settle()?;
            let (hc, e, nm) = (s.hc_mult, s.n_embd, s.hc_mix());
            check(
                hc <= 16 && w.fn_.rows == nm && w.fn_.k == hc * e && state.cols == hc * e,
                || "hc_pre: bad weights".into(),
            )?;
            if n == 0 || self.hc_pre_split(w, state, n, s, Some(norm), y, post, comb)? {
                return Ok(());
            }
        }
        self.hc_pre(w, state, n, s, y, post, comb)?;
        self.rms_norm(y, Some(norm), n, s.n_embd, s.rms_eps)
    }

    fn hc_post_pre_norm(
        &self,
        sub: &CudaAct,
        n: usize,
        s: &ModelShape,
        state: &mut CudaAct,
        next: &HcWeights<CudaWeight>,
        norm: &CudaWeight,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<()> {
        self.hc_post_pre_norm_with(sub, None, n, s, state, next, norm, y, post, comb)
    }

    fn hc_post(
        &self,
        sub: &CudaAct,
        post: &CudaAct,
        comb: &CudaAct,
        n: usize,
        hc: usize,
        state: &mut CudaAct,
    ) -> MResult<()> {
        let _prof = self.prof("hc_post", n);
        // post/comb may come from a split on the side branch (HcSplit::Side).
        self.join_side()?;
        self.hc_settle()?;
        self.wrote(state)?;
        let e = sub.cols;
        check(hc <= 16 && state.cols == hc * e, || {
            "hc_post: bad shapes".into()
        })?;
        let cfg = LaunchConfig {
            grid_dim: ((e as u32).div_ceil(256), n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (sp, lds, pp, cp, hc32, e32, xp, ldx) = (
            sub.buf.ptr,
            sub.cols as i32,
            post.buf.ptr,
            comb.buf.ptr,
            hc as i32,
            e as i32,
            state.buf.ptr,
            state.cols as i32,
        );
        self.launch(&self.ops.hc_post, cfg, |b| {
            b.arg(&sp)
                .arg(&lds)
                .arg(&pp)
                .arg(&cp)
                .arg(&hc32)
                .arg(&e32)
                .arg(&xp)
                .arg(&ldx);
        })
    }

    fn hc_head(
        &self,
        w: &HcWeights<CudaWeight>,
        state: &CudaAct,
        n: usize,
        s: &ModelShape,
        out: &mut CudaAct,
    ) -> MResult<()> {
        let _prof = self.prof("hc_head", n);
        self.wrote(out)?;
        let (hc, e) = (s.hc_mult, s.n_embd);
        check(hc <= 16 && w.fn_.rows == hc && w.fn_.k == hc * e, || {
            "hc_head: bad weights".into()
        })?;
        let mixes = self.hc_mixes(&w.fn_, state, n, hc)?;
        let (sc, bs) = (w.scale.dense_ptr()?, w.base.dense_ptr()?);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (if n == 1 { 1024 } else { 256 }, 1, 1),
            shared_mem_bytes: 0,
        };
        let (sp, lds, ldm, hc32, e32, he, re, op, ldo) = (
            state.buf.ptr,
            state.cols as i32,
            hc as i32,
            hc as i32,
            e as i32,
            s.hc_eps,
            s.rms_eps,
            out.buf.ptr,
            out.cols as i32,
        );
        self.launch(&self.ops.hc_head_finish, cfg, |b| {
            b.arg(&sp)
                .arg(&lds)
                .arg(&mixes)
                .arg(&ldm)
                .arg(&sc)
                .arg(&bs)
                .arg(&hc32)
                .arg(&e32)
                .arg(&he)
                .arg(&re)
                .arg(&op)
                .arg(&ldo);
        })
    }

    fn rope(
        &self,
        x: &mut CudaAct,
        n: usize,
        head_dim: usize,
        kind: RopeKind,
        _pos0: usize,
        inverse: bool,
    ) -> MResult<()> {
        let _prof = self.prof("rope", n);
        check(head_dim > 0 && x.cols.is_multiple_of(head_dim), || {
            "rope: bad head dim".into()
        })?;
        let n_rot = self.shape.n_rot;
        let pairs = x.cols / head_dim * n_rot / 2;
        if n == 0 || pairs == 0 {
            return Ok(());
        }
        self.wrote(x)?;
        let cfg = LaunchConfig {
            grid_dim: ((pairs as u32).div_ceil(128), n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (xp, ld, cols, hd, nr, fr, pp, inv) = (
            x.buf.ptr,
            x.cols as i32,
            x.cols as i32,
            head_dim as i32,
            n_rot as i32,
            self.freqs(kind),
            self.chunk_ptrs()?.1,
            inverse as i32,
        );
        self.launch(&self.ops.rope, cfg, |b| {
            b.arg(&xp)
                .arg(&ld)
                .arg(&cols)
                .arg(&hd)
                .arg(&nr)
                .arg(&fr)
                .arg(&pp)
                .arg(&inv);
        })
    }

    fn rms_norm_rope(
        &self,
        x: &mut CudaAct,
        w: Option<&CudaWeight>,
        n: usize,
        head_dim: usize,
        eps: f32,
        kind: RopeKind,
        pos0: usize,
    ) -> MResult<()> {
        let n_rot = self.shape.n_rot;
        let fused = head_dim.is_multiple_of(4)
            && n_rot.is_multiple_of(4)
            && n_rot <= head_dim
            && head_dim <= 4096
            && x.cols.is_multiple_of(head_dim);
        if !fused {
            self.rms_norm(x, w, n, head_dim, eps)?;
            return self.rope(x, n, head_dim, kind, pos0, false);
        }
        let _prof = self.prof("norm_rope", n);
        self.wrote(x)?;
        let wp = match w {
            Some(w) => {
                check(w.k * w.rows == head_dim, || {
                    "rms_norm: weight length".into()
                })?;
                w.dense_ptr()?
            }
            None => 0,
        };
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((x.cols / head_dim) as u32, n as u32, 1),
            block_dim: ((head_dim / 4).next_multiple_of(32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (xp, ld, hd, nr, fr, pp) = (
            x.buf.ptr,
            x.cols as i32,
            head_dim as i32,
            n_rot as i32,
            self.freqs(kind),
            self.chunk_ptrs()?.1,
        );
        self.launch(&self.ops.norm_rope, cfg, |b| {
            b.arg(&xp)
                .arg(&ld)
                .arg(&wp)
                .arg(&hd)
                .arg(&eps)
                .arg(&nr)
                .arg(&fr)
                .arg(&pp);
        })
    }

    fn rope_inverse_grouped(
        &self,
        x: &mut CudaAct,
        n: usize,
        head_dim: usize,
        kind: RopeKind,
        pos0: usize,
        w: &CudaWeight,
        groups: usize,
        out: &mut CudaAct,
    ) -> MResult<()> {
        self.rope_inverse_grouped_impl(x, n, head_dim, kind, pos0, w, groups, out, None)
    }

    fn qkv_norm_rope(
        &self,
        q: &mut CudaAct,
        kv: &mut CudaAct,
        kv_norm: &CudaWeight,
        n: usize,
        head_dim: usize,
        eps: f32,
        kind: RopeKind,
        pos0: usize,
        round_kv: bool,
    ) -> MResult<()> {
        let n_rot = self.shape.n_rot;
        // One launch: a block per query head plus one for the KV row (norm, RoPE and
        // rounding on a shared copy of it).
        let fused = self.fuse_norm_quant
            && head_dim.is_multiple_of(4)
            && n_rot.is_multiple_of(4)
            && n_rot <= head_dim
            && head_dim <= 4096
            && q.cols.is_multiple_of(head_dim)
            && kv.cols == head_dim
            && n <= q.rows.min(kv.rows);
        if !fused {
            self.rms_norm_rope(q, None, n, head_dim, eps, kind, pos0)?;
            self.rms_norm_rope(kv, Some(kv_norm), n, head_dim, eps, kind, pos0)?;
            if round_kv {
                self.round_rows(kv, n, RowRounding::KvRow)?;
            }
            return Ok(());
        }
        let _prof = self.prof("qkv_norm_rope", n);
        check(kv_norm.k * kv_norm.rows == head_dim, || {
            "rms_norm: weight length".into()
        })?;
        let wp = kv_norm.dense_ptr()?;
        if n == 0 {
            return Ok(());
        }
        self.wrote(q)?;
        self.wrote(kv)?;
        let cfg = LaunchConfig {
            grid_dim: ((q.cols / head_dim + 1) as u32, n as u32, 1),
            block_dim: ((head_dim / 4).next_multiple_of(32) as u32, 1, 1),
            shared_mem_bytes: (head_dim * 4) as u32,
        };
        let (qp, ldq, kp, ldk, hd, nr, fr, pp, rk, nn) = (
            q.buf.ptr,
            q.cols as i32,
            kv.buf.ptr,
            kv.cols as i32,
            head_dim as i32,
            n_rot as i32,
            self.freqs(kind),
            self.chunk_ptrs()?.1,
            self.qkv_round_mode(round_kv),
            self.shape.n_nope() as i32,
        );
        self.launch(&self.ops.qkv_norm_rope, cfg, |b| {
            b.arg(&qp)
                .arg(&ldq)
                .arg(&kp)
                .arg(&ldk)
                .arg(&wp)
                .arg(&hd)
                .arg(&eps)
                .arg(&nr)
                .arg(&fr)
                .arg(&pp)
                .arg(&rk)
                .arg(&nn);
        })
    }

    fn attn_queries(
        &self,
        q_b: &CudaWeight,
        indexer_q_b: Option<&CudaWeight>,
        qr: &CudaAct,
        kv_norm: &CudaWeight,
        n: usize,
        h: QueryHeads,
        q: &mut CudaAct,
        iq: &mut CudaAct,
        kv: &mut CudaAct,
    ) -> MResult<()> {
        if let Some(ix_q_b) = indexer_q_b
            && n == 1
            && self.qb_pair.load(Ordering::Relaxed)
            && self.attn_queries_paired(q_b, ix_q_b, qr, kv_norm, h, q, iq, kv)?
        {
            return Ok(());
        }
        attn_queries_separate(self, q_b, indexer_q_b, qr, kv_norm, n, h, q, iq, kv)
    }

    fn rope_indexer_q(
        &self,
        x: &mut CudaAct,
        n: usize,
        head_dim: usize,
        kind: RopeKind,
        pos0: usize,
        official: bool,
    ) -> MResult<()> {
        let n_rot = self.shape.n_rot;
        let fused = self.idx_rope_qat
            && official
            && head_dim == 128
            && x.cols.is_multiple_of(128)
            && n_rot <= 128
            && n_rot.is_multiple_of(2);
        if !fused {
            self.rope(x, n, head_dim, kind, pos0, false)?;
            if official {
                self.round_rows(x, n, RowRounding::IndexerQat)?;
            }
            return Ok(());
        }
        let _prof = self.prof("rope_qat", n);
        if n == 0 {
            return Ok(());
        }
        self.wrote(x)?;
        let cfg = LaunchConfig {
            grid_dim: ((x.cols / 128) as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 128 * 4,
        };
        let (xp, ld, nr, fr, pp) = (
            x.buf.ptr,
            x.cols as i32,
            n_rot as i32,
            self.freqs(kind),
            self.chunk_ptrs()?.1,
        );
        self.launch(&self.ops.rope_qat, cfg, |b| {
            b.arg(&xp).arg(&ld).arg(&nr).arg(&fr).arg(&pp);
        })
    }

    fn round_rows(&self, x: &mut CudaAct, n: usize, mode: RowRounding) -> MResult<()> {
        let _prof = self.prof("round_rows", n);
        self.wrote(x)?;
        let cols = x.cols;
        // KV rows round as a whole; indexer rows head by head (128 dims each).
        let (m, piece): (i32, usize) = match mode {
            RowRounding::KvRow => (0, cols),
            RowRounding::IndexerQat => {
                check(cols.is_multiple_of(128), || {
                    "indexer rounding: cols not a multiple of 128".into()
                })?;
                (1, 128)
            }
        };
        check(piece * 4 <= BIG_SMEM, || "round_rows: row too wide".into())?;
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((cols / piece) as u32, n as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (piece * 4) as u32,
        };
        let (xp, ld, c32, nn) = (
            x.buf.ptr,
            x.cols as i32,
            piece as i32,
            self.shape.n_nope() as i32,
        );
        self.launch(&self.ops.round_rows, cfg, |b| {
            b.arg(&xp).arg(&ld).arg(&c32).arg(&m).arg(&nn);
        })
    }

    fn compressor_update(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        which: CompKind,
        w: &CompressorWeights<CudaWeight>,
        proj_kv: &CudaAct,
        proj_score: &CudaAct,
        n: usize,
        pos0: usize,
        official: bool,
    ) -> MResult<()> {
        self.compressor_update_into(
            kv, layer, which, w, proj_kv, proj_score, n, pos0, official, None,
        )
    }

    fn compressor_updates(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        updates: &[CompUpdate<'_, CudaWeight, CudaAct>],
        n: usize,
        pos0: usize,
        official: bool,
    ) -> MResult<()> {
        self.compressor_updates_with(kv, layer, updates, n, pos0, official, self.comp_pair)
            .map(|_| ())
    }

    fn indexer_topk(
        &self,
        kv: &CudaKv,
        layer: usize,
        q: &CudaAct,
        weights: &CudaAct,
        n: usize,
        _pos0: usize,
        top_k: usize,
        sel: &mut CudaIdx,
    ) -> MResult<()> {
        let _prof = self.prof("indexer_topk", n);
        let l = kv
            .layers
            .get(layer)
            .ok_or_else(|| MError::Backend("layer out of range".into()))?;
        let Some((rows, fr)) = l.index.as_ref() else {
            return Err(MError::Backend(format!(
                "layer {layer} has no indexer state"
            )));
        };
        let heads = weights.cols;
        check(
            rows.dim == 128 && q.cols == heads * 128 && sel.k >= top_k && top_k <= 1024,
            || "indexer: bad shapes".into(),
        )?;

        let cap = rows.cap;
        let tok_per_pass = n.clamp(1, IDX_TOKENS_PER_PASS);
        let scores = self
            .scratch()?
            .f32(self.stream(), "idx_scores", tok_per_pass * cap)?;
        // Passes of up to IDX_TOKENS_PER_PASS tokens share the score scratch. Each pass
        // reads the position of its first token relative to the chunk's.
        let mut t0 = 0;
        while t0 < n {
            let m = (n - t0).min(tok_per_pass);
            let pos_p = self.pass_pos(t0)?;
            // Heads in parallel (bit-identical sums) unless DS4_IDX_HEADS=0 or > 64 heads.
            let by_heads = heads <= 64 && self.idx_heads;
            let (kernel, cfg) = if by_heads {
                let cfg = LaunchConfig {
                    grid_dim: ((cap as u32).div_ceil(IDXH_ROWS as u32).max(1), m as u32, 1),
                    block_dim: (IDXH_THREADS, 1, 1),
                    shared_mem_bytes: IDXH_SMEM_BYTES,
                };
                (&self.ops.idx_scores_heads, cfg)
            } else {
                let cfg = LaunchConfig {
                    grid_dim: ((cap as u32).div_ceil(IDX_TILE as u32).max(1), m as u32, 1),
                    block_dim: (IDX_TILE as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                (&self.ops.idx_scores, cfg)
            };
            let (qp, ldq, wp, ldw, h32, rp, r32, tk, ldsc) = (
                q.buf.ptr + (t0 * q.cols * 4) as u64,
                q.cols as i32,
                weights.buf.ptr + (t0 * heads * 4) as u64,
                heads as i32,
                heads as i32,
                rows.buf.ptr,
                fr.ratio as i32,
                top_k as i32,
                as_i32(cap, "indexer rows")?,
            );
            self.launch(kernel, cfg, |b| {
                b.arg(&qp)
                    .arg(&ldq)
                    .arg(&wp)
                    .arg(&ldw)
                    .arg(&h32)
                    .arg(&rp)
                    .arg(&pos_p)
                    .arg(&r32)
                    .arg(&tk)
                    .arg(&scores)
                    .arg(&ldsc);
            })?;
            let selp = sel.buf.ptr + (t0 * sel.k * 4) as u64;
            self.launch_idx_topk(
                self.idx_topk_v2,
                IdxTopkArgs {
                    scores,
                    ld_scores: ldsc,
                    pos_p,
                    ratio: r32,
                    top_k: tk,
                    sel: selp,
                    sel_k: sel.k as i32,
                    tokens: m,
                },
            )?;
            t0 += m;
        }
        Ok(())
    }

    fn attention(
        &self,
        kv: &CudaKv,
        layer: usize,
        q: &CudaAct,
        rows: &CudaAct,
        sinks: &CudaWeight,
        sel: Option<&CudaIdx>,
        n: usize,
        pos0: usize,
        out: &mut CudaAct,
    ) -> MResult<()> {
        self.attention_impl(kv, layer, q, rows, sinks, sel, n, pos0 + n, out, 0)
            .map(|_| ())
    }

    fn attention_rope_grouped(
        &self,
        kv: &CudaKv,
        layer: usize,
        q: &CudaAct,
        rows: &CudaAct,
        sinks: &CudaWeight,
        sel: Option<&CudaIdx>,
        n: usize,
        pos0: usize,
        attn: &mut CudaAct,
        head_dim: usize,
        kind: RopeKind,
        w: &CudaWeight,
        groups: usize,
        low: &mut CudaAct,
    ) -> MResult<()> {
        // Decode: the split partials are merged by the RoPE + Q8_0 kernel of o_a.
        let defer = if self.attn_merge_rope
            && head_dim == self.shape.head_dim
            && self.rope_quant_fusable(attn, n, head_dim, w, groups)
        {
            MERGE_ROPE_MAX_SPLITS
        } else {
            0
        };
        let merge =
            self.attention_impl(kv, layer, q, rows, sinks, sel, n, pos0 + n, attn, defer)?;
        let merge = merge.map(|(part, ns)| -> MResult<MergeSplits> {
            Ok(MergeSplits {
                part,
                n_splits: ns,
                n_head: self.shape.n_head,
                sinks: sinks.dense_ptr()?,
            })
        });
        let merge = merge.transpose()?;
        self.rope_inverse_grouped_impl(attn, n, head_dim, kind, pos0, w, groups, low, merge)
    }

    fn kv_append_raw(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        rows: &CudaAct,
        n: usize,
        _pos0: usize,
    ) -> MResult<()> {
        let _prof = self.prof("kv_append_raw", n);
        // The attention kernel of this layer already wrote the row (decode).
        if self.ring_appended.swap(0, Ordering::Relaxed) == layer + 1 && n == 1 {
            return Ok(());
        }
        let hd = self.shape.head_dim;
        let l = kv
            .layers
            .get(layer)
            .ok_or_else(|| MError::Backend("layer out of range".into()))?;
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((hd as u32).div_ceil(128), n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rp, ldr, n32, pp, ring, rc, hd32) = (
            rows.buf.ptr,
            rows.cols as i32,
            n as i32,
            self.chunk_ptrs()?.1,
            l.raw.ptr,
            l.raw_cap as i32,
            hd as i32,
        );
        self.launch(&self.ops.kv_append, cfg, |b| {
            b.arg(&rp)
                .arg(&ldr)
                .arg(&n32)
                .arg(&pp)
                .arg(&ring)
                .arg(&rc)
                .arg(&hd32);
        })
    }

    fn moe(
        &self,
        w: &FfnWeights<CudaWeight>,
        layer: usize,
        s: &ModelShape,
        x: &CudaAct,
        tokens: &[u32],
        n: usize,
        out: &mut CudaAct,
    ) -> MResult<()> {
        let _prof = self.prof("moe", n);
        self.wrote(out)?;
        let (e, ff, ne, k) = (s.n_embd, s.n_ff_exp, s.n_expert, s.n_expert_used);
        check(
            k <= 64 && ne <= 256 && x.cols >= e && out.cols >= e && tokens.len() >= n,
            || "moe: bad shapes".into(),
        )?;
        if n == 0 {
            return Ok(());
        }
        let clamp = s.swiglu_clamp.get(layer).copied().unwrap_or(f32::INFINITY);
        let st = self.stream().clone();
        let (logits, ids, wts, g, u, mid, down, sg, su, smid, sout, xin) = {
            let mut sc = self.scratch()?;
            (
                sc.f32(&st, "moe_logits", n * ne)?,
                sc.f32(&st, "moe_ids", n * k)?,
                sc.f32(&st, "moe_wts", n * k)?,
                sc.f32(&st, "moe_g", n * k * ff)?,
                sc.f32(&st, "moe_u", n * k * ff)?,
                sc.f32(&st, "moe_mid", n * k * ff)?,
                sc.f32(&st, "moe_down", n * k * e)?,
                sc.f32(&st, "sh_g", n * ff)?,
                sc.f32(&st, "sh_u", n * ff)?,
                sc.f32(&st, "sh_mid", n * ff)?,
                sc.f32(&st, "sh_out", n * e)?,
                sc.f32(&st, "moe_x", n * e)?,
            )
        };
        // Contiguous input rows (x may be wider than n_embd).
        let xp = if x.cols == e {
            x.buf.ptr
        } else {
            self.copy_rows(x.buf.ptr, x.cols, xin, e, n, e)?;
            xin
        };
        let swiglu = |gp: u64, up: u64, rows: usize, wp: u64, outp: u64| {
            let cfg = grid1(rows * ff, 256);
            let (ff32, rows64) = (ff as i32, rows as i64);
            self.launch(&self.ops.swiglu, cfg, |b| {
                b.arg(&gp)
                    .arg(&up)
                    .arg(&ff32)
                    .arg(&rows64)
                    .arg(&wp)
                    .arg(&clamp)
                    .arg(&outp);
            })
        };
        // Gate and up read the same input: quantize it once when their types agree.
        let same = |a: &CudaWeight, b: &CudaWeight| {
            ActKind::for_weight(a.ty).ok().map(kind_tag)
                == ActKind::for_weight(b.ty).ok().map(kind_tag)
        };
        // Decode: gate and up of every slot in one launch.
        let pair = |a: &CudaWeight, b: &CudaWeight| {
            n < GEMM_MIN_TOKENS && a.ty == b.ty && a.k == b.k && a.rows == b.rows
        };
        // Decode runs the shared expert on a side branch: its gate/up starts before the
        // router, its SwiGLU/down beside the routed ones. Only when the two chains'
        // quantized inputs live in different scratch buffers.
        let act_key =
            |wt: &CudaWeight| ActKind::for_weight(wt.ty).ok().map(|a| (kind_tag(a), wt.k));
        let branch = self.moe_branch
            && n == 1
            && self.profile.is_none()
            && [act_key(&w.gate_sh), act_key(&w.down_sh)]
                .iter()
                .all(|key| {
                    key.is_some() && *key != act_key(&w.gate_exps) && *key != act_key(&w.down_exps)
                });
        // Issued in this order, the products of x claim the quantized copies the HC split
        // left pending (Q8_0 shared, Q8_K routed) before the SwiGLU/down products, which
        // read other inputs, replace them.
        let shared_gate_up = || -> MResult<()> {
            let fused = pair(&w.gate_sh, &w.up_sh)
                && w.gate_sh.rows == ff
                && self.fused_matvec(
                    &w.gate_sh,
                    &[
                        MvSeg {
                            w: w.gate_sh.data.ptr,
                            rows: ff,
                            y: sg,
                            ldy: ff,
                        },
                        MvSeg {
                            w: w.up_sh.data.ptr,
                            rows: ff,
                            y: su,
                            ldy: ff,
                        },
                    ],
                    xp,
                    n,
                    n,
                    1,
                    0,
                    1,
                    ExpertIds::AfterWait,
                )?;
            if !fused {
                self.matmul_raw(&w.gate_sh, 0, ff, xp, e, n, sg, ff)?;
                if same(&w.gate_sh, &w.up_sh) {
                    self.allow_reuse(xp, &w.up_sh, e, n)?;
                }
                let up = self.matmul_raw(&w.up_sh, 0, ff, xp, e, n, su, ff);
                self.scratch()?.reuse.clear();
                up?;
            }
            Ok(())
        };
        let shared_down = || -> MResult<()> {
            // On the side branch, its SwiGLU carries a deferred HC split (one block
            // more), off the main chain.
            let quantized = self.carry_split(branch, |job| {
                self.swiglu_into_act(&w.down_sh, sg, su, n, 0, clamp, smid, false, job)
            })?;
            if !quantized {
                swiglu(sg, su, n, 0, smid)?;
            }
            let r = self.matmul_raw(&w.down_sh, 0, e, smid, ff, n, sout, e);
            self.scratch()?.reuse.clear();
            r
        };
        if branch {
            self.fork_side()?;
        }
        let r = shared_gate_up();
        self.on_side.store(false, Ordering::Relaxed);
        r?;
        // Router and expert choice.
        let bias = match &w.bias {
            Some(b) => b.dense_ptr()?,
            None => 0,
        };
        let t2e = w.tid2eid.as_ref().map_or(0, |t| t.data.ptr);
        let pair_exps = pair(&w.gate_exps, &w.up_exps) && n * k < ROUTED_GEMM_MIN_SLOTS;
        // Decode: the gate/up product chooses the experts itself (one launch less on
        // the chain); the router product alone before it.
        let choose = self.moe_choose
            && n == 1
            && pair_exps
            && ne <= crate::kernels::FUSED_ROUTE_MAX_EXPERTS
            && k <= 64
            && self.kernels.routed_fast(w.gate_exps.ty, w.gate_exps.k);
        let experts = if choose {
            self.matmul_raw(&w.router, 0, ne, xp, e, n, logits, ne)?;
            ExpertIds::Choose(FusedRoute {
                logits,
                bias,
                tid2eid: t2e,
                tok: self.chunk_ptrs()?.0,
                wts,
                ne,
                k,
                norm: s.expert_weights_norm,
                wscale: s.expert_weights_scale,
            })
        } else {
            if !self.router_route(s, &w.router, xp, n, bias, t2e, logits, ids, wts)? {
                self.matmul_raw(&w.router, 0, ne, xp, e, n, logits, ne)?;
                self.route(s, logits, n, bias, t2e, ids, wts)?;
            }
            ExpertIds::AfterWait
        };
        // Routed experts: 6 slots per token, gate/up share the token's input row.
        let fused = pair_exps
            && self.fused_matvec(
                &w.gate_exps,
                &[
                    MvSeg {
                        w: w.gate_exps.data.ptr,
                        rows: ff,
                        y: g,
                        ldy: ff,
                    },
                    MvSeg {
                        w: w.up_exps.data.ptr,
                        rows: ff,
                        y: u,
                        ldy: ff,
                    },
                ],
                xp,
                n,
                1,
                n * k,
                ids,
                k,
                experts,
            )?;
        if !fused {
            if choose {
                // Not launched: the experts are still to be chosen.
                self.route(s, logits, n, bias, t2e, ids, wts)?;
            }
            self.matmul_slots(&w.gate_exps, ff, ids, n * k, k, xp, g)?;
            if same(&w.gate_exps, &w.up_exps) {
                self.allow_reuse(xp, &w.up_exps, e, n)?;
            }
            let up = self.matmul_slots(&w.up_exps, ff, ids, n * k, k, xp, u);
            self.scratch()?.reuse.clear();
            up?;
        }
        // Nothing of x stays pending past its products.
        self.scratch()?.reuse.clear();
        if branch {
            // Back onto the side branch (no new fork: it continues after its gate/up).
            self.on_side.store(true, Ordering::Relaxed);
        }
        let r = shared_down();
        self.on_side.store(false, Ordering::Relaxed);
        r?;
        // Decode: the down product's ids are complete once the SwiGLU before it has
        // waited, so it may read them and start its weights before its own wait.
        let early = self.down_early
            && n == 1
            && n * k < ROUTED_GEMM_MIN_SLOTS
            && self.kernels.routed_fast(w.down_exps.ty, w.down_exps.k);
        let quantized =
            self.swiglu_into_act(&w.down_exps, g, u, n * k, wts, clamp, mid, early, None)?;
        if !quantized {
            swiglu(g, u, n * k, wts, mid)?;
        }
        let experts = if early && quantized {
            ExpertIds::Early
        } else {
            ExpertIds::AfterWait
        };
        let r = self.matmul_slots_with(&w.down_exps, e, ids, n * k, 1, mid, down, experts);
        self.scratch()?.reuse.clear();
        r?;
        self.join_side()?;
        if self.fold_moe_sum.swap(false, Ordering::Relaxed) {
            // moe_hc_post_pre_norm's merge sums them.
            *self
                .moe_parts
                .lock()
                .map_err(|_| MError::Backend("moe_parts poisoned".into()))? = Some(MoeParts {
                routed: down,
                shared: sout,
                k,
            });
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((e as u32).div_ceil(256), n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (k32, e32, op, ldo) = (k as i32, e as i32, out.buf.ptr, out.cols as i32);
        self.launch(&self.ops.moe_sum, cfg, |b| {
            b.arg(&down)
                .arg(&sout)
                .arg(&k32)
                .arg(&e32)
                .arg(&op)
                .arg(&ldo);
        })
    }

    fn moe_hc_post_pre_norm(
        &self,
        w: &FfnWeights<CudaWeight>,
        layer: usize,
        s: &ModelShape,
        tokens: &[u32],
        n: usize,
        sub: &mut CudaAct,
        state: &mut CudaAct,
        next: &HcWeights<CudaWeight>,
        norm: &CudaWeight,
        y: &mut CudaAct,
        post: &mut CudaAct,
        comb: &mut CudaAct,
    ) -> MResult<()> {
        // The merge sums the experts' outputs itself (no moe_sum) when it runs fused.
        let fold = self.moe_sum_fold && n > 0 && self.hc_post_fusable(sub, n, s, state, next, y);
        let lost = || MError::Backend("moe_parts poisoned".into());
        *self.moe_parts.lock().map_err(|_| lost())? = None;
        self.fold_moe_sum.store(fold, Ordering::Relaxed);
        let r = self.moe(w, layer, s, y, tokens, n, sub);
        self.fold_moe_sum.store(false, Ordering::Relaxed);
        r?;
        let parts = self.moe_parts.lock().map_err(|_| lost())?.take();
        if fold && parts.is_none() {
            return Err(MError::Backend(
                "moe: expert outputs not left for the merge".into(),
            ));
        }
        self.hc_post_pre_norm_with(sub, parts, n, s, state, next, norm, y, post, comb)
    }

    fn copy_row(
        &self,
        src: &CudaAct,
        src_row: usize,
        dst: &mut CudaAct,
        dst_row: usize,
    ) -> MResult<()> {
        check(
            dst.cols == src.cols && src_row < src.rows && dst_row < dst.rows,
            || "copy_row: bad shapes".into(),
        )?;
        self.wrote(dst)?;
        let c = src.cols;
        self.copy_rows(
            src.buf.ptr + (src_row * c * 4) as u64,
            c,
            dst.buf.ptr + (dst_row * c * 4) as u64,
            c,
            1,
            c,
        )
    }

    fn read_rows(&self, x: &CudaAct, n: usize, out: &mut [f32]) -> MResult<()> {
        let len = n * x.cols;
        check(out.len() >= len && n <= x.rows, || {
            "read_rows: output too small".into()
        })?;
        self.synced_read(|| self.read_rows_to(x, len, out))
    }

    fn alloc_host(&self, len: usize) -> MResult<PinnedF32> {
        PinnedHost::zeroed(&self.rt.ctx, len).map_err(be)
    }

    /// One device-to-host copy straight into `out` (page-locked), then the stream's
    /// sync: no staging, no copy on the host.
    fn read_rows_host(&self, x: &CudaAct, n: usize, out: &mut PinnedF32) -> MResult<()> {
        let len = n
            .checked_mul(x.cols)
            .filter(|&len| len <= out.len() && n <= x.rows);
        let Some(len) = len else {
            return Err(MError::Backend("read_rows_host: output too small".into()));
        };
        self.synced_read(|| {
            let t = host_profile::start();
            x.buf
                .read_f32_into(self.stream(), &mut out[..len])
                .map_err(be)?;
            host_profile::add(3, t);
            Ok(())
        })
    }

    fn begin_chunk(&self, tokens: &[u32], pos0: usize) -> MResult<()> {
        let t = host_profile::start();
        let r = self.begin_chunk_inner(tokens, pos0);
        host_profile::add(0, t);
        r
    }

    fn run_chunk(
        &self,
        n: usize,
        bufs_id: u64,
        variant: u64,
        kv: &mut CudaKv,
        body: &mut dyn FnMut(&mut CudaKv) -> MResult<()>,
    ) -> MResult<()> {
        if n != 1 || !self.use_graphs {
            let ran = body(kv);
            self.end_branches()?;
            return ran;
        }
        let epoch = self.scratch()?.epoch;
        let key = (bufs_id, epoch, variant);
        if let Some(g) = &kv.graph
            && g.key == key
        {
            let mut timing = self
                .step_timing
                .lock()
                .map_err(|_| MError::Backend("step timing poisoned".into()))?;
            let t = host_profile::start();
            timing.around(self.stream(), || g.graph.launch().map_err(be))?;
            host_profile::add(1, t);
            self.replayed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if kv.warm != Some(key) {
            // First step with these buffers: run it directly (it may size scratch).
            kv.warm = Some(key);
            let ran = body(kv);
            self.end_branches()?;
            return ran;
        }
        kv.graph = None;
        let st = self.stream().clone();
        st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(be)?;
        let ran = body(kv);
        // A side branch left open by a failed step must still rejoin inside the capture.
        let ended = self.end_branches();
        let graph = st.end_capture(CUgraphInstantiate_flags(0));
        ran?;
        ended?;
        let graph = graph.map_err(be)?;
        let epoch_after = self.scratch()?.epoch;
        match graph {
            Some(graph) if epoch_after == epoch => {
                graph.launch().map_err(be)?;
                self.recorded.fetch_add(1, Ordering::Relaxed);
                kv.graph = Some(StepGraph { key, graph });
                Ok(())
            }
            // Scratch moved while recording: the recording is stale; run the step.
            _ => {
                let ran = body(kv);
                self.end_branches()?;
                ran
            }
        }
    }
}

/// A decode compressor step's arguments, one kernel parameter of `comp_steps` (ops.cu
/// `CompStepArgs`, same layout; device pointers as u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CompStepArgs {
    pub(crate) kv: u64,
    pub(crate) score: u64,
    pub(crate) pos_p: u64,
    pub(crate) ape: u64,
    pub(crate) fr_kv: u64,
    pub(crate) fr_score: u64,
    pub(crate) rows: u64,
    pub(crate) norm_w: u64,
    pub(crate) freqs: u64,
    pub(crate) r: i32,
    pub(crate) coff: i32,
    pub(crate) dc: i32,
    pub(crate) n_rot: i32,
    pub(crate) eps: f32,
    pub(crate) mode: i32,
}

// SAFETY: plain-old-data, `#[repr(C)]` with the kernel's field order and types.
unsafe impl cudarc::driver::DeviceRepr for CompStepArgs {}

/// A pending quantized copy as the products would read it (selftest): codes, scales,
/// and for Q8_K the 16-element sums.
pub(crate) struct PendingCopy {
    pub qs: Vec<u8>,
    pub d: Vec<f32>,
    pub bsums: Vec<i16>,
}

impl CudaBackend {
    /// A read of the main stream's results to the host (`read`, which synchronises the
    /// stream): the side work joined first (it may still write what is read), and once
    /// it succeeded the decode uploads issued before it known done (`DecodeUpload`).
    fn synced_read(&self, read: impl FnOnce() -> MResult<()>) -> MResult<()> {
        let t = host_profile::start();
        self.join_side()?;
        host_profile::add(2, t);
        let issued = self.decode_up.issued();
        read()?;
        self.decode_up.note_synced(self.stream(), issued);
        Ok(())
    }

    /// `read_rows`' copy of `len` values (checked by the caller): through page-locked
    /// staging unless `DS4_PINNED_READ=0` or the read is large, else into `out` directly.
    fn read_rows_to(&self, x: &CudaAct, len: usize, out: &mut [f32]) -> MResult<()> {
        if let Some(pinned) = &self.pinned_read
            && len <= PINNED_READ_MAX
        {
            let mut staging = pinned
                .lock()
                .map_err(|_| MError::Backend("pinned staging poisoned".into()))?;
            let bytes = 4 * len;
            if staging.as_ref().is_none_or(|p| p.len() < bytes) {
                // Cacheable (not write-combined): the host reads it back. SAFETY: every
                // byte read below was first written by the device copy.
                *staging = Some(
                    unsafe { self.rt.ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }.map_err(be)?,
                );
            }
            if let Some(p) = staging.as_mut() {
                let host = &mut p.as_mut_slice().map_err(be)?[..bytes];
                let t = host_profile::start();
                x.buf.read_at(self.stream(), 0, host).map_err(be)?;
                host_profile::add(3, t);
                let t = host_profile::start();
                out[..len].copy_from_slice(bytemuck::cast_slice(&host[..]));
                host_profile::add(4, t);
                return Ok(());
            }
        }
        x.buf
            .read_at(self.stream(), 0, bytemuck::cast_slice_mut(&mut out[..len]))
            .map_err(be)
    }

    /// The token ids and positions of a chunk to the device.
    fn begin_chunk_inner(&self, tokens: &[u32], pos0: usize) -> MResult<()> {
        let st = self.stream();
        let mut cb = self
            .chunk
            .lock()
            .map_err(|_| MError::Backend("chunk buffer poisoned".into()))?;
        let n = tokens.len();
        if let [token] = tokens {
            // Decode: one asynchronous copy from page-locked staging (no pageable copies,
            // no wait); the kernels read the id and position from `decode_up.dev`.
            let pos = as_i32(pos0, "position")?;
            as_i32(pos0 + 1, "position")?;
            self.decode_up.upload(*token as i32, pos)?;
            cb.decode = Some(self.decode_up.ptrs());
            return Ok(());
        }
        cb.decode = None;
        if cb.tokens.len() < n * 4 {
            let cap = n.next_power_of_two() * 4;
            cb.tokens = DevBuf::zeros(st, cap).map_err(be)?;
            cb.pos = DevBuf::zeros(st, cap).map_err(be)?;
            self.scratch()?.epoch += 1;
        }
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let first = as_i32(pos0, "position")?;
        as_i32(pos0 + n, "position")?;
        let pos: Vec<i32> = (0..n as i32).map(|t| first + t).collect();
        cb.tokens
            .write_at(st, 0, bytemuck::cast_slice(&ids))
            .map_err(be)?;
        cb.pos
            .write_at(st, 0, bytemuck::cast_slice(&pos))
            .map_err(be)?;
        Ok(())
    }

    /// Expert choice and routing weights of `n` tokens from the router logits (n × ne
    /// at `logits`): `moe_route`, one block per token (ne ≤ 256, k ≤ 64 checked by the
    /// caller). `bias` / `t2e`: device pointers or 0.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        s: &ModelShape,
        logits: u64,
        n: usize,
        bias: u64,
        t2e: u64,
        ids: u64,
        wts: u64,
    ) -> MResult<()> {
        let (ne, k) = (s.n_expert, s.n_expert_used);
        check(ne <= 256 && k <= 64 && k <= ne, || {
            "moe_route: bad shapes".into()
        })?;
        let tok = self.chunk_ptrs()?.0;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ldl, ne32, k32, norm, wscale) = (
            ne as i32,
            ne as i32,
            k as i32,
            s.expert_weights_norm as i32,
            s.expert_weights_scale,
        );
        self.launch(&self.ops.moe_route, cfg, |b| {
            b.arg(&logits)
                .arg(&ldl)
                .arg(&ne32)
                .arg(&k32)
                .arg(&bias)
                .arg(&t2e)
                .arg(&tok)
                .arg(&norm)
                .arg(&wscale)
                .arg(&ids)
                .arg(&wts);
        })
    }

    /// Decode: the router product (F16, [`ROUTER_FUSED_EXPERTS`] rows of
    /// [`ROUTER_FUSED_K`]) and `route` in one launch, `moe_router_route` (logits at
    /// `logits` as the matvec writes them). False, launching nothing, where that kernel
    /// does not take the shape (more than one token, other types or sizes, an arch
    /// without clusters, without `DS4_ROUTE_FUSE=1`).
    #[allow(clippy::too_many_arguments)]
    fn router_route(
        &self,
        s: &ModelShape,
        router: &CudaWeight,
        x: u64,
        n: usize,
        bias: u64,
        t2e: u64,
        logits: u64,
        ids: u64,
        wts: u64,
    ) -> MResult<bool> {
        let (ne, k) = (s.n_expert, s.n_expert_used);
        let Some(func) = &self.ops.moe_router_route else {
            return Ok(false);
        };
        if !self.route_fuse.load(Ordering::Relaxed)
            || n != 1
            || router.ty != GgmlType::F16
            || router.k != ROUTER_FUSED_K
            || router.rows != ROUTER_FUSED_EXPERTS
            || ne != ROUTER_FUSED_EXPERTS
            || k == 0
            || k > 64
            // 16-byte pieces of weights and input.
            || !router.data.ptr.is_multiple_of(16)
            || !x.is_multiple_of(16)
        {
            return Ok(false);
        }
        let tok = self.chunk_ptrs()?.0;
        let cfg = LaunchConfig {
            grid_dim: (ROUTER_FUSED_CLUSTER, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ne32, k32, norm, wscale) = (
            ne as i32,
            k as i32,
            s.expert_weights_norm as i32,
            s.expert_weights_scale,
        );
        let wp = router.data.ptr;
        self.launch(func, cfg, |b| {
            b.arg(&wp)
                .arg(&x)
                .arg(&ne32)
                .arg(&k32)
                .arg(&bias)
                .arg(&t2e)
                .arg(&tok)
                .arg(&norm)
                .arg(&wscale)
                .arg(&logits)
                .arg(&ids)
                .arg(&wts);
        })?;
        Ok(true)
    }

    /// Whether decode can take the fused router + route launch at all (sm_90+).
    pub(crate) fn has_route_fuse(&self) -> bool {
        self.ops.moe_router_route.is_some()
    }

    /// The router product of one token (`x`, K floats) then `route`, on the device
    /// (selftest): the fused launch when `fused` (an error if it does not take the
    /// shape), else the F16 matvec and moe_route. Logits, ids and weights.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn router_route_host(
        &self,
        s: &ModelShape,
        router: &CudaWeight,
        x: &[f32],
        bias: Option<&CudaWeight>,
        t2e: Option<&CudaWeight>,
        fused: bool,
    ) -> MResult<(Vec<f32>, Vec<i32>, Vec<f32>)> {
        let (ne, k) = (s.n_expert, s.n_expert_used);
        check(x.len() == router.k && router.rows == ne, || {
            "router_route: shapes".into()
        })?;
        let st = self.stream();
        let xd = DevBuf::from_f32(st, x).map_err(be)?;
        let lg = DevBuf::from_f32(st, &vec![f32::NAN; ne]).map_err(be)?;
        let nan = vec![f32::NAN; k];
        let ids = DevBuf::from_f32(st, &nan).map_err(be)?;
        let wts = DevBuf::from_f32(st, &nan).map_err(be)?;
        let bias = bias.map(|b| b.dense_ptr()).transpose()?.unwrap_or(0);
        let t2e = t2e.map_or(0, |t| t.data.ptr);
        if fused {
            let was = self.route_fuse.swap(true, Ordering::Relaxed);
            let r = self.router_route(s, router, xd.ptr, 1, bias, t2e, lg.ptr, ids.ptr, wts.ptr);
            self.route_fuse.store(was, Ordering::Relaxed);
            check(r?, || {
                "router_route: the fused kernel does not take this shape".into()
            })?;
        } else {
            self.matmul_raw(router, 0, ne, xd.ptr, router.k, 1, lg.ptr, ne)?;
            self.route(s, lg.ptr, 1, bias, t2e, ids.ptr, wts.ptr)?;
        }
        st.synchronize().map_err(be)?;
        let id_bytes = ids.to_bytes(st).map_err(be)?;
        let ids = id_bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((lg.to_f32(st).map_err(be)?, ids, wts.to_f32(st).map_err(be)?))
    }

    /// `route` on host logits (selftest): the chosen expert ids and weights of every
    /// token of the current chunk (`begin_chunk`).
    pub(crate) fn route_host(
        &self,
        s: &ModelShape,
        logits: &[f32],
        n: usize,
        bias: Option<&CudaWeight>,
        t2e: Option<&CudaWeight>,
    ) -> MResult<(Vec<i32>, Vec<f32>)> {
        let k = s.n_expert_used;
        check(logits.len() == n * s.n_expert, || {
            "route: logits length".into()
        })?;
        let st = self.stream();
        let lg = DevBuf::from_f32(st, logits).map_err(be)?;
        let nan = vec![f32::NAN; n * k];
        let ids = DevBuf::from_f32(st, &nan).map_err(be)?;
        let wts = DevBuf::from_f32(st, &nan).map_err(be)?;
        let bias = bias.map(|b| b.dense_ptr()).transpose()?.unwrap_or(0);
        let t2e = t2e.map_or(0, |t| t.data.ptr);
        self.route(s, lg.ptr, n, bias, t2e, ids.ptr, wts.ptr)?;
        st.synchronize().map_err(be)?;
        let id_bytes = ids.to_bytes(st).map_err(be)?;
        let ids = id_bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((ids, wts.to_f32(st).map_err(be)?))
    }

    /// The quantized copy of the first `rows` rows of `x` (width `k`) that the next
    /// product with `kind` activations would reuse, if one is pending (selftest).
    pub(crate) fn pending_copy(
        &self,
        x: &CudaAct,
        kind: ActKind,
        k: usize,
        rows: usize,
    ) -> MResult<Option<PendingCopy>> {
        let sc = self.scratch()?;
        let key = (x.buf.ptr, kind_tag(kind), k, rows);
        if !sc.reuse.0.contains(&Some(key)) {
            return Ok(None);
        }
        let a = sc
            .acts
            .get(&(kind_tag(kind), k))
            .ok_or_else(|| MError::Backend("pending copy without its buffer".into()))?;
        let st = self.stream();
        st.synchronize().map_err(be)?;
        let blk = if kind == ActKind::Q8K { 256 } else { 32 };
        let mut qs = a.qs.to_bytes(st).map_err(be)?;
        qs.truncate(k * rows);
        let mut d = a.d.to_f32(st).map_err(be)?;
        d.truncate(k * rows / blk);
        let bsums = if kind == ActKind::Q8K {
            let b = a.bsums.to_bytes(st).map_err(be)?;
            b.chunks_exact(2)
                .take(k * rows / 16)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Some(PendingCopy { qs, d, bsums }))
    }

    /// (token ids, positions) device pointers of the current chunk.
    fn chunk_ptrs(&self) -> MResult<(u64, u64)> {
        let cb = self
            .chunk
            .lock()
            .map_err(|_| MError::Backend("chunk buffer poisoned".into()))?;
        Ok(cb.decode.unwrap_or((cb.tokens.ptr, cb.pos.ptr)))
    }

    /// Device pointer to the position of token `t0` of the chunk: kernels that work on
    /// a part of a chunk read their first position there.
    fn pass_pos(&self, t0: usize) -> MResult<u64> {
        Ok(self.chunk_ptrs()?.1 + (t0 * 4) as u64)
    }

    /// One indexer top-k launch (a 1024-thread block a token): `idx_topk_v2`, or the
    /// older `idx_topk` when `v2` is false. Also called by the selftest on its own scores.
    pub(crate) fn launch_idx_topk(&self, v2: bool, a: IdxTopkArgs) -> MResult<()> {
        let cfg = LaunchConfig {
            grid_dim: (a.tokens as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: if v2 { IDX_TOPK_V2_SMEM } else { 0 },
        };
        let f = if v2 {
            &self.ops.idx_topk_v2
        } else {
            &self.ops.idx_topk
        };
        self.launch(f, cfg, |b| {
            b.arg(&a.scores)
                .arg(&a.ld_scores)
                .arg(&a.pos_p)
                .arg(&a.ratio)
                .arg(&a.top_k)
                .arg(&a.sel)
                .arg(&a.sel_k);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Y: u64 = 0x1000;
    const MID: u64 = 0x2000;

    fn key(x: u64, kind: ActKind, k: usize, rows: usize) -> ReuseKey {
        (x, kind_tag(kind), k, rows)
    }

    #[test]
    fn ffn_split_copies_serve_the_routed_then_the_shared_product() {
        let mut p = Pending::default();
        p.set2(
            key(Y, ActKind::Q8_0, 4096, 1),
            key(Y, ActKind::Q8K, 4096, 1),
        );
        // Routed gate/up (Q8_K) first: the shared expert's Q8_0 copy stays pending.
        assert!(p.claim(key(Y, ActKind::Q8K, 4096, 1)));
        assert!(p.claim(key(Y, ActKind::Q8_0, 4096, 1)));
        // Each copy serves one product only.
        assert!(!p.claim(key(Y, ActKind::Q8_0, 4096, 1)));
        assert!(!p.claim(key(Y, ActKind::Q8K, 4096, 1)));
    }

    #[test]
    fn a_product_of_another_input_drops_every_copy() {
        let mut p = Pending::default();
        p.set2(
            key(Y, ActKind::Q8_0, 4096, 1),
            key(Y, ActKind::Q8K, 4096, 1),
        );
        assert!(!p.claim(key(MID, ActKind::Q8K, 2048, 6)));
        assert!(!p.claim(key(Y, ActKind::Q8_0, 4096, 1)));
        assert!(!p.claim(key(Y, ActKind::Q8K, 4096, 1)));
    }

    #[test]
    fn a_fresh_quantisation_of_the_same_input_drops_only_its_kind() {
        let mut p = Pending::default();
        p.set2(
            key(Y, ActKind::Q8_0, 4096, 1),
            key(Y, ActKind::Q8K, 4096, 1),
        );
        // Same input and kind, other rows: that kind's buffer is overwritten.
        assert!(!p.claim(key(Y, ActKind::Q8_0, 4096, 2)));
        assert!(!p.claim(key(Y, ActKind::Q8_0, 4096, 1)));
        assert!(p.claim(key(Y, ActKind::Q8K, 4096, 1)));
    }

    #[test]
    fn rewriting_the_input_or_setting_a_new_copy_drops_the_old_ones() {
        let mut p = Pending::default();
        p.set2(
            key(Y, ActKind::Q8_0, 4096, 1),
            key(Y, ActKind::Q8K, 4096, 1),
        );
        p.forget(MID);
        assert!(p.claim(key(Y, ActKind::Q8_0, 4096, 1)));
        p.forget(Y);
        assert!(!p.claim(key(Y, ActKind::Q8K, 4096, 1)));
        p.set2(
            key(Y, ActKind::Q8_0, 4096, 1),
            key(Y, ActKind::Q8K, 4096, 1),
        );
        p.set(key(MID, ActKind::Q8K, 2048, 6));
        assert!(!p.claim(key(Y, ActKind::Q8_0, 4096, 1)));
        p.set(key(MID, ActKind::Q8K, 2048, 6));
        p.clear();
        assert!(!p.claim(key(MID, ActKind::Q8K, 2048, 6)));
    }
}
