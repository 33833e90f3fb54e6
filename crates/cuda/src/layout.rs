//! How weights are laid out on the GPU when that differs from the GGUF bytes.
//!
//! Q8_0 rows are rearranged at upload: a GGUF row is `K/32` blocks of
//! `{f16 d, i8 qs[32]}` (34 bytes, so the codes of every other block start two
//! bytes past a word boundary); on the GPU the same row holds its `K` codes first,
//! then its `K/32` f16 scales. The row keeps its size (`K/32 · 34` bytes), so row
//! and expert strides are unchanged, while the codes become 16-byte aligned pieces
//! that the matvec and GEMM kernels load whole. Only the CUDA kernels read this
//! layout; every other type is uploaded as stored.

use ds4_gguf::GgmlType;

use crate::{Error, Result};

const Q8_0_BLOCK: usize = 34;
const Q8_0_ELEMS: usize = 32;

/// Whether weights of `ty` are rearranged at upload.
pub fn is_rearranged(ty: GgmlType) -> bool {
    ty == GgmlType::Q8_0
}

fn check_q8_0(len: usize, k: usize) -> Result<usize> {
    let row = k / Q8_0_ELEMS * Q8_0_BLOCK;
    if k == 0 || !k.is_multiple_of(Q8_0_ELEMS) || !len.is_multiple_of(row) {
        return Err(Error::Shape {
            what: "Q8_0 weight layout",
            detail: format!("{len} bytes are not whole rows of {k} elements"),
        });
    }
    Ok(row)
}

/// The GPU layout of Q8_0 `raw` (whole rows of `k` elements): per row, the codes,
/// then the scales.
pub fn q8_0_to_gpu(raw: &[u8], k: usize) -> Result<Vec<u8>> {
    use rayon::prelude::*;
    let row = check_q8_0(raw.len(), k)?;
    let mut out = vec![0u8; raw.len()];
    out.par_chunks_mut(row)
        .zip(raw.par_chunks(row))
        .for_each(|(dst, src)| {
            let (codes, scales) = dst.split_at_mut(k);
            for (b, blk) in src.chunks_exact(Q8_0_BLOCK).enumerate() {
                scales[2 * b..2 * b + 2].copy_from_slice(&blk[..2]);
                codes[Q8_0_ELEMS * b..Q8_0_ELEMS * (b + 1)].copy_from_slice(&blk[2..]);
            }
        });
    Ok(out)
}

/// Inverse of [`q8_0_to_gpu`] (tests and diagnostics).
pub fn q8_0_from_gpu(gpu: &[u8], k: usize) -> Result<Vec<u8>> {
    let row = check_q8_0(gpu.len(), k)?;
    let mut out = vec![0u8; gpu.len()];
    for (dst, src) in out.chunks_exact_mut(row).zip(gpu.chunks_exact(row)) {
        let (codes, scales) = src.split_at(k);
        for (b, blk) in dst.chunks_exact_mut(Q8_0_BLOCK).enumerate() {
            blk[..2].copy_from_slice(&scales[2 * b..2 * b + 2]);
            blk[2..].copy_from_slice(&codes[Q8_0_ELEMS * b..Q8_0_ELEMS * (b + 1)]);
        }
    }
    Ok(out)
}

/// `raw` (whole rows of `k` elements of `ty`) as the GPU kernels read it.
pub fn to_gpu(ty: GgmlType, raw: &[u8], k: usize) -> Result<std::borrow::Cow<'_, [u8]>> {
    if is_rearranged(ty) {
        Ok(std::borrow::Cow::Owned(q8_0_to_gpu(raw, k)?))
    } else {
        Ok(std::borrow::Cow::Borrowed(raw))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn raw_rows(k: usize, rows: usize) -> Vec<u8> {
        (0..k / 32 * 34 * rows)
            .map(|i| (i * 7 + i / 34) as u8)
            .collect()
    }

    #[test]
    fn codes_then_scales_per_row() {
        let k = 64;
        let raw = raw_rows(k, 3);
        let gpu = q8_0_to_gpu(&raw, k).unwrap();
        let row = 68;
        for r in 0..3 {
            let (src, dst) = (&raw[r * row..(r + 1) * row], &gpu[r * row..(r + 1) * row]);
            // block 1 of the row: scale at K + 2, codes at 32..64
            assert_eq!(&dst[k + 2..k + 4], &src[34..36]);
            assert_eq!(&dst[32..64], &src[36..68]);
            assert_eq!(&dst[k..k + 2], &src[0..2]);
            assert_eq!(&dst[0..32], &src[2..34]);
        }
    }

    #[test]
    fn round_trips() {
        for k in [32, 128, 4096] {
            let raw = raw_rows(k, 5);
            let back = q8_0_from_gpu(&q8_0_to_gpu(&raw, k).unwrap(), k).unwrap();
            assert_eq!(back, raw);
        }
    }

    #[test]
    fn refuses_partial_rows() {
        assert!(q8_0_to_gpu(&[0u8; 35], 32).is_err());
        assert!(q8_0_to_gpu(&[0u8; 34], 48).is_err());
        assert!(q8_0_to_gpu(&[0u8; 34], 0).is_err());
        assert!(to_gpu(GgmlType::Q2_K, &[0u8; 3], 256).is_ok());
    }
}
