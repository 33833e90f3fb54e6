//! Device buffers and the launch side of `kernels/matvec.cu`.
//!
//! Launches take raw device pointers (`u64`): buffers are owned by [`DevBuf`],
//! everything runs on the runtime's one stream, and the same calls can be
//! captured into CUDA graphs.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use ds4_gguf::GgmlType;

use crate::compile::{self, KernelSource};
use crate::launch::KernelArgs;
use crate::runtime::CudaRuntime;
use crate::{Error, Result};

/// Warps (rows) per block of the quantized matvec kernels (`MV_WARPS`).
const MV_WARPS: usize = 4;
/// Threads per block (one row) of the F16 matvec (`F16_THREADS`).
const F16_THREADS: usize = 128;
/// Largest K of the warp-per-row F16 kernel (`32 * 8 * F16W_MAX_CHUNKS`).
const F16_WARP_MAX_K: usize = 2048;
/// Largest K of the F16 kernel (`F16_THREADS * 8 * F16_MAX_CHUNKS`).
const F16_MAX_K: usize = 16384;
/// Dynamic shared memory the matvec kernels opt in to (two row buffers per
/// warp: Q8_0 rows of K = 8192 need 4 · 2 · 8704 bytes).
const SMEM_LIMIT: usize = 96 * 1024;
/// Shared memory per SM the grid sizing assumes is usable (H100: 228 KB).
const SMEM_PER_SM: usize = 200 * 1024;
/// Most resident blocks of 128 threads per SM (2048 threads).
const MAX_BLOCKS_PER_SM: usize = 16;

/// A device allocation (bytes) and its address.
pub struct DevBuf {
    buf: CudaSlice<u8>,
    pub ptr: u64,
}

impl DevBuf {
    pub fn zeros(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self> {
        let buf = stream.alloc_zeros::<u8>(bytes.max(1))?;
        let ptr = buf.device_ptr(stream).0;
        Ok(Self { buf, ptr })
    }

    pub fn from_bytes(stream: &Arc<CudaStream>, bytes: &[u8]) -> Result<Self> {
        let buf = stream.clone_htod(bytes)?;
        let ptr = buf.device_ptr(stream).0;
        Ok(Self { buf, ptr })
    }

    pub fn from_f32(stream: &Arc<CudaStream>, v: &[f32]) -> Result<Self> {
        Self::from_bytes(stream, bytemuck::cast_slice(v))
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Copies `bytes` to offset `at` (stream-ordered).
    pub fn write_at(&mut self, stream: &Arc<CudaStream>, at: usize, bytes: &[u8]) -> Result<()> {
        let end = at.checked_add(bytes.len()).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(Error::Shape {
                what: "device write",
                detail: format!("{} bytes at {at} into {}", bytes.len(), self.buf.len()),
            });
        };
        let mut view = self.buf.slice_mut(at..end);
        stream.memcpy_htod(bytes, &mut view)?;
        Ok(())
    }

    /// Copies `out.len()` bytes from offset `at` to the host and waits for them.
    pub fn read_at(&self, stream: &Arc<CudaStream>, at: usize, out: &mut [u8]) -> Result<()> {
        let end = at.checked_add(out.len()).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(Error::Shape {
                what: "device read",
                detail: format!("{} bytes at {at} from {}", out.len(), self.buf.len()),
            });
        };
        let view = self.buf.slice(at..end);
        stream.memcpy_dtoh(&view, out)?;
        stream.synchronize()?;
        Ok(())
    }

    /// Copies `out.len()` f32 from the start of the buffer to the host with one
    /// asynchronous copy, then waits for it. Meant for page-locked `out` (the copy then
    /// lands there directly); a pageable one works too (the driver stages it).
    pub fn read_f32_into(&self, stream: &Arc<CudaStream>, out: &mut [f32]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes > self.buf.len() {
            return Err(Error::Shape {
                what: "device read",
                detail: format!("{bytes} bytes from {}", self.buf.len()),
            });
        }
        stream.context().bind_to_thread()?;
        // SAFETY: the source range lies inside this allocation (checked above), and the
        // stream's synchronisation below waits for the copy while `out` is still
        // borrowed, so the destination outlives it. (A failed synchronisation is a
        // sticky context error, after which the device runs no further work.)
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, self.ptr, stream.cu_stream()) }?;
        stream.synchronize()?;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == 0
    }

    pub fn to_bytes(&self, stream: &Arc<CudaStream>) -> Result<Vec<u8>> {
        Ok(stream.clone_dtoh(&self.buf)?)
    }

    pub fn to_f32(&self, stream: &Arc<CudaStream>) -> Result<Vec<f32>> {
        let b = self.to_bytes(stream)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// Which activation format a weight type consumes (model.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    /// Q8_0 weights: 32-blocks, f32 scale.
    Q8_0,
    /// K-quants and IQ2_XXS: 256-blocks with f32 scale and per-16 sums.
    Q8K,
    /// F16 weights: plain f32.
    F32,
}

impl ActKind {
    pub fn for_weight(ty: GgmlType) -> Result<Self> {
        match ty {
            GgmlType::Q8_0 => Ok(Self::Q8_0),
            GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => Ok(Self::Q8K),
            GgmlType::F16 => Ok(Self::F32),
            other => Err(Error::Unsupported(other)),
        }
    }
}

/// Quantized activations of `rows` vectors of `k` elements, structure-of-arrays.
pub struct ActBuf {
    pub kind: ActKind,
    pub k: usize,
    pub rows: usize,
    pub qs: DevBuf,
    pub d: DevBuf,
    pub bsums: DevBuf,
}

impl ActBuf {
    pub fn new(stream: &Arc<CudaStream>, kind: ActKind, k: usize, rows: usize) -> Result<Self> {
        let n = k * rows;
        let (blk, sums) = match kind {
            ActKind::Q8_0 => (32, 0),
            ActKind::Q8K => (256, n / 16 * 2),
            ActKind::F32 => {
                return Err(Error::Shape {
                    what: "activation buffer",
                    detail: "F16 weights take the f32 activation directly".into(),
                });
            }
        };
        if !k.is_multiple_of(blk) {
            return Err(Error::Shape {
                what: "activation quantisation",
                detail: format!("k = {k} is not a multiple of {blk}"),
            });
        }
        Ok(Self {
            kind,
            k,
            rows,
            qs: DevBuf::zeros(stream, n)?,
            d: DevBuf::zeros(stream, n / blk * 4)?,
            bsums: DevBuf::zeros(stream, sums)?,
        })
    }
}

/// Input of a matvec: quantized activations, or f32 for F16 weights.
#[derive(Clone, Copy)]
pub enum MvInput<'a> {
    Quant(&'a ActBuf),
    F32(u64),
}

/// One matrix-vector launch (see the layout notes at the top of matvec.cu).
pub struct Matvec<'a> {
    pub ty: GgmlType,
    /// Weights: `rows` rows of `k` elements (per expert when routed).
    pub w: u64,
    pub k: usize,
    pub rows: usize,
    /// Tokens sharing each weight row read (batched form).
    pub ntok: usize,
    /// Slots: routed experts (6 per token) or output groups; 1 for dense.
    pub slots: usize,
    /// Bytes between experts (or groups) in `w`.
    pub w_slot_stride: u64,
    /// Device i32 expert id per slot; 0 = slot s uses matrix s.
    pub ids: u64,
    /// Consecutive slots that share one activation row (6: gate/up of one token).
    pub x_group: usize,
    pub x: MvInput<'a>,
    /// Output f32 [slots · ntok][rows].
    pub y: u64,
}

/// A further weight matrix of a multi-segment matvec (same type, k, input and slots as
/// the first): `rows` rows at `w`, output rows `ldy` floats apart at `y`.
#[derive(Clone, Copy, Debug)]
pub struct MvSeg {
    pub w: u64,
    pub rows: usize,
    pub y: u64,
    pub ldy: usize,
}

/// Bytes of weights a warp stages per step at most when it groups short rows.
const MV_GROUP_BYTES: usize = 4608;

/// A deferred HC split (hc_split.cuh `HcSplitJob`): post and comb of one token's HC
/// step, made from the step's partial rows by a kernel placed between that step and the
/// next merge (`hc_split_warp`). Zeroed: none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HcSplitJob {
    pub part: u64,
    pub scale3: u64,
    pub base: u64,
    pub post: u64,
    pub comb: u64,
    pub np: i32,
    pub e: i32,
    pub iters: i32,
    pub hc_eps: f32,
    pub rms_eps: f32,
}

// SAFETY: plain-old-data, `#[repr(C)]` with the kernel's field order and types.
unsafe impl cudarc::driver::DeviceRepr for HcSplitJob {}

/// Most matrices one matvec launch takes (`MV_MAX_SEGS` in matvec.cu).
pub const MV_MAX_SEGS: usize = 6;

/// The kernels' segment table (layout of `MvSegs` in matvec.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MvSegsArg {
    w: [u64; MV_MAX_SEGS],
    y: [u64; MV_MAX_SEGS],
    start: [i32; MV_MAX_SEGS + 1],
    ldy: [i32; MV_MAX_SEGS],
    n: i32,
}

// SAFETY: plain-old-data, `#[repr(C)]` with the kernel's field order and types.
unsafe impl cudarc::driver::DeviceRepr for MvSegsArg {}

/// The segment table of the matrices `segs` (each with rows, output rows `ldy` apart
/// and `ldy >= rows`), in order, at most [`MV_MAX_SEGS`]; `what` names the product in
/// errors.
fn seg_table<'a>(
    what: &'static str,
    segs: impl IntoIterator<Item = &'a MvSeg>,
) -> Result<MvSegsArg> {
    let err = |detail: String| Error::Shape { what, detail };
    let mut sg = MvSegsArg::default();
    let mut total = 0usize;
    let mut n = 0usize;
    for seg in segs {
        if n == MV_MAX_SEGS {
            return Err(err(format!(
                "more than {MV_MAX_SEGS} matrices in one launch"
            )));
        }
        if seg.rows == 0 || seg.ldy < seg.rows {
            return Err(err(format!(
                "segment {n}: rows {}, ldy {}",
                seg.rows, seg.ldy
            )));
        }
        sg.w[n] = seg.w;
        sg.y[n] = seg.y;
        sg.start[n] = i32::try_from(total).map_err(|_| err(format!("{total} rows")))?;
        sg.ldy[n] = i32::try_from(seg.ldy).map_err(|_| err(format!("ldy {}", seg.ldy)))?;
        total += seg.rows;
        n += 1;
    }
    sg.start[n] = i32::try_from(total).map_err(|_| err(format!("{total} rows")))?;
    sg.n = n as i32;
    Ok(sg)
}

/// The router's side of a routed decode product that chooses its own experts
/// ([`ExpertIds::Choose`]): what `moe_route` takes for one token.
#[derive(Clone, Copy, Debug)]
pub struct FusedRoute {
    /// The token's `ne` router logits (f32).
    pub logits: u64,
    /// Selection bias per expert (f32), or 0.
    pub bias: u64,
    /// Hash routing table (`tid2eid`, i32 [vocab][k]), or 0 for the biased top-k.
    pub tid2eid: u64,
    /// The token id (i32, device).
    pub tok: u64,
    /// Where the `k` routing weights go (f32); the ids go to [`Matvec::ids`].
    pub wts: u64,
    pub ne: usize,
    pub k: usize,
    pub norm: bool,
    pub wscale: f32,
}

/// How a routed one-token IQ2_XXS / Q2_K product (the `mv2f` kernels) learns its
/// experts.
#[derive(Clone, Copy, Debug, Default)]
pub enum ExpertIds {
    /// From [`Matvec::ids`], read after the PDL wait.
    #[default]
    AfterWait,
    /// From [`Matvec::ids`], read before the wait, so the first weights load under the
    /// previous kernel: only right after a `swiglu_quant` launched with `late_release`
    /// (which releases this launch after its own wait, when the ids are complete).
    Early,
    /// Chosen by every block from the router logits (no `moe_route` launch); block
    /// (0, 0) writes the ids to [`Matvec::ids`] and the weights to [`FusedRoute::wts`].
    Choose(FusedRoute),
}

/// matvec.cu `RouteArgs` (the `mv2f` kernels' last argument).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RouteArgsDev {
    logits: u64,
    bias: u64,
    tid2eid: u64,
    tok: u64,
    ids_out: u64,
    wts: u64,
    ne: i32,
    k: i32,
    norm: i32,
    wscale: f32,
    ids_early: i32,
}

// SAFETY: plain-old-data, `#[repr(C)]` with the kernel's field order and types.
unsafe impl cudarc::driver::DeviceRepr for RouteArgsDev {}

/// Most experts a block of the fused choice takes (one thread each, 8 warps).
pub const FUSED_ROUTE_MAX_EXPERTS: usize = 256;

