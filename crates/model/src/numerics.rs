//! Scalar primitives with model semantics (model.md §1, §6, §7.1): RoPE/YaRN frequencies,
//! the official FP8 / Hadamard+FP4 round trips, stable special functions and the HC
//! Sinkhorn split. Backends call these (CPU) or mirror them (GPU kernels); unit tests pin
//! them to independently computed values.

/// RoPE frequency set for one family of layers.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFreqs {
    /// One frequency per rotated pair (n_rot / 2 entries).
    pub freqs: Vec<f32>,
}

impl RopeFreqs {
    /// Plain RoPE: f_i = base^(−2i/n_rot). Computed like transformers (f32 result of the
    /// power, then its reciprocal) so float comparisons with the oracle stay tight.
    pub fn plain(base: f32, n_rot: usize) -> Self {
        let half = n_rot / 2;
        let freqs = (0..half).map(|i| pos_freq_inv(base, i, n_rot)).collect();
        Self { freqs }
    }

    /// YaRN without magnitude scaling (model.md §6a): pairs below `lo` keep their frequency,
    /// pairs above `hi` are divided by `factor`, the pairs between are interpolated.
    pub fn yarn(
        base: f32,
        n_rot: usize,
        factor: f32,
        orig_ctx: f32,
        beta_fast: f32,
        beta_slow: f32,
    ) -> Self {
        let half = n_rot / 2;
        let dim = n_rot as f64;
        let corr = |beta: f64| {
            dim * ((orig_ctx as f64) / (beta * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * (base as f64).ln())
        };
        let lo = corr(beta_fast as f64).floor().max(0.0);
        let hi = corr(beta_slow as f64).ceil().min(dim - 1.0);
        let hi = if lo == hi { hi + 0.001 } else { hi };
        let freqs = (0..half)
            .map(|i| {
                let extrap = pos_freq_inv(base, i, n_rot);
                let pos_freq = 1.0f32 / extrap;
                let interp = 1.0f32 / (factor * pos_freq);
                let ramp = (((i as f64) - lo) / (hi - lo)).clamp(0.0, 1.0) as f32;
                let extrap_factor = 1.0f32 - ramp;
                interp * (1.0 - extrap_factor) + extrap * extrap_factor
            })
            .collect();
        Self { freqs }
    }

    /// (cos, sin) of pair `i` at position `pos` (angle computed in f32 as transformers does).
    #[inline]
    pub fn cos_sin(&self, pos: u32, i: usize) -> (f32, f32) {
        let theta = (pos as f32) * self.freqs[i];
        let t = theta as f64;
        (t.cos() as f32, t.sin() as f32)
    }

    /// Rotates the last `2·freqs.len()` dims of `head` as interleaved pairs; `inverse`
    /// negates the angle (used on the attention output).
    pub fn apply(&self, head: &mut [f32], pos: u32, inverse: bool) {
        let n_rot = self.freqs.len() * 2;
        let Some(start) = head.len().checked_sub(n_rot) else {
            return;
        };
        let tail = &mut head[start..];
        for (i, pair) in tail.chunks_exact_mut(2).enumerate() {
            let (c, s) = self.cos_sin(pos, i);
            let s = if inverse { -s } else { s };
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c - x1 * s;
            pair[1] = x0 * s + x1 * c;
        }
    }
}

fn pos_freq_inv(base: f32, i: usize, n_rot: usize) -> f32 {
    let exponent = ((2 * i) as f32) / (n_rot as f32);
    let pos_freq = ((base as f64).powf(exponent as f64)) as f32;
    1.0f32 / pos_freq
}

/// Numerically stable sigmoid.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// softplus with the cut-offs of model.md §1.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// Sum of squares accumulated in f64 (the CPU reference does the same).
#[inline]
pub fn rms_inv(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let mean = ss / (x.len().max(1) as f64);
    (1.0 / (mean + eps as f64).sqrt()) as f32
}

/// `out = x / rms(x) ⊙ w` (w = None: unweighted).
pub fn rms_norm_into(x: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let r = rms_inv(x, eps);
    match w {
        Some(w) => {
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
                *o = g * (v * r);
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * r;
            }
        }
    }
}

