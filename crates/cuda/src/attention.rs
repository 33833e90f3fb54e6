//! Attention with sinks on the tensor cores (`kernels/attention.cu`).
//!
//! One CTA takes 16·MT query heads of one token and reads each 32-key tile once
//! for all of them (MQA: one KV head, K = V). Scores and the weighted sum run as
//! f16 `mma.sync` with every f32 operand split into hi + lo halves (three
//! products), the softmax in f32, so results stay within f32 rounding of the
//! SIMT kernels in `ops.cu` (which remain the fallback for other shapes).
//!
//! * Chunks (more than [`SPLIT_MAX_TOKENS`] tokens): one CTA per token (and head
//!   group), the output written directly.
//! * Decode (few tokens): the token's keys are split over many CTAs of 32 keys
//!   (flash-decoding); each writes a partial (max, sum, unnormalised output) to
//!   the caller's scratch and `att_combine` merges them with the sink. On sm_90+
//!   (up to [`CLUSTER_MAX_KEYS`] keys: one tile per CTA) the decode kernel runs
//!   instead as a thread-block cluster of [`CLUSTER`] CTAs per 16 heads that
//!   merges its partials in distributed shared memory: one launch, no scratch.
//!   `DS4_CUDA_ATTN=split` keeps the split + combine path (A/B timing);
//!   `DS4_CUDA_ATTN_CLUSTER_KEYS=N` moves the key bound.
//! * The split decode kernels are `att_sd_<KT>_<HD>`: P fragments loaded once per
//!   tile, and 16-key tiles (twice the CTAs, half the loads and MMAs each) where the
//!   grid stays within [`SD16_MAX_CTAS`] CTAs (window-only and ratio-128 layers).
//!   `DS4_ATTN_SD=0` restores the `att_tc_1_<HD>` split kernel with 32-key splits,
//!   `DS4_ATTN_SD16_CTAS=N` moves the CTA bound (0: 32-key tiles always). At head dim
//!   512 the decode kernels are `att_sq_<KT>_512`, the same with the queries in
//!   registers (`DS4_ATTN_SD_QREG=0`: `att_sd`); `DS4_ATTN_SD_WARPS=8` runs them on
//!   8 warps (`att_sq8_<KT>_512`, 256 threads, each warp twice the dims).
//!
//! The first position is read on the device (`pos`), so grids are sized from
//! host-known upper bounds ([`max_keys`]) and surplus CTAs exit: launches never
//! allocate or synchronise, and can be captured in a CUDA graph.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use crate::compile;
use crate::launch::{KernelArgs, env_switch, launch, pdl_enabled};
use crate::runtime::CudaRuntime;
use crate::{Error, Result};

/// Token counts up to this use the split-keys (decode) path.
pub const SPLIT_MAX_TOKENS: usize = 8;
/// Keys per tile (`AT_KT`) and per decode split.
const KEY_TILE: usize = 32;
/// Threads per CTA (`AT_THREADS`).
const THREADS: u32 = 512;
/// Warps per CTA (`AT_WARPS`).
const WARPS: usize = 16;
/// Most splits `att_combine` merges (its shared weight array).
const MAX_SPLITS: usize = 1024;
/// CTAs per cluster of the sm_90 decode kernels (`AT_CL`).
pub const CLUSTER: usize = 8;
/// Decode launches with more keys than this use split + combine. A cluster's
/// CTAs walk their tiles in sequence, and each further tile cost ~3.9 µs (H100,
/// ncu), more than the combine kernel (~5 µs) saves once a CTA has two; the
/// split path spreads long key lists over up to 1024 CTAs of one tile.
pub const CLUSTER_MAX_KEYS: usize = CLUSTER * KEY_TILE;
/// Largest grid dimension y / z.
const MAX_GRID_YZ: usize = 65535;
/// Keys per tile (and per split) of the small-tile decode kernels `att_sd_16_<HD>`.
const SMALL_KEY_TILE: usize = 16;
/// Most CTAs (splits × head groups × tokens) for which decode takes 16-key tiles
/// (`DS4_ATTN_SD16_CTAS`): Flash's window-only (8 splits × 4 head groups) and
/// ratio-128 layers (up to 32K context) stay within one CTA per SM of an H100,
/// the ratio-4 layers (40 × 4 at 16 keys) keep 32-key tiles (80 CTAs).
pub const SD16_MAX_CTAS: usize = 128;

/// Dynamic shared memory of `att_tc_<MT>_<HD>` (`AT_SMEM` in attention.cu, 32-key tiles).
pub const fn smem_bytes(mt: usize, hd: usize) -> usize {
    smem_bytes_kt(mt, hd, KEY_TILE)
}

/// Dynamic shared memory of a kernel with `kt`-key tiles (`AT_SMEM(MT, HD, KT)`).
pub const fn smem_bytes_kt(mt: usize, hd: usize, kt: usize) -> usize {
    smem_layout(mt, hd, kt, WARPS / (mt * (kt / 8)))
}