/// Loaded kernel functions.
pub struct Kernels {
    stream: Arc<CudaStream>,
    sm_count: usize,
    /// Launches as programmatic dependents (`launch.rs`).
    pdl: bool,
    /// Most rows a matvec warp takes per step (1, 2 or 4; `DS4_MV_MAX_RPW` for A/B runs).
    max_rpw: usize,
    quant_act_q8_0: CudaFunction,
    quant_act_q8_k: CudaFunction,
    swiglu_quant: CudaFunction,
    norm_quant_q8_0: CudaFunction,
    mv_q8_0: CudaFunction,
    /// Register-streaming Q8_0 matvecs for K = 512·PPL, by (PPL, loads per lane)
    /// (`Q8_REGS_VARIANTS`); empty when `DS4_MV_Q8_REGS=0` (A/B runs).
    mv_q8_0_regs: Vec<((usize, usize), CudaFunction)>,
    mv_q2_k: CudaFunction,
    mv_q4_k: CudaFunction,
    mv_iq2_xxs: CudaFunction,
    /// Register-streaming IQ2_XXS / Q2_K matvecs for K = 2048·PPL, by (type, PPL, rows
    /// per warp) (`K_REGS_VARIANTS`); empty when `DS4_MV_REGS_K=0` (A/B runs).
    mv_k_regs: Vec<((GgmlType, usize, usize), CudaFunction)>,
    /// Rows per warp of those kernels forced by `DS4_MV_REGS_K_R` (tuning runs).
    k_regs_rows: Option<usize>,
    /// Version-2 IQ2_XXS / Q2_K decode matvecs (matvec.cu `MV_K_V2`), with the shared
    /// memory each takes; empty when `DS4_MV_K_V2=0` (A/B runs).
    mv_k_v2: Vec<(KV2Variant, CudaFunction, usize)>,
    /// The version-2 variants used by default (`DS4_MV_K_V2_IQ2`, `DS4_MV_K_V2_Q2K`
    /// pick others: `s{NST}m{MATH}w{W}`).
    k_v2_pick: KV2Pick,
    /// Blocks per multiprocessor of the version-2 grid (`DS4_MV_K_V2_BPS`, tuning).
    k_v2_bps: Option<usize>,
    /// Rows handed out by per-slot counters (`DS4_MV_K_V2_DYN=1`, or forced by the
    /// selftest) instead of a fixed stride.
    k_v2_dyn: bool,
    k_v2_dyn_forced: std::sync::atomic::AtomicBool,
    /// The counters (`K_V2_SITES` sites × `K_V2_CTR_SLOTS` slots × 2 u32, zero
    /// between launches) and the weight tensor (first segment's address) each site
    /// belongs to: launches of different tensors may run at once on different
    /// streams, so each tensor counts apart.
    k_v2_ctr: DevBuf,
    k_v2_sites: std::sync::Mutex<Vec<u64>>,
    /// Forcing by the selftest and the bench (`KV2Force`): 0 none, `usize::MAX` off,
    /// else index into `mv_k_v2` + 1.
    k_v2_forced: std::sync::atomic::AtomicUsize,
    mv_f16: CudaFunction,
    mv_f16_warp: CudaFunction,
    /// Register-streaming F16 matvecs (`F16_REGS_VARIANTS`, in order of preference);
    /// empty when `DS4_MV_F16_REGS=0` (A/B runs).
    mv_f16_regs: Vec<F16Kernel>,
    /// Variants forced by `DS4_MV_F16_V` (tuning runs), see [`F16Force`].
    f16_forced: Vec<F16Force>,
    /// The compiled pairs (`MV_PAIR_VARIANTS`) with their kernels.
    mv_pair: Vec<((usize, usize), F16Variant, CudaFunction)>,
    /// Q8_0 decode products through shared memory filled by TMA (`MV_Q8_TMA`), by
    /// (PPL, rows per stage); empty before sm_90 or when `DS4_MV_TMA=0`.
    mv_q8_tma: Vec<((usize, usize), CudaFunction)>,
    /// Shared memory a TMA product block may take, by row length (`DS4_MV_TMA_KB`:
    /// `200` for every K or `1024:200,4096:150,...`; a K not listed keeps the register
    /// kernels): what it leaves is room for the small kernels placed beside it.
    tma_smem: Vec<(usize, usize)>,
    /// Weight stages a warp of a TMA product has in flight before its PDL wait
    /// (`DS4_MV_TMA_DEPTH`, default 1; 0 no limit).
    tma_depth: i32,
    /// Most blocks of a TMA product (`DS4_MV_TMA_BLOCKS`; default: every SM).
    tma_blocks: usize,
    /// Warps a TMA product block has, by row length (`DS4_MV_TMA_WARPS`: `8` or
    /// `4096:2,...`; default 8).
    tma_warps: Vec<(usize, usize)>,
    /// Smallest matrix (bytes) that takes the TMA kernel (`DS4_MV_TMA_MIN_MB`, 16).
    tma_min_bytes: usize,
    /// `mv_q8_0_tma_segs_p{PPL}_r{SR}`: several matrices of one input (q_a + kv).
    mv_q8_tma_segs: Vec<((usize, usize), CudaFunction)>,
    /// Bytes (all matrices together) a several-matrix product needs to take the TMA
    /// kernel, from and below (`DS4_MV_TMA_SEG_MB`: `lo` or `lo,hi` in MB; default 4,10),
    /// and its shared-memory budget (`DS4_MV_TMA_SEG_KB`, 200).
    tma_seg_bytes: (usize, usize),
    tma_seg_smem: usize,
    /// Forcing by the selftest: 0 the default, 1 off, 2 on (whatever the size).
    tma_forced: std::sync::atomic::AtomicU8,
    /// A TMA product block has one more warp that only waits for the previous kernel and
    /// tells the others to stop pacing their first ring fill (`DS4_MV_TMA_WAITER`, on).
    tma_waiter: bool,
    tma_expected: bool,
    pub(crate) synth_blocks: CudaFunction,
    pub(crate) synth_scales: CudaFunction,
    pub(crate) synth_f16: CudaFunction,
    pub(crate) synth_f32: CudaFunction,
}

/// The compiled `mv_q8_0_tma_p{PPL}_r{SR}` kernels (matvec.cu `MV_Q8_TMA`): rows of
/// K = 512·PPL, SR rows per shared-memory stage (a stage of ~4–9 KB).
const Q8_TMA_VARIANTS: [(usize, usize); 4] = [(2, 4), (4, 2), (8, 1), (16, 1)];
/// The compiled `mv_q8_0_tma_segs_p{PPL}_r{SR}` kernels (matvec.cu `MV_Q8_TMA_SEGS`).
const Q8_TMA_SEGS_VARIANTS: [(usize, usize); 1] = [(8, 1)];

/// `DS4_MV_TMA_SEG_MB`: `lo` or `lo,hi` (MB) → the byte range `[lo, hi)`; unset: 4 to
/// 10 MB (decode's q_a + kv, 6.7 MB in Flash, which then preloads under the HC step
/// before it; the shared expert's gate + up, 17.8 MB on the side branch, measured
/// slower through TMA); `off` or not parsing: an empty range.
fn parse_mb_range(spec: Option<&str>) -> (usize, usize) {
    let Some(spec) = spec else {
        return (4 << 20, 10 << 20);
    };
    let mut it = spec.split(',').map(|v| v.trim().parse::<usize>().ok());
    match (it.next().flatten(), it.next()) {
        (Some(lo), None) => (lo << 20, usize::MAX),
        (Some(lo), Some(Some(hi))) => (lo << 20, hi << 20),
        _ => (usize::MAX, 0),
    }
}

/// Warps of a TMA product block and the mbarrier area before its rings (matvec.cu
/// `TMA_WARPS`, `TMA_MAX_BUF`, `TMA_HEAD`).
const TMA_WARPS: usize = 16;
/// Warps a TMA block has by default.
const TMA_DEFAULT_WARPS: usize = 8;
const TMA_MAX_BUF: usize = 16;
const TMA_HEAD: usize = TMA_WARPS * TMA_MAX_BUF * 8;
/// The most dynamic shared memory a TMA product block may take: a Hopper block's 227 KB
/// less room for the kernel's static shared memory (the waiter's flag).
const TMA_SMEM_MAX: usize = 226 * 1024;

/// How a TMA product is cut: `blocks` blocks of `warps` warps, `rpw` rows a warp
/// (a multiple of `sr`), a ring of `nbuf` stages of `sr` rows a warp, `smem` bytes a
/// block. None when the budget holds fewer than two stages a warp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaPlan {
    pub blocks: usize,
    pub warps: usize,
    pub rpw: usize,
    pub nbuf: usize,
    pub smem: usize,
}

/// `DS4_MV_TMA_KB`: one budget in KB for every K (`200`), or `K:KB` pairs; default 200
/// KB for every K. Entries that do not parse are skipped.
fn parse_tma_kb(spec: Option<&str>) -> Vec<(usize, usize)> {
    match spec {
        None => vec![(0, 200 * 1024)],
        Some(s) => parse_k_list(Some(s), 1024),
    }
}

/// A value for every K (`8`) or `K:value` pairs (K 0 = every K), each value times
/// `unit`; entries that do not parse are skipped.
fn parse_k_list(spec: Option<&str>, unit: usize) -> Vec<(usize, usize)> {
    let Some(spec) = spec else {
        return Vec::new();
    };
    if let Ok(v) = spec.trim().parse::<usize>() {
        return vec![(0, v * unit)];
    }
    spec.split(',')
        .filter_map(|e| {
            let (k, v) = e.split_once(':')?;
            Some((
                k.trim().parse().ok()?,
                v.trim().parse::<usize>().ok()? * unit,
            ))
        })
        .collect()
}

/// The cut of a TMA product of `total_rows` rows of `row_bytes`, `sr` rows a stage, over
/// at most `sm_count` blocks of `warps` warps, each within `budget` bytes of shared memory.
pub fn plan_tma(
    total_rows: usize,
    row_bytes: usize,
    sr: usize,
    sm_count: usize,
    budget: usize,
    warps: usize,
) -> Option<TmaPlan> {
    if total_rows == 0 || sr == 0 || sm_count == 0 || warps == 0 || warps > TMA_WARPS {
        return None;
    }
    let rpw = total_rows.div_ceil(sm_count * warps).div_ceil(sr) * sr;
    let blocks = total_rows.div_ceil(warps * rpw);
    let stage = sr * row_bytes;
    let fit = budget.min(TMA_SMEM_MAX).saturating_sub(TMA_HEAD) / (warps * stage);
    let nbuf = fit.min(TMA_MAX_BUF).min(rpw / sr);
    // A warp with more than one stage needs two in its ring, or nothing streams while
    // a stage is read.
    if nbuf == 0 || (nbuf < 2 && rpw > sr) {
        return None;
    }
    Some(TmaPlan {
        blocks,
        rpw,
        nbuf,
        warps,
        smem: TMA_HEAD + warps * nbuf * stage,
    })
}

/// The compiled `mv_pair_q{PPL}_l{NL}_f{P}_r{R}_s{S}` kernels (matvec.cu `MV_PAIR`): a
/// Q8_0 register-streaming body (PPL, NL) and an F16 one in one grid, as the separate
/// launches pick them for Flash: q_b (K 1024, 32768 rows) with the indexer's q_b
/// (8192 rows); the shared gate + up (K 4096, 4096 rows) with the router (256 rows).
const MV_PAIR_VARIANTS: [((usize, usize), F16Variant); 2] = [
    ((2, 16), F16Variant::new(2, 8, 2)),
    ((8, 16), F16Variant::new(4, 1, 4)),
];

/// Two decode products of one input, for [`Kernels::matvec_pair`]: `q8` (Q8_0 matrices,
/// reading `act`, the Q8_0 copy of the input) and `f16` (F16 matrices, reading the f32
/// input `x`), all of K = `k`; each part one or more matrices (segments).
pub struct MvPair<'a> {
    pub k: usize,
    pub ntok: usize,
    pub act: &'a ActBuf,
    pub x: u64,
    pub q8: &'a [MvSeg],
    pub f16: &'a [MvSeg],
}

/// The compiled `mv_q8_0_p{PPL}_l{NL}` kernels (matvec.cu `MV_Q8_REGS`): 16-byte code
/// pieces per lane and row (K = 512·PPL), loads in flight per lane (NL ≥ PPL).
const Q8_REGS_VARIANTS: [(usize, usize); 12] = [
    (1, 4),
    (1, 8),
    (1, 16),
    (2, 4),
    (2, 8),
    (2, 16),
    (4, 4),
    (4, 8),
    (4, 16),
    (8, 8),
    (8, 16),
    (16, 16),
];

/// The compiled `mv_iq2_xxs_p{PPL}_r{R}` / `mv_q2_k_p{PPL}_r{R}` kernels (matvec.cu
/// `MV_K_REGS`): 16-byte code pieces per lane and row (K = 2048·PPL), rows per warp.
const K_REGS_VARIANTS: [(usize, usize); 9] = [
    (1, 1),
    (1, 2),
    (1, 4),
    (1, 8),
    (2, 1),
    (2, 2),
    (2, 4),
    (4, 1),
    (4, 2),
];

/// A register-streaming F16 matvec `mv_f16_p{ppl}_r{rows}_s{split}` (matvec.cu
/// `MV_F16_REGS`): rows of K = 256·ppl·split elements, each split over `split` warps
/// whose lanes hold `ppl` 16-byte pieces of each of `rows` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct F16Variant {
    pub ppl: usize,
    pub rows: usize,
    pub split: usize,
}

impl F16Variant {
    const fn new(ppl: usize, rows: usize, split: usize) -> Self {
        Self { ppl, rows, split }
    }

