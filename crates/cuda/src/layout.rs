//! How weights are laid out on the GPU when that differs from the GGUF bytes.
//!
//! Q8_0, IQ2_XXS and Q2_K rows are rearranged at upload: a GGUF row is a run of
//! blocks that interleave codes and scales, so the codes of most blocks start at
//! addresses no vector load can take whole. On the GPU each row keeps its size
//! (so row and expert strides are unchanged) but holds its blocks' fields one
//! region after another, each region the field of every block in block order:
//!
//! * Q8_0 (`{f16 d, i8 qs[32]}`, 34 B / 32): the `K` codes, then the `K/32` f16 scales.
//! * IQ2_XXS (`{f16 d, u16 qs[32]}`, 66 B / 256): the 64 code bytes of every block
//!   (block `b` at `64·b`), then the `K/256` f16 scales.
//! * Q2_K (`{u8 scales[16], u8 qs[64], f16 d, f16 dmin}`, 84 B / 256): every
//!   block's 64 `qs` bytes, then every block's 16 scale bytes, then every block's
//!   `(d, dmin)` pair (4 B).
//!
//! When the row size is a multiple of 16 the codes are 16-byte aligned pieces that
//! the matvec and GEMM kernels load whole. Only the CUDA kernels read this layout;
//! every other type is uploaded as stored.

use std::borrow::Cow;

use ds4_gguf::GgmlType;

use crate::{Error, Result};

/// A type's block and the fields of it that become regions of the GPU row, in
/// region order: (byte offset in the GGUF block, length).
struct Fields {
    block_bytes: usize,
    block_elems: usize,
    fields: &'static [(usize, usize)],
}

fn fields(ty: GgmlType) -> Option<Fields> {
    let (block_bytes, block_elems, fields): (usize, usize, &'static [(usize, usize)]) = match ty {
        GgmlType::Q8_0 => (34, 32, &[(2, 32), (0, 2)]),
        GgmlType::IQ2_XXS => (66, 256, &[(2, 64), (0, 2)]),
        GgmlType::Q2_K => (84, 256, &[(16, 64), (0, 16), (80, 4)]),
        _ => return None,
    };
    Some(Fields {
        block_bytes,
        block_elems,
        fields,
    })
}

/// Whether weights of `ty` are rearranged at upload.
pub fn is_rearranged(ty: GgmlType) -> bool {
    fields(ty).is_some()
}

/// Bytes per row of `k` elements, if `len` bytes are whole such rows.
fn check_rows(ty: GgmlType, f: &Fields, len: usize, k: usize) -> Result<usize> {
    let row = k / f.block_elems * f.block_bytes;
    if k == 0 || !k.is_multiple_of(f.block_elems) || !len.is_multiple_of(row) {
        return Err(Error::Shape {
            what: "weight layout",
            detail: format!(
                "{len} bytes of {} are not whole rows of {k} elements",
                ty.name()
            ),
        });
    }
    Ok(row)
}

fn rearrange(ty: GgmlType, raw: &[u8], k: usize, to_gpu_order: bool) -> Result<Vec<u8>> {
    use rayon::prelude::*;
    let Some(f) = fields(ty) else {
        return Ok(raw.to_vec());
    };
    let row = check_rows(ty, &f, raw.len(), k)?;
    let nb = k / f.block_elems;
    let mut out = vec![0u8; raw.len()];
    out.par_chunks_mut(row)
        .zip(raw.par_chunks(row))
        .for_each(|(dst, src)| {
            let mut region = 0;
            for &(off, len) in f.fields {
                for b in 0..nb {
                    let gguf = f.block_bytes * b + off;
                    let gpu = region + len * b;
                    if to_gpu_order {
                        dst[gpu..gpu + len].copy_from_slice(&src[gguf..gguf + len]);
                    } else {
                        dst[gguf..gguf + len].copy_from_slice(&src[gpu..gpu + len]);
                    }
                }
                region += len * nb;
            }
        });
    Ok(out)
}

/// The GPU layout of `raw` (whole rows of `k` elements of `ty`, GGUF order).
pub fn rows_to_gpu(ty: GgmlType, raw: &[u8], k: usize) -> Result<Vec<u8>> {
    rearrange(ty, raw, k, true)
}

/// Inverse of [`rows_to_gpu`] (tests and diagnostics).
pub fn rows_from_gpu(ty: GgmlType, gpu: &[u8], k: usize) -> Result<Vec<u8>> {
    rearrange(ty, gpu, k, false)
}

