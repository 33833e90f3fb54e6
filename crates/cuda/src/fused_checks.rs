//! GPU-vs-CPU checks of the fused decode steps of `CudaBackend` at Flash dims (issue 5):
//! each step runs through the backend on random data and is compared with a CPU
//! reference built from `ds4_model::numerics` and `ds4-quant` (the functions the CPU
//! backend calls). Outputs are poisoned with NaN before each step, so an unwritten
//! element fails. Quantized copies that a step leaves pending for the next product must
//! equal ds4-quant's `quantize_act_*` of the step's own f32 output bit for bit, and the
//! products that read them must equal the same products quantizing afresh.

use std::sync::Arc;

use ds4_gguf::GgmlType;
use ds4_model::backend::{Backend, RopeKind};
use ds4_model::config::Config;
use ds4_model::numerics;
use ds4_model::shape::ModelShape;
use ds4_model::weights::{HcWeights, TensorView};
use half::f16;

use crate::Result;
use crate::backend::{CudaAct, CudaBackend, CudaWeight, HcSplit};
use crate::kernels::ActKind;
use crate::runtime::CudaRuntime;
use crate::selftest::{
    CheckResult, Rng, TOL_F16_DOT_REL, act_mismatches, compare, random_act, random_weights,
};

/// HC merge + split + collapse + RMSNorm in f32 with sums in another order (the 16384-long
/// mix dots dominate): max |gpu − cpu| / max |cpu|.
pub const TOL_HC_REL: f32 = 1e-4;
/// Quantized copies written by a fused step: mismatching codes, scales and sums allowed.
pub const TOL_FUSED_QUANT_MISMATCHES: usize = 0;
/// Products reading a pending copy vs the same products quantizing afresh: mismatching
/// outputs allowed (same codes, same kernel, so bit-identical).
pub const TOL_REUSE_MISMATCHES: usize = 0;
/// RoPE / per-head RMSNorm: the same f32 operations as the CPU (cos/sin in f64, sums of
/// squares in f64), so only a rare last-bit difference of a library cos/sin remains.
pub const TOL_ROPE_REL: f32 = 1e-6;
/// HC step, second kernels (`DS4_HC_FIN_V2`) against the first on the same inputs:
/// differing bits allowed in y, the state, post, comb and y's quantized copies.
pub const TOL_HC_V2_MISMATCHES: usize = 0;
/// Paired query launches (`DS4_QB_PAIR`) against the four launches: differing bits
/// allowed in q, the KV row and the indexer queries (the same kernel bodies).
pub const TOL_QB_PAIR_MISMATCHES: usize = 0;
/// Routing: chosen experts must match exactly (random logits keep the k-th and k+1-th
/// scores far apart; ties are exact on both sides).
pub const TOL_ROUTE_ID_MISMATCHES: usize = 0;
/// Routing weights: expf/log1pf vs the CPU's exp/ln_1p differ by a few ulps.
pub const TOL_ROUTE_WEIGHT_REL: f32 = 1e-5;

/// Host bytes of the uploaded test weights, alive as long as the backend: it shares
/// uploads by host address, so a freed buffer's address must not come back.
type Keep = std::cell::RefCell<Vec<Box<[u8]>>>;

fn upload(
    be: &CudaBackend,
    keep: &Keep,
    name: &str,
    ty: GgmlType,
    dims: &[u64],
    data: Vec<u8>,
) -> Result<CudaWeight> {
    let data = data.into_boxed_slice();
    let w = be.upload(&TensorView {
        name,
        ty,
        dims,
        data: &data,
    })?;
    keep.borrow_mut().push(data);
    Ok(w)
}

/// A random `rows × k` matrix of type `ty` on the device (`upload` of `random_weights`).
fn upload_random(
    be: &CudaBackend,
    keep: &Keep,
    rng: &mut Rng,
    name: &str,
    ty: GgmlType,
    k: usize,
    rows: usize,
) -> Result<CudaWeight> {
    let data = random_weights(rng, ty, k * rows);
    upload(be, keep, name, ty, &[k as u64, rows as u64], data)
}

/// Random HC post weights (1 ± 0.5) and comb entries (0.25 ± 0.2) of n tokens, the
/// ranges a merge meets after a split.
fn random_post_comb(rng: &mut Rng, n: usize, hcm: usize) -> (Vec<f32>, Vec<f32>) {
    let post = (0..n * hcm).map(|_| 1.0 + 0.5 * rng.unit()).collect();
    let comb = (0..n * hcm * hcm)
        .map(|_| 0.25 + 0.2 * rng.unit())
        .collect();
    (post, comb)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An activation of `rows × cols` holding `v` (NaN when `v` is empty: an output).
fn act(be: &CudaBackend, rows: usize, cols: usize, v: &[f32]) -> Result<CudaAct> {
    let mut a = be.alloc_act(rows, cols)?;
    let fill: Vec<f32> = if v.is_empty() {
        vec![f32::NAN; rows * cols]
    } else {
        v.to_vec()
    };
    a.buf.write_at(&be.runtime().stream, 0, &f32_bytes(&fill))?;
    Ok(a)
}

fn read(be: &CudaBackend, a: &CudaAct) -> Result<Vec<f32>> {
    let mut out = vec![0f32; a.rows * a.cols];
    be.read_rows(a, a.rows, &mut out)?;
    Ok(out)
}

/// Compares the pending copy of `x`'s first `rows` rows with ds4-quant's quantisation of
/// `host` (x as read back): codes, scales, sums.
fn check_pending(
    be: &CudaBackend,
    name: String,
    x: &CudaAct,
    host: &[f32],
    kind: ActKind,
    k: usize,
    rows: usize,
) -> Result<CheckResult> {
    let got = be.pending_copy(x, kind, k, rows)?;
    let missing = got.is_none();
    let (mismatches, max_abs) = match got {
        Some(g) => act_mismatches(kind, &host[..k * rows], k, &g.qs, &g.d, &g.bsums)?,
        None => (0, 0.0),
    };
    Ok(CheckResult {
        name: format!("{name}{}", if missing { " (no copy pending)" } else { "" }),
        max_abs,
        max_rel: mismatches as f32,
        tol: TOL_FUSED_QUANT_MISMATCHES as f32,
        tol_name: "TOL_FUSED_QUANT_MISMATCHES",
        pass: !missing && mismatches == TOL_FUSED_QUANT_MISMATCHES,
    })
}

/// Bit-for-bit equality of two outputs (pending copy vs fresh quantisation).
fn check_same(name: String, a: &[f32], b: &[f32]) -> CheckResult {
    let mut mismatches = usize::from(a.len() != b.len());
    let mut max_abs = 0f32;
    for (x, y) in a.iter().zip(b) {
        if x.to_bits() != y.to_bits() {
            mismatches += 1;
            max_abs = max_abs.max((x - y).abs());
        }
        if !x.is_finite() {
            mismatches += 1;
        }
    }
    CheckResult {
        name,
        max_abs,
        max_rel: mismatches as f32,
        tol: TOL_REUSE_MISMATCHES as f32,
        tol_name: "TOL_REUSE_MISMATCHES",
        pass: mismatches == TOL_REUSE_MISMATCHES,
    }
}

/// HC weights of one sublayer (fn F16 [hc·e → mix], scale, base) on host and device.
struct Hc {
    fn_: Vec<f32>,
    scale: [f32; 3],
    base: Vec<f32>,
    dev: HcWeights<CudaWeight>,
}

fn hc_weights(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    name: &str,
) -> Result<Hc> {
    let (k, nm) = (s.hc_dim(), s.hc_mix());
    let bytes = random_weights(rng, GgmlType::F16, k * nm);
    let fn_: Vec<f32> = bytes
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    let scale = [
        0.5 + 0.1 * rng.unit(),
        0.5 + 0.1 * rng.unit(),
        0.5 + 0.1 * rng.unit(),
    ];
    let base: Vec<f32> = (0..nm).map(|_| 0.3 * rng.unit()).collect();
    let dev = HcWeights {
        fn_: upload(
            be,
            keep,
            &format!("{name}_fn"),
            GgmlType::F16,
            &[k as u64, nm as u64],
            bytes,
        )?,
        scale: upload(
            be,
            keep,
            &format!("{name}_scale"),
            GgmlType::F32,
            &[3],
            f32_bytes(&scale),
        )?,
        base: upload(
            be,
            keep,
            &format!("{name}_base"),
            GgmlType::F32,
            &[nm as u64],
            f32_bytes(&base),
        )?,
    };
    Ok(Hc {
        fn_,
        scale,
        base,
        dev,
    })
}

/// Inputs of one HC step (`run_hc_step`), host rows.
struct HcStepInputs<'a> {
    state: &'a [f32],
    sub: &'a [f32],
    routed: &'a [f32],
    shared: &'a [f32],
    post: &'a [f32],
    comb: &'a [f32],
}

