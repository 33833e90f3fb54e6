//! GPU-vs-CPU checks of every kernel on random data at full Flash dims.
//!
//! The CPU side is `ds4-quant`: the same activation quantisation
//! (`quantize_act_*`) and the same integer dot formulation (`dot_*`), so the
//! GPU must agree to f32 reordering error. Outputs are poisoned with NaN
//! before each launch, so an unwritten element fails the check.

use ds4_gguf::GgmlType;
use ds4_quant::{
    ActQ8_0, BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, dot_f16_f32, dot_iq2_xxs_q8_k,
    dot_q2_k_q8_k, dot_q4_k_q8_k, dot_q8_0, quantize_act_q8_0, quantize_act_q8_k,
};
use half::f16;

use crate::kernels::{ActBuf, ActKind, DevBuf, KV2Force, Kernels, Matvec, MvInput, matrix_bytes};
use crate::{Error, Result};

/// Quantized dots: GPU and CPU share the integer sums; only the order of the
/// f32 block sums differs. Max |gpu − cpu| / max |cpu| over the output.
pub const TOL_QUANT_DOT_REL: f32 = 1e-4;
/// F16 · f32 dots with f32 accumulation in a different order.
pub const TOL_F16_DOT_REL: f32 = 1e-4;
/// Activation quantisation must be bit-identical (codes, scales, sums).
pub const TOL_ACT_QUANT_MISMATCHES: usize = 0;

/// Outcome of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: String,
    pub max_abs: f32,
    /// max |gpu − cpu| / max |cpu| (for activation checks: mismatching elements).
    pub max_rel: f32,
    pub tol: f32,
    pub tol_name: &'static str,
    pub pass: bool,
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<58} max_abs {:>10.3e}  max_rel {:>10.3e}  tol {:.0e} ({})  {}",
            self.name,
            self.max_abs,
            self.max_rel,
            self.tol,
            self.tol_name,
            if self.pass { "PASS" } else { "FAIL" }
        )
    }
}

/// splitmix64: a tiny deterministic generator for test data.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Random but valid weights: random codes, small positive f16 scales.
pub(crate) fn random_weights(rng: &mut Rng, ty: GgmlType, n_elems: usize) -> Vec<u8> {
    if ty == GgmlType::F16 {
        return (0..n_elems)
            .flat_map(|_| f16::from_f32(0.05 * rng.unit()).to_le_bytes())
            .collect();
    }
    let bb = ty.block_bytes() as usize;
    let nb = n_elems / ty.block_elems() as usize;
    let mut v = rng.bytes(nb * bb);
    let fields: &[(usize, f32)] = match ty {
        GgmlType::Q8_0 | GgmlType::IQ2_XXS => &[(0, 1.0)],
        GgmlType::Q4_K => &[(0, 1.0), (2, 0.5)],
        GgmlType::Q2_K => &[(80, 1.0), (82, 0.5)],
        _ => &[],
    };
    for b in 0..nb {
        let s = 1e-3 * (1.5 + 0.5 * rng.unit());
        for &(off, mul) in fields {
            let h = f16::from_f32(s * mul).to_le_bytes();
            v[b * bb + off] = h[0];
            v[b * bb + off + 1] = h[1];
        }
    }
    v
}

/// Activations: uniform, with a few outliers as real activations have.
pub(crate) fn random_act(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = rng.unit();
            if i % 97 == 13 { 8.0 * v } else { v }
        })
        .collect()
}

/// Copies raw bytes into an aligned vector of blocks.
fn to_blocks<B: bytemuck::Pod>(row: &[u8]) -> Vec<B> {
    let n = row.len() / std::mem::size_of::<B>();
    let mut v = vec![B::zeroed(); n];
    let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
    let len = dst.len();
    dst.copy_from_slice(&row[..len]);
    v
}

/// CPU reference of one row · one activation row, in ds4's formulation.
fn cpu_dot(ty: GgmlType, row: &[u8], x: &[f32], q8_0: &[ActQ8_0], q8k: &[BlockQ8K]) -> f32 {
    match ty {
        GgmlType::Q8_0 => dot_q8_0(&to_blocks::<BlockQ8_0>(row), q8_0),
        GgmlType::Q2_K => dot_q2_k_q8_k(&to_blocks::<BlockQ2K>(row), q8k),
        GgmlType::Q4_K => dot_q4_k_q8_k(&to_blocks::<BlockQ4K>(row), q8k),
        GgmlType::IQ2_XXS => dot_iq2_xxs_q8_k(&to_blocks::<BlockIQ2XXS>(row), q8k),
        GgmlType::F16 => dot_f16_f32(&to_blocks::<f16>(row), x),
        _ => f32::NAN,
    }
}

/// One matvec check: `n_mats` matrices of `rows`×`k`, `slots` launched (routed
/// when `ids` is given), `x_group` slots per activation row, `ntok` tokens; `segs`
/// such weight sets in one launch (`matvec_segs`, as routed gate + up), each with
/// its own output.
struct Case {
    name: String,
    segs: usize,
    ty: GgmlType,
    k: usize,
    rows: usize,
    n_mats: usize,
    slots: usize,
    x_group: usize,
    ntok: usize,
    routed: bool,
}

fn case(name: &str, ty: GgmlType, k: usize, rows: usize) -> Case {
    Case {
        name: name.to_string(),
        segs: 1,
        ty,
        k,
        rows,
        n_mats: 1,
        slots: 1,
        x_group: 1,
        ntok: 1,
        routed: false,
    }
}

pub(crate) fn compare(
    name: String,
    gpu: &[f32],
    cpu: &[f32],
    tol: f32,
    tol_name: &'static str,
) -> CheckResult {
    let scale = cpu.iter().fold(0f32, |a, v| a.max(v.abs()));
    let mut max_abs = 0f32;
    let mut bad = gpu.len() != cpu.len();
    for (g, c) in gpu.iter().zip(cpu) {
        let e = (g - c).abs();
        if !e.is_finite() {
            bad = true;
        }
        max_abs = max_abs.max(e);
    }
    let max_rel = if scale > 0.0 {
        max_abs / scale
    } else {
        max_abs
    };
    CheckResult {
        name,
        max_abs,
        max_rel,
        tol,
        tol_name,
        pass: !bad && max_rel <= tol && scale.is_finite(),
    }
}

fn run_case(kern: &Kernels, rng: &mut Rng, c: &Case) -> Result<CheckResult> {
    let (gpu, cpu) = run_case_outputs(kern, rng, c)?;
    let (tol, tol_name) = if c.ty == GgmlType::F16 {
        (TOL_F16_DOT_REL, "TOL_F16_DOT_REL")
    } else {
        (TOL_QUANT_DOT_REL, "TOL_QUANT_DOT_REL")
    };
    Ok(compare(c.name.clone(), &gpu, &cpu, tol, tol_name))
}