/// Dynamic shared memory of `att_sq_<KT>_512` (queries in registers: a score partial
/// per warp, `KSPLIT` = 16; the query area stays in the layout, unused).
pub const fn smem_bytes_sq(kt: usize) -> usize {
    smem_layout(1, 512, kt, WARPS)
}

/// Dynamic shared memory of `att_sq8_<KT>_512` (8 warps: 8 score partials).
pub const fn smem_bytes_sq8(kt: usize) -> usize {
    smem_layout(1, 512, kt, 8)
}

/// The shared-memory layout of `att_tc_impl` with `ksplit` score partials.
const fn smem_layout(mt: usize, hd: usize, kt: usize, ksplit: usize) -> usize {
    let ldh = hd + 8;
    let rows = 16 * mt;
    let q = rows * ldh * 2;
    let k = kt * ldh * 2;
    let s = ksplit * rows * (kt + 4) * 4;
    let p = rows * (kt + 8) * 2;
    2 * q + 2 * k + s + 2 * p + 3 * rows * 4
}

/// The split decode kernels' switches, read once (scratch sizes and launches agree):
/// `DS4_ATTN_SD` (the `att_sd` / `att_sq` kernels, default on) and `DS4_ATTN_SD16_CTAS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SdConfig {
    enabled: bool,
    sd16_max_ctas: usize,
}

fn sd_config() -> SdConfig {
    static CFG: std::sync::OnceLock<SdConfig> = std::sync::OnceLock::new();
    *CFG.get_or_init(|| SdConfig {
        enabled: env_switch("DS4_ATTN_SD"),
        sd16_max_ctas: std::env::var("DS4_ATTN_SD16_CTAS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(SD16_MAX_CTAS),
    })
}

/// One decode launch's split layout: keys per tile of the kernel, keys per split, splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DecodePlan {
    key_tile: usize,
    kps: usize,
    n_splits: usize,
}

/// The decode split layout: 16-key splits where `cfg` allows them and the grid
/// (splits × head groups of 16 × tokens) stays within its CTA bound and no longer
/// splits were asked for (`DS4_ATTN_SPLIT_KEYS`); else [`split_plan`].
fn decode_plan_with(
    cfg: SdConfig,
    min_kps: usize,
    n_head: usize,
    n_tokens: usize,
    max_keys: usize,
) -> DecodePlan {
    let small = max_keys.max(1).div_ceil(SMALL_KEY_TILE);
    if cfg.enabled
        && min_kps <= KEY_TILE
        && small <= MAX_SPLITS
        && small * n_head.div_ceil(16) * n_tokens <= cfg.sd16_max_ctas
    {
        return DecodePlan {
            key_tile: SMALL_KEY_TILE,
            kps: SMALL_KEY_TILE,
            n_splits: small,
        };
    }
    let (kps, n_splits) = split_plan_with(max_keys, min_kps);
    DecodePlan {
        key_tile: KEY_TILE,
        kps,
        n_splits,
    }
}

fn decode_plan(n_head: usize, n_tokens: usize, max_keys: usize) -> DecodePlan {
    decode_plan_with(sd_config(), min_split_keys(), n_head, n_tokens, max_keys)
}

/// Whether the tensor-core kernels handle this shape (else use the SIMT kernels).
pub fn supports(n_head: usize, head_dim: usize) -> bool {
    n_head > 0 && (head_dim == 256 || head_dim == 512)
}

/// Upper bound of the keys one token attends to: the raw window plus the
/// compressed rows it may use (the indexer's `sel_k` picks, else every row of
/// the `comp_cap`-row cache; none when `ratio` is 0).
pub fn max_keys(window: usize, ratio: usize, comp_cap: usize, sel_k: Option<usize>) -> usize {
    let comp = if ratio == 0 {
        0
    } else {
        sel_k.unwrap_or(comp_cap)
    };
    window + comp
}

/// Keys per split and split count of the decode path (at most `MAX_SPLITS`).
fn split_plan(max_keys: usize) -> (usize, usize) {
    split_plan_with(max_keys, min_split_keys())
}

/// [`split_plan`] with at least `min_kps` keys per split.
fn split_plan_with(max_keys: usize, min_kps: usize) -> (usize, usize) {
    let tiles = max_keys.div_ceil(KEY_TILE).max(1);
    let kps = (KEY_TILE * tiles.div_ceil(MAX_SPLITS)).max(min_kps);
    (kps, max_keys.max(1).div_ceil(kps))
}

