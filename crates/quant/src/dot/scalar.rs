//! Scalar dot products. They define the exact f32 result of every fast dot
//! (see the module docs of [`crate::dot`]); the SIMD versions must match them.

// Index loops mirror the block layouts; iterator chains would obscure them.
#![allow(clippy::needless_range_loop)]

use crate::blocks::{ActQ8_0, BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K};
use crate::iq2_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
use half::f16;

/// Sums 8 lanes as `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`: the order of the
/// AVX2 horizontal sum (high half onto low half, then pairs).
#[inline]
pub fn hsum8(v: [f32; 8]) -> f32 {
    let h = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Combines 4 accumulators of 8 lanes: lane-wise `(a0+a1)+(a2+a3)`, then [`hsum8`].
#[inline]
pub fn reduce_4x8(acc: &[[f32; 8]; 4]) -> f32 {
    hsum8(std::array::from_fn(|j| {
        (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j])
    }))
}

pub fn dot_q8_0(w: &[BlockQ8_0], x: &[ActQ8_0]) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    for (b, (wb, xb)) in w.iter().zip(x).enumerate() {
        let s = wb.d.to_f32() * xb.d;
        let a = &mut acc[b % 4];
        for (j, lane) in a.iter_mut().enumerate() {
            let p: i32 = (4 * j..4 * j + 4)
                .map(|i| i32::from(wb.qs[i]) * i32::from(xb.qs[i]))
                .sum();
            *lane = (p as f32).mul_add(s, *lane);
        }
    }
    reduce_4x8(&acc)
}

/// Accumulates products of a stream into the 4 × 8 lane layout, starting at
/// element offset `start` (a multiple of 32 when called from SIMD tails).
#[inline]
pub(crate) fn fma_lanes(
    acc: &mut [[f32; 8]; 4],
    start: usize,
    w: impl Iterator<Item = f32>,
    x: &[f32],
) {
    for (i, (wv, &xv)) in (start..).zip(w.zip(x)) {
        let lane = &mut acc[(i / 8) % 4][i % 8];
        *lane = wv.mul_add(xv, *lane);
    }
}

pub fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    fma_lanes(&mut acc, 0, w.iter().map(|h| h.to_f32()), x);
    reduce_4x8(&acc)
}

pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    fma_lanes(&mut acc, 0, w.iter().copied(), x);
    reduce_4x8(&acc)
}

/// Integer parts of one Q2_K·Q8_K block: (Σ_k sc_k·Σ code·q, Σ_k m_k·bsums_k).
pub fn q2_k_isums(wb: &BlockQ2K, xb: &BlockQ8K) -> (i32, i32) {
    let summs: i32 = (0..16)
        .map(|k| i32::from(xb.bsums[k]) * i32::from(wb.scales[k] >> 4))
        .sum();
    let mut isum = 0i32;
    for k in 0..16 {
        let base = 16 * k;
        let (n, j, l0) = (base / 128, (base % 128) / 32, base % 32);
        let s: i32 = (0..16)
            .map(|i| {
                let code = (wb.qs[32 * n + l0 + i] >> (2 * j)) & 3;
                i32::from(code) * i32::from(xb.qs[base + i])
            })
            .sum();
        isum += i32::from(wb.scales[k] & 15) * s;
    }
    (isum, summs)
}

/// ds4's per-block combination for K-quants: `d_x·d_w·isum − d_x·dmin_w·summs`.
#[inline]
pub(crate) fn k_block_sum(d: f16, dmin: f16, xd: f32, isum: i32, summs: i32) -> f32 {
    let dall = xd * d.to_f32();
    let dmin = xd * dmin.to_f32();
    dall * isum as f32 - dmin * summs as f32
}

pub fn dot_q2_k_q8_k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let (isum, summs) = q2_k_isums(wb, xb);
        sumf += k_block_sum(wb.d, wb.dmin, xb.d, isum, summs);
    }
    sumf
}

/// Integer parts of one Q4_K·Q8_K block: (Σ_k sc_k·Σ nib·q, Σ_k m_k·(bsums_2k + bsums_2k+1)).
pub fn q4_k_isums(wb: &BlockQ4K, xb: &BlockQ8K) -> (i32, i32) {
    let (sc, m) = wb.scales_mins();
    let summs: i32 = (0..8)
        .map(|k| i32::from(m[k]) * (i32::from(xb.bsums[2 * k]) + i32::from(xb.bsums[2 * k + 1])))
        .sum();
    let mut isum = 0i32;
    for k in 0..8 {
        let (c, shift) = (k / 2, 4 * (k % 2));
        let s: i32 = (0..32)
            .map(|l| {
                let nib = (wb.qs[32 * c + l] >> shift) & 15;
                i32::from(nib) * i32::from(xb.qs[32 * k + l])
            })
            .sum();
        isum += i32::from(sc[k]) * s;
    }
    (isum, summs)
}

pub fn dot_q4_k_q8_k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let (isum, summs) = q4_k_isums(wb, xb);
        sumf += k_block_sum(wb.d, wb.dmin, xb.d, isum, summs);
    }
    sumf
}

/// Integer part of one IQ2_XXS·Q8_K block: Σ_g (2·ls_g+1)·Σ grid·sign·q.
pub fn iq2_xxs_isum(wb: &BlockIQ2XXS, xb: &BlockQ8K) -> i32 {
    let mut bsum = 0i32;
    for g in 0..8 {
        let (a0, a1) = wb.group_words(g);
        let mut sumi = 0i32;
        for l in 0..4 {
            let grid = IQ2XXS_GRID[((a0 >> (8 * l)) & 255) as usize].to_le_bytes();
            let signs = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
            for (j, &gv) in grid.iter().enumerate() {
                let v = i32::from(gv) * i32::from(xb.qs[32 * g + 8 * l + j]);
                sumi += if (signs >> j) & 1 == 1 { -v } else { v };
            }
        }
        bsum += sumi * (2 * (a1 >> 28) as i32 + 1);
    }
    bsum
}

/// `0.125 · Σ_blocks (d_w·d_x)·bsum`, as ds4.
pub fn dot_iq2_xxs_q8_k(w: &[BlockIQ2XXS], x: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let d = wb.d.to_f32() * xb.d;
        sumf += d * iq2_xxs_isum(wb, xb) as f32;
    }
    0.125 * sumf
}