/// The GPU and CPU outputs of one matvec case.
fn run_case_outputs(kern: &Kernels, rng: &mut Rng, c: &Case) -> Result<(Vec<f32>, Vec<f32>)> {
    let stream = kern.stream();
    let mat_bytes = matrix_bytes(c.ty, c.k, c.rows);
    let rb = mat_bytes / c.rows;
    let set_bytes = c.n_mats * mat_bytes;
    let w = random_weights(rng, c.ty, c.segs * c.n_mats * c.rows * c.k);
    let act_rows = c.slots.div_ceil(c.x_group) * c.ntok;
    let x = random_act(rng, act_rows * c.k);
    let ids: Vec<i32> = if c.routed {
        // Distinct experts within each token's group of slots, as the router gives.
        let mut ids = Vec::with_capacity(c.slots);
        while ids.len() < c.slots {
            let e = (rng.next() % c.n_mats as u64) as i32;
            let group_start = ids.len() / 6 * 6;
            if !ids[group_start..].contains(&e) {
                ids.push(e);
            }
        }
        ids
    } else {
        (0..c.slots as i32).collect()
    };

    // CPU reference.
    let kind = ActKind::for_weight(c.ty)?;
    let out_len = c.slots * c.ntok * c.rows;
    let mut cpu = vec![0f32; c.segs * out_len];
    let acts: Vec<(Vec<ActQ8_0>, Vec<BlockQ8K>)> = x
        .chunks_exact(c.k)
        .map(|xr| match kind {
            ActKind::Q8_0 => (quantize_act_q8_0(xr), Vec::new()),
            ActKind::Q8K => (Vec::new(), quantize_act_q8_k(xr)),
            ActKind::F32 => (Vec::new(), Vec::new()),
        })
        .collect();
    for g in 0..c.segs {
        for s in 0..c.slots {
            let e = ids[s] as usize;
            for t in 0..c.ntok {
                let arow = (s / c.x_group) * c.ntok + t;
                let xr = &x[arow * c.k..(arow + 1) * c.k];
                let (q0, qk) = &acts[arow];
                for r in 0..c.rows {
                    let off = g * set_bytes + e * mat_bytes + r * rb;
                    cpu[g * out_len + (s * c.ntok + t) * c.rows + r] =
                        cpu_dot(c.ty, &w[off..off + rb], xr, q0, qk);
                }
            }
        }
    }

    // GPU.
    // The kernels read Q8_0 rearranged (codes, then scales), as the upload stores it.
    let w_dev = DevBuf::from_bytes(stream, &crate::layout::to_gpu(c.ty, &w, c.k)?)?;
    let x_dev = DevBuf::from_f32(stream, &x)?;
    let ids_dev = DevBuf::from_bytes(stream, bytemuck::cast_slice(&ids))?;
    let y_dev = DevBuf::from_bytes(stream, &vec![0xffu8; cpu.len() * 4])?;
    let act;
    let input = match kind {
        ActKind::F32 => MvInput::F32(x_dev.ptr),
        _ => {
            act = ActBuf::new(stream, kind, c.k, act_rows)?;
            kern.quantize(x_dev.ptr, &act)?;
            MvInput::Quant(&act)
        }
    };
    let m = Matvec {
        ty: c.ty,
        w: w_dev.ptr,
        k: c.k,
        rows: c.rows,
        ntok: c.ntok,
        slots: c.slots,
        w_slot_stride: mat_bytes as u64,
        ids: if c.routed { ids_dev.ptr } else { 0 },
        x_group: c.x_group,
        x: input,
        y: y_dev.ptr,
    };
    if c.segs == 1 {
        kern.matvec(&m)?;
    } else {
        let extra: Vec<crate::kernels::MvSeg> = (1..c.segs)
            .map(|g| crate::kernels::MvSeg {
                w: w_dev.ptr + (g * set_bytes) as u64,
                rows: c.rows,
                y: y_dev.ptr + (g * out_len * 4) as u64,
                ldy: c.rows,
            })
            .collect();
        kern.matvec_segs(stream, &m, c.rows, &extra)?;
    }
    stream.synchronize()?;
    let gpu = y_dev.to_f32(stream)?;
    Ok((gpu, cpu))
}

/// attn_output_a's TMA product writing attn_output_b's Q8_0 input itself
/// (`Kernels::matvec_quant_out`, Flash shape: 8 groups of 1024 rows, K 4096): its f32
/// output and its Q8_0 copy bit for bit against the product alone and `quantize`.
fn run_quant_out_checks(
    kern: &Kernels,
    rng: &mut Rng,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    let (k, rows, groups) = (4096usize, 1024usize, 8usize);
    if !kern.has_tma(k) {
        return Ok(out);
    }
    let stream = kern.stream();
    let mat_bytes = matrix_bytes(GgmlType::Q8_0, k, rows);
    let w = random_weights(rng, GgmlType::Q8_0, groups * rows * k);
    let w_dev = DevBuf::from_bytes(stream, &crate::layout::to_gpu(GgmlType::Q8_0, &w, k)?)?;
    let x = random_act(rng, groups * k);
    let x_dev = DevBuf::from_f32(stream, &x)?;
    let act = ActBuf::new(stream, ActKind::Q8_0, k, groups)?;
    kern.quantize(x_dev.ptr, &act)?;
    let total = groups * rows;
    let nan = vec![f32::NAN; total];
    let (y_ref, y_fused) = (
        DevBuf::from_f32(stream, &nan)?,
        DevBuf::from_f32(stream, &nan)?,
    );
    let (q_ref, q_fused) = (
        ActBuf::new(stream, ActKind::Q8_0, total, 1)?,
        ActBuf::new(stream, ActKind::Q8_0, total, 1)?,
    );
    let product = |y: u64| Matvec {
        ty: GgmlType::Q8_0,
        w: w_dev.ptr,
        k,
        rows,
        ntok: 1,
        slots: groups,
        w_slot_stride: mat_bytes as u64,
        ids: 0,
        x_group: 1,
        x: MvInput::Quant(&act),
        y,
    };
    // The fused product also carries a deferred HC split (post, comb from 16 partial
    // rows of a Flash HC step) on its waiting warp when it has one; a SwiGLU launch
    // carries the same split on its extra block. Both against the CPU's split, and
    // bit for bit against each other.
    let split = SplitCase::new(rng, 16, 4096);
    let part_dev = DevBuf::from_f32(stream, &split.part)?;
    let consts = DevBuf::from_f32(stream, &split.consts)?;
    let outs = DevBuf::from_f32(stream, &[f32::NAN; 40])?;
    let job = |o: u64| crate::kernels::HcSplitJob {
        part: part_dev.ptr,
        scale3: consts.ptr,
        base: consts.ptr + 12,
        post: o,
        comb: o + 16,
        np: split.np as i32,
        e: split.e as i32,
        iters: 20,
        hc_eps: 1e-6,
        rms_eps: 1e-6,
    };
    let (job_tma, job_swiglu) = (job(outs.ptr), job(outs.ptr + 80));
    let carried = kern.tma_carries_split();
    kern.matvec(&product(y_ref.ptr))?;
    kern.quantize(y_ref.ptr, &q_ref)?;
    let taken = kern.matvec_quant_out(
        stream,
        &product(y_fused.ptr),
        &q_fused,
        carried.then_some(&job_tma),
    )?;
    // The SwiGLU's own work: one 256-block of Q8_K from random gate/up rows.
    let (g_dev, u_dev) = (
        DevBuf::from_f32(stream, &random_act(rng, 256))?,
        DevBuf::from_f32(stream, &random_act(rng, 256))?,
    );
    let sw_act = ActBuf::new(stream, ActKind::Q8K, 256, 1)?;
    kern.swiglu_quant(
        stream,
        g_dev.ptr,
        u_dev.ptr,
        1,
        0,
        f32::INFINITY,
        &sw_act,
        false,
        Some(&job_swiglu),
    )?;
    stream.synchronize()?;
    let got = outs.to_f32(stream)?;
    let (want_post, want_comb) = split.cpu(20, 1e-6, 1e-6);
    let want: Vec<f32> = want_post.iter().chain(&want_comb).copied().collect();
    let swiglu_split: Vec<f32> = got[20..40].to_vec();
    let mut carriers = vec![("swiglu_quant's extra block", swiglu_split.clone())];
    if carried {
        carriers.push(("the TMA product's waiting warp", got[..20].to_vec()));
        let bad = swiglu_split
            .iter()
            .zip(&got[..20])
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let r = bit_exact(
            "deferred HC split: TMA waiting warp = SwiGLU block".into(),
            bad,
        );
        report(&r);
        out.push(r);
    }
    for (who, v) in carriers {
        let r = compare(
            format!("deferred HC split (post, comb) on {who}"),
            &v,
            &want,
            TOL_HC_SPLIT_REL,
            "TOL_HC_SPLIT_REL",
        );
        report(&r);
        out.push(r);
    }
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
    let differ = |a: &[u32], b: &[u32]| {
        a.iter().zip(b).filter(|(x, y)| x != y).count() + usize::from(a.len() != b.len())
    };
    let codes = |q: &ActBuf| -> Result<Vec<u32>> {
        Ok(q.qs.to_bytes(stream)?.iter().map(|&b| b as u32).collect())
    };
    let y_bad = differ(&bits(y_fused.to_f32(stream)?), &bits(y_ref.to_f32(stream)?));
    let qs_bad = differ(&codes(&q_fused)?, &codes(&q_ref)?);
    let d_bad = differ(
        &bits(q_fused.d.to_f32(stream)?),
        &bits(q_ref.d.to_f32(stream)?),
    );
    for (what, bad) in [
        ("taken", usize::from(!taken)),
        ("f32 output (bits)", y_bad),
        ("Q8_0 codes", qs_bad),
        ("Q8_0 scales (bits)", d_bad),
    ] {
        let r = bit_exact(
            format!("tma product with its Q8_0 copy (attn_output_a): {what}"),
            bad,
        );
        report(&r);
        out.push(r);
    }
    Ok(out)
}

/// A check that passes when `bad` values differ in their bits (none may).
fn bit_exact(name: String, bad: usize) -> CheckResult {
    CheckResult {
        name,
        max_abs: 0.0,
        max_rel: bad as f32,
        tol: 0.0,
        tol_name: "bit-exact",
        pass: bad == 0,
    }
}

/// Relative error of a deferred HC split's post/comb against the CPU's (f32 sums in
/// the same order; the Sinkhorn's divisions are exact): rounding only.
const TOL_HC_SPLIT_REL: f32 = 1e-5;

/// Partial rows of one token's HC step (hc_post_mix_v3's layout: 24 mix rows and Σx²
/// per row) and the step's constants (scale3, then 24 base values at float 3).
struct SplitCase {
    np: usize,
    e: usize,
    part: Vec<f32>,
    consts: Vec<f32>,
}

