//! GPU checks of the fused decode kernels of the attention side chain (compressor
//! steps, indexer query preparation) against the kernels they replace, at Flash dims.
//! The replaced kernels are the reference: the tiny-model parity runs proved them
//! against the CPU backend, and the fused kernels do the same arithmetic, so the
//! results must agree bit for bit (every output element and the compressor state).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};

use crate::Result;
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

fn ops_module(stream: &Arc<CudaStream>) -> Result<Arc<CudaModule>> {
    let (sm, nvrtc_version) = crate::compile::target_of(stream)?;
    crate::compile::load_module(
        stream.context(),
        &crate::compile::OPS,
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

/// `comp_step` (one launch per decode token) against `comp_pool` + `comp_finish`
/// over decode steps that close rows, from the same random state and projections.
fn comp_checks(
    stream: &Arc<CudaStream>,
    ops: &Arc<CudaModule>,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let pool = ops.load_function("comp_pool")?;
    let finish = ops.load_function("comp_finish")?;
    let step = ops.load_function("comp_step")?;
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
                    "comp_step vs pool+finish {} {} ({} steps)",
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
    let (r, coff, dc, nr) = (i(c.r), i(c.coff), i(c.dc), i(n_rot));
    // As the backend launches it: one block of dc threads.
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (c.dc as u32, 1, 1),
        shared_mem_bytes: (c.dc * 4) as u32,
    };
    let mut b = stream.launch_builder(step);
    b.arg(&kv.ptr)
        .arg(&score.ptr)
        .arg(&pos.ptr)
        .arg(&ape.ptr)
        .arg(&r)
        .arg(&coff)
        .arg(&dc)
        .arg(&s.fr_kv.ptr)
        .arg(&s.fr_score.ptr)
        .arg(&s.rows.ptr)
        .arg(&norm.ptr)
        .arg(&freqs.ptr)
        .arg(&nr)
        .arg(&eps)
        .arg(&c.mode);
    // SAFETY: comp_step's argument list; buffers sized for the case above.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `idx_scores_hg` against `idx_scores` (bit-exact scores) at Flash dims: 64 heads
/// of 128, ratio 4, top-k 512, one decode token with one row past a full tile
/// (visible 513) and 3 tokens around 600 visible rows.
fn idx_score_checks(
    stream: &Arc<CudaStream>,
    ops: &Arc<CudaModule>,
    report: &mut impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let old = ops.load_function("idx_scores")?;
    let new = ops.load_function("idx_scores_hg")?;
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
        for (f, threads, s) in [(&old, tile, &s_old), (&new, tile * 8, &s_new)] {
            let cfg = LaunchConfig {
                grid_dim: (cap.div_ceil(tile) as u32, m as u32, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
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
            // SAFETY: the shared argument list of idx_scores / idx_scores_hg; q, w hold m
            // tokens, rows cap rows of 128, scores m rows of cap.
            unsafe { b.launch(cfg) }?;
        }
        stream.synchronize()?;
        let (a, b) = (s_new.to_f32(stream)?, s_old.to_f32(stream)?);
        let r = exact(
            format!("idx_scores_hg vs idx_scores {name} (64 heads)"),
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

/// Every check of this module.
pub fn run_attn_chain_checks(
    kern: &Kernels,
    mut report: impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let stream = kern.stream();
    let ops = ops_module(stream)?;
    let mut out = comp_checks(stream, &ops, &mut report)?;
    out.extend(idx_score_checks(stream, &ops, &mut report)?);
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
