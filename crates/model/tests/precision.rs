//! The official precision path against ml_dtypes casts (fixtures/precision, made by
//! oracles/gen_fp8_fp4.py): bit-exact FP8-E4M3 and FP4-E2M1 round trips.
#![allow(clippy::unwrap_used)]

use ds4_model::numerics;

struct Fixture {
    row_len: usize,
    param: usize,
    input: Vec<f32>,
    expected: Vec<f32>,
}

fn load(name: &str) -> Fixture {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/precision")
        .join(name);
    let b = std::fs::read(path).unwrap();
    let u = |i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as usize;
    let (n, len, param) = (u(0), u(1), u(2));
    let f: Vec<f32> = b[12..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(f.len(), 2 * n * len);
    Fixture {
        row_len: len,
        param,
        input: f[..n * len].to_vec(),
        expected: f[n * len..].to_vec(),
    }
}

#[test]
fn fp8_kv_round_trip_is_bit_exact() {
    let fx = load("fp8_kv.bin");
    let mut got = fx.input.clone();
    for row in got.chunks_mut(fx.row_len) {
        numerics::fp8_kv_round_row(row, fx.param);
    }
    let bad = got
        .iter()
        .zip(&fx.expected)
        .filter(|(a, b)| a.to_bits() != b.to_bits() && !(**a == 0.0 && **b == 0.0))
        .count();
    assert_eq!(bad, 0, "{bad} of {} values differ", got.len());
    // The RoPE tail is untouched.
    assert_eq!(got[448..512], fx.input[448..512]);
}

#[test]
fn fp4_round_trip_is_bit_exact() {
    let fx = load("fp4.bin");
    let mut got = fx.input.clone();
    for row in got.chunks_mut(fx.row_len) {
        numerics::fp4_round_row(row);
    }
    let bad = got
        .iter()
        .zip(&fx.expected)
        .filter(|(a, b)| a.to_bits() != b.to_bits() && !(**a == 0.0 && **b == 0.0))
        .count();
    assert_eq!(bad, 0, "{bad} of {} values differ", got.len());
}

#[test]
fn hadamard_matches_float64_matrix() {
    let fx = load("hadamard.bin");
    let mut got = fx.input.clone();
    for row in got.chunks_mut(fx.row_len) {
        numerics::hadamard_inplace(row);
    }
    for (row_g, row_e) in got.chunks(fx.row_len).zip(fx.expected.chunks(fx.row_len)) {
        let scale = row_e.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
        for (a, b) in row_g.iter().zip(row_e) {
            assert!((a - b).abs() <= 1e-6 * scale, "{a} vs {b}");
        }
    }
}