/// One HC step on fresh device copies of its inputs: the split alone, merge + split
/// (`merge`), or the merge that sums the MoE's outputs (`moe`: routed rows + shared
/// row; sub is then poisoned, the merge must not read it). Without `merge`, post and
/// comb start poisoned (the split writes them). The step's name, then y, state, post
/// and comb.
#[allow(clippy::too_many_arguments)]
fn run_hc_step(
    be: &CudaBackend,
    s: &ModelShape,
    hcw: &Hc,
    norm: &CudaWeight,
    n: usize,
    merge: bool,
    moe: bool,
    inp: &HcStepInputs<'_>,
) -> Result<(&'static str, [CudaAct; 4])> {
    let (hcm, e, k) = (s.hc_mult, s.n_embd, s.n_expert_used);
    let mut state = act(be, n, hcm * e, inp.state)?;
    let sub = act(be, n, e, if moe { &[] } else { inp.sub })?;
    let (pv, cv): (&[f32], &[f32]) = if merge {
        (inp.post, inp.comb)
    } else {
        (&[], &[])
    };
    let mut post = act(be, n, hcm, pv)?;
    let mut comb = act(be, n, hcm * hcm, cv)?;
    let mut y = act(be, n, e, &[])?;
    let step = if moe {
        let routed = act(be, n * k, e, inp.routed)?;
        let shared = act(be, n, e, inp.shared)?;
        be.hc_post_pre_norm_moe(
            &routed, &shared, k, &sub, n, s, &mut state, &hcw.dev, norm, &mut y, &mut post,
            &mut comb,
        )?;
        "moe_sum+hc_post+pre_norm"
    } else if merge {
        be.hc_post_pre_norm(
            &sub, n, s, &mut state, &hcw.dev, norm, &mut y, &mut post, &mut comb,
        )?;
        "hc_post+pre_norm"
    } else {
        be.hc_pre_norm(&hcw.dev, &state, n, s, norm, &mut y, &mut post, &mut comb)?;
        "hc_pre_norm"
    };
    // post/comb of a v3 step are made later (a deferred split): now, to be read.
    be.hc_settle()?;
    Ok((step, [y, state, post, comb]))
}

/// CPU reference of `hc_post` (when `merge` is given: sub, post, comb) and then
/// `hc_pre_norm` for one token: (new state, y, post, comb).
#[allow(clippy::type_complexity)]
fn cpu_hc_token(
    s: &ModelShape,
    hc: &Hc,
    norm: &[f32],
    state: &[f32],
    merge: Option<(&[f32], &[f32], &[f32])>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, e, nm) = (s.hc_mult, s.n_embd, s.hc_mix());
    let mut x = state.to_vec();
    if let Some((sub, post, comb)) = merge {
        for j in 0..e {
            for d in 0..n {
                let mut acc = post[d] * sub[j];
                for a in 0..n {
                    acc += comb[a * n + d] * state[a * e + j];
                }
                x[d * e + j] = acc;
            }
        }
    }
    let r = numerics::rms_inv(&x, s.rms_eps);
    let mixes: Vec<f32> = (0..nm)
        .map(|m| {
            let row = &hc.fn_[m * n * e..(m + 1) * n * e];
            let dot: f64 = row.iter().zip(&x).map(|(&w, &v)| w as f64 * v as f64).sum();
            dot as f32 * r
        })
        .collect();
    let (mut pre, mut post, mut comb) = (vec![0f32; n], vec![0f32; n], vec![0f32; n * n]);
    numerics::hc_split(
        &mixes,
        &hc.scale,
        &hc.base,
        n,
        s.hc_sinkhorn_iters,
        s.hc_eps,
        &mut pre,
        &mut post,
        &mut comb,
    );
    let mut y = vec![0f32; e];
    for (j, out) in y.iter_mut().enumerate() {
        let mut acc = 0f32;
        for (st, &p) in pre.iter().enumerate() {
            acc += p * x[st * e + j];
        }
        *out = acc;
    }
    let mut yn = vec![0f32; e];
    numerics::rms_norm_into(&y, Some(norm), s.rms_eps, &mut yn);
    (x, yn, post, comb)
}

/// Task 1: the HC split leaves y's Q8_0 copy (and Q8_K after the FFN norm) pending;
/// the products that follow read them.
fn hc_quant_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let (hcm, e) = (s.hc_mult, s.n_embd);
    let mut out = Vec::new();
    let mut push = |r: CheckResult, out: &mut Vec<CheckResult>| {
        report(&r);
        out.push(r);
    };
    let hcw = hc_weights(be, keep, s, rng, "fused_check_hc")?;
    let norm_v: Vec<f32> = (0..e).map(|_| 1.0 + 0.2 * rng.unit()).collect();
    let norms = [
        (
            "attn",
            upload(
                be,
                keep,
                "blk.0.attn_norm.weight",
                GgmlType::F32,
                &[e as u64],
                f32_bytes(&norm_v),
            )?,
        ),
        (
            "ffn",
            upload(
                be,
                keep,
                "blk.0.ffn_norm.weight",
                GgmlType::F32,
                &[e as u64],
                f32_bytes(&norm_v),
            )?,
        ),
    ];
    // The products that read y: attn_kv-like Q8_0 and a Q2_K (Q8_K activation) matrix.
    let rows = 256;
    let w_q8 = upload_random(be, keep, rng, "fused_check_q8_0", GgmlType::Q8_0, e, rows)?;
    let w_q2 = upload_random(be, keep, rng, "fused_check_q2_k", GgmlType::Q2_K, e, rows)?;
    // Every form of the split: the Sinkhorn on the side branch (the default; one token
    // only, n = 3 runs two blocks), in a second block, in the collapse's block.
    // v3 (one token, merge + split): the split deferred, then settled.
    let default_split = be.hc_split();
    let default_v3 = be.set_hc_v3(false);
    for (split, n, v3) in [
        (HcSplit::Side, 1usize, true),
        (HcSplit::Side, 1, false),
        (HcSplit::Side, 3, false),
        (HcSplit::TwoBlocks, 1, false),
        (HcSplit::OneBlock, 1, false),
        (HcSplit::OneBlock, 3, false),
    ] {
        be.set_hc_split(split);
        be.set_hc_v3(v3);
        be.begin_chunk(&vec![0u32; n], 0)?;
        for (which, norm) in &norms {
            // The split alone, merge + split, and merge + split summing the MoE's
            // outputs (the FFN sublayer's end: routed rows + shared row, no moe_sum).
            for (merge, moe) in [(false, false), (true, false), (true, true)] {
                let state_v = random_act(rng, n * hcm * e);
                let k = s.n_expert_used;
                let (routed_v, shared_v) = if moe {
                    (random_act(rng, n * k * e), random_act(rng, n * e))
                } else {
                    (vec![], vec![])
                };
                // The sublayer output: moe_sum's (and the CPU's) order.
                let sub_v = if moe {
                    (0..n * e)
                        .map(|idx| {
                            let (t, j) = (idx / e, idx % e);
                            let mut acc = 0f32;
                            for slot in 0..k {
                                acc += routed_v[(t * k + slot) * e + j];
                            }
                            acc + shared_v[idx]
                        })
                        .collect()
                } else {
                    random_act(rng, n * e)
                };
                let (post_v, comb_v) = random_post_comb(rng, n, hcm);
                let inputs = HcStepInputs {
                    state: &state_v,
                    sub: &sub_v,
                    routed: &routed_v,
                    shared: &shared_v,
                    post: &post_v,
                    comb: &comb_v,
                };
                let (step, [y, state, post, comb]) =
                    run_hc_step(be, s, &hcw, norm, n, merge, moe, &inputs)?;
                let variant = match split {
                    _ if v3 && merge => " v3",
                    HcSplit::Side => "",
                    HcSplit::TwoBlocks => " two-block",
                    HcSplit::OneBlock => " one-block",
                };
                let tag = format!("fused {step:<16} {which:<4} n={n}{variant}");
                let y_gpu = read(be, &y)?;
                // Quantized copies first (the products below use them up).
                let r = check_pending(
                    be,
                    format!("{tag} y Q8_0 copy (bit-exact)"),
                    &y,
                    &y_gpu,
                    ActKind::Q8_0,
                    e,
                    n,
                )?;
                push(r, &mut out);
                if *which == "ffn" {
                    let r = check_pending(
                        be,
                        format!("{tag} y Q8_K copy (bit-exact)"),
                        &y,
                        &y_gpu,
                        ActKind::Q8K,
                        e,
                        n,
                    )?;
                    push(r, &mut out);
                }
                let (state_gpu, post_gpu, comb_gpu) =
                    (read(be, &state)?, read(be, &post)?, read(be, &comb)?);
                // Products reading the pending copies, then the same products afresh.
                let mut o1 = act(be, n, rows, &[])?;
                let mut o2 = act(be, n, rows, &[])?;
                let mut o3 = act(be, n, rows, &[])?;
                let mut o4 = act(be, n, rows, &[])?;
                be.matmul(&w_q2, &y, n, &mut o1)?;
                be.matmul(&w_q8, &y, n, &mut o2)?;
                be.matmul(&w_q2, &y, n, &mut o3)?;
                be.matmul(&w_q8, &y, n, &mut o4)?;
                let (a1, a2, a3, a4) = (
                    read(be, &o1)?,
                    read(be, &o2)?,
                    read(be, &o3)?,
                    read(be, &o4)?,
                );
                push(
                    check_same(format!("{tag} Q8_0 product: pending = fresh"), &a2, &a4),
                    &mut out,
                );
                push(
                    check_same(format!("{tag} Q8_K product: pending = fresh"), &a1, &a3),
                    &mut out,
                );
                // The f32 results against the CPU reference.
                let (mut ws, mut wy, mut wp, mut wc) = (vec![], vec![], vec![], vec![]);
                for t in 0..n {
                    let st = &state_v[t * hcm * e..(t + 1) * hcm * e];
                    let m = merge.then(|| {
                        (
                            &sub_v[t * e..(t + 1) * e],
                            &post_v[t * hcm..(t + 1) * hcm],
                            &comb_v[t * hcm * hcm..(t + 1) * hcm * hcm],
                        )
                    });
                    let (x, yy, p, c) = cpu_hc_token(s, &hcw, &norm_v, st, m);
                    ws.extend(x);
                    wy.extend(yy);
                    wp.extend(p);
                    wc.extend(c);
                }
                for (what, got, want) in [
                    ("y", &y_gpu, &wy),
                    ("state", &state_gpu, &ws),
                    ("post", &post_gpu, &wp),
                    ("comb", &comb_gpu, &wc),
                ] {
                    push(
                        compare(format!("{tag} {what}"), got, want, TOL_HC_REL, "TOL_HC_REL"),
                        &mut out,
                    );
                }
            }
        }
    }
    be.set_hc_split(default_split);
    be.set_hc_v3(default_v3);
    Ok(out)
}