    /// The row length this variant takes.
    pub fn k(&self) -> usize {
        256 * self.ppl * self.split
    }

    /// Weight pieces (16 bytes) in flight per lane.
    pub fn pieces(&self) -> usize {
        self.ppl * self.rows
    }

    /// Rows one block of `MV_WARPS` warps covers.
    fn rows_per_block(&self) -> usize {
        MV_WARPS / self.split * self.rows
    }

    fn kernel_name(&self) -> String {
        format!("mv_f16_p{}_r{}_s{}", self.ppl, self.rows, self.split)
    }

    /// Parses `PxRxS` (e.g. `16x1x1`).
    fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().split('x').map(|v| v.parse::<usize>().ok());
        let v = Self::new(it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(v)
    }
}

/// The compiled register-streaming F16 kernels, by K, in the default pick's order of
/// preference: most pieces in flight per lane first, then most rows per warp (a warp
/// reads 4·K/S bytes of f32 input for 2·K·R/S bytes of weights, so R = 1 reads twice
/// as much input as weights, R = 4 half as much).
pub const F16_REGS_VARIANTS: [F16Variant; 12] = [
    // K = 4096: router, compressors
    F16Variant::new(4, 4, 4),
    F16Variant::new(8, 2, 2),
    F16Variant::new(16, 1, 1),
    F16Variant::new(4, 2, 4),
    F16Variant::new(8, 1, 2),
    F16Variant::new(4, 1, 4),
    // K = 1024: indexer q_b
    F16Variant::new(2, 8, 2),
    F16Variant::new(4, 4, 1),
    F16Variant::new(2, 4, 2),
    F16Variant::new(4, 2, 1),
    F16Variant::new(1, 4, 4),
    F16Variant::new(4, 1, 1),
];

/// A loaded register-streaming F16 kernel and its resident blocks per multiprocessor.
struct F16Kernel {
    variant: F16Variant,
    func: CudaFunction,
    resident: usize,
}

/// The default register-streaming F16 variant for `total_rows` rows of `k` among
/// `compiled` (variant, resident blocks per SM), in their order of preference (most
/// pieces per lane first): the first whose grid is one wave of resident blocks and
/// still ≥ 2 blocks per SM (every row's weights in flight at once, every SM busy), else
/// the first with ≥ 2 blocks per SM, else the one with the most blocks (small matrices
/// spread over every SM; the earlier one, with more pieces per lane, on ties).
pub fn pick_f16_variant(
    compiled: &[(F16Variant, usize)],
    k: usize,
    total_rows: usize,
    sm_count: usize,
) -> Option<F16Variant> {
    let fitting = || compiled.iter().filter(|(v, _)| v.k() == k);
    let blocks = |v: &F16Variant| total_rows.div_ceil(v.rows_per_block());
    let enough = |v: &F16Variant| blocks(v) >= 2 * sm_count;
    fitting()
        .find(|(v, resident)| enough(v) && blocks(v) <= resident * sm_count)
        .or_else(|| fitting().find(|(v, _)| enough(v)))
        .or_else(|| {
            fitting().fold(None, |best: Option<&(F16Variant, usize)>, c| match best {
                Some(b) if blocks(&b.0) >= blocks(&c.0) => Some(b),
                _ => Some(c),
            })
        })
        .map(|(v, _)| *v)
}

/// One `DS4_MV_F16_V` entry: `PxRxS` (every launch of that K) or `PxRxS@ROWS` (only
/// launches of ROWS rows in all, e.g. `4x1x4@256` the router, `16x1x1@2048` the CSA
/// compressor pair). A launch takes the first entry that matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct F16Force {
    pub variant: F16Variant,
    pub rows: Option<usize>,
}

impl F16Force {
    fn parse(s: &str) -> Option<Self> {
        let (v, rows) = match s.split_once('@') {
            Some((v, r)) => (v, Some(r.trim().parse().ok()?)),
            None => (s, None),
        };
        let variant = F16Variant::parse(v)?;
        F16_REGS_VARIANTS
            .contains(&variant)
            .then_some(Self { variant, rows })
    }

    fn matches(&self, k: usize, total_rows: usize) -> bool {
        self.variant.k() == k && self.rows.is_none_or(|r| r == total_rows)
    }
}

/// Parses a `DS4_MV_F16_V` value (comma-separated [`F16Force`] entries); an entry that
/// names no compiled variant is reported and skipped.
fn parse_f16_forces(spec: &str) -> Vec<F16Force> {
    let mut out = Vec::new();
    for item in spec.split(',').filter(|s| !s.trim().is_empty()) {
        match F16Force::parse(item) {
            Some(f) => out.push(f),
            None => tracing::warn!("DS4_MV_F16_V: no F16 matvec variant {item:?} (ignored)"),
        }
    }
    out
}

/// A version-2 IQ2_XXS / Q2_K decode matvec (`mv2_{type}_p{ppl}_s{nst}_m{math}_w{warps}`):
/// K = 2048·`ppl`, `nst` ring stages per warp, `math` 0 (IQ2_XXS lookup tables) or 1
/// (IQ2_XXS signs computed, as the register kernels), `warps` per block. `rows` > 0:
/// the fast form (`mv2f_{type}_p{ppl}_r{rows}_s{nst}_m{math}_w{warps}`, matvec.cu
/// `MV_K_V2F`), `rows` rows a warp step, no row counters; its `math` is the IQ2_XXS
/// table form: 0 static (48 KB), 1 prmt-addressed (64 KB of the dynamic memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KV2Variant {
    pub ty: GgmlType,
    pub ppl: usize,
    pub nst: usize,
    pub math: usize,
    pub warps: usize,
    pub rows: usize,
}

impl KV2Variant {
    const fn new(ty: GgmlType, ppl: usize, nst: usize, math: usize, warps: usize) -> Self {
        Self::fast(ty, ppl, 0, nst, math, warps)
    }

    const fn fast(
        ty: GgmlType,
        ppl: usize,
        rows: usize,
        nst: usize,
        math: usize,
        warps: usize,
    ) -> Self {
        Self {
            ty,
            ppl,
            nst,
            math,
            warps,
            rows,
        }
    }

    pub fn name(&self) -> String {
        let t = if self.ty == GgmlType::IQ2_XXS {
            "iq2_xxs"
        } else {
            "q2_k"
        };
        if self.rows > 0 {
            return format!(
                "mv2f_{t}_p{}_r{}_s{}_m{}_w{}",
                self.ppl, self.rows, self.nst, self.math, self.warps
            );
        }
        format!(
            "mv2_{t}_p{}_s{}_m{}_w{}",
            self.ppl, self.nst, self.math, self.warps
        )
    }

    /// Dynamic shared memory (matvec.cu `MV2_TAB` + W · NST · `MV2_STAGE`; the fast
    /// form its IQ2_XXS `DYN_TAB` + W · NST · R · `MV2_STAGE`).
    fn smem(&self) -> usize {
        let iq2 = self.ty == GgmlType::IQ2_XXS;
        let tab = match (iq2, self.math) {
            (true, 1) if self.rows > 0 => 65536,
            _ if self.rows > 0 => 0,
            (false, _) => 0,
            (true, 0) => 384 * 128,
            (true, _) => 2048,
        };
        let aux = if iq2 { 4 } else { 16 };
        tab + self.warps * self.nst * self.rows.max(1) * self.ppl * 32 * (16 + aux)
    }
}

/// Which version-2 kernel decode IQ2_XXS / Q2_K products take (`Kernels::force_k_v2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KV2Force {
    /// The environment's (or default) pick.
    Env,
    /// None: the register kernels (as `DS4_MV_K_V2=0`).
    Off,
    /// This variant for its type and row length; the others take the register kernels.
    Variant(KV2Variant),
}

/// The compiled version-2 kernels (matvec.cu `MV_K_V2_IQ2` / `MV_K_V2_Q2K`).
const K_V2_VARIANTS: [KV2Variant; 40] = {
    use GgmlType::{IQ2_XXS, Q2_K};
    [
        KV2Variant::new(IQ2_XXS, 1, 3, 0, 8),
        KV2Variant::new(IQ2_XXS, 1, 4, 0, 8),
        KV2Variant::new(IQ2_XXS, 1, 6, 0, 8),
        KV2Variant::new(IQ2_XXS, 1, 4, 1, 8),
        KV2Variant::new(IQ2_XXS, 2, 3, 0, 8),
        KV2Variant::new(IQ2_XXS, 2, 4, 0, 8),
        KV2Variant::new(IQ2_XXS, 2, 6, 0, 8),
        KV2Variant::new(IQ2_XXS, 2, 4, 1, 8),
        KV2Variant::new(IQ2_XXS, 2, 4, 0, 16),
        KV2Variant::new(IQ2_XXS, 2, 3, 0, 24),
        KV2Variant::new(Q2_K, 1, 4, 0, 8),
        KV2Variant::new(Q2_K, 1, 8, 0, 8),
        KV2Variant::new(Q2_K, 1, 12, 0, 8),
        KV2Variant::new(Q2_K, 1, 8, 0, 16),
        KV2Variant::new(Q2_K, 1, 4, 0, 32),
        KV2Variant::new(Q2_K, 2, 4, 0, 8),
        KV2Variant::new(Q2_K, 2, 8, 0, 8),
        // (type, PPL, R, NST, MATH, W) of matvec.cu `MV_K_V2F_IQ2` / `MV_K_V2F_Q2K`
        KV2Variant::fast(IQ2_XXS, 1, 2, 3, 0, 8),
        KV2Variant::fast(IQ2_XXS, 2, 1, 3, 0, 8),
        KV2Variant::fast(IQ2_XXS, 2, 2, 2, 0, 8),
        KV2Variant::fast(IQ2_XXS, 2, 2, 3, 0, 8),
        KV2Variant::fast(IQ2_XXS, 2, 4, 2, 0, 8),
        KV2Variant::fast(IQ2_XXS, 2, 2, 3, 0, 16),
        KV2Variant::fast(IQ2_XXS, 2, 2, 3, 0, 20),
        KV2Variant::fast(IQ2_XXS, 2, 2, 2, 0, 24),
        KV2Variant::fast(IQ2_XXS, 2, 2, 2, 0, 32),
        KV2Variant::fast(IQ2_XXS, 1, 2, 2, 1, 8),
        KV2Variant::fast(IQ2_XXS, 2, 2, 2, 1, 8),
        KV2Variant::fast(IQ2_XXS, 2, 2, 3, 1, 16),
        KV2Variant::fast(IQ2_XXS, 2, 2, 2, 1, 24),
        KV2Variant::fast(IQ2_XXS, 2, 2, 2, 1, 32),
        KV2Variant::fast(IQ2_XXS, 2, 4, 2, 1, 16),
        KV2Variant::fast(Q2_K, 1, 1, 4, 0, 8),
        KV2Variant::fast(Q2_K, 1, 2, 3, 0, 8),
        KV2Variant::fast(Q2_K, 1, 2, 4, 0, 8),
        KV2Variant::fast(Q2_K, 1, 4, 2, 0, 8),
        KV2Variant::fast(Q2_K, 1, 4, 3, 0, 8),
        KV2Variant::fast(Q2_K, 2, 2, 3, 0, 8),
        KV2Variant::fast(Q2_K, 1, 1, 4, 0, 16),
        KV2Variant::fast(Q2_K, 1, 2, 3, 0, 16),
    ]
};

/// Weight tensors that can have their own row counters (`Kernels::k_v2_ctr`).
const K_V2_SITES: usize = 256;
/// Slots per launch the row counters cover (larger launches take static rows).
const K_V2_CTR_SLOTS: usize = 64;

/// The (NST, MATH, W) of the version-2 kernels used per type, and the (R, NST, W) of
/// the fast form, used first unless `DS4_MV2_FAST=0` (or row counters are on).
#[derive(Debug, Clone, Copy)]
struct KV2Pick {
    iq2: (usize, usize, usize),
    q2k: (usize, usize, usize),
    fast: bool,
    iq2_fast: (usize, usize, usize, usize),
    q2k_fast: (usize, usize, usize, usize),
}

/// `r{R}s{NST}m{MATH}w{W}` (`m`, `w` parts optional: 0 and 8) as (R, NST, MATH, W).
fn parse_k_v2_fast_pick(v: &str) -> Option<(usize, usize, usize, usize)> {
    let v = v.trim().strip_prefix('r')?;
    let (rows, rest) = v.split_at(v.find('s')?);
    let (nst, math, warps) = parse_k_v2_pick(rest)?;
    Some((rows.parse().ok()?, nst, math, warps))
}

/// `s{NST}m{MATH}w{W}` (`m`, `w` parts optional: 0 and 8) as (NST, MATH, W).
fn parse_k_v2_pick(v: &str) -> Option<(usize, usize, usize)> {
    let v = v.trim().strip_prefix('s')?;
    let (nst, rest) = v.split_at(v.find(['m', 'w']).unwrap_or(v.len()));
    let (math, warps) = match rest.strip_prefix('m') {
        Some(r) => r.split_at(r.find('w').unwrap_or(r.len())),
        None => ("0", rest),
    };
    let warps = match warps.strip_prefix('w') {
        Some(w) => w.parse().ok()?,
        None if warps.is_empty() => 8,
        None => return None,
    };
    Some((nst.parse().ok()?, math.parse().ok()?, warps))
}