/// Fewest keys per decode split: one tile, or `DS4_ATTN_SPLIT_KEYS` rounded up to whole
/// tiles (an A/B knob: fewer, longer splits; read once, so scratch sizes and launches
/// agree).
fn min_split_keys() -> usize {
    static KEYS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KEYS.get_or_init(|| {
        std::env::var("DS4_ATTN_SPLIT_KEYS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(KEY_TILE, |k| k.max(KEY_TILE).next_multiple_of(KEY_TILE))
    })
}

/// Device scratch bytes a launch needs for its split partials (0 for chunks): enough
/// for the decode plan and for the 32-key plan of [`DecodePath::SplitLegacy`].
pub fn scratch_bytes(n_head: usize, head_dim: usize, n_tokens: usize, max_keys: usize) -> usize {
    if n_tokens == 0 || n_tokens > SPLIT_MAX_TOKENS {
        return 0;
    }
    let n_splits = split_plan(max_keys)
        .1
        .max(decode_plan(n_head, n_tokens, max_keys).n_splits);
    n_tokens * n_splits * n_head * (head_dim + 2) * 4
}

/// Everything one attention launch reads and writes (device pointers, f32 rows
/// unless noted). Token `i` has position `pos0 + i`, `pos0` = the i32 at `pos`.
#[derive(Debug, Clone, Copy)]
pub struct AttnLaunch {
    /// Queries: `n_tokens` rows of `n_head·head_dim`, `ld_q` floats apart.
    pub q: u64,
    pub ld_q: usize,
    /// This chunk's raw KV rows (`head_dim` used), `ld_rows` floats apart.
    pub rows: u64,
    pub ld_rows: usize,
    /// Raw KV ring: position t in slot `t % ring_cap`.
    pub ring: u64,
    pub ring_cap: usize,
    /// Compressed rows (`comp_cap` rows of `head_dim`; 0 when `ratio` is 0).
    pub comp: u64,
    pub comp_cap: usize,
    pub ratio: usize,
    /// Indexer picks: i32 `[n_tokens][sel_k]`, −1 padded; 0 = use every visible row.
    pub sel: u64,
    pub sel_k: usize,
    /// One sink logit per head.
    pub sinks: u64,
    pub window: usize,
    /// i32 position of the first token, on the device.
    pub pos: u64,
    pub n_head: usize,
    pub head_dim: usize,
    pub n_tokens: usize,
    /// Output: `n_tokens` rows of `n_head·head_dim`, `ld_out` floats apart.
    pub out: u64,
    pub ld_out: usize,
    /// Split partials ([`scratch_bytes`] of them at least; unused for chunks).
    pub scratch: u64,
    pub scratch_bytes: usize,
    /// Decode of one token: the kernel also copies the token's raw row (`rows`) to
    /// its ring slot, which `kv_append` did after the attention (the slot is outside
    /// the window read, see attention.cu). Needs `n_tokens == 1`.
    pub ring_append: bool,
}

impl AttnLaunch {
    /// The ring pointer the kernel appends the decode row to (0: no append).
    fn ring_append_ptr(&self) -> u64 {
        if self.ring_append { self.ring } else { 0 }
    }

    /// [`max_keys`] of this launch.
    pub fn max_keys(&self) -> usize {
        max_keys(
            self.window,
            self.ratio,
            self.comp_cap,
            (self.sel != 0).then_some(self.sel_k),
        )
    }
}

/// How a decode launch (at most [`SPLIT_MAX_TOKENS`] tokens) is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodePath {
    /// The cluster kernel when the device has it and the keys fit
    /// [`CLUSTER_MAX_KEYS`], else split + combine (what [`AttentionKernels::launch`] does).
    Auto,
    /// Flash-decoding over split CTAs plus `att_combine` (needs scratch), on the
    /// `att_sd` kernels unless `DS4_ATTN_SD=0`.
    Split,
    /// [`Self::Split`] on the `att_tc_1` kernels with 32-key splits whatever the
    /// switches (the reference of the `att_sd` checks).
    SplitLegacy,
    /// The cluster kernel whatever the key count (an error where the device has none).
    Cluster,
}