/// Elements whose bits differ (or that are not finite) between two runs' outputs.
fn bit_mismatches(a: &[f32], b: &[f32]) -> usize {
    let mut m = a.len().abs_diff(b.len());
    for (x, y) in a.iter().zip(b) {
        if x.to_bits() != y.to_bits() || !x.is_finite() {
            m += 1;
        }
    }
    m
}

/// One run of an HC step for `hc_v2_checks`: y, state, post, comb, then y's pending
/// copies (Q8_0 codes, scales; Q8_K codes, scales, sums; empty when none is pending)
/// as f32 lists.
type HcRun = Vec<(&'static str, Vec<f32>)>;

/// The HC step's second kernels (`hc_post_mix_v2`, `hc_pre_finish_v2`) against the
/// first (`hc_post_mix`, `hc_pre_finish_split`) on the same random inputs, for every
/// form the decode and small batches run (two blocks at n = 1 and 3, the Sinkhorn on
/// the side branch; at n = 1 also on 256-thread blocks, `DS4_HC_FIN_256`), both norms, the split alone, merge + split and the merge that
/// sums the MoE's outputs: every output bit for bit.
fn hc_v2_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let (hcm, e, k) = (s.hc_mult, s.n_embd, s.n_expert_used);
    let mut out = Vec::new();
    let hcw = hc_weights(be, keep, s, rng, "fused_check_hc_v2")?;
    let norm_v: Vec<f32> = (0..e).map(|_| 1.0 + 0.2 * rng.unit()).collect();
    let mut norms = Vec::new();
    for which in ["attn", "ffn"] {
        let w = upload(
            be,
            keep,
            &format!("blk.0.{which}_norm.weight"),
            GgmlType::F32,
            &[e as u64],
            f32_bytes(&norm_v),
        )?;
        norms.push((which, w));
    }
    let (default_split, default_v2, default_256) = (be.hc_split(), be.hc_fin_v2(), be.hc_fin_256());
    // v1 against v2: the one-token merges must not take v3 (hc_quant_checks covers it).
    let default_v3 = be.set_hc_v3(false);
    for (split, n, t256) in [
        (HcSplit::TwoBlocks, 1usize, false),
        (HcSplit::TwoBlocks, 3, false),
        (HcSplit::Side, 1, false),
        (HcSplit::TwoBlocks, 1, true),
        (HcSplit::Side, 1, true),
    ] {
        be.set_hc_split(split);
        be.set_hc_fin_256(t256);
        be.begin_chunk(&vec![0u32; n], 0)?;
        for (which, norm) in &norms {
            for (merge, moe) in [(false, false), (true, false), (true, true)] {
                let state_v = random_act(rng, n * hcm * e);
                let sub_v = random_act(rng, n * e);
                let routed_v = random_act(rng, n * k * e);
                let shared_v = random_act(rng, n * e);
                let (post_v, comb_v) = random_post_comb(rng, n, hcm);
                let inputs = HcStepInputs {
                    state: &state_v,
                    sub: &sub_v,
                    routed: &routed_v,
                    shared: &shared_v,
                    post: &post_v,
                    comb: &comb_v,
                };
                let mut runs: Vec<HcRun> = Vec::new();
                let mut step = "";
                for v2 in [false, true] {
                    be.set_hc_fin_v2(v2);
                    let (name, [y, state, post, comb]) =
                        run_hc_step(be, s, &hcw, norm, n, merge, moe, &inputs)?;
                    step = name;
                    let mut run: HcRun = vec![
                        ("y", read(be, &y)?),
                        ("state", read(be, &state)?),
                        ("post", read(be, &post)?),
                        ("comb", read(be, &comb)?),
                    ];
                    for (kind, what, flag) in [
                        (ActKind::Q8_0, "y Q8_0", "y Q8_0 pending"),
                        (ActKind::Q8K, "y Q8_K", "y Q8_K pending"),
                    ] {
                        let copy = be.pending_copy(&y, kind, e, n)?;
                        run.push((flag, vec![if copy.is_some() { 1.0 } else { 0.0 }]));
                        let (qs, d, bsums) = match copy {
                            Some(c) => (
                                c.qs.iter().map(|&b| f32::from(b)).collect(),
                                c.d,
                                c.bsums.iter().map(|&b| f32::from(b)).collect(),
                            ),
                            None => (vec![], vec![], vec![]),
                        };
                        run.push((what, qs));
                        run.push((what, d));
                        run.push((what, bsums));
                    }
                    runs.push(run);
                }
                let variant = match (split == HcSplit::Side, t256) {
                    (true, true) => " side t256",
                    (true, false) => " side",
                    (false, true) => " t256",
                    (false, false) => "",
                };
                let (v1, v2) = (&runs[0], &runs[1]);
                let mut mismatches = usize::from(v1.len() != v2.len());
                let mut differing = Vec::new();
                for ((what, a), (_, b)) in v1.iter().zip(v2) {
                    let m = bit_mismatches(a, b);
                    if m > 0 && !differing.contains(what) {
                        differing.push(*what);
                    }
                    mismatches += m;
                }
                // The FFN norm leaves both copies pending, the attention norm the Q8_0 one.
                let pending = |run: &HcRun, flag: &str| {
                    run.iter()
                        .any(|(w, v)| *w == flag && v.first() == Some(&1.0))
                };
                let want_k = *which == "ffn";
                if [v1, v2].iter().any(|r| {
                    !pending(r, "y Q8_0 pending") || pending(r, "y Q8_K pending") != want_k
                }) {
                    mismatches += 1;
                    differing.push("pending copies");
                }
                let r = CheckResult {
                    name: format!(
                        "fused {step:<16} {which:<4} n={n}{variant} v2 = v1 (bit-exact){}",
                        if differing.is_empty() {
                            String::new()
                        } else {
                            format!(" differ: {}", differing.join(", "))
                        }
                    ),
                    max_abs: 0.0,
                    max_rel: mismatches as f32,
                    tol: TOL_HC_V2_MISMATCHES as f32,
                    tol_name: "TOL_HC_V2_MISMATCHES",
                    pass: mismatches == TOL_HC_V2_MISMATCHES,
                };
                report(&r);
                out.push(r);
            }
        }
    }
    be.set_hc_split(default_split);
    be.set_hc_fin_v2(default_v2);
    be.set_hc_fin_256(default_256);
    be.set_hc_v3(default_v3);
    Ok(out)
}

