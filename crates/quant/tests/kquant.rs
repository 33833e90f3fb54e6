//! Q2_K / Q4_K quantisers (no independent oracle can produce these bytes):
//! error bounds, exact round trips of on-grid data, and grid-nearest codes.
#![allow(clippy::unwrap_used)]

use ds4_quant::{BlockQ2K, BlockQ4K, GgmlType, dequantize_row, quantize_row};

/// Relative RMSE ceilings, rms(x − dq(q(x))) / rms(x), on Gaussian rows.
/// Measured at scales 0.01, 1 and 30: Q2_K 0.296-0.297, Q4_K 0.071-0.072.
const Q2_K_MAX_REL_RMSE: f64 = 0.32;
const Q4_K_MAX_REL_RMSE: f64 = 0.08;
/// On-grid inputs come back within this fraction of one quantisation step
/// (the f16 rounding of d and dmin is the only loss).
const ON_GRID_MAX_STEP_FRACTION: f32 = 0.01;

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut uni = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (uni(), uni());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

fn round_trip(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let q = quantize_row(ty, x).unwrap();
    let mut y = vec![0f32; x.len()];
    dequantize_row(ty, &q, &mut y).unwrap();
    (q, y)
}

fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(y).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let sig: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
    (err / sig).sqrt()
}

#[test]
fn rmse_within_bounds() {
    for (ty, bound) in [
        (GgmlType::Q2_K, Q2_K_MAX_REL_RMSE),
        (GgmlType::Q4_K, Q4_K_MAX_REL_RMSE),
    ] {
        for (seed, scale) in [(1u64, 1.0f32), (2, 0.01), (3, 30.0)] {
            let x: Vec<f32> = gaussian(64 * 256, seed).iter().map(|v| v * scale).collect();
            let (_, y) = round_trip(ty, &x);
            let e = rel_rmse(&x, &y);
            println!("{ty} scale {scale}: rel rmse {e:.4}");
            assert!(e < bound, "{ty} rel rmse {e} >= {bound}");
        }
    }
}

#[test]
fn zero_rows_stay_zero() {
    for ty in [GgmlType::Q2_K, GgmlType::Q4_K] {
        let (_, y) = round_trip(ty, &[0.0; 512]);
        assert!(y.iter().all(|v| *v == 0.0), "{ty}");
    }
}

/// Every code is the nearest of its sub-block's grid d·sc·q − dmin·m.
fn assert_grid_nearest(x: &[f32], y: &[f32], grid: impl Fn(usize) -> Vec<f32>) {
    for (i, (&xi, &yi)) in x.iter().zip(y).enumerate() {
        let best = grid(i)
            .iter()
            .map(|g| (g - xi).abs())
            .fold(f32::INFINITY, f32::min);
        let tol = 1e-5 * xi.abs().max(1e-3);
        assert!(
            (yi - xi).abs() <= best + tol,
            "elem {i}: x {xi} got {yi}, nearest grid distance {best}"
        );
    }
}

#[test]
fn q2_k_codes_are_grid_nearest() {
    let x = gaussian(32 * 256, 11);
    let (q, y) = round_trip(GgmlType::Q2_K, &x);
    let blocks: Vec<BlockQ2K> = q
        .chunks_exact(84)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    assert_grid_nearest(&x, &y, |i| {
        let b = &blocks[i / 256];
        let sc = b.scales[(i % 256) / 16];
        let (dl, ml) = (
            b.d.to_f32() * f32::from(sc & 15),
            b.dmin.to_f32() * f32::from(sc >> 4),
        );
        (0..4).map(|c| dl * c as f32 - ml).collect()
    });
}

#[test]
fn q4_k_codes_are_grid_nearest() {
    let x = gaussian(32 * 256, 12);
    let (q, y) = round_trip(GgmlType::Q4_K, &x);
    let blocks: Vec<BlockQ4K> = q
        .chunks_exact(144)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    assert_grid_nearest(&x, &y, |i| {
        let b = &blocks[i / 256];
        let (sc, m) = b.scale_min((i % 256) / 32);
        let (dl, ml) = (b.d.to_f32() * f32::from(sc), b.dmin.to_f32() * f32::from(m));
        (0..16).map(|c| dl * c as f32 - ml).collect()
    });
}

#[test]
fn on_grid_rows_round_trip() {
    // Each sub-block holds every code of an affine grid with step 0.25 and offset -1.
    let step = 0.25f32;
    for (ty, levels, sub) in [(GgmlType::Q2_K, 4usize, 16usize), (GgmlType::Q4_K, 16, 32)] {
        let x: Vec<f32> = (0..1024)
            .map(|i| ((i % sub) % levels) as f32 * step - 1.0)
            .collect();
        let (_, y) = round_trip(ty, &x);
        let worst = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= ON_GRID_MAX_STEP_FRACTION * step,
            "{ty}: worst error {worst}"
        );
    }
}

#[test]
fn bad_inputs_are_errors() {
    assert!(quantize_row(GgmlType::Q2_K, &[0.0; 255]).is_err());
    assert!(quantize_row(GgmlType::Q4_K, &[0.0; 300]).is_err());
    assert!(quantize_row(GgmlType::IQ2_XXS, &[0.0; 256]).is_err());
    assert!(quantize_row(GgmlType::Q8_0, &[0.0; 31]).is_err());
}
