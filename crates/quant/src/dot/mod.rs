//! Dot products the CPU backend runs on.
//!
//! Every fast dot has a scalar version in [`scalar`] that defines its exact f32
//! result; the AVX2 version (compiled when the target has AVX2, FMA and F16C,
//! as the workspace's `x86-64-v3` build does) reproduces it bit for bit:
//!
//! * Integer parts (Σ q_w·q_x per block / sub-block) are exact in any order.
//! * `dot_q8_0`, `dot_f16_f32`, `dot_f32` keep 4 × 8 f32 lanes. Element (or, for
//!   Q8_0, 4-element group) `i` of the stream feeds lane `i mod 8` of
//!   accumulator `(i div 8) mod 4` through a fused multiply-add; the lanes are
//!   then summed as `(a0+a1)+(a2+a3)` per lane and reduced with [`scalar::hsum8`].
//! * The Q8_K dots (Q2_K, Q4_K, IQ2_XXS) form exact per-super-block integer sums
//!   and combine them in f32 block by block in row order, as ds4's
//!   `ds4_vec_dot_*_q8_K` do: `Σ d·isum − dmin·summs` (mins through `bsums`).
//!
//! Preconditions (not checked in release builds, asserted in debug builds):
//! weight and activation slices have equal block counts (only the common
//! prefix is used otherwise), and activation codes lie in [-127, 127], which
//! the `quantize_act_*` functions guarantee.

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub mod avx2;
pub mod scalar;

use crate::blocks::{ActQ8_0, BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K};
use crate::{Error, GgmlType, Result, dequantize_row};
use half::f16;

macro_rules! dispatch {
    ($name:ident, $w:ident, $x:ident) => {{
        debug_assert_eq!(
            $w.len(),
            $x.len(),
            concat!(stringify!($name), ": length mismatch")
        );
        let n = $w.len().min($x.len());
        let ($w, $x) = (&$w[..n], &$x[..n]);
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        {
            avx2::$name($w, $x)
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        )))]
        {
            scalar::$name($w, $x)
        }
    }};
}

/// Q8_0 weights · Q8_0 activations: Σ_blocks d_w·d_x·Σ q_w q_x.
#[inline]
pub fn dot_q8_0(w: &[BlockQ8_0], x: &[ActQ8_0]) -> f32 {
    dispatch!(dot_q8_0, w, x)
}

/// Q2_K weights · Q8_K activations (ds4's `ds4_vec_dot_q2_K_q8_K`).
#[inline]
pub fn dot_q2_k_q8_k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    dispatch!(dot_q2_k_q8_k, w, x)
}

/// Q4_K weights · Q8_K activations (ggml's integer formulation).
#[inline]
pub fn dot_q4_k_q8_k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    dispatch!(dot_q4_k_q8_k, w, x)
}

/// IQ2_XXS weights · Q8_K activations (ds4's `ds4_vec_dot_iq2_xxs_q8_K`).
#[inline]
pub fn dot_iq2_xxs_q8_k(w: &[BlockIQ2XXS], x: &[BlockQ8K]) -> f32 {
    dispatch!(dot_iq2_xxs_q8_k, w, x)
}

/// F16 weights · f32 activations with f32 accumulation.
#[inline]
pub fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    dispatch!(dot_f16_f32, w, x)
}

/// f32 · f32.
#[inline]
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    dispatch!(dot_f32, w, x)
}

/// Reference dot of one row of `ty` (raw bytes) with f32 `x`: the row is
/// dequantised exactly ([`dequantize_row`]) and the products `w_i·x_i` (each
/// rounded to f32) are summed in f32 in element order, without FMA.
pub fn dot_ref(ty: GgmlType, row: &[u8], x: &[f32]) -> Result<f32> {
    let mut w = vec![0f32; x.len()];
    dequantize_row(ty, row, &mut w).map_err(|e| match e {
        Error::Length {
            what: _,
            expected,
            actual,
        } => Error::Length {
            what: "dot_ref: row bytes for x.len() elements",
            expected,
            actual,
        },
        other => other,
    })?;
    let mut acc = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let p = a * b;
        acc += p;
    }
    Ok(acc)
}