/// CPU RoPE of every `head_dim` head of each `width`-wide row (row i at pos0 + i).
fn cpu_rope(
    s: &ModelShape,
    kind: RopeKind,
    x: &mut [f32],
    width: usize,
    pos0: usize,
    inverse: bool,
) {
    let f = match kind {
        RopeKind::Plain => s.rope_plain(),
        RopeKind::Compress => s.rope_compress(),
    };
    for (i, row) in x.chunks_exact_mut(width).enumerate() {
        for head in row.chunks_exact_mut(s.head_dim) {
            f.apply(head, (pos0 + i) as u32, inverse);
        }
    }
}

/// Task 2: inverse RoPE of the attention output writes the Q8_0 copy that the grouped
/// output projection reads.
fn rope_quant_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    let (qd, groups) = (s.q_dim(), s.o_groups);
    let (k, rows) = (qd / groups, groups * 64);
    let w = upload_random(be, keep, rng, "fused_check_out_a", GgmlType::Q8_0, k, rows)?;
    for (kind, pos) in [(RopeKind::Plain, 7usize), (RopeKind::Compress, 70_001)] {
        be.begin_chunk(&[0], pos)?;
        let x_v = random_act(rng, qd);
        let mut x = act(be, 1, qd, &x_v)?;
        let mut o1 = act(be, 1, rows, &[])?;
        let mut o2 = act(be, 1, rows, &[])?;
        be.rope_inverse_grouped(&mut x, 1, s.head_dim, kind, pos, &w, groups, &mut o1)?;
        let x_gpu = read(be, &x)?;
        be.matmul_grouped(&w, &x, 1, groups, &mut o2)?;
        let (a1, a2) = (read(be, &o1)?, read(be, &o2)?);
        let mut want = x_v.clone();
        cpu_rope(s, kind, &mut want, qd, pos, true);
        let tag = format!("fused rope_inverse+out_a {kind:?} pos {pos}");
        for r in [
            compare(
                format!("{tag} rows"),
                &x_gpu,
                &want,
                TOL_ROPE_REL,
                "TOL_ROPE_REL",
            ),
            check_same(format!("{tag} product: pending = fresh"), &a1, &a2),
        ] {
            report(&r);
            out.push(r);
        }
    }
    Ok(out)
}

/// Task 3: query and KV per-head norm + RoPE and the KV rounding in one launch.
fn qkv_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    let (qd, hd) = (s.q_dim(), s.head_dim);
    let w_v: Vec<f32> = (0..hd).map(|_| 1.0 + 0.3 * rng.unit()).collect();
    let w = upload(
        be,
        keep,
        "blk.0.attn_kv_a_norm.weight",
        GgmlType::F32,
        &[hd as u64],
        f32_bytes(&w_v),
    )?;
    for (n, kind, pos, round) in [
        (1usize, RopeKind::Plain, 5usize, true),
        (1, RopeKind::Compress, 70_001, true),
        (3, RopeKind::Compress, 129, false),
        (3, RopeKind::Plain, 2, true),
    ] {
        be.begin_chunk(&vec![0u32; n], pos)?;
        let (q_v, kv_v) = (random_act(rng, n * qd), random_act(rng, n * hd));
        let mut q = act(be, n, qd, &q_v)?;
        let mut kv = act(be, n, hd, &kv_v)?;
        be.qkv_norm_rope(&mut q, &mut kv, &w, n, hd, s.rms_eps, kind, pos, round)?;
        let (q_gpu, kv_gpu) = (read(be, &q)?, read(be, &kv)?);
        // The other form of the KV rounding (registers / shared copy) on the same input.
        let mut q2 = act(be, n, qd, &q_v)?;
        let mut kv2 = act(be, n, hd, &kv_v)?;
        let regs = be.set_qkv_round_regs(false);
        be.set_qkv_round_regs(!regs);
        let r = be.qkv_norm_rope(&mut q2, &mut kv2, &w, n, hd, s.rms_eps, kind, pos, round);
        be.set_qkv_round_regs(regs);
        r?;
        let kv_other = read(be, &kv2)?;
        let mut q_want = vec![0f32; n * qd];
        for (o, x) in q_want.chunks_exact_mut(hd).zip(q_v.chunks_exact(hd)) {
            numerics::rms_norm_into(x, None, s.rms_eps, o);
        }
        cpu_rope(s, kind, &mut q_want, qd, pos, false);
        let mut kv_want = vec![0f32; n * hd];
        for (o, x) in kv_want.chunks_exact_mut(hd).zip(kv_v.chunks_exact(hd)) {
            numerics::rms_norm_into(x, Some(&w_v), s.rms_eps, o);
        }
        cpu_rope(s, kind, &mut kv_want, hd, pos, false);
        if round {
            for row in kv_want.chunks_exact_mut(hd) {
                numerics::fp8_kv_round_row(row, s.n_nope());
                numerics::round_f16_inplace(row);
            }
        }
        let tag = format!("fused qkv_norm_rope {kind:?} n={n} pos {pos} round {round}");
        let forms = bit_mismatches(&kv_gpu, &kv_other);
        for r in [
            CheckResult {
                name: format!("{tag} kv: registers = shared copy (bit-exact)"),
                max_abs: 0.0,
                max_rel: forms as f32,
                tol: 0.0,
                tol_name: "exact",
                pass: forms == 0,
            },
            compare(
                format!("{tag} q"),
                &q_gpu,
                &q_want,
                TOL_ROPE_REL,
                "TOL_ROPE_REL",
            ),
            compare(
                format!("{tag} kv"),
                &kv_gpu,
                &kv_want,
                TOL_ROPE_REL,
                "TOL_ROPE_REL",
            ),
        ] {
            report(&r);
            out.push(r);
        }
    }
    Ok(out)
}