/// The HC split of model.md §7.1 steps 3–5: from the 2N+N² mixes, the pre and post weights
/// and the Sinkhorn-normalised combination matrix `comb[a][b]` (row-major, N×N).
#[allow(clippy::too_many_arguments)]
pub fn hc_split(
    mixes: &[f32],
    scale: &[f32; 3],
    base: &[f32],
    n: usize,
    iters: usize,
    eps: f32,
    pre: &mut [f32],
    post: &mut [f32],
    comb: &mut [f32],
) {
    for s in 0..n {
        pre[s] = sigmoid(scale[0] * mixes[s] + base[s]) + eps;
        post[s] = 2.0 * sigmoid(scale[1] * mixes[n + s] + base[n + s]);
    }
    for a in 0..n {
        let row = &mut comb[a * n..(a + 1) * n];
        for (b, v) in row.iter_mut().enumerate() {
            let k = 2 * n + a * n + b;
            *v = scale[2] * mixes[k] + base[k];
        }
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v = *v / sum + eps;
        }
    }
    col_normalise(comb, n, eps);
    for _ in 1..iters.max(1) {
        for a in 0..n {
            let row = &mut comb[a * n..(a + 1) * n];
            let s: f32 = row.iter().sum::<f32>() + eps;
            for v in row.iter_mut() {
                *v /= s;
            }
        }
        col_normalise(comb, n, eps);
    }
}

fn col_normalise(comb: &mut [f32], n: usize, eps: f32) {
    for b in 0..n {
        let mut s = 0.0f32;
        for a in 0..n {
            s += comb[a * n + b];
        }
        s += eps;
        for a in 0..n {
            comb[a * n + b] /= s;
        }
    }
}

/// Largest finite E4M3FN magnitude.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// Rounds `v` (|v| ≤ 448) to the nearest E4M3FN value, ties to the even code.
#[inline]
pub fn round_e4m3(v: f32) -> f32 {
    let a = v.abs();
    if a == 0.0 || !a.is_finite() {
        return v;
    }
    // Spacing: 2^-9 in the subnormal range (below 2^-6), else 2^(e-3).
    let spacing = if a < f32::powi(2.0, -6) {
        f32::powi(2.0, -9)
    } else {
        let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        f32::powi(2.0, e - 3)
    };
    let q = (a / spacing).round_ties_even() * spacing;
    q.min(FP8_E4M3_MAX).copysign(v)
}

/// Power of two ≥ a/max: 2^ceil(log2(a/max)) computed in f32 as ds4 does.
#[inline]
fn pow2_scale(a: f32, max: f32) -> f32 {
    let e = (a / max).log2().ceil();
    (e as f64).exp2() as f32
}

/// Official FP8 round trip of the first `n_nope` dims of a KV row, blocks of 64
/// (model.md §6b). The RoPE tail is untouched.
pub fn fp8_kv_round_row(row: &mut [f32], n_nope: usize) {
    let n_nope = n_nope.min(row.len());
    for block in row[..n_nope].chunks_mut(64) {
        let amax = block.iter().fold(0.0f32, |m, &x| m.max(x.abs())).max(1e-4);
        let s = pow2_scale(amax, FP8_E4M3_MAX);
        for x in block.iter_mut() {
            let v = (*x / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX);
            *x = round_e4m3(v) * s;
        }
    }
}

const FP4_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Rounds |v| ≤ 6 to the nearest E2M1 magnitude, ties to the even code.
#[inline]
pub fn round_e2m1(v: f32) -> f32 {
    let a = v.abs().min(6.0);
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (i, &c) in FP4_VALUES.iter().enumerate() {
        let d = (a - c).abs();
        if d < best_d || (d == best_d && i % 2 == 0) {
            best = i;
            best_d = d;
        }
    }
    FP4_VALUES[best].copysign(v)
}

/// In-place Walsh–Hadamard transform (Sylvester order) scaled by 1/√n; n a power of two.
pub fn hadamard_inplace(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    for v in x.iter_mut() {
        *v *= s;
    }
}

/// FP4 E2M1 round trip in blocks of 32 (model.md §6c, without the transform).
pub fn fp4_round_row(row: &mut [f32]) {
    for block in row.chunks_mut(32) {
        let amax = block
            .iter()
            .fold(0.0f32, |m, &x| m.max(x.abs()))
            .max(7.052_966e-38);
        let s = pow2_scale(amax, 6.0);
        for x in block.iter_mut() {
            let v = (*x / s).clamp(-6.0, 6.0);
            *x = round_e2m1(v) * s;
        }
    }
}

