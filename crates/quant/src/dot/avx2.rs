//! AVX2 + FMA + F16C dot products. Each returns exactly what its counterpart in
//! [`super::scalar`] returns (same lanes, same f32 operation order).

// Index loops mirror the block layouts; iterator chains would obscure them.
#![allow(clippy::needless_range_loop)]

use super::scalar::{k_block_sum, reduce_4x8};
use crate::blocks::{ActQ8_0, BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K};
use crate::iq2_tables::{IQ2XXS_GRID, KSIGNS64};
use half::f16;
use std::arch::x86_64::*;

/// How far ahead (in blocks) the weight stream is prefetched: about 0.5 KiB,
/// enough to cover DRAM latency at the compute rate of these loops.
const PREFETCH_Q8_0_BLOCKS: usize = 16;
const PREFETCH_K_BLOCKS: usize = 4;
/// Elements ahead for the f16 / f32 streams (two lines every 32 elements).
const PREFETCH_FLOAT_ELEMS: usize = 256;

/// Horizontal sum of 8 f32 lanes in [`super::scalar::hsum8`] order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum8(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let g = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(g, _mm_movehdup_ps(g)))
}

/// Horizontal sum of 8 i32 lanes (exact, wrapping like the scalar sums cannot reach).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_i32(v: __m256i) -> i32 {
    let h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let h = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
    let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01>(h));
    _mm_cvtsi128_si32(h)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce(a0: __m256, a1: __m256, a2: __m256, a3: __m256) -> f32 {
    hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load32(p: &[i8; 32]) -> __m256i {
    // SAFETY: `p` is 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load32u(p: &[u8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: checked above that 32 bytes are readable.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load32i(p: &[i8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: checked above that 32 bytes are readable.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

/// Asks for the two cache lines at `base + ahead` elements of `s` (past the end
/// is fine: prefetches never fault and the address is only computed).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn prefetch_ahead<T>(s: &[T], at: usize) {
    let p = s.as_ptr().wrapping_add(at).cast::<i8>();
    _mm_prefetch::<_MM_HINT_T0>(p);
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
}

/// Per-lane (4-element group) partial dot of one Q8_0 block as 8 f32.
/// Requires x codes in [-127, 127] so that maddubs cannot saturate.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn q8_0_block_lanes(w: &BlockQ8_0, x: &ActQ8_0) -> __m256 {
    let wq = load32(&w.qs);
    let xq = load32(&x.qs);
    let p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(wq), _mm256_sign_epi8(xq, wq));
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_q8_0_tf(w: &[BlockQ8_0], x: &[ActQ8_0]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut wc = w.chunks_exact(4);
    let mut xc = x.chunks_exact(4);
    for (i, (w4, x4)) in (&mut wc).zip(&mut xc).enumerate() {
        prefetch_ahead(w, 4 * i + PREFETCH_Q8_0_BLOCKS);
        prefetch_ahead(w, 4 * i + PREFETCH_Q8_0_BLOCKS + 2);
        for k in 0..4 {
            let s = _mm256_set1_ps(w4[k].d.to_f32() * x4[k].d);
            acc[k] = _mm256_fmadd_ps(q8_0_block_lanes(&w4[k], &x4[k]), s, acc[k]);
        }
    }
    for (k, (wb, xb)) in wc.remainder().iter().zip(xc.remainder()).enumerate() {
        let s = _mm256_set1_ps(wb.d.to_f32() * xb.d);
        acc[k] = _mm256_fmadd_ps(q8_0_block_lanes(wb, xb), s, acc[k]);
    }
    reduce(acc[0], acc[1], acc[2], acc[3])
}