/// The CSA layers' paired query launches (`DS4_QB_PAIR`: q_b with the indexer's q_b,
/// then qkv_norm_rope with rope_qat) against the four launches on the same inputs at
/// Flash dims, decode: q, the KV row and the indexer queries bit for bit (the same
/// kernel bodies). With qr's Q8_0 copy pending from the norm, as in decode, and
/// without (the pair quantizes it); both KV rounding forms.
fn qb_pair_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    use ds4_model::backend::{QueryHeads, attn_queries_separate};
    let mut out = Vec::new();
    let (k, qd, hd) = (s.q_lora_rank, s.q_dim(), s.head_dim);
    let iqd = s.indexer_heads * s.indexer_dim;
    let q_b = upload_random(
        be,
        keep,
        rng,
        "blk.0.attn_q_b.weight",
        GgmlType::Q8_0,
        k,
        qd,
    )?;
    let ix_q_b = upload_random(
        be,
        keep,
        rng,
        "blk.0.indexer.attn_q_b.weight",
        GgmlType::F16,
        k,
        iqd,
    )?;
    let norm_v: Vec<f32> = (0..k).map(|_| 1.0 + 0.3 * rng.unit()).collect();
    let q_a_norm = upload(
        be,
        keep,
        "blk.0.attn_q_a_norm.weight",
        GgmlType::F32,
        &[k as u64],
        f32_bytes(&norm_v),
    )?;
    let kv_norm_v: Vec<f32> = (0..hd).map(|_| 1.0 + 0.3 * rng.unit()).collect();
    let kv_norm = upload(
        be,
        keep,
        "blk.0.attn_kv_a_norm.weight",
        GgmlType::F32,
        &[hd as u64],
        f32_bytes(&kv_norm_v),
    )?;
    for (pos, pending, regs) in [
        (5usize, true, true),
        (70_001, true, false),
        (4_097, false, true),
    ] {
        be.begin_chunk(&[0u32], pos)?;
        let (qr_v, kv_v) = (random_act(rng, k), random_act(rng, hd));
        let h = QueryHeads {
            head_dim: hd,
            indexer_dim: s.indexer_dim,
            eps: s.rms_eps,
            rope: RopeKind::Compress,
            pos0: pos,
            official: true,
        };
        let prev_regs = be.set_qkv_round_regs(regs);
        let run = |paired: bool| -> Result<(bool, [Vec<f32>; 3])> {
            let mut qr = act(be, 1, k, &qr_v)?;
            if pending {
                be.rms_norm(&mut qr, Some(&q_a_norm), 1, k, s.rms_eps)?;
            }
            let (mut q, mut iq) = (act(be, 1, qd, &[])?, act(be, 1, iqd, &[])?);
            let mut kv = act(be, 1, hd, &kv_v)?;
            let took = if paired {
                be.attn_queries_paired(&q_b, &ix_q_b, &qr, &kv_norm, h, &mut q, &mut iq, &mut kv)?
            } else {
                attn_queries_separate(
                    be,
                    &q_b,
                    Some(&ix_q_b),
                    &qr,
                    &kv_norm,
                    1,
                    h,
                    &mut q,
                    &mut iq,
                    &mut kv,
                )?;
                be.branch_join()?;
                true
            };
            Ok((took, [read(be, &q)?, read(be, &kv)?, read(be, &iq)?]))
        };
        let pair = run(true);
        let sep = run(false);
        be.set_qkv_round_regs(prev_regs);
        let ((took, got), (_, want)) = (pair?, sep?);
        let tag = format!(
            "qb pair pos {pos}{}{}",
            if pending { "" } else { " (no pending copy)" },
            if regs {
                ""
            } else {
                " (KV rounding on a shared copy)"
            }
        );
        let taken = CheckResult {
            name: format!("{tag}: paired launches taken at Flash dims"),
            max_abs: 0.0,
            max_rel: f32::from(u8::from(!took)),
            tol: 0.0,
            tol_name: "exact",
            pass: took,
        };
        report(&taken);
        out.push(taken);
        for (what, g, w) in [
            ("q", &got[0], &want[0]),
            ("kv", &got[1], &want[1]),
            ("indexer q", &got[2], &want[2]),
        ] {
            let mismatches = bit_mismatches(g, w);
            let r = CheckResult {
                name: format!("{tag} {what} = four launches (bit-exact)"),
                max_abs: 0.0,
                max_rel: mismatches as f32,
                tol: TOL_QB_PAIR_MISMATCHES as f32,
                tol_name: "TOL_QB_PAIR_MISMATCHES",
                pass: mismatches == TOL_QB_PAIR_MISMATCHES,
            };
            report(&r);
            out.push(r);
        }
    }
    Ok(out)
}

/// A CSA layer's two decode compressor steps as one launch of two blocks
/// (`DS4_COMP_PAIR`, `comp_steps`) against `compressor_update` of each, at Flash dims:
/// positions 0 .. 9 (rows close at 3 and 7, ratio 4), the compressor state at the end
/// (the saved KV bytes: frontiers and compressed rows) bit for bit.
fn comp_pair_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    use ds4_model::backend::{CompKind, CompUpdate, KvStore};
    use ds4_model::weights::CompressorWeights;
    let mut out = Vec::new();
    let Some(il) = s.layer_kinds.iter().position(|k| k.is_csa()) else {
        return Ok(out);
    };
    let kind = s.layer_kinds[il];
    let r = kind.ratio();
    let comp =
        |rng: &mut Rng, pre: &str, w: usize, dn: usize| -> Result<CompressorWeights<CudaWeight>> {
            let ape: Vec<f32> = (0..w * r).map(|_| 0.1 * rng.unit()).collect();
            let norm: Vec<f32> = (0..dn).map(|_| 1.0 + 0.3 * rng.unit()).collect();
            Ok(CompressorWeights {
                ape: upload(
                    be,
                    keep,
                    &format!("{pre}_ape"),
                    GgmlType::F32,
                    &[w as u64, r as u64],
                    f32_bytes(&ape),
                )?,
                // The projections come in as activations: the matrices are not read.
                kv: upload(
                    be,
                    keep,
                    "unused.comp",
                    GgmlType::F32,
                    &[1],
                    f32_bytes(&[0.0]),
                )?,
                gate: upload(
                    be,
                    keep,
                    "unused.comp",
                    GgmlType::F32,
                    &[1],
                    f32_bytes(&[0.0]),
                )?,
                norm: upload(
                    be,
                    keep,
                    &format!("{pre}_norm"),
                    GgmlType::F32,
                    &[dn as u64],
                    f32_bytes(&norm),
                )?,
            })
        };
    let (wa, wi) = (kind.coff() * s.head_dim, 2 * s.indexer_dim);
    let cw = comp(rng, &format!("blk.{il}.attn_compressor"), wa, s.head_dim)?;
    let iw = comp(
        rng,
        &format!("blk.{il}.indexer_compressor"),
        wi,
        s.indexer_dim,
    )?;
    let positions: Vec<usize> = (0..10).collect();
    let inputs: Vec<[Vec<f32>; 4]> = positions
        .iter()
        .map(|_| {
            [
                random_act(rng, wa),
                random_act(rng, wa),
                random_act(rng, wi),
                random_act(rng, wi),
            ]
        })
        .collect();
    let run = |paired: bool| -> Result<(bool, Vec<u8>)> {
        let mut kv = be.alloc_kv(s, 64)?;
        let mut took = true;
        for (&pos, v) in positions.iter().zip(&inputs) {
            be.begin_chunk(&[0u32], pos)?;
            let (ak, ascore) = (act(be, 1, wa, &v[0])?, act(be, 1, wa, &v[1])?);
            let (ik, iscore) = (act(be, 1, wi, &v[2])?, act(be, 1, wi, &v[3])?);
            let updates = [
                CompUpdate {
                    which: CompKind::Attn,
                    w: &cw,
                    proj_kv: &ak,
                    proj_score: &ascore,
                },
                CompUpdate {
                    which: CompKind::Indexer,
                    w: &iw,
                    proj_kv: &ik,
                    proj_score: &iscore,
                },
            ];
            if paired {
                took &= be.compressor_updates_with(&mut kv, il, &updates, 1, pos, true, true)?;
            } else {
                for u in &updates {
                    be.compressor_update(
                        &mut kv,
                        il,
                        u.which,
                        u.w,
                        u.proj_kv,
                        u.proj_score,
                        1,
                        pos,
                        true,
                    )?;
                }
            }
        }
        let mut saved = Vec::new();
        kv.save(positions.len(), &mut saved)?;
        Ok((took, saved))
    };
    let (took, got) = run(true)?;
    let (_, want) = run(false)?;
    let tag = format!("compressor step pair, CSA layer {il}");
    let bad =
        got.iter().zip(&want).filter(|(g, w)| g != w).count() + got.len().abs_diff(want.len());
    for r in [
        CheckResult {
            name: format!("{tag}: one launch taken at Flash dims"),
            max_abs: 0.0,
            max_rel: f32::from(u8::from(!took)),
            tol: 0.0,
            tol_name: "exact",
            pass: took,
        },
        CheckResult {
            name: format!("{tag}: compressor state (saved bytes) = two launches (bit-exact)"),
            max_abs: 0.0,
            max_rel: bad as f32,
            tol: TOL_QB_PAIR_MISMATCHES as f32,
            tol_name: "TOL_QB_PAIR_MISMATCHES",
            pass: bad == TOL_QB_PAIR_MISMATCHES,
        },
    ] {
        report(&r);
        out.push(r);
    }
    Ok(out)
}

/// CPU routing of one token (as the CPU backend's MoE): scores sqrt(softplus(l)),
/// hash table or biased top-k (highest first, lower index on ties), weights.
fn cpu_route(
    s: &ModelShape,
    logits: &[f32],
    bias: &[f32],
    hashed: Option<&[i32]>,
) -> (Vec<i32>, Vec<f32>) {
    let k = s.n_expert_used;
    let score: Vec<f32> = logits
        .iter()
        .map(|&l| numerics::softplus(l).sqrt())
        .collect();
    let ids: Vec<usize> = match hashed {
        Some(h) => h.iter().map(|&e| e as usize).collect(),
        None => {
            let mut biased: Vec<f32> = score.iter().zip(bias).map(|(s, b)| s + b).collect();
            (0..k)
                .map(|_| {
                    let (mut best, mut best_v) = (0usize, f32::NEG_INFINITY);
                    for (ex, &v) in biased.iter().enumerate() {
                        if v > best_v {
                            best = ex;
                            best_v = v;
                        }
                    }
                    biased[best] = f32::NEG_INFINITY;
                    best
                })
                .collect()
        }
    };
    let sum: f32 = ids.iter().map(|&id| score[id]).sum();
    let wts = ids
        .iter()
        .map(|&id| {
            if s.expert_weights_norm {
                s.expert_weights_scale * score[id] / sum.max(6.103_515_6e-5)
            } else {
                s.expert_weights_scale * score[id]
            }
        })
        .collect();
    (ids.iter().map(|&e| e as i32).collect(), wts)
}

