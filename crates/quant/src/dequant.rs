//! Scalar dequantisation, bit-identical to gguf-py (and ggml's `dequantize_row_*`):
//! each value is computed with the same f32 operations in the same order.

use crate::blocks::{BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, QK_K, QK8_0};
use crate::iq2_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
use crate::{Error, GgmlType, Result, row_bytes};
use half::f16;

/// Dequantises one row of `ty` from its raw little-endian bytes into `dst`.
/// `dst.len()` is the element count; `src` must hold exactly that many.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let expected = row_bytes(ty, dst.len(), "dequantize_row: dst length")?;
    if src.len() != expected {
        return Err(Error::Length {
            what: "dequantize_row: src bytes",
            expected,
            actual: src.len(),
        });
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::BF16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                // A plain shift: exact, and NaN payloads survive unquietened.
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        GgmlType::Q8_0 => {
            for (o, c) in dst.chunks_exact_mut(QK8_0).zip(src.chunks_exact(34)) {
                dequant_q8_0(&bytemuck::pod_read_unaligned(c), o);
            }
        }
        GgmlType::Q2_K => {
            for (o, c) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(84)) {
                dequant_q2_k(&bytemuck::pod_read_unaligned(c), o);
            }
        }
        GgmlType::Q4_K => {
            for (o, c) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(144)) {
                dequant_q4_k(&bytemuck::pod_read_unaligned(c), o);
            }
        }
        GgmlType::IQ2_XXS => {
            for (o, c) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(66)) {
                dequant_iq2_xxs(&bytemuck::pod_read_unaligned(c), o);
            }
        }
        other => return Err(Error::Unsupported(other, "dequantize_row")),
    }
    Ok(())
}

/// IEEE binary16 → f32, exact, keeping NaN payloads as numpy does (no quieting).
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = u32::from(h & 0x3ff);
    if exp == 0x1f {
        return f32::from_bits(sign | 0x7f80_0000 | (man << 13));
    }
    // Finite values (subnormals included) convert exactly either way.
    let v = f16::from_bits(h & 0x7fff).to_f32();
    f32::from_bits(v.to_bits() | sign)
}

pub(crate) fn dequant_q8_0(b: &BlockQ8_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (o, &q) in out.iter_mut().zip(b.qs.iter()) {
        *o = f32::from(q) * d;
    }
}

pub(crate) fn dequant_q2_k(b: &BlockQ2K, out: &mut [f32]) {
    let d = b.d.to_f32();
    let dmin = b.dmin.to_f32();
    for (k, sub) in out.chunks_exact_mut(16).enumerate() {
        let sc = b.scales[k];
        let dl = d * f32::from(sc & 15);
        let ml = dmin * f32::from(sc >> 4);
        // Element 16k + i sits in half n, shift group j, lane l (model.md §5).
        let base = 16 * k;
        let (n, j, l0) = (base / 128, (base % 128) / 32, base % 32);
        for (i, o) in sub.iter_mut().enumerate() {
            let code = (b.qs[32 * n + l0 + i] >> (2 * j)) & 3;
            *o = dl * f32::from(code) - ml;
        }
    }
}

pub(crate) fn dequant_q4_k(b: &BlockQ4K, out: &mut [f32]) {
    let d = b.d.to_f32();
    let dmin = b.dmin.to_f32();
    for c in 0..4 {
        let q = &b.qs[32 * c..32 * c + 32];
        for half in 0..2 {
            let (sc, m) = b.scale_min(2 * c + half);
            let d1 = d * f32::from(sc);
            let m1 = dmin * f32::from(m);
            let o = &mut out[64 * c + 32 * half..64 * c + 32 * half + 32];
            for (o, &byte) in o.iter_mut().zip(q) {
                let nib = (byte >> (4 * half)) & 15;
                *o = d1 * f32::from(nib) - m1;
            }
        }
    }
}

pub(crate) fn dequant_iq2_xxs(b: &BlockIQ2XXS, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (g, o) in out.chunks_exact_mut(32).enumerate() {
        let (a0, a1) = b.group_words(g);
        let db = d * (0.5 + (a1 >> 28) as f32) * 0.25;
        for (l, o8) in o.chunks_exact_mut(8).enumerate() {
            let grid = IQ2XXS_GRID[((a0 >> (8 * l)) & 255) as usize].to_le_bytes();
            let signs = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
            for (j, o) in o8.iter_mut().enumerate() {
                let s = if (signs >> j) & 1 == 1 { -1.0f32 } else { 1.0 };
                *o = db * f32::from(grid[j]) * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = [0f32; 32];
        assert!(dequantize_row(GgmlType::Q8_0, &[0u8; 33], &mut out).is_err());
        assert!(dequantize_row(GgmlType::Q2_K, &[0u8; 84], &mut out).is_err());
        assert!(dequantize_row(GgmlType::Q3_K, &[0u8; 110], &mut [0f32; 256]).is_err());
        assert!(dequantize_row(GgmlType::Q8_0, &[0u8; 34], &mut out).is_ok());
    }

    #[test]
    fn q8_0_simple() {
        let mut raw = vec![0u8; 34];
        raw[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        raw[2] = 4;
        raw[3] = (-3i8) as u8;
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q8_0, &raw, &mut out).unwrap();
        assert_eq!(&out[..3], &[2.0, -1.5, 0.0]);
    }
}
