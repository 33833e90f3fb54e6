//! Tensor-core matrix-matrix products for prefill (`kernels/gemm.cu`).
//!
//! [`Gemm`]: dense `y[t][r] = Σ_k W[r][k]·x[t][k]` for a chunk of tokens.
//! [`RoutedGemm`]: the routed experts with tokens grouped by expert on the
//! device (one small kernel counts, scans and scatters the slots into
//! [`GemmScratch`], then the GEMM runs over an upper-bound grid whose surplus
//! blocks exit). Neither call allocates or synchronises with the host.
//!
//! Numerics equal the decode matvec's: quantized weights meet the same
//! quantized activations ([`ActBuf`]) with exact integer sums per block;
//! F16/F32 weights meet f32 activations split into f16 hi + lo parts, so the
//! result is close to an f32 dot (activations must stay within the f16 range).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use ds4_gguf::GgmlType;

use crate::compile;
use crate::kernels::{ActBuf, ActKind, DevBuf, MvInput};
use crate::runtime::CudaRuntime;
use crate::{Error, Result};

/// Weight rows per block (`GM_BM`).
pub const GEMM_BM: usize = 128;
/// Tokens per block (`GM_BN`); also the routed tile size.
pub const GEMM_BN: usize = 64;
const GEMM_THREADS: u32 = 256;
/// Shared-memory row pitch in bytes (`GM_LD`).
const GEMM_LD: usize = 272;
/// Dynamic shared memory of the quantized kernels (`SM_TOTAL`).
const SMEM_QUANT: usize = 2 * GEMM_BM * GEMM_LD
    + GEMM_BN * GEMM_LD
    + GEMM_BM * 8 * 4
    + GEMM_BM * 8
    + GEMM_BN * 8 * 4
    + 256 * 8;
/// Dynamic shared memory of the aligned Q8_0 kernel (`Q8F_TOTAL`: two stages).
const SMEM_Q8_0_FAST: usize = 2 * (GEMM_BM * GEMM_LD + GEMM_BN * GEMM_LD + GEMM_BN * 8 * 4);
/// Dynamic shared memory of the F16/F32 kernels (`SMF_TOTAL`).
const SMEM_FLOAT: usize = 2 * GEMM_BM * GEMM_LD + 2 * GEMM_BN * GEMM_LD;
/// Largest expert count of the grouping kernel (2 ints of shared memory each).
pub const GEMM_MAX_EXPERTS: usize = 4096;
/// Largest grid dimension y (row tiles).
const MAX_GRID_Y: usize = 65535;

/// Dense product: `y[t·y_row_stride + y_col0 + r] = Σ_k W[r][k] · x[t][x_col0 + k]`.
pub struct Gemm<'a> {
    /// Q8_0, Q2_K, Q4_K, IQ2_XXS (quantized activation) or F16, F32 (f32 activation).
    pub ty: GgmlType,
    /// Weights: `rows` rows of `k` elements.
    pub w: u64,
    pub k: usize,
    pub rows: usize,
    /// `Quant(act)` with `act.k == x_row_len`, or `F32(ptr)`.
    pub x: MvInput<'a>,
    /// First element of each activation row used (grouped o_a: `g·k`); a multiple
    /// of the activation block (32 for Q8_0, 256 for Q8_K, 8 for f32).
    pub x_col0: usize,
    /// Elements per activation row (== `act.k` for Quant; the f32 row stride for F32).
    pub x_row_len: usize,
    pub ntok: usize,
    pub y: u64,
    pub y_row_stride: usize,
    pub y_col0: usize,
}