/// Loaded tensor-core attention kernels (a module of their own: `compile::ATTENTION`).
pub struct AttentionKernels {
    /// `att_tc_<MT>_<HD>`: [MT 4, MT 1] × [HD 512, HD 256].
    tc: [[CudaFunction; 2]; 2],
    combine: CudaFunction,
    /// `att_dc_<HD>` [HD 512, HD 256]: the cluster decode kernels (sm_90+ only).
    cluster: Option<[CudaFunction; 2]>,
    /// `att_sd_<KT>_<HD>`: [KT 32, KT 16] × [HD 512, HD 256], the split decode kernels.
    sd: [[CudaFunction; 2]; 2],
    /// `att_sq_<KT>_512` [KT 32, KT 16]: `att_sd` with the queries in registers.
    sq: [CudaFunction; 2],
    /// Head dim 512 decode takes `att_sq` (`DS4_ATTN_SD_QREG=0`: `att_sd`).
    qreg: bool,
    /// `att_sq8_<KT>_512` [KT 32, KT 16]: `att_sq` on 8 warps (256 threads).
    sq8: [CudaFunction; 2],
    /// `att_sq` on 8 warps instead of 16 (`DS4_ATTN_SD_WARPS=8`; default 16).
    sq_8warps: bool,
    /// False when `DS4_CUDA_ATTN=simt` asks for the SIMT kernels (A/B timing).
    enabled: bool,
    /// Most keys for which [`DecodePath::Auto`] takes the cluster kernel (0 when
    /// `DS4_CUDA_ATTN=split` keeps decode on split + combine).
    cluster_max_keys: usize,
    /// Programmatic dependent launches (sm_90+, unless `DS4_ATTN_PDL=0` or
    /// `DS4_CUDA_PDL=0`): the kernels wait in `griddepcontrol.wait` before reading.
    pdl: bool,
    /// The indexer picks go to shared memory before the first key tile is loaded
    /// (`DS4_ATTN_PICKS_FIRST=0`: the tile reads them from global memory).
    picks_first: bool,
    /// Decode launches whose merge the caller takes over ([`Self::launch_unmerged`])
    /// take the split kernel even where the cluster kernel would serve
    /// (`DS4_ATTN_SPLIT_MERGE=0`: the cluster kernel as before).
    split_when_deferred: bool,
}

fn shape_err(detail: String) -> Error {
    Error::Shape {
        what: "attention",
        detail,
    }
}

fn to_i32(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(format!("{name} = {v} exceeds i32")))
}

impl AttentionKernels {
    /// Compiles (or loads from the cubin cache) and binds the kernels.
    pub fn load(rt: &CudaRuntime) -> Result<Self> {
        Self::load_with(&rt.stream, rt.device.sm, rt.nvrtc_version)
    }

    /// [`Self::load`] from a stream alone (its context's device and the loaded NVRTC).
    pub fn load_on(stream: &Arc<CudaStream>) -> Result<Self> {
        let (sm, nvrtc_version) = compile::target_of(stream)?;
        Self::load_with(stream, sm, nvrtc_version)
    }