/// Routing test data shared by the `moe_route` and `moe_router_route` checks: biases
/// with exact ties at the pairs where the logits tie, and a hash table for `vocab`
/// tokens (k distinct experts each), both uploaded under names starting with `prefix`.
struct RouteData {
    bias_v: Vec<f32>,
    bias: CudaWeight,
    no_bias: Vec<f32>,
    vocab: usize,
    table: Vec<i32>,
    t2e: CudaWeight,
}

fn route_data(
    be: &CudaBackend,
    keep: &Keep,
    prefix: &str,
    ne: usize,
    k: usize,
    rng: &mut Rng,
) -> Result<RouteData> {
    let mut bias_v: Vec<f32> = (0..ne).map(|_| 0.1 * rng.unit()).collect();
    // Equal biases where the logits tie, so the biased scores tie too.
    for (a, b) in [(10, 200), (30, 31), (50, 51)] {
        bias_v[b] = bias_v[a];
    }
    let bias = upload(
        be,
        keep,
        &format!("{prefix}_exp_probs_b"),
        GgmlType::F32,
        &[ne as u64],
        f32_bytes(&bias_v),
    )?;
    let no_bias = vec![0f32; ne];
    // A hash table for 8 tokens: k distinct experts each.
    let vocab = 8usize;
    let mut table = Vec::with_capacity(vocab * k);
    for _ in 0..vocab {
        let mut row: Vec<i32> = Vec::with_capacity(k);
        while row.len() < k {
            let e = (rng.next() % ne as u64) as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        table.extend(row);
    }
    let t2e = upload(
        be,
        keep,
        &format!("{prefix}.tid2eid"),
        GgmlType::I32,
        &[k as u64, vocab as u64],
        table.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )?;
    Ok(RouteData {
        bias_v,
        bias,
        no_bias,
        vocab,
        table,
        t2e,
    })
}

/// Router logits of `n` tokens (`ne` experts) with exact ties in token 0's: at the top
/// (lower index first) and across the k-th place (k = 6: 10, 200, 30, 31, 60, then 50
/// before 51); `flat`: token 0's all equal.
fn tied_logits(rng: &mut Rng, n: usize, ne: usize, flat: bool) -> Vec<f32> {
    let mut logits: Vec<f32> = (0..n * ne).map(|_| 3.0 * rng.unit()).collect();
    for (i, v) in [
        (10, 6.0),
        (200, 6.0),
        (30, 5.5),
        (31, 5.5),
        (60, 5.0),
        (50, 4.5),
        (51, 4.5),
    ] {
        logits[i] = v;
    }
    if flat {
        logits[..ne].fill(1.25);
    }
    logits
}

/// Task 4: expert choice and weights of `moe_route` (one block per token, ranks instead
/// of serial arg-max rounds) against the CPU's routing, with exact ties in the logits.
fn route_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    let (ne, k) = (s.n_expert, s.n_expert_used);
    let RouteData {
        bias_v,
        bias,
        no_bias,
        vocab,
        table,
        t2e,
    } = route_data(be, keep, "fused_check", ne, k, rng)?;
    // flat: no bias and token 0's logits all equal (every expert ties: the threshold
    // admits all 256 and the lowest indices win).
    for (n, hashed, flat) in [
        (1usize, false, false),
        (5, false, false),
        (2, false, true),
        (3, true, false),
    ] {
        let tokens: Vec<u32> = (0..n as u32).map(|t| (t * 3 + 1) % vocab as u32).collect();
        be.begin_chunk(&tokens, 0)?;
        let logits = tied_logits(rng, n, ne, flat);
        let (ids, wts) = be.route_host(
            s,
            &logits,
            n,
            (!hashed && !flat).then_some(&bias),
            hashed.then_some(&t2e),
        )?;
        let (mut want_ids, mut want_wts) = (Vec::new(), Vec::new());
        for (t, &tok) in tokens.iter().enumerate() {
            let row = tok as usize * k;
            let (i, w) = cpu_route(
                s,
                &logits[t * ne..(t + 1) * ne],
                if hashed || flat { &no_bias } else { &bias_v },
                hashed.then(|| &table[row..row + k]),
            );
            want_ids.extend(i);
            want_wts.extend(w);
        }
        let mismatches = ids.iter().zip(&want_ids).filter(|(a, b)| a != b).count()
            + usize::from(ids.len() != want_ids.len());
        let tag = format!(
            "fused moe_route {} n={n}",
            if hashed {
                "hash"
            } else if flat {
                "top-k all-tied"
            } else {
                "top-k"
            }
        );
        for r in [
            CheckResult {
                name: format!("{tag} expert ids (exact)"),
                max_abs: 0.0,
                max_rel: mismatches as f32,
                tol: TOL_ROUTE_ID_MISMATCHES as f32,
                tol_name: "TOL_ROUTE_ID_MISMATCHES",
                pass: mismatches == TOL_ROUTE_ID_MISMATCHES,
            },
            compare(
                format!("{tag} weights"),
                &wts,
                &want_wts,
                TOL_ROUTE_WEIGHT_REL,
                "TOL_ROUTE_WEIGHT_REL",
            ),
        ] {
            report(&r);
            out.push(r);
        }
    }
    Ok(out)
}

/// Bit mismatches allowed between a routed product that learns its experts another way
/// (`ExpertIds`) and the launches it replaces: none (same choice, same sums).
pub const TOL_EXPERT_IDS_MISMATCHES: usize = 0;