/// Shared driver of the two float dots: `load8(i)` yields 8 weights at element i.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_lanes(
    n: usize,
    load8: impl Fn(usize) -> __m256,
    prefetch: impl Fn(usize),
    x: &[f32],
    tail: impl FnOnce(&mut [[f32; 8]; 4], usize),
) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let full = n / 32 * 32;
    let mut i = 0;
    while i < full {
        prefetch(i + PREFETCH_FLOAT_ELEMS);
        for (k, a) in acc.iter_mut().enumerate() {
            let xs = &x[i + 8 * k..i + 8 * k + 8];
            // SAFETY: `xs` has 8 readable f32.
            let xv = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
            *a = _mm256_fmadd_ps(load8(i + 8 * k), xv, *a);
        }
        i += 32;
    }
    if full == n {
        return reduce(acc[0], acc[1], acc[2], acc[3]);
    }
    let mut lanes = [[0f32; 8]; 4];
    for (l, a) in lanes.iter_mut().zip(acc) {
        // SAFETY: `l` is 8 writable f32.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), a) };
    }
    tail(&mut lanes, full);
    reduce_4x8(&lanes)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_f16_f32_tf(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    dot_lanes(
        n,
        |i| {
            let ws = &w[i..i + 8];
            // SAFETY: `ws` has 8 readable f16 = 16 bytes.
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(ws.as_ptr().cast()) })
        },
        |i| prefetch_ahead(w, i),
        x,
        |lanes, start| {
            super::scalar::fma_lanes(
                lanes,
                start,
                w[start..].iter().map(|h| h.to_f32()),
                &x[start..],
            )
        },
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_f32_tf(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    dot_lanes(
        n,
        |i| {
            let ws = &w[i..i + 8];
            // SAFETY: `ws` has 8 readable f32.
            unsafe { _mm256_loadu_ps(ws.as_ptr()) }
        },
        |i| prefetch_ahead(w, i),
        x,
        |lanes, start| {
            super::scalar::fma_lanes(lanes, start, w[start..].iter().copied(), &x[start..])
        },
    )
}

/// pshufb controls that spread one byte of a 16-byte table into every i16 of
/// a 128-bit lane (index, then 0x80 = zero for the high byte).
const fn spread_ctrl(lo: u8, hi: u8) -> [u8; 32] {
    let mut c = [0x80u8; 32];
    let mut i = 0;
    while i < 16 {
        c[i] = lo;
        c[16 + i] = hi;
        i += 2;
    }
    c
}

/// Q2_K: pair p covers sub-blocks 2p (low 16 elements) and 2p+1 (high 16).
static Q2K_CTRL: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut p = 0;
    while p < 8 {
        t[p] = spread_ctrl(2 * p as u8, 2 * p as u8 + 1);
        p += 1;
    }
    t
};

/// Q4_K: sub-block k's scale in every i16 of both lanes.
static Q4K_CTRL: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut k = 0;
    while k < 8 {
        t[k] = spread_ctrl(k as u8, k as u8);
        k += 1;
    }
    t
};

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn ctrl(c: &[u8; 32]) -> __m256i {
    load32u(c)
}

/// Exact integer parts of one Q2_K·Q8_K block, as [`super::scalar::q2_k_isums`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn q2_k_isums(wb: &BlockQ2K, xb: &BlockQ8K) -> (i32, i32) {
    // SAFETY: 16 readable bytes.
    let sc = unsafe { _mm_loadu_si128(wb.scales.as_ptr().cast()) };
    let m4 = _mm_set1_epi8(15);
    let scales = _mm256_broadcastsi128_si256(_mm_and_si128(sc, m4));
    let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sc), m4));
    // SAFETY: 16 i16 = 32 readable bytes.
    let bsums = unsafe { _mm256_loadu_si256(xb.bsums.as_ptr().cast()) };
    let summs = hsum_i32(_mm256_madd_epi16(mins, bsums));

    let m3 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_si256();
    for n in 0..2 {
        let bits = load32u(&wb.qs[32 * n..]);
        let codes = [
            _mm256_and_si256(bits, m3),
            _mm256_and_si256(_mm256_srli_epi16::<2>(bits), m3),
            _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m3),
            _mm256_and_si256(_mm256_srli_epi16::<6>(bits), m3),
        ];
        for (j, c) in codes.into_iter().enumerate() {
            let q8 = load32i(&xb.qs[128 * n + 32 * j..]);
            let p16 = _mm256_maddubs_epi16(c, q8);
            let s16 = _mm256_shuffle_epi8(scales, ctrl(&Q2K_CTRL[4 * n + j]));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, s16));
        }
    }
    (hsum_i32(acc), summs)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_q2_k_q8_k_tf(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (i, (wb, xb)) in w.iter().zip(x).enumerate() {
        prefetch_ahead(w, i + PREFETCH_K_BLOCKS);
        let (isum, summs) = q2_k_isums(wb, xb);
        sumf += k_block_sum(wb.d, wb.dmin, xb.d, isum, summs);
    }
    sumf
}