    fn load_with(
        stream: &Arc<CudaStream>,
        sm: (i32, i32),
        nvrtc_version: (i32, i32),
    ) -> Result<Self> {
        let arch = compile::arch_for(sm);
        let m = compile::load_module(stream.context(), &compile::ATTENTION, &arch, nvrtc_version)?;
        let bind = |name: &str, mt: usize, hd: usize| {
            compile::load_with_smem(&m, name, smem_bytes(mt, hd))
        };
        let tc = |mt: usize, hd: usize| bind(&format!("att_tc_{mt}_{hd}"), mt, hd);
        let mode = std::env::var("DS4_CUDA_ATTN");
        let enabled = !matches!(mode.as_deref(), Ok("simt"));
        if !enabled {
            tracing::info!("DS4_CUDA_ATTN=simt: attention on the SIMT kernels");
        }
        let cluster_max_keys = if matches!(mode.as_deref(), Ok("split")) {
            tracing::info!("DS4_CUDA_ATTN=split: decode attention on split + combine");
            0
        } else {
            std::env::var("DS4_CUDA_ATTN_CLUSTER_KEYS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(CLUSTER_MAX_KEYS)
        };
        // Thread-block clusters and distributed shared memory need sm_90.
        let cluster = if sm.0 >= 9 {
            Some([bind("att_dc_512", 1, 512)?, bind("att_dc_256", 1, 256)?])
        } else {
            None
        };
        let pdl = pdl_enabled(sm.0) && env_switch("DS4_ATTN_PDL");
        let sd = |kt: usize, hd: usize| {
            compile::load_with_smem(&m, &format!("att_sd_{kt}_{hd}"), smem_bytes_kt(1, hd, kt))
        };
        let sq =
            |kt: usize| compile::load_with_smem(&m, &format!("att_sq_{kt}_512"), smem_bytes_sq(kt));
        let sq8 = |kt: usize| {
            compile::load_with_smem(&m, &format!("att_sq8_{kt}_512"), smem_bytes_sq8(kt))
        };
        Ok(Self {
            tc: [[tc(4, 512)?, tc(4, 256)?], [tc(1, 512)?, tc(1, 256)?]],
            sq: [sq(KEY_TILE)?, sq(SMALL_KEY_TILE)?],
            sq8: [sq8(KEY_TILE)?, sq8(SMALL_KEY_TILE)?],
            sq_8warps: matches!(std::env::var("DS4_ATTN_SD_WARPS").as_deref(), Ok("8")),
            qreg: env_switch("DS4_ATTN_SD_QREG"),
            sd: [
                [sd(KEY_TILE, 512)?, sd(KEY_TILE, 256)?],
                [sd(SMALL_KEY_TILE, 512)?, sd(SMALL_KEY_TILE, 256)?],
            ],
            combine: m.load_function("att_combine")?,
            cluster,
            enabled,
            cluster_max_keys,
            pdl,
            picks_first: env_switch("DS4_ATTN_PICKS_FIRST"),
            split_when_deferred: env_switch("DS4_ATTN_SPLIT_MERGE"),
        })
    }

    /// These kernels with head dim 512 decode on `att_sq` (`on`) or `att_sd` (the
    /// checks run both, whatever `DS4_ATTN_SD_QREG` says).
    pub fn with_qreg(mut self, on: bool) -> Self {
        self.qreg = on;
        self
    }

    /// `att_sq` decode on 8 warps (`on`) or 16 (the checks run both, whatever
    /// `DS4_ATTN_SD_WARPS` says).
    pub fn with_sq_8warps(mut self, on: bool) -> Self {
        self.sq_8warps = on;
        self
    }

    /// Whether the backend should launch these kernels for this shape
    /// ([`supports`], unless `DS4_CUDA_ATTN=simt`).
    pub fn handles(&self, n_head: usize, head_dim: usize) -> bool {
        self.enabled && supports(n_head, head_dim)
    }

    /// Whether decode launches of `max_keys` keys take the cluster kernel.
    pub fn uses_cluster_decode(&self, max_keys: usize) -> bool {
        self.has_cluster_decode() && max_keys <= self.cluster_max_keys
    }

    /// Whether the device has the cluster decode kernels (sm_90+).
    pub fn has_cluster_decode(&self) -> bool {
        self.cluster.is_some()
    }

    /// Launches the attention of `a.n_tokens` tokens on `stream` (one or two
    /// kernels; no allocation, no host synchronisation).
    pub fn launch(&self, stream: &Arc<CudaStream>, a: &AttnLaunch) -> Result<()> {
        self.launch_path(stream, a, DecodePath::Auto)
    }

    /// [`Self::launch`] with the decode path chosen by the caller (the checks run
    /// both); chunks ignore `path`.
    pub fn launch_path(
        &self,
        stream: &Arc<CudaStream>,
        a: &AttnLaunch,
        path: DecodePath,
    ) -> Result<()> {
        self.launch_inner(stream, a, path, 0).map(|_| ())
    }

    /// [`Self::launch`], except that a decode launch of at most `max_splits` splits
    /// takes split + combine (also where [`Self::launch`] would take the cluster kernel,
    /// unless `DS4_ATTN_SPLIT_MERGE=0`) and leaves the merge to the caller: it returns the split
    /// count of the partials in `a.scratch` (`n_tokens × splits × n_head × (head_dim +
    /// 2)` floats: m, l, unnormalised output), and `a.out` is not written. `None`: the
    /// output was written (cluster kernel, chunk, or more splits).
    pub fn launch_unmerged(
        &self,
        stream: &Arc<CudaStream>,
        a: &AttnLaunch,
        max_splits: usize,
    ) -> Result<Option<usize>> {
        self.launch_inner(stream, a, DecodePath::Auto, max_splits)
    }

    fn launch_inner(
        &self,
        stream: &Arc<CudaStream>,
        a: &AttnLaunch,
        path: DecodePath,
        defer_merge_up_to: usize,
    ) -> Result<Option<usize>> {
        let (nh, hd, n) = (a.n_head, a.head_dim, a.n_tokens);
        if n == 0 {
            return Ok(None);
        }
        if !supports(nh, hd) {
            return Err(shape_err(format!(
                "{nh} heads of dim {hd} (need head_dim 256 or 512)"
            )));
        }
        // float4 loads of q and the key rows, float2 stores of the output.
        let aligned16 = [a.q, a.rows, a.ring, a.comp]
            .iter()
            .all(|p| p.is_multiple_of(16));
        if !a.ld_q.is_multiple_of(4)
            || !a.ld_rows.is_multiple_of(4)
            || !a.ld_out.is_multiple_of(2)
            || !aligned16
            || !a.out.is_multiple_of(8)
        {
            return Err(shape_err(format!(
                "row strides q {} / rows {} must be multiples of 4, out {} even, \
                 q/rows/ring/comp 16-byte and out 8-byte aligned",
                a.ld_q, a.ld_rows, a.ld_out
            )));
        }
        if a.ld_q < nh * hd || a.ld_out < nh * hd || a.ld_rows < hd {
            return Err(shape_err(format!(
                "row strides q {} / out {} / rows {} below the row widths",
                a.ld_q, a.ld_out, a.ld_rows
            )));
        }
        if a.window == 0 || a.ring_cap == 0 || (a.ratio > 0 && a.comp == 0) {
            return Err(shape_err(format!(
                "window {}, ring_cap {}, ratio {} with comp {:#x}",
                a.window, a.ring_cap, a.ratio, a.comp
            )));
        }
        if n > MAX_GRID_YZ {
            return Err(shape_err(format!("{n} tokens exceed the grid")));
        }
        if a.ring_append && n != 1 {
            return Err(shape_err(format!(
                "ring append in the kernel needs one token, got {n}"
            )));
        }
        let max_keys = a.max_keys();
        let split = n <= SPLIT_MAX_TOKENS;
        // The split decode layout: the att_sd kernels' plan, or the att_tc_1 kernel with
        // 32-key splits (DS4_ATTN_SD=0, or the legacy path asked for).
        let legacy = path == DecodePath::SplitLegacy || !sd_config().enabled;
        let plan = if legacy {
            let (kps, n_splits) = split_plan(max_keys);
            DecodePlan {
                key_tile: KEY_TILE,
                kps,
                n_splits,
            }
        } else {
            decode_plan(nh, n, max_keys)
        };
        // A merge the caller takes over costs little more than its own kernel, so the
        // split CTAs (one tile each, no cluster barriers) beat the cluster kernel then.
        let merge_deferred =
            split && self.split_when_deferred && plan.n_splits <= defer_merge_up_to;
        let cluster = match path {
            DecodePath::Auto => self.uses_cluster_decode(max_keys) && !merge_deferred,
            DecodePath::Split | DecodePath::SplitLegacy => false,
            DecodePath::Cluster => true,
        };
        if split && cluster {
            return self.launch_cluster(stream, a).map(|_| None);
        }
        let mt = if split || nh <= 16 { 1 } else { 4 };
        let hgroups = nh.div_ceil(16 * mt);
        let (kps, n_splits) = if split {
            (plan.kps, plan.n_splits)
        } else {
            // One CTA owns all of a token's keys.
            (i32::MAX as usize, 1)
        };
        if split {
            let need = scratch_bytes(nh, hd, n, max_keys);
            if a.scratch == 0 || a.scratch_bytes < need {
                return Err(shape_err(format!(
                    "split scratch of {} bytes, need {need}",
                    a.scratch_bytes
                )));
            }
        }
        let small = plan.key_tile == SMALL_KEY_TILE;
        let sq = split && !legacy && self.qreg && hd == 512;
        let (func, smem, threads) = if sq && self.sq_8warps {
            (
                &self.sq8[usize::from(small)],
                smem_bytes_sq8(plan.key_tile),
                THREADS / 2,
            )
        } else if sq {
            (
                &self.sq[usize::from(small)],
                smem_bytes_sq(plan.key_tile),
                THREADS,
            )
        } else if split && !legacy {
            (
                &self.sd[usize::from(small)][usize::from(hd == 256)],
                smem_bytes_kt(1, hd, plan.key_tile),
                THREADS,
            )
        } else {
            (
                &self.tc[usize::from(mt == 1)][usize::from(hd == 256)],
                smem_bytes(mt, hd),
                THREADS,
            )
        };
        let cfg = LaunchConfig {
            grid_dim: (n_splits as u32, hgroups as u32, n as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let ld_q = to_i32("ld_q", a.ld_q)?;
        let ld_rows = to_i32("ld_rows", a.ld_rows)?;
        let ring_cap = to_i32("ring_cap", a.ring_cap)?;
        let ratio = to_i32("ratio", a.ratio)?;
        let sel_k = to_i32("sel_k", if a.sel != 0 { a.sel_k } else { 0 })?;
        let window = to_i32("window", a.window)?;
        let nh_i = to_i32("n_head", nh)?;
        let kps_i = to_i32("keys per split", kps)?;
        let ld_out = to_i32("ld_out", a.ld_out)?;
        let part = if split { a.scratch } else { 0u64 };
        let ring_app = a.ring_append_ptr();
        let picks_first = i32::from(self.picks_first);
        let mut b = KernelArgs::new();
        b.arg(&a.q)
            .arg(&ld_q)
            .arg(&a.rows)
            .arg(&ld_rows)
            .arg(&a.ring)
            .arg(&ring_cap)
            .arg(&a.comp)
            .arg(&ratio)
            .arg(&a.sel)
            .arg(&sel_k)
            .arg(&a.sinks)
            .arg(&window)
            .arg(&a.pos)
            .arg(&nh_i)
            .arg(&kps_i)
            .arg(&a.out)
            .arg(&ld_out)
            .arg(&part)
            .arg(&ring_app)
            .arg(&picks_first);
        // SAFETY: matches AT_KERNEL (and AT_SD_KERNEL, the same arguments) in attention.cu;
        // kps is a multiple of the kernel's key tile; strides and scratch checked above,
        // the buffers are the caller's (sized for n_tokens rows and the KV caches); the
        // kernel waits (PDL_START) before reading anything.
        unsafe { launch(stream, func, cfg, &mut b, self.pdl) }?;
        if split && n_splits <= defer_merge_up_to {
            return Ok(Some(n_splits));
        }
        if split {
            let ns = to_i32("splits", n_splits)?;
            let hd_i = to_i32("head_dim", hd)?;
            let cfg = LaunchConfig {
                grid_dim: (nh as u32, n as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = KernelArgs::new();
            b.arg(&a.scratch)
                .arg(&ns)
                .arg(&nh_i)
                .arg(&hd_i)
                .arg(&a.sinks)
                .arg(&a.out)
                .arg(&ld_out);
            // SAFETY: matches att_combine; the partials were written by the launch above,
            // which the combine waits for (PDL_START).
            unsafe { launch(stream, &self.combine, cfg, &mut b, self.pdl) }?;
        }
        Ok(None)
    }

    /// The sm_90 decode kernel: grid (CLUSTER, head groups of 16, tokens), the
    /// compile-time cluster spans x. Arguments already checked by the caller.
    fn launch_cluster(&self, stream: &Arc<CudaStream>, a: &AttnLaunch) -> Result<()> {
        let Some(funcs) = &self.cluster else {
            return Err(shape_err("no cluster decode kernels on this device".into()));
        };
        let hd = a.head_dim;
        let func = &funcs[usize::from(hd == 256)];
        let cfg = LaunchConfig {
            grid_dim: (
                CLUSTER as u32,
                a.n_head.div_ceil(16) as u32,
                a.n_tokens as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_bytes(1, hd) as u32,
        };
        let ld_q = to_i32("ld_q", a.ld_q)?;
        let ld_rows = to_i32("ld_rows", a.ld_rows)?;
        let ring_cap = to_i32("ring_cap", a.ring_cap)?;
        let ratio = to_i32("ratio", a.ratio)?;
        let sel_k = to_i32("sel_k", if a.sel != 0 { a.sel_k } else { 0 })?;
        let window = to_i32("window", a.window)?;
        let nh_i = to_i32("n_head", a.n_head)?;
        let ld_out = to_i32("ld_out", a.ld_out)?;
        let ring_app = a.ring_append_ptr();
        let picks_first = i32::from(self.picks_first);
        let mut b = KernelArgs::new();
        b.arg(&a.q)
            .arg(&ld_q)
            .arg(&a.rows)
            .arg(&ld_rows)
            .arg(&a.ring)
            .arg(&ring_cap)
            .arg(&a.comp)
            .arg(&ratio)
            .arg(&a.sel)
            .arg(&sel_k)
            .arg(&a.sinks)
            .arg(&window)
            .arg(&a.pos)
            .arg(&nh_i)
            .arg(&a.out)
            .arg(&ld_out)
            .arg(&ring_app)
            .arg(&picks_first);
        // SAFETY: matches AT_DC_KERNEL in attention.cu (grid x = its cluster size);
        // strides checked by `launch_path`, buffers the caller's as for `launch`.
        unsafe { launch(stream, func, cfg, &mut b, self.pdl) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_a_hopper_cta() {
        // AT_SMEM(4, 512) worked out by hand: Q 2·66560, K 2·33280, S 9216, P 2·5120, state 768.
        assert_eq!(smem_bytes(4, 512), 219_904);
        // Static shared memory beside it: s_ncomp and AT_PICKS picks (ptxas: 4112 bytes).
        for (mt, hd) in [(4, 512), (1, 512), (4, 256), (1, 256)] {
            assert!(smem_bytes(mt, hd) + 4112 <= 227 * 1024, "{mt} {hd}");
        }
    }

    #[test]
    fn split_plan_covers_every_key_with_at_most_1024_splits() {
        for keys in [1, 31, 32, 33, 640, 385, 32 * 1024, 32 * 1024 + 1, 1_000_000] {
            let (kps, ns) = split_plan(keys);
            assert_eq!(kps % KEY_TILE, 0);
            assert!(ns <= MAX_SPLITS, "{keys}: {ns}");
            assert!(
                kps * ns >= keys && kps * (ns - 1) < keys,
                "{keys}: {kps} x {ns}"
            );
        }
    }

    #[test]
    fn longer_splits_keep_whole_tiles() {
        assert_eq!(split_plan_with(640, 64), (64, 10));
        assert_eq!(split_plan_with(640, 96), (96, 7));
        assert_eq!(split_plan_with(145, 32), (32, 5));
        // The split cap still wins for long key lists.
        assert_eq!(split_plan_with(32 * 4096, 32), (128, 1024));
    }

    #[test]
    fn decode_plan_takes_16_key_tiles_for_small_grids() {
        let on = SdConfig {
            enabled: true,
            sd16_max_ctas: SD16_MAX_CTAS,
        };
        let plan = |cfg, min_kps, nh, n, keys| decode_plan_with(cfg, min_kps, nh, n, keys);
        // Flash decode: window-only 128 keys, ratio 128 at 2K (145), ratio 4 (640).
        assert_eq!(
            plan(on, 32, 64, 1, 128),
            DecodePlan {
                key_tile: 16,
                kps: 16,
                n_splits: 8
            }
        );
        assert_eq!(plan(on, 32, 64, 1, 145).n_splits, 10);
        // Ratio 128 at 32K context: 385 keys, 25 × 4 = 100 CTAs.
        assert_eq!(plan(on, 32, 64, 1, 385).key_tile, 16);
        assert_eq!(
            plan(on, 32, 64, 1, 640),
            DecodePlan {
                key_tile: 32,
                kps: 32,
                n_splits: 20
            }
        );
        // Five tokens of the window-only layer: 8 × 4 × 5 = 160 CTAs.
        assert_eq!(plan(on, 32, 64, 5, 128).key_tile, 32);
        // The bound moved, switched off, or longer splits asked for.
        let wide = SdConfig {
            sd16_max_ctas: 256,
            ..on
        };
        assert_eq!(plan(wide, 32, 64, 1, 640).n_splits, 40);
        let off = SdConfig {
            enabled: false,
            ..on
        };
        assert_eq!(plan(off, 32, 64, 1, 128).key_tile, 32);
        assert_eq!(
            plan(on, 64, 64, 1, 128),
            DecodePlan {
                key_tile: 32,
                kps: 64,
                n_splits: 2
            }
        );
        // Every plan covers every key with whole tiles.
        for keys in [1, 15, 16, 17, 128, 145, 640, 1222, 40_000] {
            for cfg in [on, wide, off] {
                let p = plan(cfg, 32, 64, 1, keys);
                assert_eq!(p.kps % p.key_tile, 0);
                assert!(p.n_splits <= MAX_SPLITS);
                assert!(p.kps * p.n_splits >= keys && p.kps * (p.n_splits - 1) < keys);
            }
        }
    }

    #[test]
    fn small_tile_shared_memory() {
        // AT_SMEM(1, 512, 16): Q 2·16640, K 2·16640, S 8·16·20·4, P 2·16·24·2, state 192.
        assert_eq!(smem_bytes_kt(1, 512, 16), 78_528);
        assert_eq!(smem_bytes_kt(1, 512, 32), smem_bytes(1, 512));
        // att_sq: 16 score partials of 16 × (KT + 4) floats instead of 8 (KT 16) / 4 (KT 32).
        assert_eq!(smem_bytes_sq(16), 78_528 + 8 * 16 * 20 * 4);
        assert_eq!(smem_bytes_sq(32), smem_bytes(1, 512) + 12 * 16 * 36 * 4);
        for kt in [16, 32] {
            assert!(smem_bytes_sq(kt) + 4112 <= 227 * 1024);
            // att_sq8: 8 partials.
            assert_eq!(
                smem_bytes_sq8(kt) + 8 * 16 * (kt + 4) * 4,
                smem_bytes_sq(kt)
            );
        }
    }

    #[test]
    fn max_keys_counts_window_and_usable_compressed_rows() {
        assert_eq!(max_keys(128, 4, 8193, Some(512)), 640);
        assert_eq!(max_keys(128, 128, 257, None), 385);
        assert_eq!(max_keys(128, 0, 0, None), 128);
    }

    #[test]
    fn cluster_decode_bound_is_one_tile_per_rank() {
        assert_eq!(CLUSTER_MAX_KEYS, 256);
        // Flash: window-only layers, ratio 128 up to 8K context (65 rows) take the
        // cluster kernel; ratio 4 (window + 512 picks) and ratio 128 at 32K split.
        assert!(max_keys(128, 0, 0, None) <= CLUSTER_MAX_KEYS);
        assert!(max_keys(128, 128, 65, None) <= CLUSTER_MAX_KEYS);
        assert!(max_keys(128, 128, 257, None) > CLUSTER_MAX_KEYS);
        assert!(max_keys(128, 4, 8193, Some(512)) > CLUSTER_MAX_KEYS);
    }

    #[test]
    fn scratch_only_for_the_split_path() {
        assert_eq!(scratch_bytes(64, 512, 1, 640), 20 * 64 * 514 * 4);
        // 16-key splits (the default plan for 128 keys) need the larger scratch.
        if sd_config()
            == (SdConfig {
                enabled: true,
                sd16_max_ctas: SD16_MAX_CTAS,
            })
            && min_split_keys() == KEY_TILE
        {
            assert_eq!(scratch_bytes(64, 512, 1, 128), 8 * 64 * 514 * 4);
        }
        assert_eq!(scratch_bytes(64, 512, SPLIT_MAX_TOKENS + 1, 640), 0);
        assert_eq!(scratch_bytes(64, 512, 0, 640), 0);
    }

    #[test]
    fn supported_shapes() {
        assert!(supports(64, 512) && supports(4, 256) && supports(16, 512));
        assert!(!supports(64, 128) && !supports(0, 512) && !supports(8, 384));
    }
}