/// Routed decode products that learn their experts another way (`ExpertIds`), bit for
/// bit against the launches they replace, on Flash widths with 64 rows an expert: the
/// IQ2_XXS gate + up pair choosing its experts from the router logits (no moe_route)
/// against moe_route and the same pair reading the ids, with the ids and weights it
/// leaves (biased top-k with ties, all tied, hash table); the Q2_K down product reading
/// its ids before its PDL wait against after.
fn expert_ids_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    use crate::kernels::{
        ActBuf, DevBuf, ExpertIds, FusedRoute, Matvec, MvInput, MvSeg, matrix_bytes,
    };
    let mut out = Vec::new();
    let kern = be.kernels();
    let (ne, k, e, ff) = (s.n_expert, s.n_expert_used, s.n_embd, s.n_ff_exp);
    if !kern.routed_fast(GgmlType::IQ2_XXS, e) || !kern.routed_fast(GgmlType::Q2_K, ff) {
        return Ok(out);
    }
    let st = kern.stream().clone();
    let rows = 64usize;
    let RouteData {
        bias_v,
        bias,
        vocab,
        table,
        t2e,
        ..
    } = route_data(be, keep, "expert_ids_check", ne, k, rng)?;
    let bias_dev = DevBuf::from_f32(&st, &bias_v)?;
    let table_dev = DevBuf::from_bytes(&st, bytemuck::cast_slice(&table))?;
    let upload_w = |rng: &mut Rng, ty: GgmlType, kk: usize, mats: usize| -> Result<DevBuf> {
        let w = random_weights(rng, ty, mats * rows * kk);
        DevBuf::from_bytes(&st, &crate::layout::to_gpu(ty, &w, kk)?)
    };
    let gu = upload_w(rng, GgmlType::IQ2_XXS, e, 2 * ne)?;
    let down = upload_w(rng, GgmlType::Q2_K, ff, ne)?;
    let gu_set = (ne * matrix_bytes(GgmlType::IQ2_XXS, e, rows)) as u64;
    let i32_bytes = |b: Vec<u8>| -> Vec<i32> {
        b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let mismatch = |a: &[u32], b: &[u32]| {
        a.iter().zip(b).filter(|(x, y)| x != y).count() + usize::from(a.len() != b.len())
    };
    let mut push = |name: String, bad: usize, out: &mut Vec<CheckResult>| {
        let r = CheckResult {
            name,
            max_abs: 0.0,
            max_rel: bad as f32,
            tol: TOL_EXPERT_IDS_MISMATCHES as f32,
            tol_name: "TOL_EXPERT_IDS_MISMATCHES",
            pass: bad == TOL_EXPERT_IDS_MISMATCHES,
        };
        report(&r);
        out.push(r);
    };
    for (case, (hashed, flat)) in [(false, false), (false, true), (true, false)]
        .into_iter()
        .enumerate()
    {
        let tok = (case as u32 * 3 + 2) % vocab as u32;
        be.begin_chunk(&[tok], 0)?;
        let logits = tied_logits(rng, 1, ne, flat);
        let use_bias = !hashed && !flat;
        let (want_ids, want_wts) = be.route_host(
            s,
            &logits,
            1,
            use_bias.then_some(&bias),
            hashed.then_some(&t2e),
        )?;
        let lg = DevBuf::from_f32(&st, &logits)?;
        let tok_dev = DevBuf::from_bytes(&st, &(tok as i32).to_le_bytes())?;
        let x: Vec<f32> = (0..e).map(|_| rng.unit()).collect();
        let x_dev = DevBuf::from_f32(&st, &x)?;
        let act = ActBuf::new(&st, ActKind::Q8K, e, 1)?;
        kern.quantize(x_dev.ptr, &act)?;
        let nan = vec![f32::NAN; 2 * k * rows];
        let (y_ref, y_fused) = (DevBuf::from_f32(&st, &nan)?, DevBuf::from_f32(&st, &nan)?);
        let ids_ref = DevBuf::from_bytes(&st, bytemuck::cast_slice(&want_ids))?;
        let (ids_out, wts_out) = (
            DevBuf::from_f32(&st, &nan[..k])?,
            DevBuf::from_f32(&st, &nan[..k])?,
        );
        let product = |ids: u64, y: u64, experts: ExpertIds| -> Result<()> {
            let m = Matvec {
                ty: GgmlType::IQ2_XXS,
                w: gu.ptr,
                k: e,
                rows,
                ntok: 1,
                slots: k,
                w_slot_stride: matrix_bytes(GgmlType::IQ2_XXS, e, rows) as u64,
                ids,
                x_group: k,
                x: MvInput::Quant(&act),
                y,
            };
            let up = MvSeg {
                w: gu.ptr + gu_set,
                rows,
                y: y + (k * rows * 4) as u64,
                ldy: rows,
            };
            kern.matvec_routed(&st, &m, rows, &[up], experts)
        };
        product(ids_ref.ptr, y_ref.ptr, ExpertIds::AfterWait)?;
        let choice = FusedRoute {
            logits: lg.ptr,
            bias: if use_bias { bias_dev.ptr } else { 0 },
            tid2eid: if hashed { table_dev.ptr } else { 0 },
            tok: tok_dev.ptr,
            wts: wts_out.ptr,
            ne,
            k,
            norm: s.expert_weights_norm,
            wscale: s.expert_weights_scale,
        };
        product(ids_out.ptr, y_fused.ptr, ExpertIds::Choose(choice))?;
        st.synchronize()?;
        let tag = format!(
            "expert choice in the gate/up product ({})",
            if hashed {
                "hash"
            } else if flat {
                "top-k all tied"
            } else {
                "top-k"
            }
        );
        let got_ids = i32_bytes(ids_out.to_bytes(&st)?);
        let id_bad = got_ids
            .iter()
            .zip(&want_ids)
            .filter(|(a, b)| a != b)
            .count()
            + usize::from(got_ids.len() != want_ids.len());
        push(format!("{tag}: ids (exact)"), id_bad, &mut out);
        let w_bad = mismatch(&bits(&wts_out.to_f32(&st)?), &bits(&want_wts));
        push(format!("{tag}: weights (bits)"), w_bad, &mut out);
        let y_bad = mismatch(&bits(&y_fused.to_f32(&st)?), &bits(&y_ref.to_f32(&st)?));
        push(format!("{tag}: outputs (bits)"), y_bad, &mut out);

        // The down product, ids read before the wait against after.
        let mid: Vec<f32> = (0..k * ff).map(|_| rng.unit()).collect();
        let mid_dev = DevBuf::from_f32(&st, &mid)?;
        let mid_act = ActBuf::new(&st, ActKind::Q8K, ff, k)?;
        kern.quantize(mid_dev.ptr, &mid_act)?;
        let nan_d = vec![f32::NAN; k * rows];
        let (d_ref, d_early) = (
            DevBuf::from_f32(&st, &nan_d)?,
            DevBuf::from_f32(&st, &nan_d)?,
        );
        for (y, experts) in [(&d_ref, ExpertIds::AfterWait), (&d_early, ExpertIds::Early)] {
            let m = Matvec {
                ty: GgmlType::Q2_K,
                w: down.ptr,
                k: ff,
                rows,
                ntok: 1,
                slots: k,
                w_slot_stride: matrix_bytes(GgmlType::Q2_K, ff, rows) as u64,
                ids: ids_ref.ptr,
                x_group: 1,
                x: MvInput::Quant(&mid_act),
                y: y.ptr,
            };
            kern.matvec_routed(&st, &m, rows, &[], experts)?;
        }
        st.synchronize()?;
        let d_bad = mismatch(&bits(&d_early.to_f32(&st)?), &bits(&d_ref.to_f32(&st)?));
        push(
            format!(
                "expert ids before the wait, Q2_K down ({}): outputs (bits)",
                case
            ),
            d_bad,
            &mut out,
        );
    }
    Ok(out)
}

