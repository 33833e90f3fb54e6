//! Weight quantisers (ggml's reference algorithms, re-implemented) and ds4's
//! activation quantisers for the Q8_0 and Q8_K dot products.

// Index loops mirror the block layouts; iterator chains would obscure them.
#![allow(clippy::needless_range_loop)]

use crate::blocks::{ActQ8_0, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, QK_K, QK8_0};
use crate::{Error, GgmlType, Result, row_bytes};
use half::f16;

/// Quantises one row of f32 values to `ty`, returning the raw block bytes.
/// `src.len()` must be a whole number of blocks of `ty`.
pub fn quantize_row(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>> {
    let n_bytes = row_bytes(ty, src.len(), "quantize_row: src length")?;
    let mut out = Vec::with_capacity(n_bytes);
    match ty {
        GgmlType::F32 => src.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => src
            .iter()
            .for_each(|&v| out.extend(f32_to_f16_bits(v).to_le_bytes())),
        GgmlType::BF16 => src
            .iter()
            .for_each(|&v| out.extend(f32_to_bf16_bits(v).to_le_bytes())),
        GgmlType::Q8_0 => src
            .chunks_exact(QK8_0)
            .for_each(|x| out.extend(bytemuck::bytes_of(&quantize_block_q8_0(x)))),
        GgmlType::Q2_K => src
            .chunks_exact(QK_K)
            .for_each(|x| out.extend(bytemuck::bytes_of(&quantize_block_q2_k(x)))),
        GgmlType::Q4_K => src
            .chunks_exact(QK_K)
            .for_each(|x| out.extend(bytemuck::bytes_of(&quantize_block_q4_k(x)))),
        other => return Err(Error::Unsupported(other, "quantize_row")),
    }
    debug_assert_eq!(out.len(), n_bytes);
    Ok(out)
}

/// f32 → binary16, round to nearest even; NaN keeps its top payload bits
/// (forced non-zero) like numpy's `astype(float16)`.
pub(crate) fn f32_to_f16_bits(v: f32) -> u16 {
    if v.is_nan() {
        let b = v.to_bits();
        let payload = ((b >> 13) & 0x3ff) as u16;
        return ((b >> 16) & 0x8000) as u16 | 0x7c00 | if payload == 0 { 1 } else { payload };
    }
    f16::from_f32(v).to_bits()
}

/// f32 → bf16 as ggml's `ggml_compute_fp32_to_bf16`: NaN becomes a quiet NaN
/// with the same upper bits; everything else rounds to nearest even.
pub(crate) fn f32_to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u64::from(u) + 0x7fff + u64::from((u >> 16) & 1)) >> 16) as u16
}

/// ggml's `nearest_int` (round half to even) for the magnitudes the K-quant
/// searches produce.
#[inline]
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// `quantize_row_q8_0_ref`: d = amax/127 stored as f16, q = round-half-away(x/d).
fn quantize_block_q8_0(x: &[f32]) -> BlockQ8_0 {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK8_0];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    BlockQ8_0 {
        d: f16::from_bits(f32_to_f16_bits(d)),
        qs,
    }
}

/// Result of one `make_qkx2_quants` search: codes in `levels`, value ≈ scale·l − min.
struct Qkx2Params {
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
}

/// ggml's `make_qkx2_quants`: fit scale and (non-positive) offset for `x` on
/// codes 0..=nmax, minimising the weighted error over a small scan of scales.
/// Returns (scale, min) where x ≈ scale·l − min.
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    p: &Qkx2Params,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = if x[i] < min { x[i] } else { min };
        max = if x[i] > max { x[i] } else { max };
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if p.use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        best_error += weights[i] * err(scale * l as f32 + min - x[i]);
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    let mut aux = [0u8; 32];
    let aux = &mut aux[..n];
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                cur_error += weights[i] * err(this_scale * aux[i] as f32 + this_min - x[i]);
            }
            if cur_error < best_error {
                levels.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `quantize_row_q2_K_ref` for one 256-element block.
pub(crate) fn quantize_block_q2_k(x: &[f32]) -> BlockQ2K {
    const Q4SCALE: f32 = 15.0;
    let params = Qkx2Params {
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    let mut weights = [0f32; 16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        (scales[j], mins[j]) =
            make_qkx2_quants(3, xs, &weights, &mut levels[16 * j..16 * j + 16], &params);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let mut b = BlockQ2K {
        scales: [0; 16],
        qs: [0; 64],
        d: f16::ZERO,
        dmin: f16::ZERO,
    };
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            b.scales[j] = nearest_int(iscale * scales[j]).clamp(0, 15) as u8;
        }
        b.d = f16::from_f32(max_scale / Q4SCALE);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            b.scales[j] |= (nearest_int(iscale * mins[j]).clamp(0, 15) as u8) << 4;
        }
        b.dmin = f16::from_f32(max_min / Q4SCALE);
    }
    let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
    for j in 0..16 {
        let dl = d * f32::from(b.scales[j] & 15);
        if dl == 0.0 {
            continue;
        }
        let ml = dmin * f32::from(b.scales[j] >> 4);
        for i in 16 * j..16 * j + 16 {
            levels[i] = nearest_int((x[i] + ml) / dl).clamp(0, 3) as u8;
        }
    }
    for n in 0..2 {
        for l in 0..32 {
            let at = |j: usize| levels[128 * n + 32 * j + l] << (2 * j);
            b.qs[32 * n + l] = at(0) | at(1) | at(2) | at(3);
        }
    }
    b
}

