//! GPU checks of the fused decode kernels of the attention chain (compressor steps,
//! indexer query preparation, split merge) against the kernels they replace, at Flash
//! dims.
//! The replaced kernels are the reference: the tiny-model parity runs proved them
//! against the CPU backend, and the fused kernels do the same arithmetic, so the
//! results must agree bit for bit (every output element and the compressor state).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};

use crate::Result;
use crate::backend::CompStepArgs;
use crate::compile::KernelSource;
use crate::kernels::{DevBuf, Kernels};
use crate::selftest::{CheckResult, Rng};

/// Fused kernel vs the kernels it replaces: elements whose bits differ (none allowed).
pub const TOL_FUSED_EXACT_MISMATCHES: usize = 0;

/// Elements of `a` and `b` whose bits differ (a length mismatch counts every element).
fn mismatches(a: &[f32], b: &[f32]) -> usize {
    if a.len() != b.len() {
        return a.len().max(b.len());
    }
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

fn exact(name: String, a: &[f32], b: &[f32]) -> CheckResult {
    let bad = mismatches(a, b);
    CheckResult {
        name,
        max_abs: bad as f32,
        max_rel: bad as f32,
        tol: TOL_FUSED_EXACT_MISMATCHES as f32,
        tol_name: "mismatching elements",
        pass: bad == TOL_FUSED_EXACT_MISMATCHES && !a.is_empty(),
    }
}

/// `src` compiled (or loaded from the cache) for the device of `stream`.
fn module(stream: &Arc<CudaStream>, src: &KernelSource) -> Result<Arc<CudaModule>> {
    let (sm, nvrtc_version) = crate::compile::target_of(stream)?;
    crate::compile::load_module(
        stream.context(),
        src,
        &crate::compile::arch_for(sm),
        nvrtc_version,
    )
}

/// One compressor: ratio `r`, `coff` halves, rows of `dc`, finish `mode` (0 plain,
/// 1 KV FP8 + f16, 2 indexer QAT + f16), decode steps at `pos`.
struct CompCase {
    name: &'static str,
    r: usize,
    coff: usize,
    dc: usize,
    mode: i32,
    pos: std::ops::Range<usize>,
}

/// The compressor state of one path: frontier (kv, score) and the compressed rows.
struct CompState {
    fr_kv: DevBuf,
    fr_score: DevBuf,
    rows: DevBuf,
}

impl CompState {
    fn new(
        stream: &Arc<CudaStream>,
        fr_kv: &[f32],
        fr_score: &[f32],
        rows: &[f32],
    ) -> Result<Self> {
        Ok(Self {
            fr_kv: DevBuf::from_f32(stream, fr_kv)?,
            fr_score: DevBuf::from_f32(stream, fr_score)?,
            rows: DevBuf::from_f32(stream, rows)?,
        })
    }
}

/// `comp_steps` (one launch per decode token) against `comp_pool` + `comp_finish`
/// over decode steps that close rows, from the same random state and projections.
fn comp_checks(
    stream: &Arc<CudaStream>,
    ops: &Arc<CudaModule>,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let pool = ops.load_function("comp_pool")?;
    let finish = ops.load_function("comp_finish")?;
    let step = ops.load_function("comp_steps")?;
    let cases = [
        CompCase {
            name: "attn comp  ratio 4   dc 512 fp8",
            r: 4,
            coff: 2,
            dc: 512,
            mode: 1,
            pos: 2000..2010,
        },
        CompCase {
            name: "attn comp  ratio 128 dc 512 fp8",
            r: 128,
            coff: 1,
            dc: 512,
            mode: 1,
            pos: 1020..1026,
        },
        CompCase {
            name: "attn comp  ratio 4   dc 512 plain",
            r: 4,
            coff: 2,
            dc: 512,
            mode: 0,
            pos: 5..13,
        },
        CompCase {
            name: "index comp ratio 4   dc 128 qat",
            r: 4,
            coff: 2,
            dc: 128,
            mode: 2,
            pos: 2001..2011,
        },
    ];
    let n_rot = 64usize;
    let eps = 1e-6f32;
    let mut rng = Rng(0xc0_4a55);
    let mut out = Vec::new();
    for c in &cases {
        let wdt = c.coff * c.dc;
        let mut rand = |n: usize, scale: f32, bias: f32| -> Vec<f32> {
            (0..n).map(|_| bias + scale * rng.unit()).collect()
        };
        let fr_kv = rand(c.coff * c.r * wdt, 1.0, 0.0);
        let fr_score = rand(c.coff * c.r * wdt, 2.0, 0.0);
        let cap = c.pos.end / c.r + 1;
        let rows = rand(cap * c.dc, 1.0, 0.0);
        let ape = DevBuf::from_f32(stream, &rand(c.r * wdt, 0.5, 0.0))?;
        let norm = DevBuf::from_f32(stream, &rand(c.dc, 0.25, 1.0))?;
        let freqs: Vec<f32> = (0..n_rot / 2)
            .map(|k| 10000f32.powf(-2.0 * k as f32 / n_rot as f32))
            .collect();
        let freqs = DevBuf::from_f32(stream, &freqs)?;
        let fused = CompState::new(stream, &fr_kv, &fr_score, &rows)?;
        let split = CompState::new(stream, &fr_kv, &fr_score, &rows)?;
        // Every step's projections and position stay alive until the final sync.
        let mut keep = Vec::new();
        for p in c.pos.clone() {
            let kv = DevBuf::from_f32(stream, &rand(wdt, 1.0, 0.0))?;
            let score = DevBuf::from_f32(stream, &rand(wdt, 2.0, 0.0))?;
            let pos = DevBuf::from_bytes(stream, &(p as i32).to_le_bytes())?;
            launch_comp_pair(
                stream, &pool, &finish, c, &split, &kv, &score, &pos, &ape, &norm, &freqs, n_rot,
                eps,
            )?;
            launch_comp_step(
                stream, &step, c, &fused, &kv, &score, &pos, &ape, &norm, &freqs, n_rot, eps,
            )?;
            keep.push((kv, score, pos));
        }
        stream.synchronize()?;
        for (what, a, b) in [
            ("rows    ", &fused.rows, &split.rows),
            ("fr kv   ", &fused.fr_kv, &split.fr_kv),
            ("fr score", &fused.fr_score, &split.fr_score),
        ] {
            let r = exact(
                format!(
                    "comp_steps vs pool+finish {} {} ({} steps)",
                    c.name,
                    what,
                    c.pos.len()
                ),
                &a.to_f32(stream)?,
                &b.to_f32(stream)?,
            );
            report(&r);
            out.push(r);
        }
        // The steps closed rows: the reference changed them (else the check is empty).
        let changed = mismatches(&split.rows.to_f32(stream)?, &rows);
        let r = CheckResult {
            name: format!(
                "comp rows closed by the steps {} (elements changed)",
                c.name
            ),
            max_abs: changed as f32,
            max_rel: changed as f32,
            tol: c.dc as f32,
            tol_name: "at least one row",
            pass: changed >= c.dc / 2,
        };
        report(&r);
        out.push(r);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn launch_comp_pair(
    stream: &Arc<CudaStream>,
    pool: &CudaFunction,
    finish: &CudaFunction,
    c: &CompCase,
    s: &CompState,
    kv: &DevBuf,
    score: &DevBuf,
    pos: &DevBuf,
    ape: &DevBuf,
    norm: &DevBuf,
    freqs: &DevBuf,
    n_rot: usize,
    eps: f32,
) -> Result<()> {
    let i = |v: usize| v as i32;
    let (ld, n, r, coff, dc, nr) = (i(c.coff * c.dc), 1i32, i(c.r), i(c.coff), i(c.dc), i(n_rot));
    let cfg = LaunchConfig {
        grid_dim: ((c.dc as u32).div_ceil(128), 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(pool);
    b.arg(&kv.ptr)
        .arg(&score.ptr)
        .arg(&ld)
        .arg(&n)
        .arg(&pos.ptr)
        .arg(&ape.ptr)
        .arg(&r)
        .arg(&coff)
        .arg(&dc)
        .arg(&s.fr_kv.ptr)
        .arg(&s.fr_score.ptr)
        .arg(&s.rows.ptr);
    // SAFETY: comp_pool's argument list; buffers sized for the case above.
    unsafe { b.launch(cfg) }?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: (c.dc * 4) as u32,
    };
    let mut b = stream.launch_builder(finish);
    b.arg(&s.rows.ptr)
        .arg(&dc)
        .arg(&n)
        .arg(&pos.ptr)
        .arg(&r)
        .arg(&norm.ptr)
        .arg(&freqs.ptr)
        .arg(&nr)
        .arg(&eps)
        .arg(&c.mode);
    // SAFETY: comp_finish's argument list; rows hold pos/r + 1 rows of dc.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn launch_comp_step(
    stream: &Arc<CudaStream>,
    step: &CudaFunction,
    c: &CompCase,
    s: &CompState,
    kv: &DevBuf,
    score: &DevBuf,
    pos: &DevBuf,
    ape: &DevBuf,
    norm: &DevBuf,
    freqs: &DevBuf,
    n_rot: usize,
    eps: f32,
) -> Result<()> {
    let i = |v: usize| v as i32;
    let step_args = CompStepArgs {
        kv: kv.ptr,
        score: score.ptr,
        pos_p: pos.ptr,
        ape: ape.ptr,
        fr_kv: s.fr_kv.ptr,
        fr_score: s.fr_score.ptr,
        rows: s.rows.ptr,
        norm_w: norm.ptr,
        freqs: freqs.ptr,
        r: i(c.r),
        coff: i(c.coff),
        dc: i(c.dc),
        n_rot: i(n_rot),
        eps,
        mode: c.mode,
    };
    // As the backend launches one step: one block of dc threads.
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (c.dc as u32, 1, 1),
        shared_mem_bytes: (c.dc * 4) as u32,
    };
    let unused = CompStepArgs::default();
    let mut b = stream.launch_builder(step);
    b.arg(&step_args).arg(&unused);
    // SAFETY: comp_steps' argument list (one step); buffers sized for the case above.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `idx_scores_heads` against `idx_scores` (bit-exact scores) at Flash dims: 64 heads
/// of 128, ratio 4, top-k 512, one decode token with one row past a full tile
/// (visible 513) and 3 tokens around 600 visible rows.
fn idx_score_checks(
    stream: &Arc<CudaStream>,
    ops: &Arc<CudaModule>,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let old = ops.load_function("idx_scores")?;
    let new = ops.load_function("idx_scores_heads")?;
    let (heads, ratio, top_k, tile) = (64usize, 4usize, 512usize, 32usize);
    let mut rng = Rng(0x1d5_c0de);
    let mut out = Vec::new();
    for (name, pos0, m) in [
        ("decode visible 513", 2051usize, 1usize),
        ("3 tok visible 600 ", 2400, 3),
    ] {
        let cap = (pos0 + m) / ratio + 7;
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.unit()).collect() };
        let q = DevBuf::from_f32(stream, &rand(m * heads * 128))?;
        let w = DevBuf::from_f32(stream, &rand(m * heads))?;
        let rows = DevBuf::from_f32(stream, &rand(cap * 128))?;
        let pos = DevBuf::from_bytes(stream, &(pos0 as i32).to_le_bytes())?;
        let nan = vec![f32::NAN; m * cap];
        let s_old = DevBuf::from_f32(stream, &nan)?;
        let s_new = DevBuf::from_f32(stream, &nan)?;
        let i = |v: usize| v as i32;
        let (ldq, ldw, h32, r32, tk, lds) = (
            i(heads * 128),
            i(heads),
            i(heads),
            i(ratio),
            i(top_k),
            i(cap),
        );
        // idx_scores_heads: rows, threads and shared memory a block as backend.rs launches it.
        for (f, rows_per_block, threads, smem, s) in [
            (&old, tile, tile, 0u32, &s_old),
            (
                &new,
                crate::backend::IDXH_ROWS,
                crate::backend::IDXH_THREADS as usize,
                crate::backend::IDXH_SMEM_BYTES,
                &s_new,
            ),
        ] {
            let cfg = LaunchConfig {
                grid_dim: (cap.div_ceil(rows_per_block) as u32, m as u32, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: smem,
            };
            let mut b = stream.launch_builder(f);
            b.arg(&q.ptr)
                .arg(&ldq)
                .arg(&w.ptr)
                .arg(&ldw)
                .arg(&h32)
                .arg(&rows.ptr)
                .arg(&pos.ptr)
                .arg(&r32)
                .arg(&tk)
                .arg(&s.ptr)
                .arg(&lds);
            // SAFETY: the shared argument list of idx_scores / idx_scores_heads; q, w hold m
            // tokens, rows cap rows of 128, scores m rows of cap.
            unsafe { b.launch(cfg) }?;
        }
        stream.synchronize()?;
        let (a, b) = (s_new.to_f32(stream)?, s_old.to_f32(stream)?);
        let r = exact(
            format!("idx_scores_heads vs idx_scores {name} (64 heads)"),
            &a,
            &b,
        );
        report(&r);
        out.push(r);
        // Every visible row of every token was scored (not left NaN) by the reference.
        let want: usize = (0..m).map(|t| (pos0 + t + 1) / ratio).sum();
        let scored = b.iter().filter(|v| v.is_finite()).count();
        let r = CheckResult {
            name: format!("idx_scores rows scored {name}"),
            max_abs: scored as f32,
            max_rel: scored as f32,
            tol: want as f32,
            tol_name: "visible rows",
            pass: scored == want,
        };
        report(&r);
        out.push(r);
    }
    Ok(out)
}

/// `att_merge_rope_q8_0` and `att_merge_rope_q8_0_pre` (decode: split merge + inverse
/// RoPE + Q8_0 in one kernel) against `att_combine` then `rope_quant_q8_0`: bit-exact
/// output rows, codes and scales; at 20 splits the merged values of the unrotated dims
/// also against an f64 merge. Flash dims: 64 heads of 512, two splits empty; 20 splits
/// (ratio-4 decode), 8 and 10 (16-key window-only / ratio-128 decode), 45 and 64 (lanes
/// holding a second split).
fn merge_rope_checks(
    stream: &Arc<CudaStream>,
    ops: &Arc<CudaModule>,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    for ns in [20usize, 8, 10, 45, 64] {
        out.extend(merge_rope_case(stream, ops, ns, report)?);
    }
    Ok(out)
}

/// [`merge_rope_checks`] at `ns` splits.
fn merge_rope_case(
    stream: &Arc<CudaStream>,
    ops: &Arc<CudaModule>,
    ns: usize,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let att = module(stream, &crate::compile::ATTENTION)?;
    let combine = att.load_function("att_combine")?;
    let rope_quant = ops.load_function("rope_quant_q8_0")?;
    let fused = ops.load_function("att_merge_rope_q8_0")?;
    let pre = ops.load_function("att_merge_rope_q8_0_pre")?;
    let (nh, hd, n_rot, pos0) = (64usize, 512usize, 64usize, 2050usize);
    let cols = nh * hd;
    let stride = nh * (hd + 2);
    let mut rng = Rng(0x3e_4b1e + ns as u64);
    // Partials as att_tc writes them: (m, l, acc[hd]) per split and head; empty splits
    // have m = -inf, l = 0 and unwritten (here NaN) values.
    let mut part = vec![0f32; ns * stride];
    for sp in 0..ns {
        let empty = sp == 7 || sp == ns - 1;
        for h in 0..nh {
            let o = sp * stride + h * (hd + 2);
            if empty {
                part[o] = f32::NEG_INFINITY;
                part[o + 1] = 0.0;
                part[o + 2..o + 2 + hd].fill(f32::NAN);
            } else {
                part[o] = 3.0 * rng.unit();
                part[o + 1] = 1.0 + 25.0 * (rng.unit() + 1.0);
                for v in &mut part[o + 2..o + 2 + hd] {
                    *v = 10.0 * rng.unit();
                }
            }
        }
    }
    let sinks: Vec<f32> = (0..nh).map(|_| 2.0 * rng.unit()).collect();
    let freqs: Vec<f32> = (0..n_rot / 2)
        .map(|k| 10000f32.powf(-2.0 * k as f32 / n_rot as f32))
        .collect();
    let dpart = DevBuf::from_f32(stream, &part)?;
    let dsinks = DevBuf::from_f32(stream, &sinks)?;
    let dfreqs = DevBuf::from_f32(stream, &freqs)?;
    let dpos = DevBuf::from_bytes(stream, &(pos0 as i32).to_le_bytes())?;
    let nan = vec![f32::NAN; cols];
    let (xa, xb) = (
        DevBuf::from_f32(stream, &nan)?,
        DevBuf::from_f32(stream, &nan)?,
    );
    let xc = DevBuf::from_f32(stream, &nan)?;
    let (qa, qb, qc) = (
        DevBuf::zeros(stream, cols)?,
        DevBuf::zeros(stream, cols)?,
        DevBuf::zeros(stream, cols)?,
    );
    let (da, db, dc) = (
        DevBuf::from_f32(stream, &nan[..cols / 32])?,
        DevBuf::from_f32(stream, &nan[..cols / 32])?,
        DevBuf::from_f32(stream, &nan[..cols / 32])?,
    );
    let i = |v: usize| v as i32;
    let (ns32, nh32, hd32, cols32, nr32, inv) = (i(ns), i(nh), i(hd), i(cols), i(n_rot), 1i32);
    let rq_cfg = LaunchConfig {
        grid_dim: ((cols / 32).div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // One merge kernel (they share one argument list) into rows x, codes q, scales d.
    let launch_merge = |f: &CudaFunction, cfg: LaunchConfig, x: &DevBuf, q: &DevBuf, d: &DevBuf| {
        let mut b = stream.launch_builder(f);
        b.arg(&dpart.ptr)
            .arg(&ns32)
            .arg(&nh32)
            .arg(&dsinks.ptr)
            .arg(&x.ptr)
            .arg(&cols32)
            .arg(&hd32)
            .arg(&nr32)
            .arg(&dfreqs.ptr)
            .arg(&dpos.ptr)
            .arg(&inv)
            .arg(&q.ptr)
            .arg(&d.ptr);
        // SAFETY: the argument list of att_merge_rope_q8_0 and its _pre / lean variants;
        // partials of one token, x one row of cols with its codes and scales, and the
        // grid covers whole heads.
        unsafe { b.launch(cfg) }.map(|_| ())
    };
    {
        let cfg = LaunchConfig {
            grid_dim: (nh as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&combine);
        b.arg(&dpart.ptr)
            .arg(&ns32)
            .arg(&nh32)
            .arg(&hd32)
            .arg(&dsinks.ptr)
            .arg(&xa.ptr)
            .arg(&cols32);
        // SAFETY: att_combine's argument list; partials of one token, output one row.
        unsafe { b.launch(cfg) }?;
        let mut b = stream.launch_builder(&rope_quant);
        b.arg(&xa.ptr)
            .arg(&cols32)
            .arg(&hd32)
            .arg(&nr32)
            .arg(&dfreqs.ptr)
            .arg(&dpos.ptr)
            .arg(&inv)
            .arg(&qa.ptr)
            .arg(&da.ptr);
        // SAFETY: rope_quant_q8_0's argument list; x one row of cols, codes and scales.
        unsafe { b.launch(rq_cfg) }?;
        for (f, x, q, d) in [(&fused, &xb, &qb, &db), (&pre, &xc, &qc, &dc)] {
            launch_merge(f, rq_cfg, x, q, d)?;
        }
    }
    // The lean merges (at most 32 splits; 512 / 256 threads a block).
    let mut lean = Vec::new();
    if ns <= 32 {
        for t in [512u32, 256] {
            let f = ops.load_function(&format!("att_merge_rope_q8_0_pre32_t{t}"))?;
            let (x, q, d) = (
                DevBuf::from_f32(stream, &nan)?,
                DevBuf::zeros(stream, cols)?,
                DevBuf::from_f32(stream, &nan[..cols / 32])?,
            );
            let cfg = LaunchConfig {
                grid_dim: (cols as u32 / t, 1, 1),
                block_dim: (t, 1, 1),
                shared_mem_bytes: 0,
            };
            launch_merge(&f, cfg, &x, &q, &d)?;
            lean.push((format!("att_merge_rope_q8_0_pre32_t{t}"), x, q, d));
        }
    }
    stream.synchronize()?;
    let (x_ref, x_new) = (xa.to_f32(stream)?, xb.to_f32(stream)?);
    let as_f32 = |v: Vec<u8>| -> Vec<f32> { v.into_iter().map(|c| f32::from(c as i8)).collect() };
    let (codes_ref, scales_ref) = (as_f32(qa.to_bytes(stream)?), da.to_f32(stream)?);
    let mut out = Vec::new();
    let mut kernels = vec![
        ("att_merge_rope_q8_0    ".to_string(), &xb, &qb, &db),
        ("att_merge_rope_q8_0_pre".to_string(), &xc, &qc, &dc),
    ];
    kernels.extend(lean.iter().map(|(k, x, q, d)| (k.clone(), x, q, d)));
    for (kernel, x, q, d) in kernels {
        for (what, a, b) in [
            ("rows  ", x.to_f32(stream)?, &x_ref),
            ("codes ", as_f32(q.to_bytes(stream)?), &codes_ref),
            ("scales", d.to_f32(stream)?, &scales_ref),
        ] {
            let r = exact(
                format!("{kernel} vs att_combine+rope_quant {what} 64h x 512, {ns} splits"),
                &a,
                b,
            );
            report(&r);
            out.push(r);
        }
    }
    if ns != 20 {
        return Ok(out);
    }
    // The merge itself (unrotated dims) against f64.
    let mut want = Vec::new();
    let mut got = Vec::new();
    for h in 0..nh {
        let base = h * (hd + 2);
        let sink = f64::from(sinks[h]);
        let mx = (0..ns)
            .map(|sp| f64::from(part[sp * stride + base]))
            .fold(sink, f64::max);
        let wts: Vec<f64> = (0..ns)
            .map(|sp| (f64::from(part[sp * stride + base]) - mx).exp())
            .collect();
        let den: f64 = (sink - mx).exp()
            + (0..ns)
                .map(|sp| wts[sp] * f64::from(part[sp * stride + base + 1]))
                .sum::<f64>();
        for dim in 0..hd - n_rot {
            let num: f64 = (0..ns)
                .filter(|&sp| wts[sp] > 0.0)
                .map(|sp| wts[sp] * f64::from(part[sp * stride + base + 2 + dim]))
                .sum();
            want.push((num / den) as f32);
            got.push(x_new[h * hd + dim]);
        }
    }
    let r = crate::selftest::compare(
        "att_merge_rope_q8_0 merge vs f64 (unrotated dims)".into(),
        &got,
        &want,
        crate::selftest::TOL_ATTENTION_REL,
        "rel",
    );
    report(&r);
    out.push(r);
    Ok(out)
}

/// `rope_qat` against `rope` then `round_rows` (indexer QAT), bit-exact: the
/// indexer queries at Flash dims (64 heads of 128, 64 rotated dims), 1 and 3 rows.
fn rope_qat_checks(
    stream: &Arc<CudaStream>,
    ops: &Arc<CudaModule>,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let rope = ops.load_function("rope")?;
    let round = ops.load_function("round_rows")?;
    let fused = ops.load_function("rope_qat")?;
    let (heads, n_rot, pos0) = (64usize, 64usize, 2051usize);
    let cols = heads * 128;
    let freqs: Vec<f32> = (0..n_rot / 2)
        .map(|k| 160000f32.powf(-2.0 * k as f32 / n_rot as f32))
        .collect();
    let dfreqs = DevBuf::from_f32(stream, &freqs)?;
    let dpos = DevBuf::from_bytes(stream, &(pos0 as i32).to_le_bytes())?;
    let mut rng = Rng(0xa7f4);
    let mut out = Vec::new();
    for n in [1usize, 3] {
        let x: Vec<f32> = (0..n * cols).map(|_| 2.0 * rng.unit()).collect();
        let (xa, xb) = (DevBuf::from_f32(stream, &x)?, DevBuf::from_f32(stream, &x)?);
        let i = |v: usize| v as i32;
        let (ld, hd, nr, c128, mode, nn, inv) =
            (i(cols), 128i32, i(n_rot), 128i32, 1i32, 0i32, 0i32);
        let pairs = heads * n_rot / 2;
        let cfg = LaunchConfig {
            grid_dim: (pairs.div_ceil(128) as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&rope);
        b.arg(&xa.ptr)
            .arg(&ld)
            .arg(&ld)
            .arg(&hd)
            .arg(&nr)
            .arg(&dfreqs.ptr)
            .arg(&dpos.ptr)
            .arg(&inv);
        // SAFETY: rope's argument list; x holds n rows of cols.
        unsafe { b.launch(cfg) }?;
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 128 * 4,
        };
        let mut b = stream.launch_builder(&round);
        b.arg(&xa.ptr).arg(&ld).arg(&c128).arg(&mode).arg(&nn);
        // SAFETY: round_rows' argument list (mode 1: 128-dim pieces).
        unsafe { b.launch(cfg) }?;
        let mut b = stream.launch_builder(&fused);
        b.arg(&xb.ptr)
            .arg(&ld)
            .arg(&nr)
            .arg(&dfreqs.ptr)
            .arg(&dpos.ptr);
        // SAFETY: rope_qat's argument list; same grid as round_rows.
        unsafe { b.launch(cfg) }?;
        stream.synchronize()?;
        let (a, bb) = (xb.to_f32(stream)?, xa.to_f32(stream)?);
        let r = exact(
            format!("rope_qat vs rope+round_rows indexer q 64h x 128, {n} rows"),
            &a,
            &bb,
        );
        report(&r);
        out.push(r);
        let changed = mismatches(&bb, &x);
        let r = CheckResult {
            name: format!("rope+round_rows changed the indexer q ({n} rows)"),
            max_abs: changed as f32,
            max_rel: changed as f32,
            tol: (n * cols / 2) as f32,
            tol_name: "at least half the elements",
            pass: changed >= n * cols / 2,
        };
        report(&r);
        out.push(r);
    }
    Ok(out)
}

/// Every check of this module.
pub fn run_attn_chain_checks(
    kern: &Kernels,
    mut report: impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let stream = kern.stream();
    let ops = module(stream, &crate::compile::OPS)?;
    let mut out = comp_checks(stream, &ops, &mut report)?;
    out.extend(idx_score_checks(stream, &ops, &mut report)?);
    out.extend(merge_rope_checks(stream, &ops, &mut report)?);
    out.extend(rope_qat_checks(stream, &ops, &mut report)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_count_bits_not_values() {
        assert_eq!(mismatches(&[1.0, 2.0], &[1.0, 2.0]), 0);
        assert_eq!(mismatches(&[0.0, 2.0], &[-0.0, 2.0]), 1);
        assert_eq!(mismatches(&[f32::NAN], &[1.0]), 1);
        assert_eq!(mismatches(&[1.0], &[1.0, 2.0]), 2);
        assert!(!exact("empty".into(), &[], &[]).pass);
        assert!(exact("same".into(), &[3.0], &[3.0]).pass);
    }
}
