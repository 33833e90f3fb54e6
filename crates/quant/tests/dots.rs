//! Fast dots: SIMD == scalar bit for bit, agreement with the dequantise-then-dot
//! reference within the activation-quantisation error bound, and the
//! activation quantisers' invariants.
#![allow(clippy::unwrap_used)]

use ds4_quant::dot::scalar;
use ds4_quant::{
    BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, GgmlType, cast_blocks, dequantize_row, dot_f16_f32,
    dot_f32, dot_iq2_xxs_q8_k, dot_q2_k_q8_k, dot_q4_k_q8_k, dot_q8_0, dot_ref, quantize_act_q8_0,
    quantize_act_q8_k,
};
use half::f16;
use proptest::prelude::*;

/// Relative slack for f32 rounding on top of the exact quantisation-error bound.
const FLOAT_SLACK: f32 = 1e-4;

/// Random raw bytes of `n` blocks of `ty` whose f16 scales are finite and sane.
fn random_row(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let bb = ty.block_bytes() as usize;
    let mut raw: Vec<u8> = (0..n * bb).map(|_| next() as u8).collect();
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q8_0 | GgmlType::IQ2_XXS | GgmlType::F16 => &[0],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q4_K => &[0, 2],
        _ => &[],
    };
    let step = if ty == GgmlType::F16 { 2 } else { bb };
    for b in (0..raw.len()).step_by(step) {
        for &o in scale_offsets {
            let v =
                ((next() % 2000) as f32 + 1.0) * 1e-4 * if next() % 8 == 0 { -1.0 } else { 1.0 };
            raw[b + o..b + o + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
    }
    raw
}

fn to_blocks<B: bytemuck::Pod>(raw: &[u8]) -> Vec<B> {
    raw.chunks_exact(std::mem::size_of::<B>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

fn random_x(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x2545_F491_4F6C_DD1D) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            // Mixed magnitudes, some outliers like real activations.
            if i % 97 == 3 { u * 40.0 } else { u * 2.0 }
        })
        .collect()
}

fn dequant(ty: GgmlType, raw: &[u8], n: usize) -> Vec<f32> {
    let mut w = vec![0f32; n];
    dequantize_row(ty, raw, &mut w).unwrap();
    w
}