impl SplitCase {
    fn new(rng: &mut Rng, np: usize, e: usize) -> Self {
        let mut part = random_act(rng, np * 25);
        for p in 0..np {
            // Σx² of the row's columns: positive, about 4 · 256 unit values.
            part[p * 25 + 24] = 1024.0 * (1.0 + 0.25 * part[p * 25 + 24].abs());
        }
        let mut consts = vec![0.5, 0.8, 1.3];
        consts.extend(random_act(rng, 24).iter().map(|v| 0.3 * v));
        Self {
            np,
            e,
            part,
            consts,
        }
    }

    /// The CPU split: rows summed in order (f32), r in f64, `numerics::hc_split`.
    fn cpu(&self, iters: usize, hc_eps: f32, rms_eps: f32) -> (Vec<f32>, Vec<f32>) {
        let mut sums = [0f32; 25];
        for row in self.part.chunks_exact(25) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
        let r = (1.0 / ((sums[24] as f64) / (4 * self.e) as f64 + rms_eps as f64).sqrt()) as f32;
        let mixes: Vec<f32> = sums[..24].iter().map(|m| m * r).collect();
        let scale = [self.consts[0], self.consts[1], self.consts[2]];
        let (mut pre, mut post, mut comb) = (vec![0f32; 4], vec![0f32; 4], vec![0f32; 16]);
        ds4_model::numerics::hc_split(
            &mixes,
            &scale,
            &self.consts[3..],
            4,
            iters,
            hc_eps,
            &mut pre,
            &mut post,
            &mut comb,
        );
        (post, comb)
    }
}

/// The Q8_0 decode products through shared memory (`mv_q8_0_tma_*`) forced on, on the
/// Flash shapes they take and on short ones (fewer rows than warps, several slots):
/// against the CPU, and bit for bit against the register kernels on the same data.
fn run_tma_checks(
    kern: &Kernels,
    rng: &mut Rng,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    use GgmlType::Q8_0;
    let grouped = |name: &str, k, rows, slots| Case {
        n_mats: slots,
        slots,
        ..case(name, Q8_0, k, rows)
    };
    // The one-token Q8_0 products of the kernel checks with 8 M weights or more (those
    // that take the TMA kernel by default, ≥ 16 MB, or with DS4_MV_TMA_MIN_MB=8), two
    // short ones and two of several matrices.
    let shapes: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.ty == Q8_0 && c.ntok == 1 && c.segs == 1 && !c.routed)
        .filter(|c| c.k * c.rows * c.slots >= 8 << 20)
        .chain([
            case(
                "Q8_0            4096->40 (fewer rows than warps)",
                Q8_0,
                4096,
                40,
            ),
            grouped("Q8_0            3 x (1024->36)", 1024, 36, 3),
            // Several matrices of one input (mv_q8_0_tma_segs_*): q_a + kv's 6.7 MB,
            // and odd matrix ends inside a warp's rows.
            Case {
                segs: 2,
                ..case("Q8_0            2 x (4096->768)", Q8_0, 4096, 768)
            },
            Case {
                segs: 3,
                ..case("Q8_0            3 x (4096->37)", Q8_0, 4096, 37)
            },
        ])
        .collect();
    let mut out = Vec::new();
    if kern.tma_expected() && !shapes.iter().any(|c| kern.has_tma(c.k)) {
        // sm_90 with DS4_MV_TMA on: every kernel must have loaded (a shared-memory
        // attribute the device refuses leaves them out, and with them these checks).
        let r = CheckResult {
            name: "tma kernels loaded (sm_90, DS4_MV_TMA on)".into(),
            max_abs: f32::NAN,
            max_rel: f32::NAN,
            tol: 0.0,
            tol_name: "loaded",
            pass: false,
        };
        report(&r);
        out.push(r);
    }
    for c in shapes.iter().filter(|c| kern.has_tma(c.k)) {
        let seed = rng.next();
        kern.force_tma(Some(true));
        let on = run_case_outputs(kern, &mut Rng(seed), c);
        kern.force_tma(Some(false));
        let off = run_case_outputs(kern, &mut Rng(seed), c);
        kern.force_tma(None);
        let ((tma, cpu), (regs, _)) = (on?, off?);
        for r in [
            compare(
                format!("tma {}", c.name),
                &tma,
                &cpu,
                TOL_QUANT_DOT_REL,
                "TOL_QUANT_DOT_REL",
            ),
            compare(
                format!("tma = regs {}", c.name),
                &tma,
                &regs,
                0.0,
                "bit-exact",
            ),
        ] {
            report(&r);
            out.push(r);
        }
    }
    Ok(out)
}

/// A GPU quantisation of whole rows of `k` values `x` (codes `qs`, scales `d`, Q8_K
/// sums `bsums`, as read back) against ds4-quant's: the number of codes, scales and sums
/// that differ (missing ones count), and the largest scale difference.
pub(crate) fn act_mismatches(
    kind: ActKind,
    x: &[f32],
    k: usize,
    qs: &[u8],
    d: &[f32],
    bsums: &[i16],
) -> Result<(usize, f32)> {
    let mut mismatches = 0usize;
    let mut max_abs = 0f32;
    let mut scale = |b: usize, cpu: f32| {
        let dd = d.get(b).copied().unwrap_or(f32::NAN);
        max_abs = max_abs.max((dd - cpu).abs());
        usize::from(dd.to_bits() != cpu.to_bits())
    };
    match kind {
        ActKind::Q8_0 => {
            for (b, blk) in x.chunks_exact(k).flat_map(quantize_act_q8_0).enumerate() {
                mismatches += scale(b, blk.d);
                for (i, &q) in blk.qs.iter().enumerate() {
                    mismatches += usize::from(qs.get(b * 32 + i).copied() != Some(q as u8));
                }
            }
        }
        ActKind::Q8K => {
            for (b, blk) in x.chunks_exact(k).flat_map(quantize_act_q8_k).enumerate() {
                mismatches += scale(b, blk.d);
                for (i, &q) in blk.qs.iter().enumerate() {
                    mismatches += usize::from(qs.get(b * 256 + i).copied() != Some(q as u8));
                }
                for (i, &s) in blk.bsums.iter().enumerate() {
                    mismatches += usize::from(bsums.get(b * 16 + i).copied() != Some(s));
                }
            }
        }
        ActKind::F32 => {
            return Err(Error::Shape {
                what: "act check",
                detail: "f32 has no quantisation".into(),
            });
        }
    }
    Ok((mismatches, max_abs))
}

/// Activation quantisation: GPU codes, scales and sums equal the CPU's exactly.
fn run_act_check(
    kern: &Kernels,
    rng: &mut Rng,
    kind: ActKind,
    k: usize,
    rows: usize,
) -> Result<CheckResult> {
    let stream = kern.stream();
    let mut x = random_act(rng, k * rows);
    // Ties of |x| with opposite signs: the first one must set the Q8_K scale's sign.
    if let (Some(a), true) = (x.get(5).copied(), x.len() > 200) {
        x[5] = 9.5 * a.signum();
        x[200] = -x[5];
    }
    let x_dev = DevBuf::from_f32(stream, &x)?;
    let act = ActBuf::new(stream, kind, k, rows)?;
    kern.quantize(x_dev.ptr, &act)?;
    stream.synchronize()?;
    let qs = act.qs.to_bytes(stream)?;
    let d = act.d.to_f32(stream)?;
    let bsums: Vec<i16> = if kind == ActKind::Q8K {
        act.bsums
            .to_bytes(stream)?
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect()
    } else {
        Vec::new()
    };
    let name = match kind {
        ActKind::Q8K => format!("quant_act_q8_k {rows}x{k} (bit-exact)"),
        _ => format!("quant_act_q8_0 {rows}x{k} (bit-exact)"),
    };
    let (mismatches, max_abs) = act_mismatches(kind, &x, k, &qs, &d, &bsums)?;
    Ok(CheckResult {
        name,
        max_abs,
        max_rel: mismatches as f32,
        tol: TOL_ACT_QUANT_MISMATCHES as f32,
        tol_name: "TOL_ACT_QUANT_MISMATCHES",
        pass: mismatches == TOL_ACT_QUANT_MISMATCHES,
    })
}