/// `quantize_row_q4_K_ref` for one 256-element block.
pub(crate) fn quantize_block_q4_k(x: &[f32]) -> BlockQ4K {
    let params = Qkx2Params {
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0.0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) =
            make_qkx2_quants(15, xs, &weights, &mut levels[32 * j..32 * j + 32], &params);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut s = [0u8; 12];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8;
        let lm = nearest_int(inv_min * mins[j]).clamp(0, 63) as u8;
        if j < 4 {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (ls & 15) | ((lm & 15) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
    let mut b = BlockQ4K {
        d: f16::from_f32(max_scale / 63.0),
        dmin: f16::from_f32(max_min / 63.0),
        scales: s,
        qs: [0; 128],
    };
    let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
    for j in 0..8 {
        let (sc, m) = b.scale_min(j);
        let dl = d * f32::from(sc);
        if dl == 0.0 {
            continue;
        }
        let ml = dmin * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + ml) / dl).clamp(0, 15) as u8;
        }
    }
    for c in 0..4 {
        for l in 0..32 {
            b.qs[32 * c + l] = levels[64 * c + l] | (levels[64 * c + 32 + l] << 4);
        }
    }
    b
}

/// ds4's Q8_0 activation quantisation (`quantize_q8_0_activation`): per 32 values
/// d = amax/127 (kept in f32), q = lrint(x · (1/d)). A short last block is
/// zero-padded. |q| ≤ 127 always holds for finite input, so the clamp to
/// [-127, 127] never differs from ds4's [-128, 127].
pub fn quantize_act_q8_0(x: &[f32]) -> Vec<ActQ8_0> {
    let mut out = vec![
        ActQ8_0 {
            d: 0.0,
            qs: [0; QK8_0]
        };
        x.len().div_ceil(QK8_0)
    ];
    quantize_act_q8_0_blocks(x, &mut out);
    out
}

/// [`quantize_act_q8_0`] into a caller-owned buffer of exactly ⌈len/32⌉ blocks.
pub fn quantize_act_q8_0_into(x: &[f32], out: &mut [ActQ8_0]) -> Result<()> {
    let need = x.len().div_ceil(QK8_0);
    if out.len() != need {
        return Err(Error::Length {
            what: "quantize_act_q8_0_into: output blocks",
            expected: need,
            actual: out.len(),
        });
    }
    quantize_act_q8_0_blocks(x, out);
    Ok(())
}

fn quantize_act_q8_0_blocks(x: &[f32], out: &mut [ActQ8_0]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks(QK8_0)) {
        let amax = xs
            .iter()
            .fold(0.0f32, |a, v| if v.abs() > a { v.abs() } else { a });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        blk.d = d;
        blk.qs = [0; QK8_0];
        for (q, &v) in blk.qs.iter_mut().zip(xs) {
            *q = ((v * id).round_ties_even() as i32).clamp(-127, 127) as i8;
        }
    }
}

/// ds4's Q8_K activation quantisation (`ds4_quantize_row_q8_K`): per 256 values,
/// max = the signed value of largest magnitude, iscale = −127/max,
/// q = lrint(iscale·x), d = 1/iscale, bsums = sums of q per 16. A short last
/// block is zero-padded. As for Q8_0, |q| ≤ 127 always holds.
pub fn quantize_act_q8_k(x: &[f32]) -> Vec<BlockQ8K> {
    let zero = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; 16],
    };
    let mut out = vec![zero; x.len().div_ceil(QK_K)];
    quantize_act_q8_k_blocks(x, &mut out);
    out
}

/// [`quantize_act_q8_k`] into a caller-owned buffer of exactly ⌈len/256⌉ blocks.
pub fn quantize_act_q8_k_into(x: &[f32], out: &mut [BlockQ8K]) -> Result<()> {
    let need = x.len().div_ceil(QK_K);
    if out.len() != need {
        return Err(Error::Length {
            what: "quantize_act_q8_k_into: output blocks",
            expected: need,
            actual: out.len(),
        });
    }
    quantize_act_q8_k_blocks(x, out);
    Ok(())
}

fn quantize_act_q8_k_blocks(x: &[f32], out: &mut [BlockQ8K]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks(QK_K)) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        blk.qs = [0; QK_K];
        blk.bsums = [0; 16];
        if amax == 0.0 {
            blk.d = 0.0;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in blk.qs.iter_mut().zip(xs) {
            *q = ((iscale * v).round_ties_even() as i32).clamp(-127, 127) as i8;
        }
        for (s, q) in blk.bsums.iter_mut().zip(blk.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| i16::from(v)).sum();
        }
        blk.d = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bf16_rounding_and_nan() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is a tie between 1.0 and 1+2^-7: goes to even (1.0).
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
    }

    #[test]
    fn act_q8_k_matches_spec_on_a_small_case() {
        let mut x = vec![0.0f32; 256];
        x[3] = -2.0;
        x[17] = 1.0;
        let b = &quantize_act_q8_k(&x)[0];
        // max = -2 → iscale = 63.5 → q = lrint(63.5 · x).
        assert_eq!(b.qs[3], -127);
        assert_eq!(b.qs[17], 64); // 63.5 ties to even
        assert_eq!(b.bsums[0], -127);
        assert_eq!(b.bsums[1], 64);
        assert_eq!(b.d, 1.0 / 63.5);
    }

    #[test]
    fn act_q8_0_zero_block_and_padding() {
        let x = [0.0f32; 40];
        let q = quantize_act_q8_0(&x);
        assert_eq!(q.len(), 2);
        assert_eq!(q[1].d, 0.0);
        assert!(quantize_act_q8_0_into(&x, &mut q.clone()[..1]).is_err());
    }
}
