//! Row dot products and matrix products over file-resident weights.
//!
//! Float weights (F32/F16/BF16) are multiplied with f32 activations and f32 accumulation.
//! Quantised types are not wired yet (they need `ds4-quant`'s activation quantisers).

use ds4_gguf::GgmlType;
use ds4_model::weights::TensorView;
use ds4_model::{Error, Result};
use rayon::prelude::*;

use crate::Mat;

/// Decodes one float row (F32/F16/BF16 little-endian bytes) into `out`.
pub(crate) fn decode_float_row(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<()> {
    let need = out.len() * if ty == GgmlType::F32 { 4 } else { 2 };
    if src.len() < need {
        return Err(Error::Backend(format!("row of {} bytes, need {need}", src.len())));
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        other => return Err(Error::Backend(format!("{other:?} is not a float type"))),
    }
    Ok(())
}

fn dot_bytes(ty: GgmlType, row: &[u8], x: &[f32]) -> Result<f32> {
    match ty {
        GgmlType::F32 => {
            if let Ok(w) = bytemuck::try_cast_slice::<u8, f32>(row) {
                Ok(w.iter().zip(x).map(|(a, b)| a * b).sum())
            } else {
                Ok(row
                    .chunks_exact(4)
                    .zip(x)
                    .map(|(c, b)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * b)
                    .sum())
            }
        }
        GgmlType::F16 => {
            let mut acc = 0.0f32;
            if let Ok(w) = bytemuck::try_cast_slice::<u8, half::f16>(row) {
                for (a, b) in w.iter().zip(x) {
                    acc += a.to_f32() * b;
                }
            } else {
                for (c, b) in row.chunks_exact(2).zip(x) {
                    acc += half::f16::from_le_bytes([c[0], c[1]]).to_f32() * b;
                }
            }
            Ok(acc)
        }
        GgmlType::BF16 => Ok(row
            .chunks_exact(2)
            .zip(x)
            .map(|(c, b)| half::bf16::from_le_bytes([c[0], c[1]]).to_f32() * b)
            .sum()),
        other => Err(Error::Backend(format!("weight type {other:?} is not supported by the CPU backend yet"))),
    }
}

fn row_bytes(w: &TensorView<'_>) -> Result<usize> {
    w.ty
        .row_bytes(w.row_len() as u64)
        .map(|b| b as usize)
        .ok_or_else(|| Error::Backend(format!("tensor {}: bad row size", w.name)))
}

fn row_slice<'a>(w: &TensorView<'a>, row: usize) -> Result<&'a [u8]> {
    let rb = row_bytes(w)?;
    w.data
        .get(row * rb..(row + 1) * rb)
        .ok_or_else(|| Error::Backend(format!("tensor {}: row {row} out of range", w.name)))
}

/// Dot of weight row `row` (counting across experts for 3-D tensors) with x.
pub fn dot_row(w: &TensorView<'_>, row: usize, x: &[f32]) -> Result<f32> {
    let k = w.row_len();
    if x.len() < k {
        return Err(Error::Backend(format!("tensor {}: input of {} < row {k}", w.name, x.len())));
    }
    dot_bytes(w.ty, row_slice(w, row)?, &x[..k])
}

/// out[o] = W[row0 + o] · x for o < n_rows (parallel over rows).
pub(crate) fn matvec(w: &TensorView<'_>, row0: usize, n_rows: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
    out[..n_rows]
        .par_chunks_mut(32)
        .enumerate()
        .try_for_each(|(c, o)| -> Result<()> {
            for (j, v) in o.iter_mut().enumerate() {
                *v = dot_row(w, row0 + c * 32 + j, x)?;
            }
            Ok(())
        })
}

/// For tokens i < n: out[i][ooff + o] = W[row0 + o] · x[i][xoff .. xoff + k], o < n_rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    w: &TensorView<'_>,
    row0: usize,
    n_rows: usize,
    x: &Mat,
    xoff: usize,
    k: usize,
    n: usize,
    out: &mut Mat,
    ooff: usize,
) -> Result<()> {
    if xoff + k > x.cols || ooff + n_rows > out.cols || w.row_len() != k {
        return Err(Error::Backend(format!("matmul {}: shape mismatch", w.name)));
    }
    let ocols = out.cols;
    out.data[..n * ocols]
        .par_chunks_mut(ocols)
        .enumerate()
        .try_for_each(|(i, orow)| {
            let xi = &x.data[i * x.cols + xoff..i * x.cols + xoff + k];
            matvec(w, row0, n_rows, xi, &mut orow[ooff..ooff + n_rows])
        })
}