/// |fast − ref| must stay under Σ_blocks Σ|w|·|d_x|/2 (each activation moves by at
/// most half a step) plus float slack.
fn check_close(fast: f32, reference: f32, w: &[f32], x: &[f32], step: &[f32], block: usize) {
    let quant_bound: f32 = w
        .chunks(block)
        .zip(step)
        .map(|(wb, d)| wb.iter().map(|v| v.abs()).sum::<f32>() * d.abs() / 2.0)
        .sum();
    let mag: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
    let tol = quant_bound * 1.001 + FLOAT_SLACK * mag + 1e-6;
    assert!(
        (fast - reference).abs() <= tol,
        "fast {fast} ref {reference} diff {} > tol {tol}",
        (fast - reference).abs()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn q8_0_simd_equals_scalar_and_tracks_ref(blocks in 0usize..40, seed: u64) {
        let n = blocks * 32;
        let raw = random_row(GgmlType::Q8_0, blocks, seed);
        let w: &[BlockQ8_0] = &to_blocks::<BlockQ8_0>(&raw);
        let x = random_x(n, seed);
        let xq = quantize_act_q8_0(&x);
        let fast = dot_q8_0(w, &xq);
        prop_assert_eq!(fast.to_bits(), scalar::dot_q8_0(w, &xq).to_bits());
        let steps: Vec<f32> = xq.iter().map(|b| b.d).collect();
        check_close(fast, dot_ref(GgmlType::Q8_0, &raw, &x).unwrap(),
            &dequant(GgmlType::Q8_0, &raw, n), &x, &steps, 32);
    }

    #[test]
    fn q2_k_simd_equals_scalar_and_tracks_ref(blocks in 0usize..12, seed: u64) {
        let n = blocks * 256;
        let raw = random_row(GgmlType::Q2_K, blocks, seed);
        let w = to_blocks::<BlockQ2K>(&raw);
        let x = random_x(n, seed);
        let xq = quantize_act_q8_k(&x);
        let fast = dot_q2_k_q8_k(&w, &xq);
        prop_assert_eq!(fast.to_bits(), scalar::dot_q2_k_q8_k(&w, &xq).to_bits());
        let steps: Vec<f32> = xq.iter().map(|b| b.d).collect();
        check_close(fast, dot_ref(GgmlType::Q2_K, &raw, &x).unwrap(),
            &dequant(GgmlType::Q2_K, &raw, n), &x, &steps, 256);
    }

    #[test]
    fn q4_k_simd_equals_scalar_and_tracks_ref(blocks in 0usize..12, seed: u64) {
        let n = blocks * 256;
        let raw = random_row(GgmlType::Q4_K, blocks, seed);
        let w = to_blocks::<BlockQ4K>(&raw);
        let x = random_x(n, seed);
        let xq = quantize_act_q8_k(&x);
        let fast = dot_q4_k_q8_k(&w, &xq);
        prop_assert_eq!(fast.to_bits(), scalar::dot_q4_k_q8_k(&w, &xq).to_bits());
        let steps: Vec<f32> = xq.iter().map(|b| b.d).collect();
        check_close(fast, dot_ref(GgmlType::Q4_K, &raw, &x).unwrap(),
            &dequant(GgmlType::Q4_K, &raw, n), &x, &steps, 256);
    }

    #[test]
    fn iq2_xxs_simd_equals_scalar_and_tracks_ref(blocks in 0usize..12, seed: u64) {
        let n = blocks * 256;
        let raw = random_row(GgmlType::IQ2_XXS, blocks, seed);
        let w = to_blocks::<BlockIQ2XXS>(&raw);
        let x = random_x(n, seed);
        let xq = quantize_act_q8_k(&x);
        let fast = dot_iq2_xxs_q8_k(&w, &xq);
        prop_assert_eq!(fast.to_bits(), scalar::dot_iq2_xxs_q8_k(&w, &xq).to_bits());
        let steps: Vec<f32> = xq.iter().map(|b| b.d).collect();
        check_close(fast, dot_ref(GgmlType::IQ2_XXS, &raw, &x).unwrap(),
            &dequant(GgmlType::IQ2_XXS, &raw, n), &x, &steps, 256);
    }

    #[test]
    fn f16_simd_equals_scalar_and_tracks_ref(n in 0usize..300, seed: u64) {
        let raw = random_row(GgmlType::F16, n, seed);
        let w = to_blocks::<f16>(&raw);
        let x = random_x(n, seed);
        let fast = dot_f16_f32(&w, &x);
        prop_assert_eq!(fast.to_bits(), scalar::dot_f16_f32(&w, &x).to_bits());
        let wf = dequant(GgmlType::F16, &raw, n);
        check_close(fast, dot_ref(GgmlType::F16, &raw, &x).unwrap(), &wf, &x, &[], 1);
    }

    #[test]
    fn f32_simd_equals_scalar_and_tracks_ref(n in 0usize..300, seed: u64) {
        let w = random_x(n, seed ^ 0xABCD);
        let x = random_x(n, seed);
        let fast = dot_f32(&w, &x);
        prop_assert_eq!(fast.to_bits(), scalar::dot_f32(&w, &x).to_bits());
        let raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        check_close(fast, dot_ref(GgmlType::F32, &raw, &x).unwrap(), &w, &x, &[], 1);
    }

    #[test]
    fn act_q8_k_invariants(n_blocks in 1usize..4, seed: u64) {
        let x = random_x(n_blocks * 256, seed);
        for (b, blk) in quantize_act_q8_k(&x).iter().enumerate() {
            let xs = &x[b * 256..(b + 1) * 256];
            for (k, s) in blk.bsums.iter().enumerate() {
                let sum: i32 = blk.qs[16 * k..16 * k + 16].iter().map(|&q| i32::from(q)).sum();
                prop_assert_eq!(i32::from(*s), sum);
            }
            for (&q, &v) in blk.qs.iter().zip(xs) {
                prop_assert!((-127..=127).contains(&q));
                // Reconstruction within half a step (plus rounding of d).
                prop_assert!((blk.d * f32::from(q) - v).abs() <= blk.d.abs() * 0.5001);
            }
            // The signed maximum maps to -127 (iscale = -127/max).
            let imax = xs.iter().enumerate().fold(0, |m, (i, v)| if v.abs() > xs[m].abs() { i } else { m });
            prop_assert_eq!(blk.qs[imax], -127);
        }
    }

    #[test]
    fn act_q8_0_invariants(n in 1usize..200, seed: u64) {
        let x = random_x(n, seed);
        let q = quantize_act_q8_0(&x);
        prop_assert_eq!(q.len(), n.div_ceil(32));
        for (i, &v) in x.iter().enumerate() {
            let b = &q[i / 32];
            let amax = x[i / 32 * 32..(i / 32 * 32 + 32).min(n)].iter().fold(0f32, |a, v| a.max(v.abs()));
            prop_assert_eq!(b.d, amax / 127.0);
            let qi = b.qs[i % 32];
            prop_assert!((-127..=127).contains(&qi));
            prop_assert!((b.d * f32::from(qi) - v).abs() <= b.d * 0.5001);
        }
    }
}

#[test]
fn zero_and_empty_inputs() {
    assert_eq!(dot_q8_0(&[], &[]), 0.0);
    assert_eq!(dot_f32(&[], &[]), 0.0);
    let zeros = quantize_act_q8_k(&[0.0; 256]);
    assert_eq!(zeros[0].d, 0.0);
    let raw = random_row(GgmlType::Q2_K, 1, 7);
    let w: &[BlockQ2K] = cast_blocks(&raw).unwrap();
    assert_eq!(dot_q2_k_q8_k(w, &zeros), 0.0);
}

#[test]
fn dot_ref_rejects_bad_lengths() {
    assert!(dot_ref(GgmlType::Q8_0, &[0u8; 34], &[0.0; 31]).is_err());
    assert!(dot_ref(GgmlType::Q8_0, &[0u8; 33], &[0.0; 32]).is_err());
    assert!(dot_ref(GgmlType::Q5_K, &[0u8; 176], &[0.0; 256]).is_err());
}