/// Lightning-indexer score of one key (§9): Σ_h (w_h/√H)·(relu(q_h·key)/√d) over the
/// H = `w.len()` heads of d = `key.len()` dims (`q` holds H·d), every sum in order and
/// without fused multiply-adds: the GPU kernels reproduce it bit for bit, so ties
/// between scores break the same way on both.
pub fn indexer_score(q: &[f32], w: &[f32], key: &[f32]) -> f32 {
    let dim = key.len();
    let qscale = 1.0 / (dim as f32).sqrt();
    let wscale = 1.0 / (w.len() as f32).sqrt();
    let mut acc = 0.0f32;
    for (qh, &wh) in q.chunks_exact(dim).zip(w) {
        let d: f32 = qh.iter().zip(key).map(|(a, b)| a * b).sum();
        acc += (wh * wscale) * (d.max(0.0) * qscale);
    }
    acc
}

/// The indexer's picks: repeated selection of the largest remaining score, the lower
/// index on ties, into `out` in order until it is full or no finite score is left
/// (slots not filled are left as they are). Consumes `scores`.
pub fn indexer_pick_top(scores: &mut [f32], out: &mut [i32]) {
    for slot in out.iter_mut() {
        let mut best = usize::MAX;
        let mut best_v = f32::NEG_INFINITY;
        for (c, &v) in scores.iter().enumerate() {
            if v > best_v {
                best = c;
                best_v = v;
            }
        }
        if best == usize::MAX {
            break;
        }
        *slot = best as i32;
        scores[best] = f32::NEG_INFINITY;
    }
}

/// Indexer QAT: Hadamard-128 then FP4 round trip, per 128-dim head.
pub fn indexer_qat_row(row: &mut [f32]) {
    for head in row.chunks_mut(128) {
        hadamard_inplace(head);
        fp4_round_row(head);
    }
}