/// Routed experts, tokens grouped by expert: the semantics of a routed
/// `Matvec` with ntok = 1. Slot `s < n_slots` uses expert `ids[s]` (device
/// i32), activation row `s / x_group`, output row `s`: `y[s·rows + r]`.
/// Slots whose id is outside `[0, n_expert)` are skipped (row not written).
pub struct RoutedGemm<'a> {
    /// Q8_0, Q2_K, Q4_K or IQ2_XXS.
    pub ty: GgmlType,
    pub w: u64,
    /// Bytes between experts in `w`.
    pub w_expert_stride: u64,
    pub n_expert: usize,
    pub k: usize,
    pub rows: usize,
    pub ids: u64,
    pub n_slots: usize,
    pub x_group: usize,
    pub x: &'a ActBuf,
    pub y: u64,
}

/// Device buffers of the routed grouping, sized once for `max_slots` slots.
pub struct GemmScratch {
    /// Slot ids sorted by expert: i32 [max_slots].
    sorted: DevBuf,
    /// Tile list: i32 [max_tiles][3] = (expert, first sorted position, count).
    tiles: DevBuf,
    /// Number of valid tiles: i32.
    n_tiles: DevBuf,
    max_slots: usize,
    n_expert: usize,
}

/// Upper bound of the tile count: Σ_e ceil(c_e / BN) ≤ n/BN + min(E, n).
fn max_tiles(n_slots: usize, n_expert: usize) -> usize {
    n_slots.div_ceil(GEMM_BN) + n_expert.min(n_slots)
}