/// Decode router + expert choice in one cluster launch (`moe_router_route`, Flash
/// shapes, one token) against the CPU (f32 logits of the f16 router, then the CPU
/// routing) and against the two-launch path it replaces (F16 matvec + moe_route), whose
/// logits, ids and weights it must reproduce bit for bit. Exact ties come from
/// duplicated router rows; column 0 (x[0] = 1) lifts chosen experts to fixed places.
fn router_route_checks(
    be: &CudaBackend,
    keep: &Keep,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    let (ne, k, kin) = (s.n_expert, s.n_expert_used, s.n_embd);
    if !be.has_route_fuse() || ne != 256 || kin != 4096 {
        return Ok(out);
    }
    let RouteData {
        bias_v,
        bias,
        no_bias,
        vocab,
        table,
        t2e,
    } = route_data(be, keep, "router_check", ne, k, rng)?;
    for (case, (hashed, flat)) in [(false, false), (false, true), (true, false)]
        .into_iter()
        .enumerate()
    {
        // Router rows rounded to f16 (what the GPU holds); the CPU works on these values.
        let mut w: Vec<f32> = (0..ne * kin)
            .map(|_| f16::from_f32(0.02 * rng.unit()).to_f32())
            .collect();
        if flat {
            let first: Vec<f32> = w[..kin].to_vec();
            for r in 1..ne {
                w[r * kin..(r + 1) * kin].copy_from_slice(&first);
            }
        } else {
            // Places: 10 = 200 first, 30 = 31, 60, then 50 = 51 across the k-th place.
            for (r, lift) in [(10, 20.0), (30, 16.0), (60, 12.0), (50, 8.0)] {
                w[r * kin] = lift;
            }
            for (a, b) in [(10, 200), (30, 31), (50, 51)] {
                let row: Vec<f32> = w[a * kin..(a + 1) * kin].to_vec();
                w[b * kin..(b + 1) * kin].copy_from_slice(&row);
            }
        }
        let bytes: Vec<u8> = w
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let router = upload(
            be,
            keep,
            &format!("router_check_{case}.ffn_gate_inp"),
            GgmlType::F16,
            &[kin as u64, ne as u64],
            bytes,
        )?;
        let mut x: Vec<f32> = (0..kin).map(|_| rng.unit()).collect();
        x[0] = 1.0;
        let tok = (case as u32 * 3 + 1) % vocab as u32;
        be.begin_chunk(&[tok], 0)?;
        let use_bias = !hashed && !flat;
        let b = use_bias.then_some(&bias);
        let t = hashed.then_some(&t2e);
        let (fl, fi, fw) = be.router_route_host(s, &router, &x, b, t, true)?;
        let (tl, ti, tw) = be.router_route_host(s, &router, &x, b, t, false)?;
        let cpu_logits: Vec<f32> = (0..ne)
            .map(|r| {
                w[r * kin..(r + 1) * kin]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect();
        let row = tok as usize * k;
        let (want_ids, want_wts) = cpu_route(
            s,
            &cpu_logits,
            if use_bias { &bias_v } else { &no_bias },
            hashed.then(|| &table[row..row + k]),
        );
        let tag = format!(
            "router+route fused {}",
            if hashed {
                "hash"
            } else if flat {
                "top-k all-tied"
            } else {
                "top-k"
            }
        );
        let id_mismatches = fi.iter().zip(&want_ids).filter(|(a, b)| a != b).count()
            + usize::from(fi.len() != want_ids.len());
        let two_launch = bit_mismatches(&fl, &tl)
            + bit_mismatches(&fw, &tw)
            + fi.iter().zip(&ti).filter(|(a, b)| a != b).count()
            + usize::from(fi.len() != ti.len());
        for r in [
            compare(
                format!("{tag} logits"),
                &fl,
                &cpu_logits,
                TOL_F16_DOT_REL,
                "TOL_F16_DOT_REL",
            ),
            CheckResult {
                name: format!("{tag} expert ids (exact)"),
                max_abs: 0.0,
                max_rel: id_mismatches as f32,
                tol: TOL_ROUTE_ID_MISMATCHES as f32,
                tol_name: "TOL_ROUTE_ID_MISMATCHES",
                pass: id_mismatches == TOL_ROUTE_ID_MISMATCHES,
            },
            compare(
                format!("{tag} weights"),
                &fw,
                &want_wts,
                TOL_ROUTE_WEIGHT_REL,
                "TOL_ROUTE_WEIGHT_REL",
            ),
            CheckResult {
                name: format!("{tag} = two launches (logits, ids, weights bit-exact)"),
                max_abs: 0.0,
                max_rel: two_launch as f32,
                tol: TOL_ROUTER_FUSED_BIT_MISMATCHES as f32,
                tol_name: "TOL_ROUTER_FUSED_BIT_MISMATCHES",
                pass: two_launch == TOL_ROUTER_FUSED_BIT_MISMATCHES,
            },
        ] {
            report(&r);
            out.push(r);
        }
    }
    Ok(out)
}

/// Values of the fused router + route launch that may differ in any bit from the F16
/// matvec + moe_route pair (same sums in the same order: none).
pub const TOL_ROUTER_FUSED_BIT_MISMATCHES: usize = 0;

/// Indexer top-k picks: mismatching picks allowed. The GPU scores are bit-identical to
/// the CPU's (same order of sums, no FMA), so ties break the same way.
pub const TOL_INDEXER_PICK_MISMATCHES: usize = 0;

/// The check of `mismatches` indexer picks against the CPU's (`TOL_INDEXER_PICK_MISMATCHES`).
pub(crate) fn pick_check(name: String, mismatches: usize) -> CheckResult {
    CheckResult {
        name,
        max_abs: 0.0,
        max_rel: mismatches as f32,
        tol: TOL_INDEXER_PICK_MISMATCHES as f32,
        tol_name: "TOL_INDEXER_PICK_MISMATCHES",
        pass: mismatches == TOL_INDEXER_PICK_MISMATCHES,
    }
}

/// Lightning indexer at Flash dims (64 heads, top 512) through `Backend::indexer_topk`:
/// decode and a 3-token chunk, random rows (~2,000 visible), and rows with many exact
/// ties (zero keys score exactly 0, duplicated keys score alike).
fn indexer_checks(
    be: &CudaBackend,
    s: &ModelShape,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    use ds4_model::backend::KvStore;
    use ds4_model::kv::HostKv;
    let mut out = Vec::new();
    let Some(layer) = s.layer_kinds.iter().position(|k| k.is_csa()) else {
        return Ok(out);
    };
    let (heads, dim, top_k) = (s.indexer_heads, s.indexer_dim, s.indexer_top_k);
    let ctx = 16384usize;
    // A state after pos0 tokens holds pos0 / 4 closed rows; these tokens see no more
    // (pos0 % 4 + n <= 4), as when the chunk's own rows are not yet closed.
    for (n, pos0, ties) in [
        (1usize, 8000usize, false),
        (3, 8100, true),
        (1, 2044, false),
    ] {
        let mut host = HostKv::new(s, ctx);
        let n_rows = pos0 / 4;
        let mut keys: Vec<f32> = (0..n_rows * dim).map(|_| rng.unit()).collect();
        if ties {
            // Most rows zero (score 0: ties across the k-th place), some duplicated.
            for c in 0..n_rows {
                if c % 5 != 0 {
                    keys[c * dim..(c + 1) * dim].fill(0.0);
                }
            }
            for c in (5..n_rows).step_by(50) {
                let (a, b) = keys.split_at_mut(c * dim);
                b[..dim].copy_from_slice(&a[..dim]);
            }
        }
        {
            let l = host
                .layers
                .get_mut(layer)
                .and_then(|l| l.index.as_mut())
                .ok_or_else(|| crate::Error::Shape {
                    what: "indexer check",
                    detail: "the first CSA layer has no indexer rows".into(),
                })?;
            l.n = n_rows;
            l.data[..n_rows * dim].copy_from_slice(&keys);
        }
        let mut bytes = Vec::new();
        host.save(pos0, &mut bytes)?;
        let mut kv = be.alloc_kv(s, ctx)?;
        kv.load(pos0, &bytes)?;
        let qv: Vec<f32> = (0..n * heads * dim).map(|_| rng.unit()).collect();
        // Positive head weights keep zero keys at score 0, below every positive score.
        let wv: Vec<f32> = (0..n * heads).map(|_| 0.1 + rng.unit().abs()).collect();
        let q = act(be, n, heads * dim, &qv)?;
        let w = act(be, n, heads, &wv)?;
        let mut sel = be.alloc_idx(n, top_k)?;
        let tokens: Vec<u32> = (0..n as u32).collect();
        be.begin_chunk(&tokens, pos0)?;
        be.indexer_topk(&kv, layer, &q, &w, n, pos0, top_k, &mut sel)?;
        let mut raw = vec![0u8; n * top_k * 4];
        sel.buf.read_at(&be.runtime().stream, 0, &mut raw)?;
        let got: Vec<i32> = raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut mismatches = 0usize;
        for t in 0..n {
            let visible = ((pos0 + t + 1) / 4).min(n_rows);
            // The CPU backend's indexer (crates/cpu `indexer_topk`): every row visible
            // when they fit, else its scores and repeated selection.
            let mut want = vec![-1i32; top_k];
            if visible <= top_k {
                for (c, w) in want.iter_mut().enumerate().take(visible) {
                    *w = c as i32;
                }
            } else {
                let (qt, wt) = (
                    &qv[t * heads * dim..(t + 1) * heads * dim],
                    &wv[t * heads..(t + 1) * heads],
                );
                let mut scores: Vec<f32> = keys
                    .chunks_exact(dim)
                    .take(visible)
                    .map(|key| numerics::indexer_score(qt, wt, key))
                    .collect();
                numerics::indexer_pick_top(&mut scores, &mut want);
            }
            mismatches += want
                .iter()
                .zip(&got[t * top_k..(t + 1) * top_k])
                .filter(|(a, b)| a != b)
                .count();
        }
        let r = pick_check(
            format!(
                "indexer top-{top_k} n={n} pos {pos0}{} picks (exact)",
                if ties { " ties" } else { "" }
            ),
            mismatches,
        );
        report(&r);
        out.push(r);
    }
    Ok(out)
}

/// Every fused-step check on a backend built for the Flash shape.
pub fn run_fused_checks(
    rt: &Arc<CudaRuntime>,
    mut report: impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let s = Config::flash().shape();
    let keep = Keep::default();
    let be = CudaBackend::new(rt.clone(), &s)?;
    let mut rng = Rng(0xf05e_d0c4_5eed);
    let mut out = Vec::new();
    out.extend(hc_quant_checks(&be, &keep, &s, &mut rng, &mut report)?);
    out.extend(hc_v2_checks(&be, &keep, &s, &mut rng, &mut report)?);
    out.extend(rope_quant_checks(&be, &keep, &s, &mut rng, &mut report)?);
    out.extend(qkv_checks(&be, &keep, &s, &mut rng, &mut report)?);
    out.extend(route_checks(&be, &keep, &s, &mut rng, &mut report)?);
    out.extend(router_route_checks(&be, &keep, &s, &mut rng, &mut report)?);
    out.extend(expert_ids_checks(&be, &keep, &s, &mut rng, &mut report)?);
    out.extend(indexer_checks(&be, &s, &mut rng, &mut report)?);
    out.extend(crate::topk_checks::topk_checks(
        &be,
        s.indexer_top_k,
        &mut rng,
        &mut report,
    )?);
    // Last: the earlier checks keep the random data they had before them.
    out.extend(qb_pair_checks(&be, &keep, &s, &mut rng, &mut report)?);
    out.extend(comp_pair_checks(&be, &keep, &s, &mut rng, &mut report)?);
    be.runtime().stream.synchronize()?;
    Ok(out)
}