/// The kernel checks at full Flash dims (model.md §4.3).
fn cases() -> Vec<Case> {
    use GgmlType::*;
    let routed = |name: &str, ty, k, rows, tokens: usize| Case {
        n_mats: 32,
        slots: 6 * tokens,
        x_group: if k == 4096 { 6 } else { 1 },
        routed: true,
        ..case(name, ty, k, rows)
    };
    let batched = |name: &str, ty, k, rows, ntok| Case {
        ntok,
        ..case(name, ty, k, rows)
    };
    vec![
        case("attn_q_a        Q8_0    4096->1024", Q8_0, 4096, 1024),
        case("attn_q_b        Q8_0    1024->32768", Q8_0, 1024, 32768),
        case("attn_kv         Q8_0    4096->512", Q8_0, 4096, 512),
        Case {
            n_mats: 8,
            slots: 8,
            ..case(
                "attn_output_a   Q8_0    grouped 8 x (4096->1024)",
                Q8_0,
                4096,
                1024,
            )
        },
        case("attn_output_b   Q8_0    8192->4096", Q8_0, 8192, 4096),
        case("ffn_gate_shexp  Q8_0    4096->2048", Q8_0, 4096, 2048),
        case("ffn_down_shexp  Q8_0    2048->4096", Q8_0, 2048, 4096),
        routed(
            "ffn_gate_exps   IQ2_XXS 4096->2048 routed 2 tok x 6",
            IQ2_XXS,
            4096,
            2048,
            2,
        ),
        routed(
            "ffn_down_exps   Q2_K    2048->4096 routed 6",
            Q2_K,
            2048,
            4096,
            1,
        ),
        routed(
            "ffn_gate_exps   Q4_K    4096->2048 routed 6",
            Q4_K,
            4096,
            2048,
            1,
        ),
        routed(
            "ffn_down_exps   Q4_K    2048->4096 routed 2 tok x 6",
            Q4_K,
            2048,
            4096,
            2,
        ),
        case("ffn_gate_inp    F16     4096->256", F16, 4096, 256),
        case("attn_compr_kv   F16     4096->1024", F16, 4096, 1024),
        case("indexer.q_b     F16     1024->8192", F16, 1024, 8192),
        case("hc_attn_fn      F16     16384->24", F16, 16384, 24),
        batched(
            "attn_q_a        Q8_0    4096->1024 batched 7 tok",
            Q8_0,
            4096,
            1024,
            7,
        ),
        batched(
            "ffn_gate_exps   IQ2_XXS 4096->2048 batched 3 tok",
            IQ2_XXS,
            4096,
            2048,
            3,
        ),
        batched(
            "ffn_down_exps   Q2_K    2048->4096 batched 5 tok",
            Q2_K,
            2048,
            4096,
            5,
        ),
        // Register-streaming IQ2_XXS / Q2_K matvecs at the other row lengths they take
        // (K = 2048·PPL: PPL 1, 2 and 4).
        routed(
            "exps_gate-like  IQ2_XXS 8192->512 routed 6",
            IQ2_XXS,
            8192,
            512,
            1,
        ),
        batched(
            "exps_gate-like  IQ2_XXS 2048->1024 batched 2 tok",
            IQ2_XXS,
            2048,
            1024,
            2,
        ),
        routed(
            "exps_down-like  Q2_K    4096->1024 routed 6",
            Q2_K,
            4096,
            1024,
            1,
        ),
        case("exps_down-like  Q2_K    8192->256", Q2_K, 8192, 256),
        // The shared-memory matvec with the GPU layout: 16-byte rows (Q2_K K = 1024) and
        // the tiny test models' rows (66 / 84 bytes, byte-staged).
        batched(
            "smem            Q2_K    1024->256 batched 3 tok",
            Q2_K,
            1024,
            256,
            3,
        ),
        routed(
            "tiny            IQ2_XXS 256->64 routed 2 tok x 6",
            IQ2_XXS,
            256,
            64,
            2,
        ),
        batched(
            "tiny            Q2_K    256->72 batched 3 tok",
            Q2_K,
            256,
            72,
            3,
        ),
        routed("tiny            Q2_K    768->40 routed 6", Q2_K, 768, 40, 1),
        batched(
            "ffn_gate_inp    F16     4096->256 batched 5 tok",
            F16,
            4096,
            256,
            5,
        ),
        batched(
            "indexer.q_b     F16     1024->8192 batched 3 tok",
            F16,
            1024,
            8192,
            3,
        ),
    ]
}

/// Runs every kernel check, calling `report` after each one.
pub fn run_kernel_checks(
    kern: &Kernels,
    mut report: impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut rng = Rng(0x05ee_dd54_c0da);
    let mut out = Vec::new();
    for (kind, k, rows) in [
        (ActKind::Q8_0, 32768, 1),
        (ActKind::Q8_0, 4096, 3),
        (ActKind::Q8K, 4096, 2),
        (ActKind::Q8K, 2048, 6),
    ] {
        let r = run_act_check(kern, &mut rng, kind, k, rows)?;
        report(&r);
        out.push(r);
    }
    for c in cases() {
        let r = run_case(kern, &mut rng, &c)?;
        report(&r);
        out.push(r);
    }
    out.extend(crate::f16_checks::run_f16_checks(kern, &mut report)?);
    out.extend(run_k_v2_checks(kern, &mut rng, &mut report)?);
    out.extend(run_tma_checks(kern, &mut rng, &mut report)?);
    out.extend(run_quant_out_checks(kern, &mut rng, &mut report)?);
    out.extend(run_gemm_checks(kern, &mut report)?);
    out.extend(run_attention_checks(kern, &mut report)?);
    out.extend(crate::attn_checks::run_attn_chain_checks(
        kern,
        &mut report,
    )?);
    Ok(out)
}

/// Every version-2 IQ2_XXS / Q2_K decode kernel (`KV2Variant`), forced in turn, on
/// the routed Flash shapes of its row length and on short matrices (fewer rows than
/// warps, rows that leave warps idle, dense slots without ids).
fn run_k_v2_checks(
    kern: &Kernels,
    rng: &mut Rng,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    use GgmlType::*;
    let routed = |name: &str, ty, k, rows, tokens: usize| Case {
        n_mats: 32,
        slots: 6 * tokens,
        x_group: if ty == IQ2_XXS { 6 } else { 1 },
        routed: true,
        ..case(name, ty, k, rows)
    };
    let shapes = [
        routed(
            "IQ2_XXS 4096->2048 routed 2 tok x 6",
            IQ2_XXS,
            4096,
            2048,
            2,
        ),
        Case {
            segs: 2,
            ..routed(
                "IQ2_XXS 2 x (4096->2048) routed 6 (gate + up)",
                IQ2_XXS,
                4096,
                2048,
                1,
            )
        },
        routed("IQ2_XXS 2048->1024 routed 6", IQ2_XXS, 2048, 1024, 1),
        Case {
            n_mats: 3,
            slots: 3,
            ..case("IQ2_XXS 4096->36 dense 3 slots", IQ2_XXS, 4096, 36)
        },
        routed("Q2_K    2048->4096 routed 6", Q2_K, 2048, 4096, 1),
        routed("Q2_K    4096->1024 routed 6", Q2_K, 4096, 1024, 1),
        routed("Q2_K    2048->72 routed 6", Q2_K, 2048, 72, 1),
        Case {
            segs: 3,
            ..routed("Q2_K    3 x (2048->200) routed 6", Q2_K, 2048, 200, 1)
        },
        // Odd segment ends: a warp's rows of one step (mv2f) span two matrices.
        Case {
            segs: 2,
            ..routed(
                "IQ2_XXS 2 x (4096->37) routed 6 (odd segments)",
                IQ2_XXS,
                4096,
                37,
                1,
            )
        },
        Case {
            segs: 3,
            ..routed(
                "Q2_K    3 x (2048->37) routed 6 (odd segments)",
                Q2_K,
                2048,
                37,
                1,
            )
        },
    ];
    let mut out = Vec::new();
    for v in kern.k_v2_variants() {
        kern.force_k_v2(KV2Force::Variant(v));
        for c in shapes
            .iter()
            .filter(|c| c.ty == v.ty && c.k == 2048 * v.ppl)
        {
            let r = run_case(kern, rng, c);
            let r = r.map(|mut r| {
                r.name = format!("{} {}", v.name(), r.name);
                r
            });
            if r.is_err() {
                kern.force_k_v2(KV2Force::Env);
            }
            let r = r?;
            report(&r);
            out.push(r);
        }
    }
    kern.force_k_v2(KV2Force::Env);
    // The default pick (the fast form unless DS4_MV2_FAST=0) on every shape.
    for c in &shapes {
        let mut r = run_case(kern, rng, c)?;
        r.name = format!("mv2 default {}", r.name);
        report(&r);
        out.push(r);
    }
    // Rows from the per-slot counters (`DS4_MV_K_V2_DYN`), default variants, every
    // shape twice: the second launch finds the counters the first left behind.
    kern.force_k_v2_dyn(true);
    for pass in ["", " again"] {
        for c in &shapes {
            let r = run_case(kern, rng, c);
            let r = r.map(|mut r| {
                r.name = format!("mv2 row counters{pass} {}", r.name);
                r
            });
            if r.is_err() {
                kern.force_k_v2_dyn(false);
            }
            let r = r?;
            report(&r);
            out.push(r);
        }
    }
    kern.force_k_v2_dyn(false);
    Ok(out)
}

// ---------------------------------------------------------------------------
// Prefill GEMM checks (`crate::gemm`): the same CPU dots, many tokens.
// ---------------------------------------------------------------------------