impl KV2Pick {
    /// Defaults, or `DS4_MV_K_V2_IQ2` / `DS4_MV_K_V2_Q2K` = `s{NST}m{MATH}w{W}`.
    fn from_env() -> Self {
        let pick = |var: &str, dflt| match std::env::var(var) {
            Err(_) => dflt,
            Ok(v) => parse_k_v2_pick(&v).unwrap_or_else(|| {
                tracing::warn!("{var}={v}: expected s<NST>m<MATH>w<W>, using the default");
                dflt
            }),
        };
        // H100, whole decode step at 2K: s3 / s4 156.7, 156.9 -> 158.7, 158.7 tok/s
        // against s4 / s8 (routed products alone: gate+up 16.9 -> 15.7 us, down 11.2 -> 9.5).
        let pick_fast = |var: &str, dflt| match std::env::var(var) {
            Err(_) => dflt,
            Ok(v) => parse_k_v2_fast_pick(&v).unwrap_or_else(|| {
                tracing::warn!("{var}={v}: expected r<R>s<NST>m<MATH>w<W>, using the default");
                dflt
            }),
        };
        Self {
            iq2: pick("DS4_MV_K_V2_IQ2", (3, 0, 8)),
            q2k: pick("DS4_MV_K_V2_Q2K", (4, 0, 8)),
            fast: crate::launch::env_switch("DS4_MV2_FAST"),
            // H100 (ncu, isolated): gate+up 20.06 -> 17.79 us, down 12.06 -> 10.34 us
            // (mv2 s3 / s4 before); step 5.70 -> 5.65 ms. Whole step at 2K by IQ2_XXS
            // pick: r2s2m0w8 5.598 / 5.605 ms, r2s2m1w24 5.625 / 5.624, r2s2m1w8 5.660 /
            // 5.676, r2s3m0w8 5.701 (m1's 104 KB of shared memory per block is faster
            // alone, 13.2 against 13.8 us, but slower beside the side branch's kernels).
            // Q2_K: r2s3w8 5.660, r2s4w8 5.682; the w16 forms slower.
            iq2_fast: pick_fast("DS4_MV2_FAST_IQ2", (2, 2, 0, 8)),
            q2k_fast: pick_fast("DS4_MV2_FAST_Q2K", (2, 3, 0, 8)),
        }
    }
}

#[cfg(test)]
#[test]
fn k_v2_fast_pick_parses() {
    assert_eq!(parse_k_v2_fast_pick("r2s3m1w8"), Some((2, 3, 1, 8)));
    assert_eq!(parse_k_v2_fast_pick("r2s3w8"), Some((2, 3, 0, 8)));
    assert_eq!(parse_k_v2_fast_pick("r4s2"), Some((4, 2, 0, 8)));
    assert_eq!(parse_k_v2_fast_pick(" r2s3w16 "), Some((2, 3, 0, 16)));
    assert_eq!(parse_k_v2_fast_pick("s3w8"), None);
    assert_eq!(parse_k_v2_fast_pick("r2"), None);
    assert_eq!(parse_k_v2_fast_pick("r2s"), None);
    assert_eq!(parse_k_v2_fast_pick("r2s3w"), None);
    assert_eq!(
        KV2Variant::fast(GgmlType::IQ2_XXS, 2, 2, 3, 0, 8).name(),
        "mv2f_iq2_xxs_p2_r2_s3_m0_w8"
    );
    // Ring only (static tables): 8 warps x 3 stages x 2 rows x 1280 bytes.
    assert_eq!(
        KV2Variant::fast(GgmlType::IQ2_XXS, 2, 2, 3, 0, 8).smem(),
        61440
    );
    // 64 KB of tables, then the ring.
    assert_eq!(
        KV2Variant::fast(GgmlType::IQ2_XXS, 2, 2, 2, 1, 8).smem(),
        65536 + 40960
    );
    assert_eq!(
        KV2Variant::fast(GgmlType::Q2_K, 1, 2, 4, 0, 8).smem(),
        65536
    );
}

#[cfg(test)]
#[test]
fn k_v2_pick_parses() {
    assert_eq!(parse_k_v2_pick("s4m0w8"), Some((4, 0, 8)));
    assert_eq!(parse_k_v2_pick("s6"), Some((6, 0, 8)));
    assert_eq!(parse_k_v2_pick("s4m1"), Some((4, 1, 8)));
    assert_eq!(parse_k_v2_pick("s3w24"), Some((3, 0, 24)));
    assert_eq!(parse_k_v2_pick(" s12m0w16 "), Some((12, 0, 16)));
    assert_eq!(parse_k_v2_pick("4"), None);
    assert_eq!(parse_k_v2_pick("s4x"), None);
    assert_eq!(parse_k_v2_pick("s4m"), None);
    assert_eq!(parse_k_v2_pick("s4w"), None);
}