/// Exact integer parts of one Q4_K·Q8_K block, as [`super::scalar::q4_k_isums`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn q4_k_isums(wb: &BlockQ4K, xb: &BlockQ8K) -> (i32, i32) {
    let (sc, m) = wb.scales_mins();
    let mut summs = 0i32;
    for k in 0..8 {
        summs += i32::from(m[k]) * (i32::from(xb.bsums[2 * k]) + i32::from(xb.bsums[2 * k + 1]));
    }
    let scales = _mm256_broadcastsi128_si256(_mm_cvtsi64_si128(i64::from_le_bytes(sc)));
    let m4 = _mm256_set1_epi8(15);
    let mut acc = _mm256_setzero_si256();
    for c in 0..4 {
        let bits = load32u(&wb.qs[32 * c..]);
        let lo = _mm256_and_si256(bits, m4);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
        let plo = _mm256_maddubs_epi16(lo, load32i(&xb.qs[64 * c..]));
        let phi = _mm256_maddubs_epi16(hi, load32i(&xb.qs[64 * c + 32..]));
        let slo = _mm256_shuffle_epi8(scales, ctrl(&Q4K_CTRL[2 * c]));
        let shi = _mm256_shuffle_epi8(scales, ctrl(&Q4K_CTRL[2 * c + 1]));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(plo, slo));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(phi, shi));
    }
    (hsum_i32(acc), summs)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_q4_k_q8_k_tf(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (i, (wb, xb)) in w.iter().zip(x).enumerate() {
        prefetch_ahead(w, i + PREFETCH_K_BLOCKS);
        let (isum, summs) = q4_k_isums(wb, xb);
        sumf += k_block_sum(wb.d, wb.dmin, xb.d, isum, summs);
    }
    sumf
}

/// Exact integer part of one IQ2_XXS·Q8_K block, as [`super::scalar::iq2_xxs_isum`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn iq2_xxs_isum(wb: &BlockIQ2XXS, xb: &BlockQ8K) -> i32 {
    let bytes: &[u8; 64] = bytemuck::cast_ref(&wb.qs);
    let grid = |i: u8| IQ2XXS_GRID[usize::from(i)] as i64;
    let sign = |i: u32| KSIGNS64[(i & 127) as usize] as i64;
    let mut acc = _mm256_setzero_si256();
    for (g, q) in bytes.chunks_exact(8).enumerate() {
        let a1 = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
        let gv = _mm256_set_epi64x(grid(q[3]), grid(q[2]), grid(q[1]), grid(q[0]));
        let sv = _mm256_set_epi64x(sign(a1 >> 21), sign(a1 >> 14), sign(a1 >> 7), sign(a1));
        let q8 = _mm256_sign_epi8(load32i(&xb.qs[32 * g..]), sv);
        let p16 = _mm256_maddubs_epi16(gv, q8);
        let ls = _mm256_set1_epi16((2 * (a1 >> 28) + 1) as i16);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, ls));
    }
    hsum_i32(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_iq2_xxs_q8_k_tf(w: &[BlockIQ2XXS], x: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (i, (wb, xb)) in w.iter().zip(x).enumerate() {
        prefetch_ahead(w, i + PREFETCH_K_BLOCKS);
        let d = wb.d.to_f32() * xb.d;
        sumf += d * iq2_xxs_isum(wb, xb) as f32;
    }
    0.125 * sumf
}

/// Safe entry point of the AVX2 `dot_q8_0`.
pub fn dot_q8_0(w: &[BlockQ8_0], x: &[ActQ8_0]) -> f32 {
    // SAFETY: this module is only compiled when the target enables avx2, fma and f16c.
    unsafe { dot_q8_0_tf(w, x) }
}

/// Safe entry point of the AVX2 `dot_f16_f32`.
pub fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    // SAFETY: this module is only compiled when the target enables avx2, fma and f16c.
    unsafe { dot_f16_f32_tf(w, x) }
}

/// Safe entry point of the AVX2 `dot_f32`.
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    // SAFETY: this module is only compiled when the target enables avx2, fma and f16c.
    unsafe { dot_f32_tf(w, x) }
}

/// Safe entry point of the AVX2 `dot_q2_k_q8_k`.
pub fn dot_q2_k_q8_k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    // SAFETY: this module is only compiled when the target enables avx2, fma and f16c.
    unsafe { dot_q2_k_q8_k_tf(w, x) }
}

/// Safe entry point of the AVX2 `dot_q4_k_q8_k`.
pub fn dot_q4_k_q8_k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    // SAFETY: this module is only compiled when the target enables avx2, fma and f16c.
    unsafe { dot_q4_k_q8_k_tf(w, x) }
}

/// Safe entry point of the AVX2 `dot_iq2_xxs_q8_k`.
pub fn dot_iq2_xxs_q8_k(w: &[BlockIQ2XXS], x: &[BlockQ8K]) -> f32 {
    // SAFETY: this module is only compiled when the target enables avx2, fma and f16c.
    unsafe { dot_iq2_xxs_q8_k_tf(w, x) }
}