/// F16/F32 GEMM: f16 MMA with the activation split into f16 hi + lo parts.
pub const TOL_F16_GEMM_REL: f32 = 2e-3;

/// One dense GEMM check: `groups` weight matrices of `rows`×`k`, each reading
/// its own `k`-slice of the activation row (`x_col0 = g·k`) and writing its own
/// `rows`-slice of the output row (`y_col0 = g·rows`), as attn_output_a does.
struct GemmCase {
    name: String,
    ty: GgmlType,
    k: usize,
    rows: usize,
    ntok: usize,
    groups: usize,
}

fn gemm_case(name: &str, ty: GgmlType, k: usize, rows: usize, ntok: usize) -> GemmCase {
    GemmCase {
        name: name.to_string(),
        ty,
        k,
        rows,
        ntok,
        groups: 1,
    }
}

/// Runs `f(i)` for `i < n` on all host cores, collecting the results in order.
fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .clamp(1, 32);
    let per = n.div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| s.spawn(move || (start..(start + per).min(n)).map(f).collect::<Vec<T>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Quantized activation of one row, as the CPU dots take it.
fn cpu_act(kind: ActKind, x: &[f32]) -> (Vec<ActQ8_0>, Vec<BlockQ8K>) {
    match kind {
        ActKind::Q8_0 => (quantize_act_q8_0(x), Vec::new()),
        ActKind::Q8K => (Vec::new(), quantize_act_q8_k(x)),
        ActKind::F32 => (Vec::new(), Vec::new()),
    }
}

/// CPU dot including F32 weights (f64 accumulation).
fn cpu_dot_any(ty: GgmlType, row: &[u8], x: &[f32], q8_0: &[ActQ8_0], q8k: &[BlockQ8K]) -> f32 {
    if ty == GgmlType::F32 {
        let w: Vec<f32> = to_blocks::<f32>(row);
        return w
            .iter()
            .zip(x)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum::<f64>() as f32;
    }
    cpu_dot(ty, row, x, q8_0, q8k)
}

fn random_weights_any(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    if ty == GgmlType::F32 {
        return (0..n)
            .flat_map(|_| (0.05 * rng.unit()).to_le_bytes())
            .collect();
    }
    random_weights(rng, ty, n)
}

fn gemm_tol(ty: GgmlType) -> (f32, &'static str) {
    if matches!(ty, GgmlType::F16 | GgmlType::F32) {
        (TOL_F16_GEMM_REL, "TOL_F16_GEMM_REL")
    } else {
        (TOL_QUANT_DOT_REL, "TOL_QUANT_DOT_REL")
    }
}

fn run_gemm_case(
    kern: &Kernels,
    gk: &crate::gemm::GemmKernels,
    rng: &mut Rng,
    c: &GemmCase,
) -> Result<CheckResult> {
    use crate::gemm::Gemm;
    let stream = kern.stream();
    let row_len = c.k * c.groups;
    let out_len = c.rows * c.groups;
    let rb = matrix_bytes(c.ty, c.k, 1);
    let w = random_weights_any(rng, c.ty, c.groups * c.rows * c.k);
    let x = random_act(rng, c.ntok * row_len);
    let kind = if c.ty == GgmlType::F32 {
        ActKind::F32
    } else {
        ActKind::for_weight(c.ty)?
    };
    // CPU: activation quantized per full row (the GPU quantizes the whole row too).
    let acts: Vec<(Vec<ActQ8_0>, Vec<BlockQ8K>)> = par_map(c.ntok, |t| {
        cpu_act(kind, &x[t * row_len..(t + 1) * row_len])
    });
    let (blk_q8_0, blk_q8k) = (32, 256);
    let cpu: Vec<f32> = par_map(c.ntok, |t| {
        let (q0, qk) = &acts[t];
        let mut out = vec![0f32; out_len];
        for g in 0..c.groups {
            let col0 = g * c.k;
            let xr = &x[t * row_len + col0..t * row_len + col0 + c.k];
            let q0s = if q0.is_empty() {
                q0.as_slice()
            } else {
                &q0[col0 / blk_q8_0..(col0 + c.k) / blk_q8_0]
            };
            let qks = if qk.is_empty() {
                qk.as_slice()
            } else {
                &qk[col0 / blk_q8k..(col0 + c.k) / blk_q8k]
            };
            for r in 0..c.rows {
                let off = (g * c.rows + r) * rb;
                out[g * c.rows + r] = cpu_dot_any(c.ty, &w[off..off + rb], xr, q0s, qks);
            }
        }
        out
    })
    .into_iter()
    .flatten()
    .collect();

    // The kernels read Q8_0 rearranged (codes, then scales), as the upload stores it.
    let w_dev = DevBuf::from_bytes(stream, &crate::layout::to_gpu(c.ty, &w, c.k)?)?;
    let x_dev = DevBuf::from_f32(stream, &x)?;
    let y_dev = DevBuf::from_bytes(stream, &vec![0xffu8; cpu.len() * 4])?;
    let act;
    let input = match kind {
        ActKind::F32 => MvInput::F32(x_dev.ptr),
        _ => {
            act = ActBuf::new(stream, kind, row_len, c.ntok)?;
            kern.quantize(x_dev.ptr, &act)?;
            MvInput::Quant(&act)
        }
    };
    for g in 0..c.groups {
        gk.gemm(&Gemm {
            ty: c.ty,
            w: w_dev.ptr + (g * c.rows * rb) as u64,
            k: c.k,
            rows: c.rows,
            x: input,
            x_col0: g * c.k,
            x_row_len: row_len,
            ntok: c.ntok,
            y: y_dev.ptr,
            y_row_stride: out_len,
            y_col0: g * c.rows,
        })?;
    }
    stream.synchronize()?;
    let gpu = y_dev.to_f32(stream)?;
    let (tol, tol_name) = gemm_tol(c.ty);
    Ok(compare(c.name.clone(), &gpu, &cpu, tol, tol_name))
}

/// One routed check: `n_tok` tokens × `top` experts of `n_expert`; `shared_act`:
/// the `top` slots of a token share its activation row (gate/up), else each
/// slot has its own (down). CPU reference on every `sample`-th slot; every
/// output element must be written (finite).
struct RoutedCase {
    name: String,
    ty: GgmlType,
    k: usize,
    rows: usize,
    n_expert: usize,
    n_tok: usize,
    top: usize,
    shared_act: bool,
    sample: usize,
}

fn run_routed_case(
    kern: &Kernels,
    gk: &crate::gemm::GemmKernels,
    rng: &mut Rng,
    c: &RoutedCase,
) -> Result<CheckResult> {
    use crate::gemm::{GemmScratch, RoutedGemm};
    let stream = kern.stream();
    let n_slots = c.n_tok * c.top;
    let x_group = if c.shared_act { c.top } else { 1 };
    let act_rows = n_slots / x_group;
    let mat = matrix_bytes(c.ty, c.k, c.rows);
    let rb = mat / c.rows;
    let w = random_weights(rng, c.ty, c.n_expert * c.rows * c.k);
    let x = random_act(rng, act_rows * c.k);
    let mut ids = Vec::with_capacity(n_slots);
    while ids.len() < n_slots {
        let e = (rng.next() % c.n_expert as u64) as i32;
        let start = ids.len() / c.top * c.top;
        if !ids[start..].contains(&e) {
            ids.push(e);
        }
    }
    let kind = ActKind::for_weight(c.ty)?;
    let sampled: Vec<usize> = (0..n_slots).step_by(c.sample.max(1)).collect();
    let cpu: Vec<f32> = par_map(sampled.len(), |i| {
        let s = sampled[i];
        let arow = s / x_group;
        let xr = &x[arow * c.k..(arow + 1) * c.k];
        let (q0, qk) = cpu_act(kind, xr);
        let e = ids[s] as usize;
        (0..c.rows)
            .map(|r| {
                let off = e * mat + r * rb;
                cpu_dot(c.ty, &w[off..off + rb], xr, &q0, &qk)
            })
            .collect::<Vec<f32>>()
    })
    .into_iter()
    .flatten()
    .collect();

    // The kernels read Q8_0 rearranged (codes, then scales), as the upload stores it.
    let w_dev = DevBuf::from_bytes(stream, &crate::layout::to_gpu(c.ty, &w, c.k)?)?;
    drop(w);
    let x_dev = DevBuf::from_f32(stream, &x)?;
    let ids_dev = DevBuf::from_bytes(stream, bytemuck::cast_slice(&ids))?;
    let y_dev = DevBuf::from_bytes(stream, &vec![0xffu8; n_slots * c.rows * 4])?;
    let act = ActBuf::new(stream, kind, c.k, act_rows)?;
    kern.quantize(x_dev.ptr, &act)?;
    let scratch = GemmScratch::new(stream, n_slots, c.n_expert)?;
    gk.routed_gemm(
        &RoutedGemm {
            ty: c.ty,
            w: w_dev.ptr,
            w_expert_stride: mat as u64,
            n_expert: c.n_expert,
            k: c.k,
            rows: c.rows,
            ids: ids_dev.ptr,
            n_slots,
            x_group,
            x: &act,
            y: y_dev.ptr,
        },
        &scratch,
    )?;
    stream.synchronize()?;
    let all = y_dev.to_f32(stream)?;
    let unwritten = all.iter().filter(|v| !v.is_finite()).count();
    let gpu: Vec<f32> = sampled
        .iter()
        .flat_map(|&s| all[s * c.rows..(s + 1) * c.rows].iter().copied())
        .collect();
    let mut r = compare(
        c.name.clone(),
        &gpu,
        &cpu,
        TOL_QUANT_DOT_REL,
        "TOL_QUANT_DOT_REL",
    );
    if unwritten > 0 {
        r.pass = false;
        r.name = format!("{} ({unwritten} outputs unwritten)", r.name);
    }
    Ok(r)
}

/// The GEMM checks: every type at Flash dims (37 and 512 tokens) and tiny
/// shapes, the grouped attn_output_a, routed experts (2048 tokens × 6 of 256,
/// and 4 experts).
pub fn run_gemm_checks(
    kern: &Kernels,
    mut report: impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    use GgmlType::*;
    let gk = crate::gemm::GemmKernels::load_on(kern.stream())?;
    let mut rng = Rng(0x9e44_0001);
    let mut out = Vec::new();
    let dense = vec![
        gemm_case(
            "gemm attn_q_a   Q8_0    4096->1024 x 37 tok",
            Q8_0,
            4096,
            1024,
            37,
        ),
        gemm_case(
            "gemm attn_q_b   Q8_0    1024->32768 x 37 tok",
            Q8_0,
            1024,
            32768,
            37,
        ),
        gemm_case(
            "gemm shexp_down Q8_0    2048->4096 x 512 tok",
            Q8_0,
            2048,
            4096,
            512,
        ),
        gemm_case(
            "gemm exps_gate  IQ2_XXS 4096->2048 x 37 tok",
            IQ2_XXS,
            4096,
            2048,
            37,
        ),
        gemm_case(
            "gemm exps_gate  IQ2_XXS 4096->2048 x 512 tok",
            IQ2_XXS,
            4096,
            2048,
            512,
        ),
        gemm_case(
            "gemm exps_down  Q2_K    2048->4096 x 37 tok",
            Q2_K,
            2048,
            4096,
            37,
        ),
        gemm_case(
            "gemm exps_down  Q2_K    2048->4096 x 512 tok",
            Q2_K,
            2048,
            4096,
            512,
        ),
        gemm_case(
            "gemm exps_gate  Q4_K    4096->2048 x 37 tok",
            Q4_K,
            4096,
            2048,
            37,
        ),
        gemm_case(
            "gemm exps_down  Q4_K    2048->4096 x 512 tok",
            Q4_K,
            2048,
            4096,
            512,
        ),
        gemm_case(
            "gemm compr_kv   F16     4096->1024 x 37 tok",
            F16,
            4096,
            1024,
            37,
        ),
        gemm_case(
            "gemm idx.q_b    F16     1024->8192 x 512 tok",
            F16,
            1024,
            8192,
            512,
        ),
        gemm_case(
            "gemm hc_attn_fn F16     16384->24 x 512 tok",
            F16,
            16384,
            24,
            512,
        ),
        gemm_case(
            "gemm tiny       Q8_0    128->200 x 5 tok",
            Q8_0,
            128,
            200,
            5,
        ),
        gemm_case(
            "gemm tiny       Q8_0    160->64 x 70 tok",
            Q8_0,
            160,
            64,
            70,
        ),
        gemm_case(
            "gemm tiny       Q2_K    256->72 x 37 tok",
            Q2_K,
            256,
            72,
            37,
        ),
        gemm_case(
            "gemm tiny       Q4_K    256->130 x 3 tok",
            Q4_K,
            256,
            130,
            3,
        ),
        gemm_case(
            "gemm tiny       IQ2_XXS 256->64 x 70 tok",
            IQ2_XXS,
            256,
            64,
            70,
        ),
        gemm_case(
            "gemm attn_out_b Q8_0    8192->4096 x 37 tok",
            Q8_0,
            8192,
            4096,
            37,
        ),
        gemm_case(
            "gemm tiny       Q8_0    256->200 x 37 tok",
            Q8_0,
            256,
            200,
            37,
        ),
        gemm_case(
            "gemm tiny       IQ2_XXS 512->80 x 19 tok",
            IQ2_XXS,
            512,
            80,
            19,
        ),
        gemm_case("gemm tiny       F16     128->100 x 9 tok", F16, 128, 100, 9),
        gemm_case("gemm tiny       F32     256->96 x 37 tok", F32, 256, 96, 37),
        GemmCase {
            groups: 8,
            ..gemm_case(
                "gemm attn_out_a Q8_0    grouped 8 x (4096->1024) x 37 tok",
                Q8_0,
                4096,
                1024,
                37,
            )
        },
    ];
    for c in &dense {
        let r = run_gemm_case(kern, &gk, &mut rng, c)?;
        report(&r);
        out.push(r);
    }
    let routed = |name: &str, ty, k, rows, n_expert, n_tok, top, shared_act, sample| RoutedCase {
        name: name.to_string(),
        ty,
        k,
        rows,
        n_expert,
        n_tok,
        top,
        shared_act,
        sample,
    };
    let routed_cases = vec![
        routed(
            "gemm routed IQ2_XXS 4096->2048 2048 tok x 6/256",
            IQ2_XXS,
            4096,
            2048,
            256,
            2048,
            6,
            true,
            97,
        ),
        routed(
            "gemm routed Q2_K    2048->4096 2048 tok x 6/256",
            Q2_K,
            2048,
            4096,
            256,
            2048,
            6,
            false,
            97,
        ),
        routed(
            "gemm routed Q4_K    4096->2048 512 tok x 6/256",
            Q4_K,
            4096,
            2048,
            256,
            512,
            6,
            true,
            31,
        ),
        routed(
            "gemm routed Q8_0    4096->2048 300 tok x 6/256",
            Q8_0,
            4096,
            2048,
            256,
            300,
            6,
            true,
            13,
        ),
        routed(
            "gemm routed tiny Q2_K 256->96 150 tok x 2/4",
            Q2_K,
            256,
            96,
            4,
            150,
            2,
            true,
            1,
        ),
        routed(
            "gemm routed tiny IQ2_XXS 256->64 40 tok x 3/4",
            IQ2_XXS,
            256,
            64,
            4,
            40,
            3,
            false,
            1,
        ),
    ];
    for c in &routed_cases {
        let r = run_routed_case(kern, &gk, &mut rng, c)?;
        report(&r);
        out.push(r);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Attention checks (`crate::attention`): the tensor-core kernels against the
// SIMT kernels of ops.cu (every output) and a CPU reference in f64 (every
// token of small cases, a sample of long chunks).
// ---------------------------------------------------------------------------

/// Tensor-core attention (f16 hi/lo splits, f32 softmax) vs f32/f64 references:
/// max |diff| / max |reference|.
pub const TOL_ATTENTION_REL: f32 = 1e-5;

/// One attention shape: `n` tokens from position `pos0`.
struct AttCase {
    name: &'static str,
    n_head: usize,
    hd: usize,
    window: usize,
    ratio: usize,
    sel_k: Option<usize>,
    n: usize,
    pos0: usize,
    /// Compressed rows the launch plans for, where not every cached row (the backend
    /// plans for top_k in a CSA layer whose indexer is skipped).
    comp_plan: Option<usize>,
}

/// Random inputs of one case, laid out as the backend's buffers.
struct AttData {
    q: Vec<f32>,
    rows: Vec<f32>,
    ring: Vec<f32>,
    ring_cap: usize,
    comp: Vec<f32>,
    comp_cap: usize,
    /// `[n][sel_k]`, picks then −1 padding (some rows end in a not-yet-visible row).
    sel: Vec<i32>,
    sinks: Vec<f32>,
}

fn att_data(rng: &mut Rng, c: &AttCase) -> AttData {
    let (nh, hd) = (c.n_head, c.hd);
    let mut rand =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| scale * rng.unit()).collect() };
    // Queries ×3: scores of unit spread, so the softmax is neither flat nor one-hot.
    let q = rand(c.n * nh * hd, 3.0);
    let rows = rand(c.n * hd, 1.0);
    let ring_cap = c.window;
    let ring = rand(ring_cap * hd, 1.0);
    let comp_cap = (c.pos0 + c.n).checked_div(c.ratio).map_or(0, |v| v + 1);
    let comp = rand(comp_cap.max(1) * hd, 1.0);
    let sinks = rand(nh, 2.0);
    let mut sel = Vec::new();
    if let Some(k) = c.sel_k {
        sel.reserve(c.n * k);
        for i in 0..c.n {
            let n_vis = (c.pos0 + i + 1) / c.ratio;
            let count = n_vis.min(k.saturating_sub(1 + (rng.next() % 8) as usize));
            let mut pool: Vec<i32> = (0..n_vis as i32).collect();
            for j in 0..count {
                let r = j + (rng.next() % (n_vis - j) as u64) as usize;
                pool.swap(j, r);
                sel.push(pool[j]);
            }
            // Every third row: a future row right after the picks (must end the list).
            let mut rest = k - count;
            if i % 3 == 1 && rest > 0 {
                sel.push((n_vis + 1) as i32);
                rest -= 1;
            }
            sel.extend(std::iter::repeat_n(-1, rest));
        }
    }
    AttData {
        q,
        rows,
        ring,
        ring_cap,
        comp,
        comp_cap,
        sel,
        sinks,
    }
}

/// Attention of token `i` in f64 (model.md §10): raw window, then the usable
/// compressed rows, softmax with the sink.
fn cpu_attention_token(c: &AttCase, d: &AttData, i: usize) -> Vec<f32> {
    let (nh, hd) = (c.n_head, c.hd);
    let p = c.pos0 + i;
    let first = (p + 1).saturating_sub(c.window);
    let mut keys: Vec<&[f32]> = (first..=p)
        .map(|t| {
            if t >= c.pos0 {
                &d.rows[(t - c.pos0) * hd..(t - c.pos0 + 1) * hd]
            } else {
                let s = t % d.ring_cap;
                &d.ring[s * hd..(s + 1) * hd]
            }
        })
        .collect();
    let n_vis = p
        .checked_add(1)
        .and_then(|v| v.checked_div(c.ratio))
        .unwrap_or(0);
    let comp_rows: Vec<usize> = match c.sel_k {
        Some(k) => d.sel[i * k..(i + 1) * k]
            .iter()
            .take_while(|&&v| v >= 0 && (v as usize) < n_vis)
            .map(|&v| v as usize)
            .collect(),
        None => (0..n_vis).collect(),
    };
    keys.extend(comp_rows.iter().map(|&r| &d.comp[r * hd..(r + 1) * hd]));
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; nh * hd];
    for h in 0..nh {
        let qh = &d.q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
        let s: Vec<f64> = keys
            .iter()
            .map(|k| {
                qh.iter()
                    .zip(*k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let sink = d.sinks[h] as f64;
        let m = s.iter().copied().fold(sink, f64::max);
        let den = (sink - m).exp() + s.iter().map(|v| (v - m).exp()).sum::<f64>();
        let mut o = vec![0f64; hd];
        for (k, v) in keys.iter().zip(&s) {
            let w = (v - m).exp() / den;
            for (oo, &kk) in o.iter_mut().zip(*k) {
                *oo += w * kk as f64;
            }
        }
        for (dst, v) in out[h * hd..(h + 1) * hd].iter_mut().zip(o) {
            *dst = v as f32;
        }
    }
    out
}

/// `compare` plus, on failure, where the worst element is (token / head / dim).
fn compare_att(
    name: String,
    got: &[f32],
    want: &[f32],
    tokens: &[usize],
    nh: usize,
    hd: usize,
) -> CheckResult {
    let mut r = compare(name, got, want, TOL_ATTENTION_REL, "TOL_ATTENTION_REL");
    if !r.pass {
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| {
                if (g - w).is_finite() {
                    (g - w).abs()
                } else {
                    f32::INFINITY
                }
            })
            .enumerate()
            .fold((0, -1f32), |a, (j, e)| if e > a.1 { (j, e) } else { a });
        let (row, col) = (worst.0 / (nh * hd), worst.0 % (nh * hd));
        r.name = format!(
            "{} [worst: token {} head {} dim {}: {} vs {}]",
            r.name,
            tokens.get(row).copied().unwrap_or(row),
            col / hd,
            col % hd,
            got.get(worst.0).copied().unwrap_or(f32::NAN),
            want.get(worst.0).copied().unwrap_or(f32::NAN)
        );
    }
    r
}

/// The attention checks: Flash dims (64 heads, hd 512, window 128) for the CSA
/// (ratio 4, 512 picks), HCA (ratio 128) and window-only layers, decode (1 and 5
/// tokens at pos ~2000, ring in use) and chunks of 64 / 2048 tokens; 16 heads;
/// the tiny models' 4 heads of dim 256.
pub fn run_attention_checks(
    kern: &Kernels,
    mut report: impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    use crate::attention::{
        AttentionKernels, AttnLaunch, DecodePath, SPLIT_MAX_TOKENS, scratch_bytes,
    };
    let stream = kern.stream();
    let ak = AttentionKernels::load_on(stream)?;
    // The split decode kernels with and without the queries in registers.
    let ak_sd = AttentionKernels::load_on(stream)?.with_qreg(false);
    let ak_sq = AttentionKernels::load_on(stream)?
        .with_qreg(true)
        .with_sq_8warps(false);
    let ak_sq8 = AttentionKernels::load_on(stream)?
        .with_qreg(true)
        .with_sq_8warps(true);
    let (sm, nvrtc_version) = crate::compile::target_of(stream)?;
    let ops = crate::compile::load_module(
        stream.context(),
        &crate::compile::OPS,
        &crate::compile::arch_for(sm),
        nvrtc_version,
    )?;
    let flash = |name, ratio, sel_k, n, pos0| AttCase {
        name,
        n_head: 64,
        hd: 512,
        window: 128,
        ratio,
        sel_k,
        n,
        pos0,
        comp_plan: None,
    };
    let cases = [
        flash("flash csa  ratio 4 sel 512   decode", 4, Some(512), 1, 2001),
        // The indexer skipped (every token sees at most 512 rows): all rows, no picks.
        AttCase {
            comp_plan: Some(512),
            ..flash("flash csa  ratio 4 no picks  decode", 4, None, 1, 2047)
        },
        AttCase {
            comp_plan: Some(512),
            ..flash("flash csa  ratio 4 no picks 2048 tok", 4, None, 2048, 0)
        },
        flash("flash csa  ratio 4 sel 512   5 tok ", 4, Some(512), 5, 1998),
        flash(
            "flash csa  ratio 4 sel 512   64 tok",
            4,
            Some(512),
            64,
            1000,
        ),
        flash(
            "flash csa  ratio 4 sel 512 2048 tok",
            4,
            Some(512),
            2048,
            2048,
        ),
        flash("flash hca  ratio 128         decode", 128, None, 1, 2003),
        // 1222 keys: past the cluster kernel's bound, so decode takes split + combine.
        flash("flash hca  ratio 128 decode at 140K", 128, None, 1, 140_001),
        flash("flash hca  ratio 128         64 tok", 128, None, 64, 0),
        flash("flash hca  ratio 128       2048 tok", 128, None, 2048, 2048),
        flash("flash swa  ratio 0           decode", 0, None, 1, 1999),
        flash("flash swa  ratio 0         2048 tok", 0, None, 2048, 0),
        AttCase {
            n_head: 16,
            ..flash("16 heads   ratio 128         20 tok", 128, None, 20, 300)
        },
        AttCase {
            n_head: 16,
            ..flash("16 heads   ratio 4 sel 64   decode", 4, Some(64), 1, 300)
        },
        AttCase {
            name: "tiny 4x256 ratio 4 sel 16    decode",
            n_head: 4,
            hd: 256,
            window: 32,
            ratio: 4,
            sel_k: Some(16),
            n: 1,
            pos0: 100,
            comp_plan: None,
        },
        AttCase {
            name: "tiny 4x256 ratio 4 sel 16    37 tok",
            n_head: 4,
            hd: 256,
            window: 32,
            ratio: 4,
            sel_k: Some(16),
            n: 37,
            pos0: 50,
            comp_plan: None,
        },
        AttCase {
            name: "tiny 4x256 ratio 0           37 tok",
            n_head: 4,
            hd: 256,
            window: 32,
            ratio: 0,
            sel_k: None,
            n: 37,
            pos0: 0,
            comp_plan: None,
        },
    ];
    let mut rng = Rng(0xa77e_5000);
    let mut out = Vec::new();
    for c in &cases {
        let d = att_data(&mut rng, c);
        let (nh, hd, n) = (c.n_head, c.hd, c.n);
        let w = nh * hd;
        let dq = DevBuf::from_f32(stream, &d.q)?;
        let drows = DevBuf::from_f32(stream, &d.rows)?;
        let dring = DevBuf::from_f32(stream, &d.ring)?;
        let dcomp = DevBuf::from_f32(stream, &d.comp)?;
        let dsel = DevBuf::from_bytes(stream, bytemuck::cast_slice(&d.sel))?;
        let dsinks = DevBuf::from_f32(stream, &d.sinks)?;
        let dpos = DevBuf::from_bytes(stream, &(c.pos0 as i32).to_le_bytes())?;
        let mut a = AttnLaunch {
            q: dq.ptr,
            ld_q: w,
            rows: drows.ptr,
            ld_rows: hd,
            ring: dring.ptr,
            ring_cap: d.ring_cap,
            comp: if c.ratio > 0 { dcomp.ptr } else { 0 },
            comp_cap: c.comp_plan.unwrap_or(d.comp_cap),
            ratio: c.ratio,
            sel: if c.sel_k.is_some() { dsel.ptr } else { 0 },
            sel_k: c.sel_k.unwrap_or(0),
            sinks: dsinks.ptr,
            window: c.window,
            pos: dpos.ptr,
            n_head: nh,
            head_dim: hd,
            n_tokens: n,
            out: 0,
            ld_out: w,
            scratch: 0,
            scratch_bytes: 0,
            // Decode appends the token's row to the ring in the kernel, as the backend does.
            ring_append: n == 1,
        };
        let sb = scratch_bytes(nh, hd, n, a.max_keys());
        let dscratch = DevBuf::zeros(stream, sb.max(4))?;
        let dout = DevBuf::from_bytes(stream, &vec![0xffu8; n * w * 4])?;
        a.out = dout.ptr;
        a.scratch = dscratch.ptr;
        a.scratch_bytes = sb;
        ak.launch(stream, &a)?;
        // The SIMT kernel, launched as the backend did before the tensor-core path.
        let dold = DevBuf::from_bytes(stream, &vec![0xffu8; n * w * 4])?;
        {
            let f = crate::compile::load_with_smem(
                &ops,
                &format!("attention_{}", hd / 128),
                200 * 1024,
            )?;
            let decode = n <= 8;
            let hb = if decode {
                1
            } else {
                [8usize, 4, 2, 1]
                    .into_iter()
                    .find(|&h| nh.is_multiple_of(h))
                    .unwrap_or(1)
            };
            let tile_smem = if decode { 0 } else { 32 * (hd + 4) * 4 };
            let smem = (8 * (2 + hd) * 4).max(hb * hd * 4 + tile_smem);
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: ((nh / hb) as u32, n as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let i = |v: usize| v as i32;
            let (ldq, ldr, rc, ratio, sk, win, hb32, tiled, ldo) = (
                i(w),
                i(hd),
                i(d.ring_cap),
                i(c.ratio),
                i(a.sel_k),
                i(c.window),
                i(hb),
                i(usize::from(!decode)),
                i(w),
            );
            use cudarc::driver::PushKernelArg;
            let mut b = stream.launch_builder(&f);
            b.arg(&a.q)
                .arg(&ldq)
                .arg(&a.rows)
                .arg(&ldr)
                .arg(&a.ring)
                .arg(&rc)
                .arg(&a.comp)
                .arg(&ratio)
                .arg(&a.sel)
                .arg(&sk)
                .arg(&a.sinks)
                .arg(&win)
                .arg(&a.pos)
                .arg(&hb32)
                .arg(&tiled)
                .arg(&dold.ptr)
                .arg(&ldo);
            // SAFETY: the argument list of ATT_KERNEL in ops.cu; buffers sized above.
            unsafe { b.launch(cfg) }?;
        }
        stream.synchronize()?;
        let got = dout.to_f32(stream)?;
        let old = dold.to_f32(stream)?;
        if a.ring_append {
            // The ring after the append: slot pos0 % ring_cap holds the token's row
            // exactly, every other slot is untouched.
            let mut want = d.ring.clone();
            let slot = c.pos0 % d.ring_cap;
            want[slot * hd..(slot + 1) * hd].copy_from_slice(&d.rows[..hd]);
            let r = compare(
                format!("attention ring append {} {}h x {}", c.name, nh, hd),
                &dring.to_f32(stream)?,
                &want,
                0.0,
                "exact",
            );
            report(&r);
            out.push(r);
        }
        let all: Vec<usize> = (0..n).collect();
        let r = compare_att(
            format!("attention tc vs simt {} {}h x {}", c.name, nh, hd),
            &got,
            &old,
            &all,
            nh,
            hd,
        );
        report(&r);
        out.push(r);
        // CPU: every token of small cases, a spread of positions in long chunks.
        let tokens: Vec<usize> = if n <= 64 {
            all
        } else {
            let mut t: Vec<usize> = [0, 1, 2, 127, 128, 129, 511, 512, 1023, 1024, n - 2, n - 1]
                .into_iter()
                .chain((0..n).step_by(173))
                .filter(|&t| t < n)
                .collect();
            t.sort_unstable();
            t.dedup();
            t
        };
        let cpu: Vec<f32> = par_map(tokens.len(), |j| cpu_attention_token(c, &d, tokens[j]))
            .into_iter()
            .flatten()
            .collect();
        // The sampled tokens' rows of a GPU output against the CPU's.
        let check = |path_vs_cpu: &str, all: &[f32]| {
            let gpu: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| all[t * w..(t + 1) * w].iter().copied())
                .collect();
            let name = format!(
                "attention {path_vs_cpu} {} {}h x {} ({} tok)",
                c.name,
                nh,
                hd,
                tokens.len()
            );
            compare_att(name, &gpu, &cpu, &tokens, nh, hd)
        };
        let r = check("tc vs cpu ", &got);
        report(&r);
        out.push(r);
        // Decode on sm_90+: the path the backend did not take (cluster kernel or
        // split + combine) against the CPU too.
        if n <= SPLIT_MAX_TOKENS && ak.has_cluster_decode() {
            let (other, other_name) = if ak.uses_cluster_decode(a.max_keys()) {
                (DecodePath::Split, "split  ")
            } else {
                (DecodePath::Cluster, "cluster")
            };
            let dsplit = DevBuf::from_bytes(stream, &vec![0xffu8; n * w * 4])?;
            let b = AttnLaunch {
                out: dsplit.ptr,
                ..a
            };
            ak.launch_path(stream, &b, other)?;
            stream.synchronize()?;
            let r = check(&format!("{other_name} vs cpu"), &dsplit.to_f32(stream)?);
            report(&r);
            out.push(r);
        }
        // Decode: the split kernels att_sd and (head dim 512) att_sq, 16- or 32-key tiles
        // by the grid size, against the CPU and against the att_tc_1 split kernel they
        // replace (DS4_ATTN_SD=0).
        if n <= SPLIT_MAX_TOKENS {
            let run = |k: &AttentionKernels, path| -> Result<Vec<f32>> {
                let dsplit = DevBuf::from_bytes(stream, &vec![0xffu8; n * w * 4])?;
                k.launch_path(
                    stream,
                    &AttnLaunch {
                        out: dsplit.ptr,
                        ..a
                    },
                    path,
                )?;
                stream.synchronize()?;
                dsplit.to_f32(stream)
            };
            let legacy = run(&ak, DecodePath::SplitLegacy)?;
            let variants: &[(&AttentionKernels, &str)] = if hd == 512 {
                &[(&ak_sd, "att_sd"), (&ak_sq, "att_sq"), (&ak_sq8, "att_sq8")]
            } else {
                &[(&ak_sd, "att_sd")]
            };
            for &(k, kname) in variants {
                let got = run(k, DecodePath::Split)?;
                for r in [
                    check(&format!("{kname} vs cpu"), &got),
                    compare_att(
                        format!(
                            "attention {kname} vs att_tc_1 split {} {}h x {}",
                            c.name, nh, hd
                        ),
                        &got,
                        &legacy,
                        &tokens,
                        nh,
                        hd,
                    ),
                ] {
                    report(&r);
                    out.push(r);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_have_finite_scales() {
        let mut rng = Rng(1);
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q2_K,
            GgmlType::Q4_K,
            GgmlType::IQ2_XXS,
            GgmlType::F16,
        ] {
            let w = random_weights(&mut rng, ty, 4096);
            let mut deq = vec![0f32; 4096];
            ds4_quant::dequantize_row(ty, &w, &mut deq).unwrap();
            assert!(deq.iter().all(|v| v.is_finite()), "{ty:?}");
            assert!(deq.iter().any(|&v| v != 0.0), "{ty:?}");
        }
    }

    #[test]
    fn compare_flags_nan_and_large_errors() {
        let cpu = [1.0f32, -2.0, 0.5];
        assert!(compare("ok".into(), &[1.0, -2.0, 0.5], &cpu, 1e-4, "t").pass);
        assert!(!compare("nan".into(), &[1.0, f32::NAN, 0.5], &cpu, 1e-4, "t").pass);
        assert!(!compare("off".into(), &[1.0, -2.1, 0.5], &cpu, 1e-4, "t").pass);
        assert!(!compare("short".into(), &[1.0], &cpu, 1e-4, "t").pass);
    }
}