impl GemmScratch {
    pub fn new(stream: &Arc<CudaStream>, max_slots: usize, n_expert: usize) -> Result<Self> {
        if max_slots == 0 || n_expert == 0 || n_expert > GEMM_MAX_EXPERTS {
            return Err(Error::Shape {
                what: "gemm scratch",
                detail: format!(
                    "max_slots {max_slots}, n_expert {n_expert} (need both > 0, n_expert <= {GEMM_MAX_EXPERTS})"
                ),
            });
        }
        Ok(Self {
            sorted: DevBuf::zeros(stream, max_slots * 4)?,
            tiles: DevBuf::zeros(stream, max_tiles(max_slots, n_expert) * 12)?,
            n_tiles: DevBuf::zeros(stream, 4)?,
            max_slots,
            n_expert,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.sorted.len() + self.tiles.len() + self.n_tiles.len()
    }
}

/// Loaded GEMM kernels (a module of their own: `compile::GEMM`).
pub struct GemmKernels {
    stream: Arc<CudaStream>,
    gemm_q8_0: CudaFunction,
    gemm_iq2_xxs: CudaFunction,
    gemm_q8_0_fast: CudaFunction,
    gemm_q2_k_pipe: CudaFunction,
    gemm_q4_k_pipe: CudaFunction,
    gemm_iq2_xxs_pipe: CudaFunction,
    gemm_f16: CudaFunction,
    gemm_f32: CudaFunction,
    gemm_group: CudaFunction,
}

fn shape_err(what: &'static str, detail: String) -> Error {
    Error::Shape { what, detail }
}

fn to_i32(what: &'static str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(what, format!("{name} = {v} exceeds i32")))
}

/// Weight pointer alignment the decode loads need.
fn weight_align(ty: GgmlType) -> u64 {
    match ty {
        GgmlType::Q2_K | GgmlType::Q4_K => 4,
        GgmlType::F16 | GgmlType::F32 => 16,
        _ => 2,
    }
}

/// `v` with only the bits that matter for alignment up to 256 (0 counts as aligned).
fn pow2_align(v: u64) -> u64 {
    if v == 0 { 256 } else { v & 255 | 256 }
}

/// Largest power of two dividing every value OR-ed into `v` (capped at 256).
fn lowest_bit(v: u64) -> u64 {
    1 << v.trailing_zeros().min(8)
}

fn row_bytes(ty: GgmlType, k: usize) -> usize {
    k / ty.block_elems() as usize * ty.block_bytes() as usize
}

impl GemmKernels {
    /// Compiles (or loads from the cubin cache) and binds the GEMM kernels.
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
        let m = compile::load_module(stream.context(), &compile::GEMM, &arch, nvrtc_version)?;
        let with_smem = |name: &str, bytes: usize| compile::load_with_smem(&m, name, bytes);
        Ok(Self {
            stream: stream.clone(),
            gemm_q8_0: with_smem("gemm_q8_0", SMEM_QUANT)?,
            gemm_iq2_xxs: with_smem("gemm_iq2_xxs", SMEM_QUANT)?,
            gemm_q8_0_fast: with_smem("gemm_q8_0_fast", SMEM_Q8_0_FAST)?,
            gemm_q2_k_pipe: with_smem("gemm_q2_k_pipe", SMEM_QUANT)?,
            gemm_q4_k_pipe: with_smem("gemm_q4_k_pipe", SMEM_QUANT)?,
            gemm_iq2_xxs_pipe: with_smem("gemm_iq2_xxs_pipe", SMEM_QUANT)?,
            gemm_f16: with_smem("gemm_f16", SMEM_FLOAT)?,
            gemm_f32: with_smem("gemm_f32", SMEM_FLOAT)?,
            gemm_group: with_smem("gemm_group", 2 * GEMM_MAX_EXPERTS * 4)?,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernel for a quantized product and its dynamic shared memory: the
    /// streaming variants where the alignment allows, else the general ones.
    /// `w_align`: the gcd-style alignment of every weight row start (base,
    /// row bytes, expert stride); `x_align`: of x_row_len and x_col0 (elements).
    fn quant_func(
        &self,
        ty: GgmlType,
        k: usize,
        w_align: u64,
        x_align: usize,
    ) -> Result<(&CudaFunction, usize)> {
        Ok(match ty {
            GgmlType::Q8_0
                if k.is_multiple_of(256)
                    && w_align.is_multiple_of(16)
                    && x_align.is_multiple_of(256) =>
            {
                (&self.gemm_q8_0_fast, SMEM_Q8_0_FAST)
            }
            GgmlType::Q8_0 => (&self.gemm_q8_0, SMEM_QUANT),
            GgmlType::Q2_K => (&self.gemm_q2_k_pipe, SMEM_QUANT),
            GgmlType::Q4_K => (&self.gemm_q4_k_pipe, SMEM_QUANT),
            GgmlType::IQ2_XXS if w_align.is_multiple_of(4) => (&self.gemm_iq2_xxs_pipe, SMEM_QUANT),
            GgmlType::IQ2_XXS => (&self.gemm_iq2_xxs, SMEM_QUANT),
            other => return Err(Error::Unsupported(other)),
        })
    }

    /// Dense GEMM on the runtime's stream.
    pub fn gemm(&self, g: &Gemm) -> Result<()> {
        self.gemm_on(&self.stream, g)
    }

    /// [`Self::gemm`] on another stream (graph branches).
    pub fn gemm_on(&self, stream: &Arc<CudaStream>, g: &Gemm) -> Result<()> {
        const WHAT: &str = "gemm";
        check_dense(g)?;
        let rows_i = to_i32(WHAT, "rows", g.rows)?;
        let k_i = to_i32(WHAT, "k", g.k)?;
        let ntok_i = to_i32(WHAT, "ntok", g.ntok)?;
        let xrl_i = to_i32(WHAT, "x_row_len", g.x_row_len)?;
        let xc0_i = to_i32(WHAT, "x_col0", g.x_col0)?;
        let yc0_i = to_i32(WHAT, "y_col0", g.y_col0)?;
        let y_stride = g.y_row_stride as i64;
        let grid = (
            g.ntok.div_ceil(GEMM_BN) as u32,
            g.rows.div_ceil(GEMM_BM) as u32,
            1,
        );
        let block = (GEMM_THREADS, 1, 1);
        match g.x {
            MvInput::F32(x) => {
                let func = if g.ty == GgmlType::F16 {
                    &self.gemm_f16
                } else {
                    &self.gemm_f32
                };
                let cfg = LaunchConfig {
                    grid_dim: grid,
                    block_dim: block,
                    shared_mem_bytes: SMEM_FLOAT as u32,
                };
                let mut b = stream.launch_builder(func);
                b.arg(&g.w)
                    .arg(&k_i)
                    .arg(&rows_i)
                    .arg(&x)
                    .arg(&xrl_i)
                    .arg(&xc0_i)
                    .arg(&ntok_i)
                    .arg(&g.y)
                    .arg(&y_stride)
                    .arg(&yc0_i);
                // SAFETY: matches `gemm_f16`/`gemm_f32`; shapes and alignment checked.
                unsafe { b.launch(cfg) }?;
            }
            MvInput::Quant(act) => {
                let w_align = pow2_align(g.w) | pow2_align(row_bytes(g.ty, g.k) as u64);
                let x_align = g.x_row_len | g.x_col0;
                let (func, smem) = self.quant_func(g.ty, g.k, lowest_bit(w_align), x_align)?;
                let cfg = LaunchConfig {
                    grid_dim: grid,
                    block_dim: block,
                    shared_mem_bytes: smem as u32,
                };
                let zero_stride = 0i64;
                let null = 0u64;
                let one = 1i32;
                let mut b = stream.launch_builder(func);
                b.arg(&g.w)
                    .arg(&zero_stride)
                    .arg(&k_i)
                    .arg(&rows_i)
                    .arg(&act.qs.ptr)
                    .arg(&act.d.ptr)
                    .arg(&act.bsums.ptr)
                    .arg(&xrl_i)
                    .arg(&xc0_i)
                    .arg(&ntok_i)
                    .arg(&g.y)
                    .arg(&y_stride)
                    .arg(&yc0_i)
                    .arg(&null)
                    .arg(&null)
                    .arg(&null)
                    .arg(&one);
                // SAFETY: matches GEMM_Q_KERNEL; shapes and alignment checked.
                unsafe { b.launch(cfg) }?;
            }
        }
        Ok(())
    }

    /// Routed GEMM on the runtime's stream (grouping + product, two launches).
    pub fn routed_gemm(&self, g: &RoutedGemm, scratch: &GemmScratch) -> Result<()> {
        self.routed_gemm_on(&self.stream, g, scratch)
    }

    /// [`Self::routed_gemm`] on another stream (graph branches).
    pub fn routed_gemm_on(
        &self,
        stream: &Arc<CudaStream>,
        g: &RoutedGemm,
        scratch: &GemmScratch,
    ) -> Result<()> {
        const WHAT: &str = "routed gemm";
        check_routed(g, scratch)?;
        let w_align = pow2_align(g.w)
            | pow2_align(row_bytes(g.ty, g.k) as u64)
            | pow2_align(g.w_expert_stride);
        let (func, smem) = self.quant_func(g.ty, g.k, lowest_bit(w_align), g.k)?;
        let n_slots_i = to_i32(WHAT, "n_slots", g.n_slots)?;
        let n_expert_i = to_i32(WHAT, "n_expert", g.n_expert)?;
        let k_i = to_i32(WHAT, "k", g.k)?;
        let rows_i = to_i32(WHAT, "rows", g.rows)?;
        let xg_i = to_i32(WHAT, "x_group", g.x_group)?;
        let group_cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: (2 * g.n_expert * 4) as u32,
        };
        let mut b = stream.launch_builder(&self.gemm_group);
        b.arg(&g.ids)
            .arg(&n_slots_i)
            .arg(&n_expert_i)
            .arg(&scratch.sorted.ptr)
            .arg(&scratch.tiles.ptr)
            .arg(&scratch.n_tiles.ptr);
        // SAFETY: matches `gemm_group`; scratch holds max_tiles(n_slots) entries.
        unsafe { b.launch(group_cfg) }?;

        let tiles = max_tiles(g.n_slots, g.n_expert);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, g.rows.div_ceil(GEMM_BM) as u32, 1),
            block_dim: (GEMM_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let stride = g.w_expert_stride as i64;
        let y_stride = g.rows as i64;
        let zero = 0i32;
        let mut b = stream.launch_builder(func);
        b.arg(&g.w)
            .arg(&stride)
            .arg(&k_i)
            .arg(&rows_i)
            .arg(&g.x.qs.ptr)
            .arg(&g.x.d.ptr)
            .arg(&g.x.bsums.ptr)
            .arg(&k_i)
            .arg(&zero)
            .arg(&n_slots_i)
            .arg(&g.y)
            .arg(&y_stride)
            .arg(&zero)
            .arg(&scratch.tiles.ptr)
            .arg(&scratch.sorted.ptr)
            .arg(&scratch.n_tiles.ptr)
            .arg(&xg_i);
        // SAFETY: matches GEMM_Q_KERNEL; the tile list was written by the
        // grouping kernel just before on the same stream.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// Block size of the activation a weight type needs, and its kind.
fn act_block(ty: GgmlType) -> Result<(usize, ActKind)> {
    match ty {
        GgmlType::F32 => Ok((8, ActKind::F32)),
        other => {
            let kind = ActKind::for_weight(other)?;
            Ok((
                match kind {
                    ActKind::Q8_0 => 32,
                    ActKind::Q8K => 256,
                    ActKind::F32 => 8,
                },
                kind,
            ))
        }
    }
}

fn check_weights(what: &'static str, ty: GgmlType, w: u64, k: usize, rows: usize) -> Result<()> {
    let be = ty.block_elems() as usize;
    let need = if matches!(ty, GgmlType::F16 | GgmlType::F32) {
        8
    } else {
        be
    };
    if k == 0 || rows == 0 || !k.is_multiple_of(need) {
        return Err(shape_err(
            what,
            format!(
                "{} weights of {rows} rows x {k}: need rows > 0 and k a positive multiple of {need}",
                ty.name()
            ),
        ));
    }
    if rows.div_ceil(GEMM_BM) > MAX_GRID_Y {
        return Err(shape_err(what, format!("{rows} rows exceed the grid")));
    }
    let align = weight_align(ty);
    if !w.is_multiple_of(align) || !row_bytes(ty, k).is_multiple_of(align as usize) {
        return Err(shape_err(
            what,
            format!(
                "{} weights at {w:#x} with rows of {} bytes: need {align}-byte alignment",
                ty.name(),
                row_bytes(ty, k)
            ),
        ));
    }
    Ok(())
}

fn check_dense(g: &Gemm) -> Result<()> {
    const WHAT: &str = "gemm";
    let (blk, kind) = act_block(g.ty)?;
    check_weights(WHAT, g.ty, g.w, g.k, g.rows)?;
    if g.ntok == 0 {
        return Err(shape_err(WHAT, "ntok = 0".into()));
    }
    if !g.x_col0.is_multiple_of(blk) || !g.x_row_len.is_multiple_of(blk) {
        return Err(shape_err(
            WHAT,
            format!(
                "x_col0 {} and x_row_len {} must be multiples of {blk} for {}",
                g.x_col0,
                g.x_row_len,
                g.ty.name()
            ),
        ));
    }
    if g.x_col0.checked_add(g.k).is_none_or(|e| e > g.x_row_len) {
        return Err(shape_err(
            WHAT,
            format!(
                "columns {}..{}+{} exceed the activation row of {}",
                g.x_col0, g.x_col0, g.k, g.x_row_len
            ),
        ));
    }
    match (g.x, kind) {
        (MvInput::F32(x), ActKind::F32) => {
            if !x.is_multiple_of(16) {
                return Err(shape_err(
                    WHAT,
                    format!("f32 activation at {x:#x}: need 16-byte alignment"),
                ));
            }
        }
        (MvInput::Quant(act), ActKind::Q8_0 | ActKind::Q8K) => {
            if act.kind != kind || act.k != g.x_row_len || act.rows < g.ntok {
                return Err(shape_err(
                    WHAT,
                    format!(
                        "activation is {:?} {}x{}, {} needs {kind:?} with k == x_row_len {} and >= {} rows",
                        act.kind,
                        act.rows,
                        act.k,
                        g.ty.name(),
                        g.x_row_len,
                        g.ntok
                    ),
                ));
            }
        }
        _ => {
            return Err(shape_err(
                WHAT,
                format!("{} weights take a {kind:?} activation", g.ty.name()),
            ));
        }
    }
    if g.y_col0
        .checked_add(g.rows)
        .is_none_or(|e| e > g.y_row_stride)
        && g.ntok > 1
    {
        return Err(shape_err(
            WHAT,
            format!(
                "output columns {}+{} exceed the row stride {}",
                g.y_col0, g.rows, g.y_row_stride
            ),
        ));
    }
    if !g.y.is_multiple_of(4) {
        return Err(shape_err(
            WHAT,
            format!("output at {:#x}: need 4-byte alignment", g.y),
        ));
    }
    Ok(())
}

fn check_routed(g: &RoutedGemm, scratch: &GemmScratch) -> Result<()> {
    const WHAT: &str = "routed gemm";
    let (_, kind) = act_block(g.ty)?;
    if kind == ActKind::F32 {
        return Err(Error::Unsupported(g.ty));
    }
    check_weights(WHAT, g.ty, g.w, g.k, g.rows)?;
    let mat = row_bytes(g.ty, g.k) as u64 * g.rows as u64;
    if g.n_slots == 0 || g.x_group == 0 || g.n_expert == 0 {
        return Err(shape_err(
            WHAT,
            format!(
                "empty dimension (n_slots {}, x_group {}, n_expert {})",
                g.n_slots, g.x_group, g.n_expert
            ),
        ));
    }
    if g.w_expert_stride < mat || !g.w_expert_stride.is_multiple_of(weight_align(g.ty)) {
        return Err(shape_err(
            WHAT,
            format!(
                "expert stride {} bytes: need >= {mat} (one matrix) and {}-byte alignment",
                g.w_expert_stride,
                weight_align(g.ty)
            ),
        ));
    }
    if g.n_slots > scratch.max_slots || g.n_expert > scratch.n_expert {
        return Err(shape_err(
            WHAT,
            format!(
                "{} slots / {} experts, scratch sized for {} / {}",
                g.n_slots, g.n_expert, scratch.max_slots, scratch.n_expert
            ),
        ));
    }
    let act_rows = g.n_slots.div_ceil(g.x_group);
    if g.x.kind != kind || g.x.k != g.k || g.x.rows < act_rows {
        return Err(shape_err(
            WHAT,
            format!(
                "activation is {:?} {}x{}, {} needs {kind:?} of k {} with >= {act_rows} rows",
                g.x.kind,
                g.x.rows,
                g.x.k,
                g.ty.name(),
                g.k
            ),
        ));
    }
    if !g.y.is_multiple_of(4) {
        return Err(shape_err(
            WHAT,
            format!("output at {:#x}: need 4-byte alignment", g.y),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernel_layout() {
        // SM_TOTAL / SMF_TOTAL in gemm.cu; two blocks must fit an H100 SM (228 KB).
        assert_eq!(SMEM_QUANT, 96256);
        assert_eq!(SMEM_FLOAT, 104448);
        assert_eq!(SMEM_Q8_0_FAST, 108544);
        const { assert!(2 * (SMEM_Q8_0_FAST + 528 + 1024) <= 228 * 1024) };
        const { assert!(2 * (SMEM_FLOAT + 1024) <= 228 * 1024) };
        let src = compile::GEMM.src;
        assert!(src.contains(&format!("#define GM_BM {GEMM_BM}")));
        assert!(src.contains(&format!("#define GM_BN {GEMM_BN}")));
        assert!(src.contains(&format!("#define GM_LD {GEMM_LD}")));
        assert!(src.contains(&format!("#define GM_THREADS {GEMM_THREADS}")));
    }

    #[test]
    fn tile_bound_covers_every_distribution() {
        // Worst case: every expert has a partial tile.
        for (n, e) in [
            (12288, 256),
            (24, 4),
            (1, 256),
            (64, 1),
            (65, 2),
            (300, 256),
        ] {
            let bound = max_tiles(n, e);
            // All slots on min(e, n) experts, as evenly as possible.
            let used = e.min(n);
            let per = n / used;
            let extra = n % used;
            let need: usize = (0..used)
                .map(|i| (per + usize::from(i < extra)).div_ceil(GEMM_BN))
                .sum();
            assert!(need <= bound, "{n} slots / {e} experts: {need} > {bound}");
        }
    }

    #[test]
    fn alignment_is_the_largest_common_power_of_two() {
        let a = |vals: &[u64]| lowest_bit(vals.iter().fold(0, |acc, &v| acc | pow2_align(v)));
        assert_eq!(a(&[0x7f00_0000_0000, 4352]), 256);
        assert_eq!(a(&[0x7f00_0000_0000, 4352, 4352 * 1024]), 256);
        assert_eq!(a(&[0x7f00_0000_0000, 170]), 2);
        assert_eq!(a(&[0x7f00_0000_0004, 1056]), 4);
        assert_eq!(a(&[0]), 256);
    }

    fn f16_gemm(x: u64) -> Gemm<'static> {
        Gemm {
            ty: GgmlType::F16,
            w: 0x1000,
            k: 4096,
            rows: 256,
            x: MvInput::F32(x),
            x_col0: 0,
            x_row_len: 4096,
            ntok: 37,
            y: 0x2000,
            y_row_stride: 256,
            y_col0: 0,
        }
    }

    #[test]
    fn dense_checks_accept_flash_shapes_and_name_bad_ones() {
        assert!(check_dense(&f16_gemm(0x3000)).is_ok());
        let bad = |g: Gemm, want: &str| {
            let e = check_dense(&g).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        };
        bad(f16_gemm(0x3004), "16-byte alignment");
        bad(
            Gemm {
                x_col0: 8,
                ..f16_gemm(0x3000)
            },
            "exceed the activation row",
        );
        bad(
            Gemm {
                y_col0: 8,
                ..f16_gemm(0x3000)
            },
            "row stride",
        );
        bad(
            Gemm {
                ntok: 0,
                ..f16_gemm(0x3000)
            },
            "ntok = 0",
        );
        bad(
            Gemm {
                ty: GgmlType::Q8_0,
                ..f16_gemm(0x3000)
            },
            "Q8_0 activation",
        );
        bad(
            Gemm {
                ty: GgmlType::Q5_0,
                ..f16_gemm(0x3000)
            },
            "not supported",
        );
        // One token: the output stride is irrelevant.
        assert!(
            check_dense(&Gemm {
                ntok: 1,
                y_row_stride: 0,
                ..f16_gemm(0x3000)
            })
            .is_ok()
        );
    }

    #[test]
    fn weight_checks_name_the_problem() {
        let e = check_weights("gemm", GgmlType::Q2_K, 0, 100, 64).unwrap_err();
        assert!(e.to_string().contains("multiple of 256"), "{e}");
        let e = check_weights("gemm", GgmlType::Q4_K, 2, 256, 64).unwrap_err();
        assert!(e.to_string().contains("alignment"), "{e}");
        assert!(check_weights("gemm", GgmlType::Q8_0, 0, 128, 64).is_ok());
        assert!(check_weights("gemm", GgmlType::IQ2_XXS, 0, 256, 64).is_ok());
        assert!(check_weights("gemm", GgmlType::F16, 0, 0, 64).is_err());
    }
}