/// `raw` (whole rows of `k` elements of `ty`) as the GPU kernels read it.
pub fn to_gpu(ty: GgmlType, raw: &[u8], k: usize) -> Result<Cow<'_, [u8]>> {
    if is_rearranged(ty) {
        Ok(Cow::Owned(rows_to_gpu(ty, raw, k)?))
    } else {
        Ok(Cow::Borrowed(raw))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn raw_rows(ty: GgmlType, k: usize, rows: usize) -> Vec<u8> {
        let bb = ty.block_bytes() as usize;
        (0..k / ty.block_elems() as usize * bb * rows)
            .map(|i| (i * 7 + i / bb) as u8)
            .collect()
    }

    #[test]
    fn q8_0_codes_then_scales_per_row() {
        let k = 64;
        let raw = raw_rows(GgmlType::Q8_0, k, 3);
        let gpu = rows_to_gpu(GgmlType::Q8_0, &raw, k).unwrap();
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
    fn iq2_xxs_codes_then_scales_per_row() {
        let k = 768; // 3 blocks of 66 bytes
        let raw = raw_rows(GgmlType::IQ2_XXS, k, 2);
        let gpu = rows_to_gpu(GgmlType::IQ2_XXS, &raw, k).unwrap();
        let row = 3 * 66;
        for r in 0..2 {
            let (src, dst) = (&raw[r * row..(r + 1) * row], &gpu[r * row..(r + 1) * row]);
            for b in 0..3 {
                let blk = &src[66 * b..66 * (b + 1)];
                assert_eq!(
                    &dst[64 * b..64 * (b + 1)],
                    &blk[2..66],
                    "codes of block {b}"
                );
                assert_eq!(
                    &dst[192 + 2 * b..192 + 2 * b + 2],
                    &blk[0..2],
                    "d of block {b}"
                );
            }
        }
    }

    #[test]
    fn q2_k_qs_then_scales_then_d_dmin_per_row() {
        let k = 512; // 2 blocks of 84 bytes
        let raw = raw_rows(GgmlType::Q2_K, k, 3);
        let gpu = rows_to_gpu(GgmlType::Q2_K, &raw, k).unwrap();
        let row = 2 * 84;
        for r in 0..3 {
            let (src, dst) = (&raw[r * row..(r + 1) * row], &gpu[r * row..(r + 1) * row]);
            for b in 0..2 {
                let blk = &src[84 * b..84 * (b + 1)];
                assert_eq!(&dst[64 * b..64 * (b + 1)], &blk[16..80], "qs of block {b}");
                assert_eq!(
                    &dst[128 + 16 * b..128 + 16 * (b + 1)],
                    &blk[0..16],
                    "scales {b}"
                );
                assert_eq!(
                    &dst[160 + 4 * b..160 + 4 * (b + 1)],
                    &blk[80..84],
                    "d, dmin {b}"
                );
            }
        }
    }

    #[test]
    fn round_trips() {
        for (ty, ks) in [
            (GgmlType::Q8_0, &[32usize, 128, 4096][..]),
            (GgmlType::IQ2_XXS, &[256, 768, 4096][..]),
            (GgmlType::Q2_K, &[256, 512, 2048][..]),
        ] {
            for &k in ks {
                let raw = raw_rows(ty, k, 5);
                let gpu = rows_to_gpu(ty, &raw, k).unwrap();
                assert_eq!(gpu.len(), raw.len());
                assert_ne!(gpu, raw, "{} k {k} rearranged", ty.name());
                assert_eq!(rows_from_gpu(ty, &gpu, k).unwrap(), raw);
            }
        }
    }

    #[test]
    fn refuses_partial_rows() {
        assert!(rows_to_gpu(GgmlType::Q8_0, &[0u8; 35], 32).is_err());
        assert!(rows_to_gpu(GgmlType::Q8_0, &[0u8; 34], 48).is_err());
        assert!(rows_to_gpu(GgmlType::Q8_0, &[0u8; 34], 0).is_err());
        assert!(rows_to_gpu(GgmlType::IQ2_XXS, &[0u8; 67], 256).is_err());
        assert!(rows_to_gpu(GgmlType::IQ2_XXS, &[0u8; 66], 128).is_err());
        assert!(rows_to_gpu(GgmlType::IQ2_XXS, &[0u8; 132], 512).is_ok());
        assert!(rows_to_gpu(GgmlType::Q2_K, &[0u8; 84 * 3], 512).is_err());
        assert!(to_gpu(GgmlType::Q2_K, &[0u8; 83], 256).is_err());
        assert!(to_gpu(GgmlType::Q4_K, &[0u8; 3], 256).is_ok());
        assert!(!is_rearranged(GgmlType::Q4_K));
        assert!(is_rearranged(GgmlType::Q2_K) && is_rearranged(GgmlType::IQ2_XXS));
    }
}