/// Rounds every value to the nearest f16 (stored cache rows on the official path).
pub fn round_f16_inplace(row: &mut [f32]) {
    for v in row.iter_mut() {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn indexer_score_weighs_only_positive_head_dots() {
        // Two heads of two dims: head 0 dots to 2, head 1 to -2 (relu drops it).
        let s = indexer_score(&[1.0, 0.0, -1.0, 0.0], &[1.0, 1.0], &[2.0, 0.0]);
        // (1/√2)·(2/√2) = 1.
        assert!((s - 1.0).abs() < 1e-6, "{s}");
    }

    #[test]
    fn indexer_pick_top_orders_by_score_then_lower_index() {
        let mut scores = vec![1.0, 3.0, 3.0, 2.0];
        let mut out = vec![-1; 3];
        indexer_pick_top(&mut scores, &mut out);
        assert_eq!(out, vec![1, 2, 3]);
        // More slots than scores: the rest stays untouched.
        let mut scores = vec![0.5];
        let mut out = vec![-1; 2];
        indexer_pick_top(&mut scores, &mut out);
        assert_eq!(out, vec![0, -1]);
    }

    #[test]
    fn yarn_check_values_of_spec() {
        // model.md §6a check values (θ = 160000, factor 16, 65536, β 32/1).
        let r = RopeFreqs::yarn(160000.0, 64, 16.0, 65536.0, 32.0, 1.0);
        let rel = |a: f32, b: f32| ((a - b) / b).abs();
        assert!(rel(r.freqs[1], 0.687_656_02) < 1e-6, "{}", r.freqs[1]);
        assert!(rel(r.freqs[16], 0.002_265_625) < 1e-5, "{}", r.freqs[16]);
        assert!(rel(r.freqs[20], 2.969_777_8e-4) < 1e-5, "{}", r.freqs[20]);
        assert!(rel(r.freqs[31], 5.680_529e-7) < 1e-5, "{}", r.freqs[31]);
        // Pairs 0..15 are unscaled.
        let p = RopeFreqs::plain(160000.0, 64);
        assert_eq!(&r.freqs[..15], &p.freqs[..15]);
    }

    #[test]
    fn rope_inverse_undoes_forward() {
        let r = RopeFreqs::plain(10000.0, 64);
        let orig: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = orig.clone();
        r.apply(&mut x, 123, false);
        assert_eq!(&x[..64], &orig[..64]);
        assert_ne!(&x[64..], &orig[64..]);
        r.apply(&mut x, 123, true);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn rope_pair_zero_rotates_by_position() {
        // f_0 = 1: pair 0 rotates by exactly `pos` radians.
        let r = RopeFreqs::plain(10000.0, 64);
        let mut x = vec![0.0f32; 64];
        x[0] = 1.0;
        r.apply(&mut x, 3, false);
        assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[1] - 3f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn softplus_and_sigmoid() {
        // python: import math; math.log1p(math.exp(0.5)) = 0.9740769841801067
        assert!((softplus(0.5) - 0.974_077).abs() < 1e-6);
        assert_eq!(softplus(25.0), 25.0);
        assert!((softplus(-25.0) - (-25f32).exp()).abs() < 1e-20);
        assert!((sigmoid(-100.0)).abs() < 1e-30 && (sigmoid(100.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn sinkhorn_matches_numpy() {
        // numpy reference (f64), run once:
        // m=np.arange(24)*0.1-1; sc=[0.9,1.1,0.7]; b=np.sin(np.arange(24))
        // C=(sc[2]*m[8:]+b[8:]).reshape(4,4); C=np.exp(C-C.max(1,keepdims=1));
        // C=C/C.sum(1,keepdims=1)+1e-6; C/=C.sum(0,keepdims=1)+1e-6
        // for _ in range(19): C/=C.sum(1,keepdims=1)+1e-6; C/=C.sum(0,keepdims=1)+1e-6
        // print(C[0], C[:,0])
        let mixes: Vec<f32> = (0..24).map(|i| i as f32 * 0.1 - 1.0).collect();
        let base: Vec<f32> = (0..24).map(|i| (i as f32).sin()).collect();
        let (mut pre, mut post, mut comb) = ([0f32; 4], [0f32; 4], [0f32; 16]);
        hc_split(
            &mixes,
            &[0.9, 1.1, 0.7],
            &base,
            4,
            20,
            1e-6,
            &mut pre,
            &mut post,
            &mut comb,
        );
        // Doubly stochastic within the eps slack.
        for a in 0..4 {
            let r: f32 = comb[a * 4..a * 4 + 4].iter().sum();
            let c: f32 = (0..4).map(|k| comb[k * 4 + a]).sum();
            assert!((r - 1.0).abs() < 1e-4 && (c - 1.0).abs() < 1e-5, "{r} {c}");
        }
        // pre_0 = sigmoid(0.9*-1.0 + sin 0) + 1e-6 = 0.289050497... + 1e-6
        assert!((pre[0] - 0.289_051_5).abs() < 1e-6, "{}", pre[0]);
        // post_0 = 2*sigmoid(1.1*-0.6 + sin 4) = 2*sigmoid(-1.41680249) = 0.39073...
        assert!((post[0] - 2.0 * sigmoid(1.1 * -0.6 + 4f32.sin())).abs() < 1e-7);
    }

    #[test]
    fn e4m3_rounding_rules() {
        assert_eq!(round_e4m3(448.0), 448.0);
        assert_eq!(round_e4m3(1.0625), 1.0); // tie between 1.0 (even) and 1.125
        assert_eq!(round_e4m3(1.1875), 1.25); // tie between 1.125 and 1.25 (even)
        assert_eq!(round_e4m3(-0.000_976_562_5), 0.0); // 2^-10: tie between 0 (even) and 2^-9
        assert_eq!(round_e4m3(0.001953125), 0.001953125); // 2^-9
        assert_eq!(round_e2m1(2.5), 2.0);
        assert_eq!(round_e2m1(0.75), 1.0);
        assert_eq!(round_e2m1(-5.0), -4.0);
        assert_eq!(round_e2m1(0.25), 0.0);
    }

    #[test]
    fn hadamard_is_orthonormal() {
        let mut x: Vec<f32> = (0..128).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
        let orig = x.clone();
        hadamard_inplace(&mut x);
        hadamard_inplace(&mut x);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}