/// Grid of the register-streaming matvecs (`mv_q8_0_p*_l*`, `mv_iq2_xxs_p*_r*`,
/// `mv_q2_k_p*_r*`): MV_WARPS warps a block, `rows_per_warp` rows a warp, one grid
/// row per slot.
fn regs_launch_cfg(total: usize, rows_per_warp: usize, slots: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            total.div_ceil(MV_WARPS * rows_per_warp) as u32,
            slots as u32,
            1,
        ),
        block_dim: ((MV_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn row_bytes(ty: GgmlType, k: usize) -> usize {
    k / ty.block_elems() as usize * ty.block_bytes() as usize
}

impl Kernels {
    /// Compiles (or loads from the cache) and binds every kernel.
    pub fn load(rt: &CudaRuntime) -> Result<Self> {
        let arch = compile::arch_for(rt.device.sm);
        let src: &KernelSource = &compile::MATVEC;
        let m = compile::load_module(&rt.ctx, src, &arch, rt.nvrtc_version)?;
        let f = |name: &str| m.load_function(name);
        let mv = |name: &str| compile::load_with_smem(&m, name, SMEM_LIMIT);
        // The TMA products `{prefix}_p{PPL}_r{SR}` (sm_90 and DS4_MV_TMA on); a device
        // with less shared memory than TMA_SMEM_MAX leaves them out.
        let tma_on = rt.device.sm.0 >= 9 && crate::launch::env_switch("DS4_MV_TMA");
        let load_tma = |prefix: &str, variants: &[(usize, usize)]| {
            let mut v = Vec::new();
            for &(ppl, sr) in variants.iter().filter(|_| tma_on) {
                let name = format!("{prefix}_p{ppl}_r{sr}");
                match compile::load_with_smem(&m, &name, TMA_SMEM_MAX) {
                    Ok(func) => v.push(((ppl, sr), func)),
                    Err(e) => tracing::debug!("{name} left out: {e}"),
                }
            }
            v
        };
        Ok(Self {
            stream: rt.stream.clone(),
            sm_count: rt.device.multiprocessors.max(1) as usize,
            pdl: crate::launch::pdl_enabled(rt.device.sm.0),
            max_rpw: match std::env::var("DS4_MV_MAX_RPW").ok().as_deref() {
                Some("1") => 1,
                Some("2") => 2,
                _ => 4,
            },
            quant_act_q8_0: f("quant_act_q8_0")?,
            quant_act_q8_k: f("quant_act_q8_k")?,
            swiglu_quant: f("swiglu_quant")?,
            norm_quant_q8_0: f("norm_quant_q8_0")?,
            mv_q8_0: mv("mv_q8_0")?,
            mv_q8_0_regs: if crate::launch::env_switch("DS4_MV_Q8_REGS") {
                Q8_REGS_VARIANTS
                    .iter()
                    .map(|&(ppl, nl)| Ok(((ppl, nl), f(&format!("mv_q8_0_p{ppl}_l{nl}"))?)))
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            },
            mv_q2_k: mv("mv_q2_k")?,
            mv_q4_k: mv("mv_q4_k")?,
            mv_iq2_xxs: mv("mv_iq2_xxs")?,
            mv_k_regs: if crate::launch::env_switch("DS4_MV_REGS_K") {
                let mut v = Vec::new();
                for &(ppl, r) in &K_REGS_VARIANTS {
                    for (ty, name) in [(GgmlType::IQ2_XXS, "iq2_xxs"), (GgmlType::Q2_K, "q2_k")] {
                        v.push(((ty, ppl, r), f(&format!("mv_{name}_p{ppl}_r{r}"))?));
                    }
                }
                v
            } else {
                Vec::new()
            },
            k_regs_rows: std::env::var("DS4_MV_REGS_K_R")
                .ok()
                .and_then(|v| v.parse().ok()),
            mv_k_v2: if crate::launch::env_switch("DS4_MV_K_V2") {
                let mut v2 = Vec::new();
                for v in &K_V2_VARIANTS {
                    let func = m.load_function(&v.name())?;
                    // Devices with less shared memory than the variant needs skip it.
                    match func.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        v.smem() as i32,
                    ) {
                        Ok(()) => v2.push((*v, func, v.smem())),
                        Err(e) => tracing::debug!("{} left out: {e}", v.name()),
                    }
                }
                v2
            } else {
                Vec::new()
            },
            k_v2_pick: KV2Pick::from_env(),
            k_v2_dyn: std::env::var("DS4_MV_K_V2_DYN").is_ok_and(|v| v == "1"),
            k_v2_dyn_forced: std::sync::atomic::AtomicBool::new(false),
            k_v2_ctr: DevBuf::zeros(&rt.stream, K_V2_SITES * K_V2_CTR_SLOTS * 8)?,
            k_v2_sites: std::sync::Mutex::new(Vec::new()),
            k_v2_bps: std::env::var("DS4_MV_K_V2_BPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&b: &usize| b > 0),
            k_v2_forced: std::sync::atomic::AtomicUsize::new(0),
            mv_f16: f("mv_f16")?,
            mv_f16_warp: f("mv_f16_warp")?,
            mv_f16_regs: if crate::launch::env_switch("DS4_MV_F16_REGS") {
                F16_REGS_VARIANTS
                    .iter()
                    .map(|&variant| {
                        let func = f(&variant.kernel_name())?;
                        // Unknown occupancy: assume the 4 blocks `__launch_bounds__` asks for.
                        let resident = func
                            .occupancy_max_active_blocks_per_multiprocessor(
                                (MV_WARPS * 32) as u32,
                                0,
                                None,
                            )
                            .map_or(4, |b| (b as usize).max(1));
                        Ok(F16Kernel {
                            variant,
                            func,
                            resident,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            },
            f16_forced: std::env::var("DS4_MV_F16_V")
                .map(|spec| parse_f16_forces(&spec))
                .unwrap_or_default(),
            mv_pair: MV_PAIR_VARIANTS
                .iter()
                .map(|&((ppl, nl), v)| {
                    let name = format!("mv_pair_q{ppl}_l{nl}_f{}_r{}_s{}", v.ppl, v.rows, v.split);
                    Ok(((ppl, nl), v, f(&name)?))
                })
                .collect::<Result<Vec<_>>>()?,
            mv_q8_tma: load_tma("mv_q8_0_tma", &Q8_TMA_VARIANTS),
            tma_smem: parse_tma_kb(std::env::var("DS4_MV_TMA_KB").ok().as_deref()),
            tma_warps: parse_k_list(std::env::var("DS4_MV_TMA_WARPS").ok().as_deref(), 1)
                .into_iter()
                .filter(|&(_, w)| (1..=TMA_WARPS).contains(&w))
                .collect(),
            tma_blocks: std::env::var("DS4_MV_TMA_BLOCKS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&b: &usize| b > 0)
                .unwrap_or(usize::MAX),
            tma_depth: std::env::var("DS4_MV_TMA_DEPTH")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(1, |d: i32| d.clamp(0, TMA_MAX_BUF as i32)),
            tma_min_bytes: std::env::var("DS4_MV_TMA_MIN_MB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(16 << 20, |mb| mb << 20),
            mv_q8_tma_segs: load_tma("mv_q8_0_tma_segs", &Q8_TMA_SEGS_VARIANTS),
            tma_seg_bytes: parse_mb_range(std::env::var("DS4_MV_TMA_SEG_MB").ok().as_deref()),
            tma_seg_smem: std::env::var("DS4_MV_TMA_SEG_KB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(200 * 1024, |kb| kb * 1024),
            tma_forced: std::sync::atomic::AtomicU8::new(0),
            tma_waiter: crate::launch::env_switch("DS4_MV_TMA_WAITER"),
            tma_expected: rt.device.sm.0 >= 9 && crate::launch::env_switch("DS4_MV_TMA"),
            synth_blocks: f("synth_blocks")?,
            synth_scales: f("synth_scales")?,
            synth_f16: f("synth_f16")?,
            synth_f32: f("synth_f32")?,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Whether this device's launches use programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// Quantizes `act.rows × act.k` f32 values at `x` into `act`.
    pub fn quantize(&self, x: u64, act: &ActBuf) -> Result<()> {
        self.quantize_on(&self.stream, x, act)
    }

    /// [`Self::quantize`] on another stream (graph branches).
    pub fn quantize_on(&self, stream: &Arc<CudaStream>, x: u64, act: &ActBuf) -> Result<()> {
        self.quantize_rows(stream, x, act, act.rows)
    }

    /// Quantizes the first `rows` rows (of `act.k` contiguous f32 each) at `x`.
    pub fn quantize_rows(
        &self,
        stream: &Arc<CudaStream>,
        x: u64,
        act: &ActBuf,
        rows: usize,
    ) -> Result<()> {
        if rows > act.rows {
            return Err(Error::Shape {
                what: "activation quantisation",
                detail: format!("{rows} rows into a buffer of {}", act.rows),
            });
        }
        let n = (act.k * rows) as i32;
        let (func, blk) = match act.kind {
            ActKind::Q8_0 => (&self.quant_act_q8_0, 32),
            ActKind::Q8K => (&self.quant_act_q8_k, 256),
            ActKind::F32 => return Ok(()),
        };
        let warps = (act.k * rows / blk) as u32;
        if warps == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(8), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = KernelArgs::new();
        b.arg(&x).arg(&n).arg(&act.qs.ptr).arg(&act.d.ptr);
        if act.kind == ActKind::Q8K {
            b.arg(&act.bsums.ptr);
        }
        // SAFETY: argument list matches the kernel signature; buffers sized by ActBuf;
        // the kernel starts with PDL_WAIT.
        unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
        Ok(())
    }

    /// SwiGLU of `rows` rows of `act.k` (gate `g`, up `u`, f32; row weights `wts` or 0
    /// for 1) quantized straight into `act` (Q8_0 or Q8_K). `late_release`: the next
    /// launch is placed only after this one's PDL wait (see [`ExpertIds::Early`]).
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_quant(
        &self,
        stream: &Arc<CudaStream>,
        g: u64,
        u: u64,
        rows: usize,
        wts: u64,
        clamp: f32,
        act: &ActBuf,
        late_release: bool,
        split: Option<&HcSplitJob>,
    ) -> Result<()> {
        let (q8k, bw) = match act.kind {
            ActKind::Q8_0 => (0i32, 32usize),
            ActKind::Q8K => (1, 256),
            ActKind::F32 => {
                return Err(Error::Shape {
                    what: "swiglu quantisation",
                    detail: "f32 activation buffer".into(),
                });
            }
        };
        if rows > act.rows || !act.k.is_multiple_of(bw) {
            return Err(Error::Shape {
                what: "swiglu quantisation",
                detail: format!(
                    "{rows} rows of {} into {} rows (block {bw})",
                    act.k, act.rows
                ),
            });
        }
        let warps = (rows * act.k / bw) as u32;
        if warps == 0 {
            return Ok(());
        }
        // A carried split takes one more block (the last).
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(8) + u32::from(split.is_some()), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ff, rows32, late) = (act.k as i32, rows as i32, i32::from(late_release));
        let split = split.copied().unwrap_or_default();
        let mut b = KernelArgs::new();
        b.arg(&g)
            .arg(&u)
            .arg(&ff)
            .arg(&rows32)
            .arg(&wts)
            .arg(&clamp)
            .arg(&q8k)
            .arg(&act.qs.ptr)
            .arg(&act.d.ptr)
            .arg(&act.bsums.ptr)
            .arg(&late)
            .arg(&split);
        // SAFETY: matches `swiglu_quant`; sizes checked above; PDL_WAIT before any read.
        unsafe { crate::launch::launch(stream, &self.swiglu_quant, cfg, &mut b, self.pdl) }?;
        Ok(())
    }

    /// RMSNorm of `rows` rows of `k` f32 at `x` in place (weight `w`, or 0 for none),
    /// and their Q8_0 quantisation into `act`. `k` a multiple of 128, at most 4096.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_quant_q8_0(
        &self,
        stream: &Arc<CudaStream>,
        x: u64,
        w: u64,
        k: usize,
        rows: usize,
        eps: f32,
        act: &ActBuf,
    ) -> Result<()> {
        if act.kind != ActKind::Q8_0
            || act.k != k
            || rows > act.rows
            || !k.is_multiple_of(128)
            || k > 4096
        {
            return Err(Error::Shape {
                what: "norm + Q8_0 quantisation",
                detail: format!(
                    "{rows} rows of {k} into {:?} rows {} of {}",
                    act.kind, act.rows, act.k
                ),
            });
        }
        if rows == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: ((k / 4) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let k32 = k as i32;
        let mut b = KernelArgs::new();
        b.arg(&x)
            .arg(&w)
            .arg(&k32)
            .arg(&eps)
            .arg(&act.qs.ptr)
            .arg(&act.d.ptr);
        // SAFETY: matches `norm_quant_q8_0`; sizes checked above; PDL_START first.
        unsafe { crate::launch::launch(stream, &self.norm_quant_q8_0, cfg, &mut b, self.pdl) }?;
        Ok(())
    }

    /// Launches one matvec after checking its shape.
    pub fn matvec(&self, m: &Matvec) -> Result<()> {
        self.matvec_on(&self.stream, m)
    }

    /// [`Self::matvec`] on another stream (graph branches).
    pub fn matvec_on(&self, stream: &Arc<CudaStream>, m: &Matvec) -> Result<()> {
        self.matvec_ld(stream, m, m.rows)
    }

    /// A matvec whose output rows are `ldy` floats apart (`ldy >= rows`).
    pub fn matvec_ld(&self, stream: &Arc<CudaStream>, m: &Matvec, ldy: usize) -> Result<()> {
        self.matvec_segs(stream, m, ldy, &[])
    }

    /// `m` (output rows `ldy` apart) and the further matrices `extra` of the same type,
    /// width, input and slots, as one launch.
    pub fn matvec_segs(
        &self,
        stream: &Arc<CudaStream>,
        m: &Matvec,
        ldy: usize,
        extra: &[MvSeg],
    ) -> Result<()> {
        self.matvec_segs_with(stream, m, ldy, extra, None, ExpertIds::AfterWait)
    }

    /// [`Self::matvec_segs`] of a routed one-token product whose experts come as
    /// `experts` says; an error, launching nothing, unless [`Self::routed_fast`] holds
    /// for its type and K (or `experts` is [`ExpertIds::AfterWait`]).
    pub fn matvec_routed(
        &self,
        stream: &Arc<CudaStream>,
        m: &Matvec,
        ldy: usize,
        extra: &[MvSeg],
        experts: ExpertIds,
    ) -> Result<()> {
        self.matvec_segs_with(stream, m, ldy, extra, None, experts)
    }

    /// A one-token Q8_0 product (slots contiguous, output rows `m.rows` apart) through
    /// the TMA kernel that also writes the Q8_0 copy of its output (`q8_out`: `k` = all
    /// the output rows, slot-major), so the next product of that output needs no
    /// quantising launch. False, launching nothing, where that kernel does not take it.
    pub fn matvec_quant_out(
        &self,
        stream: &Arc<CudaStream>,
        m: &Matvec,
        q8_out: &ActBuf,
        split: Option<&HcSplitJob>,
    ) -> Result<bool> {
        let MvInput::Quant(act) = m.x else {
            return Ok(false);
        };
        if m.ty != GgmlType::Q8_0
            || act.kind != ActKind::Q8_0
            || act.k != m.k
            || m.ntok != 1
            || m.rows == 0
            || act.rows < m.slots
        {
            return Ok(false);
        }
        let only = MvSeg {
            w: m.w,
            rows: m.rows,
            y: m.y,
            ldy: m.rows,
        };
        let sg = seg_table("matvec", [&only])?;
        let rb = row_bytes(m.ty, m.k);
        self.try_q8_tma(stream, m, &sg, 1, rb, act, Some(q8_out), split)
    }

    /// Whether the TMA products can carry a deferred HC split (their blocks have a
    /// waiting warp): `matvec_quant_out` takes a split only then.
    pub fn tma_carries_split(&self) -> bool {
        self.tma_waiter && !self.mv_q8_tma.is_empty()
    }

    /// Whether a routed one-token product of `ty` with rows of `k` runs on an `mv2f`
    /// kernel, which takes every [`ExpertIds`] form (a choosing block needs a thread
    /// an expert: 8 warps or more).
    pub fn routed_fast(&self, ty: GgmlType, k: usize) -> bool {
        matches!(ty, GgmlType::IQ2_XXS | GgmlType::Q2_K)
            && k.is_multiple_of(2048)
            && self
                .k_v2_kernel(ty, k / 2048)
                .is_some_and(|(v, _, _)| v.rows > 0 && v.warps * 32 >= FUSED_ROUTE_MAX_EXPERTS)
    }

    /// [`Self::matvec_segs`] of F16 weights through the register-streaming variant `v`
    /// (selftest: every variant, whatever the default pick); an error when `v` is not
    /// compiled (`DS4_MV_F16_REGS=0`) or does not take this shape.
    pub fn matvec_f16_variant(
        &self,
        stream: &Arc<CudaStream>,
        m: &Matvec,
        ldy: usize,
        extra: &[MvSeg],
        v: F16Variant,
    ) -> Result<()> {
        self.matvec_segs_with(stream, m, ldy, extra, Some(v), ExpertIds::AfterWait)
    }

    /// The register-streaming F16 variants this run compiled (none with `DS4_MV_F16_REGS=0`).
    pub fn f16_regs_variants(&self) -> Vec<F16Variant> {
        self.mv_f16_regs.iter().map(|c| c.variant).collect()
    }

    fn matvec_segs_with(
        &self,
        stream: &Arc<CudaStream>,
        m: &Matvec,
        ldy: usize,
        extra: &[MvSeg],
        f16_variant: Option<F16Variant>,
        experts: ExpertIds,
    ) -> Result<()> {
        let shape_err = |detail: String| Error::Shape {
            what: "matvec",
            detail,
        };
        let special_ids = !matches!(experts, ExpertIds::AfterWait);
        if special_ids && (m.ids == 0 || m.ntok != 1 || !self.routed_fast(m.ty, m.k)) {
            return Err(shape_err(format!(
                "{experts:?} needs a routed one-token mv2f product ({} K {})",
                m.ty.name(),
                m.k
            )));
        }
        if let ExpertIds::Choose(r) = experts
            && (r.ne == 0
                || r.ne > FUSED_ROUTE_MAX_EXPERTS
                || r.k == 0
                || r.k > 64
                || r.k > r.ne
                || m.slots != r.k)
        {
            return Err(shape_err(format!(
                "expert choice of {} of {} experts in {} slots",
                r.k, r.ne, m.slots
            )));
        }
        if extra.len() >= MV_MAX_SEGS {
            return Err(shape_err(format!(
                "{} matrices in one launch, at most {MV_MAX_SEGS}",
                extra.len() + 1
            )));
        }
        let first = MvSeg {
            w: m.w,
            rows: m.rows,
            y: m.y,
            ldy,
        };
        let sg = seg_table("matvec", std::iter::once(&first).chain(extra))?;
        let n_segs = extra.len() + 1;
        // Non-negative: it came from a usize through i32::try_from.
        let total = sg.start[n_segs] as usize;
        if m.rows == 0 || m.k == 0 || m.ntok == 0 || m.slots == 0 || m.x_group == 0 {
            return Err(shape_err(format!(
                "empty dimension (rows {}, k {}, ntok {}, slots {}, x_group {})",
                m.rows, m.k, m.ntok, m.slots, m.x_group
            )));
        }
        let (k, ntok) = (m.k as i32, m.ntok as i32);
        if m.ty == GgmlType::F16 {
            let MvInput::F32(x) = m.x else {
                return Err(shape_err("F16 weights take an f32 input".into()));
            };
            if !m.k.is_multiple_of(8) || m.k > F16_MAX_K || m.slots != 1 {
                return Err(shape_err(format!(
                    "F16 needs k % 8 == 0, k <= {F16_MAX_K}, one slot (k {}, slots {})",
                    m.k, m.slots
                )));
            }
            // 16-byte weight pieces need aligned matrices (rows are 512-byte multiples).
            let regs = if m.k.is_multiple_of(256)
                && sg.w.iter().take(n_segs).all(|w| w.is_multiple_of(16))
                && x.is_multiple_of(16)
            {
                self.f16_regs_kernel(m.k, total, f16_variant)
            } else {
                None
            };
            if let Some((v, func)) = regs {
                return self.launch_f16_regs(stream, v, func, &sg, x, total, ntok);
            }
            if let Some(v) = f16_variant {
                return Err(shape_err(format!(
                    "F16 variant {v:?} is not compiled or does not take k {}",
                    m.k
                )));
            }
            // Short rows: a warp per row (`mv_f16_warp`), else a block per row.
            let short = m.k <= F16_WARP_MAX_K;
            let cfg = LaunchConfig {
                grid_dim: (if short { total.div_ceil(4) } else { total } as u32, 1, 1),
                block_dim: (F16_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let func = if short {
                &self.mv_f16_warp
            } else {
                &self.mv_f16
            };
            let mut b = KernelArgs::new();
            b.arg(&sg).arg(&x).arg(&k).arg(&ntok);
            // SAFETY: matches `mv_f16`; shapes checked above; the kernel starts with PDL_WAIT.
            unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
            return Ok(());
        }
        let func = match m.ty {
            GgmlType::Q8_0 => &self.mv_q8_0,
            GgmlType::Q2_K => &self.mv_q2_k,
            GgmlType::Q4_K => &self.mv_q4_k,
            GgmlType::IQ2_XXS => &self.mv_iq2_xxs,
            other => return Err(Error::Unsupported(other)),
        };
        let MvInput::Quant(act) = m.x else {
            return Err(shape_err(format!(
                "{} weights take a quantized input",
                m.ty.name()
            )));
        };
        let want = ActKind::for_weight(m.ty)?;
        if act.kind != want || act.k != m.k {
            return Err(shape_err(format!(
                "activation is {:?} of k {}, {} needs {want:?} of k {}",
                act.kind,
                act.k,
                m.ty.name(),
                m.k
            )));
        }
        let act_rows_needed = m.slots.div_ceil(m.x_group) * m.ntok;
        if act.rows < act_rows_needed {
            return Err(shape_err(format!(
                "{} activation rows, {act_rows_needed} needed",
                act.rows
            )));
        }
        let be = m.ty.block_elems() as usize;
        let rb = row_bytes(m.ty, m.k);
        if m.ty == GgmlType::Q8_0 && self.try_q8_tma(stream, m, &sg, n_segs, rb, act, None, None)? {
            return Ok(());
        }
        if m.ty == GgmlType::Q8_0
            && m.k.is_multiple_of(512)
            && let Some((func, rows_per_warp)) = self.q8_0_regs_kernel(m.k / 512, total, m.slots)
        {
            let cfg = regs_launch_cfg(total, rows_per_warp, m.slots);
            let stride = m.w_slot_stride as i64;
            let x_group = m.x_group as i32;
            let mut b = KernelArgs::new();
            b.arg(&sg)
                .arg(&stride)
                .arg(&m.ids)
                .arg(&act.qs.ptr)
                .arg(&act.d.ptr)
                .arg(&ntok)
                .arg(&x_group);
            // SAFETY: matches `MV_Q8_REGS`; shapes checked above (K = 512·PPL, so rows
            // and activation rows are 16-byte multiples); routed slots PDL_WAIT first.
            unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
            return Ok(());
        }
        let k_aligned = matches!(m.ty, GgmlType::IQ2_XXS | GgmlType::Q2_K)
            && m.k.is_multiple_of(2048)
            // 16-byte loads of codes, activation codes and bsums need aligned bases
            // (the rows themselves are 16-byte multiples when K = 2048·PPL).
            && [m.w_slot_stride, act.qs.ptr, act.bsums.ptr]
                .iter()
                .chain(sg.w.iter().take(n_segs))
                .all(|v| v.is_multiple_of(16));
        if k_aligned
            && m.ntok == 1
            && let Some((v, func, smem)) = self.k_v2_kernel(m.ty, m.k / 2048)
        {
            // One wave of resident blocks over every slot; warps walk the rows.
            // (`DS4_MV_K_V2_BPS` sets the blocks per multiprocessor instead, for
            // tuning: more than fit makes waves of shorter blocks.)
            let per_sm = self.k_v2_bps.unwrap_or_else(|| {
                func.occupancy_max_active_blocks_per_multiprocessor(
                    (v.warps * 32) as u32,
                    *smem,
                    None,
                )
                .map(|b| b as usize)
                .unwrap_or(1)
            });
            let fill = (self.sm_count * per_sm.max(1) / m.slots).max(1);
            let blocks_x = total.div_ceil(v.warps).min(fill);
            let cfg = LaunchConfig {
                grid_dim: (blocks_x as u32, m.slots as u32, 1),
                block_dim: ((v.warps * 32) as u32, 1, 1),
                shared_mem_bytes: *smem as u32,
            };
            tracing::trace!("matvec {} via {}", m.ty.name(), v.name());
            let stride = m.w_slot_stride as i64;
            let x_group = m.x_group as i32;
            // The fast form has no row counters: it takes RouteArgs there.
            let ctr = if v.rows == 0 {
                self.k_v2_counters(m.w, m.slots)
            } else {
                0
            };
            let route = match experts {
                ExpertIds::AfterWait => RouteArgsDev::default(),
                ExpertIds::Early => RouteArgsDev {
                    ids_early: 1,
                    ..Default::default()
                },
                ExpertIds::Choose(r) => RouteArgsDev {
                    logits: r.logits,
                    bias: r.bias,
                    tid2eid: r.tid2eid,
                    tok: r.tok,
                    ids_out: m.ids,
                    wts: r.wts,
                    ne: r.ne as i32,
                    k: r.k as i32,
                    norm: i32::from(r.norm),
                    wscale: r.wscale,
                    ids_early: 0,
                },
            };
            let mut b = KernelArgs::new();
            b.arg(&sg)
                .arg(&stride)
                .arg(&m.ids)
                .arg(&act.qs.ptr)
                .arg(&act.d.ptr)
                .arg(&act.bsums.ptr)
                .arg(&x_group);
            if v.rows == 0 {
                b.arg(&ctr);
            } else {
                b.arg(&route);
            }
            // SAFETY: matches `MV_K_V2` / `MV_K_V2F`; shapes checked above (one token,
            // K = 2048·PPL, rows and activation rows 16-byte multiples, bases aligned);
            // routed slots PDL_WAIT before reading the ids (or read them early only as
            // `ExpertIds::Early` allows); a choosing launch has a thread an expert
            // (routed_fast) and k = slots <= 64 ids / weights to write; `ctr` is null or
            // 2·slots zeroed u32 that only launches of this tensor use (and leave zeroed).
            unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
            return Ok(());
        }
        if special_ids {
            // Any other kernel would read the ids after its wait, or never choose them.
            return Err(shape_err(format!(
                "{experts:?}: the mv2f kernel does not take this product (alignment)"
            )));
        }
        if k_aligned
            && let Some((func, rows_per_warp)) =
                self.k_regs_kernel(m.ty, m.k / 2048, total, m.slots)
        {
            let cfg = regs_launch_cfg(total, rows_per_warp, m.slots);
            let stride = m.w_slot_stride as i64;
            let x_group = m.x_group as i32;
            let mut b = KernelArgs::new();
            b.arg(&sg)
                .arg(&stride)
                .arg(&m.ids)
                .arg(&act.qs.ptr)
                .arg(&act.d.ptr)
                .arg(&act.bsums.ptr)
                .arg(&ntok)
                .arg(&x_group);
            // SAFETY: matches `MV_K_REGS`; shapes checked above (K = 2048·PPL, so rows
            // and activation rows are 16-byte multiples; bases aligned); routed slots
            // PDL_WAIT first.
            unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
            return Ok(());
        }
        if !m.k.is_multiple_of(be) {
            return Err(shape_err(format!(
                "{} row of {} elements: must be whole blocks of {be}",
                m.ty.name(),
                m.k
            )));
        }
        // Rows per warp step: short rows go in groups of up to 4 (~4 KB staged at a time);
        // every matrix's row count must divide into whole groups.
        let mut rpw = 1usize;
        while rpw < self.max_rpw
            && rb.is_multiple_of(16)
            && rb * rpw * 2 <= MV_GROUP_BYTES
            && std::iter::once(m.rows)
                .chain(extra.iter().map(|s| s.rows))
                .all(|r| r.is_multiple_of(rpw * 2))
        {
            rpw *= 2;
        }
        let smem = MV_WARPS * 2 * (rb * rpw).div_ceil(16) * 16;
        if smem > SMEM_LIMIT {
            return Err(shape_err(format!(
                "{} row of {} elements needs {smem} bytes of shared memory",
                m.ty.name(),
                m.k
            )));
        }
        // Exactly one wave of resident blocks; warps then walk the remaining rows. (A
        // grid past the resident count leaves a partial second wave running at a
        // fraction of the GPU: 1.33 waves cost ~2 waves of time.)
        let per_sm = func
            .occupancy_max_active_blocks_per_multiprocessor((MV_WARPS * 32) as u32, smem, None)
            .map(|b| b as usize)
            .unwrap_or(SMEM_PER_SM / smem)
            .clamp(1, MAX_BLOCKS_PER_SM);
        let fill = (self.sm_count * per_sm).div_ceil(m.slots);
        let blocks_x = (total / rpw).div_ceil(MV_WARPS).min(fill.max(1));
        let cfg = LaunchConfig {
            grid_dim: (blocks_x as u32, m.slots as u32, 1),
            block_dim: ((MV_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let stride = m.w_slot_stride as i64;
        let x_group = m.x_group as i32;
        let rpw_i = rpw as i32;
        let bsums = if act.kind == ActKind::Q8K {
            act.bsums.ptr
        } else {
            0u64
        };
        let mut b = KernelArgs::new();
        b.arg(&sg)
            .arg(&stride)
            .arg(&m.ids)
            .arg(&act.qs.ptr)
            .arg(&act.d.ptr)
            .arg(&bsums)
            .arg(&k)
            .arg(&ntok)
            .arg(&x_group)
            .arg(&rpw_i);
        // SAFETY: matches the MV_KERNEL signature; shapes checked above; PDL_WAIT first.
        unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
        Ok(())
    }

    /// The two products of `p` as one launch (`mv_pair_*`) when the separate launches
    /// ([`Self::matvec_segs`] of each part) would run the register-streaming kernels of
    /// a compiled pair: the same bodies, so the same results. Ok(false) (nothing
    /// launched) otherwise, and the caller runs the two products.
    pub fn matvec_pair(&self, stream: &Arc<CudaStream>, p: &MvPair) -> Result<bool> {
        let act = p.act;
        let aligned = p
            .f16
            .iter()
            .map(|s| s.w)
            .chain([p.x])
            .all(|v| v.is_multiple_of(16));
        let parts_ok = |segs: &[MvSeg]| {
            !segs.is_empty()
                && segs.len() <= MV_MAX_SEGS
                && segs.iter().all(|s| s.rows > 0 && s.ldy >= s.rows)
        };
        if p.ntok == 0
            || p.ntok > act.rows
            || act.kind != ActKind::Q8_0
            || act.k != p.k
            || !p.k.is_multiple_of(512)
            || p.k > F16_MAX_K
            || !aligned
            || !parts_ok(p.q8)
            || !parts_ok(p.f16)
        {
            return Ok(false);
        }
        let q8_rows: usize = p.q8.iter().map(|s| s.rows).sum();
        let f16_rows: usize = p.f16.iter().map(|s| s.rows).sum();
        let Some((_, q8_rpw)) = self.q8_0_regs_kernel(p.k / 512, q8_rows, 1) else {
            return Ok(false);
        };
        let q8_v = (p.k / 512, q8_rpw * (p.k / 512));
        let Some((f16_v, _)) = self.f16_regs_kernel(p.k, f16_rows, None) else {
            return Ok(false);
        };
        let Some((_, _, func)) = self
            .mv_pair
            .iter()
            .find(|(q, f, _)| *q == q8_v && *f == f16_v)
        else {
            return Ok(false);
        };
        let (q8_sg, f16_sg) = (
            seg_table("matvec pair", p.q8)?,
            seg_table("matvec pair", p.f16)?,
        );
        let n_q8 = q8_rows.div_ceil(MV_WARPS * q8_rpw);
        let n_f16 = f16_rows.div_ceil(f16_v.rows_per_block());
        let cfg = LaunchConfig {
            grid_dim: ((n_q8 + n_f16) as u32, 1, 1),
            block_dim: ((MV_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ntok, n_q8) = (p.ntok as i32, n_q8 as i32);
        let mut b = KernelArgs::new();
        b.arg(&q8_sg)
            .arg(&act.qs.ptr)
            .arg(&act.d.ptr)
            .arg(&f16_sg)
            .arg(&p.x)
            .arg(&ntok)
            .arg(&n_q8);
        // SAFETY: matches `MV_PAIR`; checked above: K = 512·PPL = 256·ppl·split (so rows
        // are 16-byte multiples), at most MV_MAX_SEGS matrices a part, the Q8_0 copy has
        // K and the tokens, the F16 matrices and input are 16-byte aligned; both bodies
        // PDL_WAIT before reading the inputs or writing.
        unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
        Ok(true)
    }

    /// The register-streaming F16 kernel for rows of `k` elements: `want` when given,
    /// else the first matching `DS4_MV_F16_V` entry, else [`pick_f16_variant`]. None
    /// when no compiled variant takes this K (tiny models) or the kernels are off.
    fn f16_regs_kernel(
        &self,
        k: usize,
        total_rows: usize,
        want: Option<F16Variant>,
    ) -> Option<(F16Variant, &CudaFunction)> {
        let find = |v: F16Variant| {
            self.mv_f16_regs
                .iter()
                .find(|c| c.variant == v && v.k() == k)
                .map(|c| (c.variant, &c.func))
        };
        if let Some(v) = want {
            return find(v);
        }
        if let Some(f) = self.f16_forced.iter().find(|f| f.matches(k, total_rows)) {
            return find(f.variant);
        }
        let compiled: Vec<(F16Variant, usize)> = self
            .mv_f16_regs
            .iter()
            .map(|c| (c.variant, c.resident))
            .collect();
        pick_f16_variant(&compiled, k, total_rows, self.sm_count).and_then(find)
    }

    /// Launches `mv_f16_p*_r*_s*` over the `total` rows of `sg` (x: f32 rows of K).
    #[allow(clippy::too_many_arguments)]
    fn launch_f16_regs(
        &self,
        stream: &Arc<CudaStream>,
        v: F16Variant,
        func: &CudaFunction,
        sg: &MvSegsArg,
        x: u64,
        total: usize,
        ntok: i32,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(v.rows_per_block()) as u32, 1, 1),
            block_dim: ((MV_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = KernelArgs::new();
        b.arg(sg).arg(&x).arg(&ntok);
        // SAFETY: matches `MV_F16_REGS`; the caller checked K = 256·ppl·split, one slot,
        // 16-byte aligned matrices and input; the kernel waits (PDL_WAIT) before it
        // reads the input or writes.
        unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
        Ok(())
    }

    /// Forces the TMA Q8_0 products on (any size) or off, or back to the default (None).
    pub fn force_tma(&self, on: Option<bool>) {
        let v = match on {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.tma_forced
            .store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the TMA kernels should be there: sm_90 or newer and `DS4_MV_TMA` on.
    pub fn tma_expected(&self) -> bool {
        self.tma_expected
    }

    /// Whether a TMA Q8_0 kernel is compiled for rows of `k`.
    pub fn has_tma(&self, k: usize) -> bool {
        self.tma_kernel(k).is_some()
    }

    /// The TMA Q8_0 kernel for rows of `k` and its rows per stage, if compiled.
    fn tma_kernel(&self, k: usize) -> Option<(usize, &CudaFunction)> {
        if !k.is_multiple_of(512) {
            return None;
        }
        self.mv_q8_tma
            .iter()
            .find(|((ppl, _), _)| *ppl == k / 512)
            .map(|((_, sr), f)| (*sr, f))
    }

    /// A decode Q8_0 product through `mv_q8_0_tma_*` when it takes this shape (one
    /// token, no expert ids; one matrix with its slots contiguous, each with its own
    /// activation row, big enough, or `mv_q8_0_tma_segs_*` for several matrices of one
    /// input); false to leave it to the other kernels.
    #[allow(clippy::too_many_arguments)]
    fn try_q8_tma(
        &self,
        stream: &Arc<CudaStream>,
        m: &Matvec,
        sg: &MvSegsArg,
        n_segs: usize,
        rb: usize,
        act: &ActBuf,
        q8_out: Option<&ActBuf>,
        split: Option<&HcSplitJob>,
    ) -> Result<bool> {
        let forced = self.tma_forced.load(std::sync::atomic::Ordering::Relaxed);
        if forced == 1 {
            return Ok(false);
        }
        if split.is_some() && !self.tma_waiter {
            return Err(Error::Shape {
                what: "matvec",
                detail: "an HC split given to a TMA product without a waiting warp".into(),
            });
        }
        // Several matrices of one input (`mv_q8_0_tma_segs_*`): one slot, no quantized
        // copy, every matrix start a multiple of the stage rows, the bytes in the
        // `DS4_MV_TMA_SEG_MB` range; one matrix: its slots contiguous, big enough.
        let segs = n_segs > 1;
        let kernel = if segs {
            self.mv_q8_tma_segs
                .iter()
                .find(|((ppl, _), _)| m.k.is_multiple_of(512) && *ppl == m.k / 512)
                .map(|((_, sr), f)| (*sr, f))
        } else {
            self.tma_kernel(m.k)
        };
        let Some((sr, func)) = kernel else {
            return Ok(false);
        };
        // Non-negative: seg_table made the starts from usizes.
        let total = if segs {
            sg.start[n_segs] as usize
        } else {
            m.rows * m.slots
        };
        let shaped = m.ntok == 1
            && m.ids == 0
            && m.x_group == 1
            && sg.w.iter().take(n_segs).all(|w| w.is_multiple_of(16))
            && act.qs.ptr.is_multiple_of(16)
            && if segs {
                m.slots == 1
                    && q8_out.is_none()
                    && (0..=n_segs).all(|i| (sg.start[i] as usize).is_multiple_of(sr))
            } else {
                (m.slots == 1 || m.w_slot_stride as usize == m.rows * rb)
                    && m.rows.is_multiple_of(sr)
            };
        let big = if segs {
            let (lo, hi) = self.tma_seg_bytes;
            (lo..hi).contains(&(total * rb))
        } else {
            total * rb >= self.tma_min_bytes
        };
        if !shaped || (forced != 2 && !big) {
            return Ok(false);
        }
        let budget = match self.tma_smem.iter().find(|(k, _)| *k == 0 || *k == m.k) {
            _ if segs => self.tma_seg_smem,
            Some(&(_, b)) => b,
            None if forced == 2 => 200 * 1024,
            None => return Ok(false),
        };
        let warps = if segs {
            TMA_DEFAULT_WARPS
        } else {
            self.tma_warps
                .iter()
                .find(|(k, _)| *k == 0 || *k == m.k)
                .map_or(TMA_DEFAULT_WARPS, |&(_, w)| w)
                // The K = 8192 kernel is compiled for 8 warps (its registers).
                .min(if m.k >= 8192 { 8 } else { TMA_WARPS })
        };
        let Some(plan) = plan_tma(
            total,
            rb,
            sr,
            self.sm_count.min(self.tma_blocks),
            budget,
            warps,
        ) else {
            return Ok(false);
        };
        // The Q8_0 copy of the output: a block's rows whole 32-blocks of it, a warp's
        // values one a lane, the output rows contiguous.
        let (qout, dout) = match q8_out {
            None => (0u64, 0u64),
            Some(q) => {
                let fits = q.kind == ActKind::Q8_0
                    && q.k == total
                    && q.rows >= 1
                    && plan.rpw <= 32
                    && (plan.warps * plan.rpw).is_multiple_of(32)
                    && total.is_multiple_of(32)
                    && sg.ldy[0] as usize == m.rows;
                if !fits {
                    return Ok(false);
                }
                (q.qs.ptr, q.d.ptr)
            }
        };
        let waiter = i32::from(self.tma_waiter);
        let split = split.copied().unwrap_or_default();
        let cfg = LaunchConfig {
            grid_dim: (plan.blocks as u32, 1, 1),
            block_dim: ((plan.warps + waiter as usize) as u32 * 32, 1, 1),
            shared_mem_bytes: plan.smem as u32,
        };
        // Several matrices: one slot of all their rows (the kernel's slot index stays 0).
        let (rows, total, rpw, nbuf) = (
            if segs { total } else { m.rows } as i32,
            total as i32,
            plan.rpw as i32,
            plan.nbuf as i32,
        );
        let mut b = KernelArgs::new();
        b.arg(sg)
            .arg(&rows)
            .arg(&total)
            .arg(&rpw)
            .arg(&nbuf)
            .arg(&self.tma_depth)
            .arg(&act.qs.ptr)
            .arg(&act.d.ptr)
            .arg(&waiter)
            .arg(&qout)
            .arg(&dout)
            .arg(&split);
        // SAFETY: matches `MV_Q8_TMA_K`; checked above: K = 512·PPL (rows are 16-byte
        // multiples, as the TMA copies need), 16-byte aligned matrices, slots contiguous
        // (one matrix) or one slot with every matrix starting at a multiple of SR rows
        // (several), rows and rpw multiples of SR, the ring within the shared memory
        // given, a Q8_0 copy (one matrix only) of `total` values in whole 32-blocks; the
        // kernel waits (PDL_WAIT) before it reads the activation or writes.
        unsafe { crate::launch::launch(stream, func, cfg, &mut b, self.pdl) }?;
        Ok(true)
    }

    /// The register-streaming Q8_0 kernel for rows of 512·`ppl` elements and the rows
    /// each warp takes: the most loads in flight per lane that still leave ≥ 2 blocks
    /// per multiprocessor (small matrices spread over every SM instead).
    fn q8_0_regs_kernel(
        &self,
        ppl: usize,
        total_rows: usize,
        slots: usize,
    ) -> Option<(&CudaFunction, usize)> {
        let mut pick = None;
        for nl in [4usize, 8, 16] {
            let Some((_, f)) = self.mv_q8_0_regs.iter().find(|(v, _)| *v == (ppl, nl)) else {
                continue;
            };
            let rows_per_warp = nl / ppl;
            let blocks = total_rows.div_ceil(MV_WARPS * rows_per_warp) * slots;
            if pick.is_none() || blocks >= 2 * self.sm_count {
                pick = Some((f, rows_per_warp));
            }
        }
        pick
    }

    /// The version-2 decode kernel for `ty` rows of 2048·`ppl` elements: the one the
    /// selftest forces, else the environment's (or default) pick, if compiled.
    fn k_v2_kernel(&self, ty: GgmlType, ppl: usize) -> Option<&(KV2Variant, CudaFunction, usize)> {
        let forced = self.k_v2_forced.load(std::sync::atomic::Ordering::Relaxed);
        if forced == usize::MAX {
            return None;
        }
        if forced > 0 {
            return self
                .mv_k_v2
                .get(forced - 1)
                .filter(|(v, _, _)| v.ty == ty && v.ppl == ppl);
        }
        let iq2 = ty == GgmlType::IQ2_XXS;
        let dyn_rows = self.k_v2_dyn
            || self
                .k_v2_dyn_forced
                .load(std::sync::atomic::Ordering::Relaxed);
        if self.k_v2_pick.fast && !dyn_rows {
            let (rows, nst, math, warps) = if iq2 {
                self.k_v2_pick.iq2_fast
            } else {
                self.k_v2_pick.q2k_fast
            };
            let want = KV2Variant::fast(ty, ppl, rows, nst, math, warps);
            if let Some(found) = self.mv_k_v2.iter().find(|(v, _, _)| *v == want) {
                return Some(found);
            }
        }
        let (nst, math, warps) = if iq2 {
            self.k_v2_pick.iq2
        } else {
            self.k_v2_pick.q2k
        };
        self.mv_k_v2
            .iter()
            .find(|(v, _, _)| *v == KV2Variant::new(ty, ppl, nst, math, warps))
    }

    /// The row counters of a version-2 launch over weight tensor `w` (first segment)
    /// and `slots` slots, or 0 (static rows) when counters are off or none is free.
    fn k_v2_counters(&self, w: u64, slots: usize) -> u64 {
        let on = self.k_v2_dyn
            || self
                .k_v2_dyn_forced
                .load(std::sync::atomic::Ordering::Relaxed);
        if !on || slots > K_V2_CTR_SLOTS {
            return 0;
        }
        let Ok(mut sites) = self.k_v2_sites.lock() else {
            return 0;
        };
        let site = match sites.iter().position(|&t| t == w) {
            Some(i) => i,
            None if sites.len() < K_V2_SITES => {
                sites.push(w);
                sites.len() - 1
            }
            None => return 0,
        };
        self.k_v2_ctr.ptr + (site * K_V2_CTR_SLOTS * 8) as u64
    }

    /// Forces the row counters of the version-2 kernels on (selftest), or back to
    /// `DS4_MV_K_V2_DYN`.
    pub fn force_k_v2_dyn(&self, on: bool) {
        self.k_v2_dyn_forced
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The compiled version-2 variants (empty when `DS4_MV_K_V2=0`).
    pub fn k_v2_variants(&self) -> Vec<KV2Variant> {
        self.mv_k_v2.iter().map(|(v, _, _)| *v).collect()
    }

    /// Forces the version-2 kernel choice (selftest, bench); a variant that was not
    /// compiled counts as `Off`.
    pub fn force_k_v2(&self, f: KV2Force) {
        let idx = match f {
            KV2Force::Env => 0,
            KV2Force::Off => usize::MAX,
            KV2Force::Variant(v) => self
                .mv_k_v2
                .iter()
                .position(|(w, _, _)| *w == v)
                .map_or(usize::MAX, |i| i + 1),
        };
        self.k_v2_forced
            .store(idx, std::sync::atomic::Ordering::Relaxed);
    }

    /// The register-streaming IQ2_XXS / Q2_K kernel for rows of 2048·`ppl` elements and
    /// the rows each warp takes: the most with ≤ 4 pieces per lane (those fit 168
    /// registers without spills, so ≥ 3 blocks stay resident per multiprocessor) that
    /// still leave ≥ 2 blocks per multiprocessor, or `DS4_MV_REGS_K_R` where that
    /// variant exists.
    fn k_regs_kernel(
        &self,
        ty: GgmlType,
        ppl: usize,
        total_rows: usize,
        slots: usize,
    ) -> Option<(&CudaFunction, usize)> {
        let variant = |r: usize| {
            self.mv_k_regs
                .iter()
                .find(|(v, _)| *v == (ty, ppl, r))
                .map(|(_, f)| (f, r))
        };
        if let Some(forced) = self.k_regs_rows.and_then(variant) {
            return Some(forced);
        }
        let mut pick = None;
        for r in [1usize, 2, 4] {
            let Some(v) = variant(r) else {
                continue;
            };
            if pick.is_some() && ppl * r > 4 {
                break;
            }
            let blocks = total_rows.div_ceil(MV_WARPS * r) * slots;
            if pick.is_none() || blocks >= 2 * self.sm_count {
                pick = Some(v);
            }
        }
        pick
    }

    /// Fills `n_blocks` blocks of `ty` at `p` (rows of `k` elements) with random codes and
    /// small positive scales, in the layout the kernels read (`crate::layout`).
    pub fn synth_weights(
        &self,
        ty: GgmlType,
        p: u64,
        n_blocks: u64,
        k: usize,
        seed: u64,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (132 * 8, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        if ty == GgmlType::F16 {
            let n = n_blocks as i64;
            let scale = 0.05f32;
            let mut b = self.stream.launch_builder(&self.synth_f16);
            b.arg(&p).arg(&n).arg(&scale).arg(&seed);
            // SAFETY: matches `synth_f16`.
            unsafe { b.launch(cfg) }?;
            return Ok(());
        }
        let (f0, f1): (i32, i32) = match ty {
            GgmlType::Q8_0 | GgmlType::IQ2_XXS => (0, -1),
            GgmlType::Q4_K => (0, 2),
            GgmlType::Q2_K => (80, 82),
            other => return Err(Error::Unsupported(other)),
        };
        let nb = n_blocks as i64;
        let bb = ty.block_bytes() as i32;
        // Rearranged types (`crate::layout`) keep their scales after the row's codes: the
        // kernel needs the row length to find them.
        let row_k: i32 = if crate::layout::is_rearranged(ty) {
            let be = ty.block_elems() as usize;
            if k == 0 || !k.is_multiple_of(be) || !n_blocks.is_multiple_of((k / be) as u64) {
                return Err(Error::Shape {
                    what: "synthetic weights",
                    detail: format!(
                        "{n_blocks} blocks of {} are not whole rows of {k} elements",
                        ty.name()
                    ),
                });
            }
            i32::try_from(k).map_err(|_| Error::Shape {
                what: "synthetic weights",
                detail: format!("row of {k} elements"),
            })?
        } else {
            0
        };
        let mut b = self.stream.launch_builder(&self.synth_blocks);
        b.arg(&p).arg(&nb).arg(&bb).arg(&f0).arg(&f1).arg(&seed);
        // SAFETY: matches `synth_blocks`; it writes the n_blocks blocks at p.
        unsafe { b.launch(cfg) }?;
        let mut b = self.stream.launch_builder(&self.synth_scales);
        b.arg(&p)
            .arg(&nb)
            .arg(&bb)
            .arg(&f0)
            .arg(&f1)
            .arg(&seed)
            .arg(&row_k);
        // SAFETY: matches `synth_scales`; row_k > 0 only for whole rows (checked above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Fills `n` f32 at `p` uniformly in [-scale, scale).
    pub fn synth_f32(&self, p: u64, n: u64, scale: f32, seed: u64) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (132 * 4, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = n as i64;
        let mut b = self.stream.launch_builder(&self.synth_f32);
        b.arg(&p).arg(&n).arg(&scale).arg(&seed);
        // SAFETY: matches `synth_f32`.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// Bytes of `rows` rows of `k` elements of `ty`.
pub fn matrix_bytes(ty: GgmlType, k: usize, rows: usize) -> usize {
    row_bytes(ty, k) * rows
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tma_plans_of_the_flash_products() {
        // q_b: 32768 rows of K 1024 (1088 B), stages of 4 rows, 200 KB a block.
        let p = plan_tma(32768, 1088, 4, 132, 200 * 1024, 8).unwrap();
        assert_eq!((p.rpw, p.blocks, p.nbuf), (32, 128, 5));
        assert_eq!(p.smem, TMA_HEAD + 8 * 5 * 4 * 1088);
        // attn_output_a: 8 x 1024 rows of K 4096 (4352 B), a row a stage.
        let p = plan_tma(8192, 4352, 1, 132, 200 * 1024, 8).unwrap();
        assert_eq!((p.rpw, p.blocks, p.nbuf), (8, 128, 5));
        // attn_output_b: 4096 rows of K 8192: two stages of a row fit, 4 rows a warp.
        let p = plan_tma(4096, 8704, 1, 132, 200 * 1024, 8).unwrap();
        assert_eq!((p.rpw, p.blocks, p.nbuf), (4, 128, 2));
        assert!(p.smem <= 200 * 1024 && p.blocks * 8 * p.rpw >= 4096);
    }

    #[test]
    fn tma_plans_of_short_matrices_and_small_budgets() {
        // Fewer rows than warps: one row a warp, a ring of one stage.
        let p = plan_tma(40, 4352, 1, 132, 200 * 1024, 8).unwrap();
        assert_eq!((p.rpw, p.blocks, p.nbuf), (1, 5, 1));
        // rpw rounds up to whole stages.
        let p = plan_tma(108, 1088, 4, 132, 200 * 1024, 8).unwrap();
        assert_eq!((p.rpw, p.blocks), (4, 4));
        // A budget below two stages a warp (several stages to stream) is refused,
        // and so is one below a single stage.
        assert_eq!(plan_tma(4096, 8704, 1, 132, 100 * 1024, 8), None);
        assert_eq!(plan_tma(40, 8704, 1, 132, 8 * 1024, 8), None);
        assert_eq!(plan_tma(0, 1088, 4, 132, 200 * 1024, 8), None);
        // Never more than the hardware gives a block.
        let p = plan_tma(1 << 20, 1088, 4, 132, 1 << 30, 8).unwrap();
        assert!(p.smem <= TMA_SMEM_MAX && p.nbuf <= TMA_MAX_BUF);
    }

    #[test]
    fn several_matrix_tma_range() {
        // Default: q_a + kv (1536 rows of 4352 B, 6.7 MB) in, gate + up (17.8 MB) out.
        let (lo, hi) = parse_mb_range(None);
        assert!((lo..hi).contains(&(1536 * 4352)) && !(lo..hi).contains(&(4096 * 4352)));
        assert_eq!(parse_mb_range(Some("8")), (8 << 20, usize::MAX));
        assert_eq!(parse_mb_range(Some(" 2 , 20 ")), (2 << 20, 20 << 20));
        let (lo, hi) = parse_mb_range(Some("off"));
        assert!((lo..hi).is_empty());
        // q_a + kv: two rows a warp on 96 blocks, both rows in the ring.
        let p = plan_tma(1536, 4352, 1, 132, 200 * 1024, 8).unwrap();
        assert_eq!((p.rpw, p.blocks, p.nbuf), (2, 96, 2));
    }

    #[test]
    fn hc_split_job_matches_the_kernel_struct() {
        // hc_split.cuh's HcSplitJob: five pointers, three ints, two floats, 8-aligned.
        assert_eq!(std::mem::size_of::<HcSplitJob>(), 64);
        assert_eq!(std::mem::align_of::<HcSplitJob>(), 8);
    }

    #[test]
    fn tma_plans_with_fewer_warps() {
        // attn_output_a on 2 warps a block: 32 rows a warp, the ring capped at 16 stages.
        let p = plan_tma(8192, 4352, 1, 132, 200 * 1024, 2).unwrap();
        assert_eq!((p.rpw, p.blocks, p.nbuf, p.warps), (32, 128, 16, 2));
        assert_eq!(plan_tma(8192, 4352, 1, 132, 200 * 1024, 0), None);
        assert_eq!(plan_tma(8192, 4352, 1, 132, 200 * 1024, 17), None);
    }

    #[test]
    fn tma_budget_spec() {
        assert_eq!(parse_tma_kb(None), vec![(0, 200 * 1024)]);
        assert_eq!(parse_tma_kb(Some("150")), vec![(0, 150 * 1024)]);
        assert_eq!(
            parse_tma_kb(Some("1024:180, 8192:100,bad,4096:x")),
            vec![(1024, 180 * 1024), (8192, 100 * 1024)]
        );
    }

    const H100_SMS: usize = 132;

    fn v(ppl: usize, rows: usize, split: usize) -> F16Variant {
        F16Variant::new(ppl, rows, split)
    }

    fn all_resident(n: usize) -> Vec<(F16Variant, usize)> {
        F16_REGS_VARIANTS.iter().map(|&x| (x, n)).collect()
    }

    #[test]
    fn f16_variant_spec_parses_only_whole_triples() {
        assert_eq!(F16Variant::parse("16x1x1"), Some(v(16, 1, 1)));
        assert_eq!(F16Variant::parse(" 4x4x1 "), Some(v(4, 4, 1)));
        assert_eq!(F16Variant::parse("16x1"), None);
        assert_eq!(F16Variant::parse("16x1x1x1"), None);
        assert_eq!(F16Variant::parse("ax1x1"), None);
        assert_eq!(F16Variant::parse(""), None);
    }

    #[test]
    fn f16_forces_parse_and_match_by_k_then_rows() {
        let f = parse_f16_forces("4x1x4@256, 16x1x1 ,9x9x9,8x1x2@x,4x4x1");
        assert_eq!(
            f,
            vec![
                F16Force {
                    variant: v(4, 1, 4),
                    rows: Some(256)
                },
                F16Force {
                    variant: v(16, 1, 1),
                    rows: None
                },
                F16Force {
                    variant: v(4, 4, 1),
                    rows: None
                },
            ]
        );
        let first = |k, rows| f.iter().find(|x| x.matches(k, rows)).map(|x| x.variant);
        assert_eq!(first(4096, 256), Some(v(4, 1, 4)));
        assert_eq!(first(4096, 2048), Some(v(16, 1, 1)));
        assert_eq!(first(1024, 8192), Some(v(4, 4, 1)));
        assert_eq!(first(2048, 256), None);
    }

    #[test]
    fn every_f16_variant_is_instantiated_and_fits_a_block() {
        let src = include_str!("../kernels/matvec.cu");
        for x in F16_REGS_VARIANTS {
            let inst = format!("MV_F16_REGS({}, {}, {})", x.ppl, x.rows, x.split);
            assert!(src.contains(&inst), "{inst} missing from matvec.cu");
            assert!(MV_WARPS.is_multiple_of(x.split), "{x:?}");
            assert!([1024, 4096].contains(&x.k()), "{x:?}");
        }
    }

    #[test]
    fn every_pair_is_instantiated_from_compiled_bodies() {
        let src = include_str!("../kernels/matvec.cu");
        for ((ppl, nl), f) in MV_PAIR_VARIANTS {
            let inst = format!("MV_PAIR({ppl}, {nl}, {}, {}, {})", f.ppl, f.rows, f.split);
            assert!(src.contains(&inst), "{inst} missing from matvec.cu");
            // The separate launches must have the same bodies compiled, at one K.
            assert!(Q8_REGS_VARIANTS.contains(&(ppl, nl)), "{inst}");
            assert!(F16_REGS_VARIANTS.contains(&f), "{inst}");
            assert_eq!(512 * ppl, f.k(), "{inst}");
        }
        // Flash's indexer q_b takes the pair's F16 body by default (8192 rows of K 1024).
        let pick = pick_f16_variant(&all_resident(4), 1024, 8192, H100_SMS);
        assert_eq!(pick, Some(MV_PAIR_VARIANTS[0].1));
    }

    #[test]
    fn f16_variants_of_a_k_go_most_pieces_first() {
        for k in [1024, 4096] {
            let p: Vec<usize> = F16_REGS_VARIANTS
                .iter()
                .filter(|x| x.k() == k)
                .map(|x| x.pieces())
                .collect();
            assert!(p.windows(2).all(|w| w[0] >= w[1]), "K {k}: {p:?}");
        }
    }

    #[test]
    fn f16_default_pick_at_flash_shapes() {
        let c = all_resident(4);
        let pick = |k, rows| pick_f16_variant(&c, k, rows, H100_SMS);
        // 2048 rows: 512 blocks of 16 pieces per lane and 4 rows per warp = one wave.
        assert_eq!(pick(4096, 2048), Some(v(4, 4, 4)));
        // CSA layer (compressor kv + gate, indexer compressor kv + gate, indexer proj):
        // no variant is one wave; 16 pieces per lane in 656 blocks (1.24 waves).
        assert_eq!(pick(4096, 2624), Some(v(4, 4, 4)));
        // HCA compressor pair: 16 pieces per lane would leave < 2 blocks per SM.
        assert_eq!(pick(4096, 1024), Some(v(4, 2, 4)));
        assert_eq!(pick(4096, 512), Some(v(4, 1, 4)));
        // Router: no variant reaches 2 blocks per SM; the most blocks wins.
        assert_eq!(pick(4096, 256), Some(v(4, 1, 4)));
        // Indexer q_b: 512 blocks of 8 rows per warp.
        assert_eq!(pick(1024, 8192), Some(v(2, 8, 2)));
        // No variant of this K (tiny models keep the old kernels).
        assert_eq!(pick(2048, 4096), None);
        assert_eq!(pick(256, 64), None);
    }

    #[test]
    fn f16_default_pick_keeps_one_wave() {
        // 4x4x4 at 3 resident blocks: its 512 blocks would be 1.3 waves; 8x2x2 (also
        // 16 pieces per lane, 4 resident) is one.
        let c: Vec<_> = all_resident(4)
            .into_iter()
            .map(|(x, r)| (x, if x == v(4, 4, 4) { 3 } else { r }))
            .collect();
        assert_eq!(pick_f16_variant(&c, 4096, 2048, H100_SMS), Some(v(8, 2, 2)));
        // 384 blocks: one wave at 3 resident.
        assert_eq!(pick_f16_variant(&c, 4096, 1536, H100_SMS), Some(v(4, 4, 4)));
        // Without any one-wave variant: the most preferred with ≥ 2 blocks/SM.
        let c = all_resident(1);
        assert_eq!(pick_f16_variant(&c, 4096, 2048, H100_SMS), Some(v(4, 4, 4)));
    }
}
