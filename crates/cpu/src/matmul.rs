//! Row dot products and matrix products over file-resident weights.
//!
//! Float weights (F32/F16/BF16) are multiplied with f32 activations and f32 accumulation
//! (tight float oracle comparisons). Quantised weights follow ds4 (model.md §5): the
//! activation row is quantised once (Q8_0 for Q8_0 weights, Q8_K for the k-quants and
//! IQ2_XXS) and the integer dot products of `ds4-quant` do the rest.

use ds4_gguf::GgmlType;
use ds4_model::weights::TensorView;
use ds4_model::{Error, Result};
use ds4_quant::{
    ActQ8_0, BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, QK_K, QK8_0, cast_blocks,
};
use rayon::prelude::*;

use crate::Mat;

/// What the activation must be converted to for a weight type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActKind {
    F32,
    Q8_0,
    Q8K,
}

pub(crate) fn act_kind(ty: GgmlType) -> Result<ActKind> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Ok(ActKind::F32),
        GgmlType::Q8_0 => Ok(ActKind::Q8_0),
        GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => Ok(ActKind::Q8K),
        other => Err(Error::Backend(format!(
            "weight type {other:?} is not supported by the CPU backend"
        ))),
    }
}

/// An activation row in the form a weight type consumes.
#[derive(Clone, Copy)]
pub(crate) enum Xq<'a> {
    F32(&'a [f32]),
    Q8_0(&'a [ActQ8_0]),
    Q8K(&'a [BlockQ8K]),
}

/// Reused quantised-activation buffers (grown, never shrunk).
#[derive(Default)]
pub(crate) struct QBuf {
    pub q8_0: Vec<ActQ8_0>,
    pub q8k: Vec<BlockQ8K>,
    /// Row-major [rows × tile] partial results of a tiled multi-token matmul.
    pub tile: Vec<f32>,
}

fn qerr(e: ds4_quant::Error) -> Error {
    Error::Backend(format!("quant: {e}"))
}

impl QBuf {
    /// Quantises `n` rows (`x[i][off..off+k]`) for `kind`; returns blocks per row.
    pub(crate) fn quantize_rows(
        &mut self,
        kind: ActKind,
        x: &Mat,
        off: usize,
        k: usize,
        n: usize,
    ) -> Result<usize> {
        match kind {
            ActKind::F32 => Ok(0),
            ActKind::Q8_0 => {
                let bpr = k.div_ceil(QK8_0);
                if self.q8_0.len() < n * bpr {
                    self.q8_0.resize(
                        n * bpr,
                        ActQ8_0 {
                            d: 0.0,
                            qs: [0; QK8_0],
                        },
                    );
                }
                self.q8_0[..n * bpr]
                    .par_chunks_mut(bpr)
                    .enumerate()
                    .try_for_each(|(i, out)| {
                        ds4_quant::quantize_act_q8_0_into(
                            &x.data[i * x.cols + off..i * x.cols + off + k],
                            out,
                        )
                        .map_err(qerr)
                    })?;
                Ok(bpr)
            }
            ActKind::Q8K => {
                let bpr = k.div_ceil(QK_K);
                if self.q8k.len() < n * bpr {
                    self.q8k.resize(n * bpr, bytemuck::Zeroable::zeroed());
                }
                self.q8k[..n * bpr]
                    .par_chunks_mut(bpr)
                    .enumerate()
                    .try_for_each(|(i, out)| {
                        ds4_quant::quantize_act_q8_k_into(
                            &x.data[i * x.cols + off..i * x.cols + off + k],
                            out,
                        )
                        .map_err(qerr)
                    })?;
                Ok(bpr)
            }
        }
    }

    /// Quantises one vector for `kind` into slot `slot` (0 or 1) of the buffers.
    pub(crate) fn quantize_vec(&mut self, kind: ActKind, x: &[f32]) -> Result<()> {
        match kind {
            ActKind::F32 => Ok(()),
            ActKind::Q8_0 => {
                let b = x.len().div_ceil(QK8_0);
                self.q8_0.resize(
                    b,
                    ActQ8_0 {
                        d: 0.0,
                        qs: [0; QK8_0],
                    },
                );
                ds4_quant::quantize_act_q8_0_into(x, &mut self.q8_0[..b]).map_err(qerr)
            }
            ActKind::Q8K => {
                let b = x.len().div_ceil(QK_K);
                self.q8k.resize(b, bytemuck::Zeroable::zeroed());
                ds4_quant::quantize_act_q8_k_into(x, &mut self.q8k[..b]).map_err(qerr)
            }
        }
    }

    pub(crate) fn view<'a>(&'a self, kind: ActKind, x: &'a [f32]) -> Xq<'a> {
        match kind {
            ActKind::F32 => Xq::F32(x),
            ActKind::Q8_0 => Xq::Q8_0(&self.q8_0[..x.len().div_ceil(QK8_0)]),
            ActKind::Q8K => Xq::Q8K(&self.q8k[..x.len().div_ceil(QK_K)]),
        }
    }
}

/// Decodes one float row (F32/F16/BF16 little-endian bytes) into `out`.
pub(crate) fn decode_float_row(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<()> {
    let need = out.len() * if ty == GgmlType::F32 { 4 } else { 2 };
    if src.len() < need {
        return Err(Error::Backend(format!(
            "row of {} bytes, need {need}",
            src.len()
        )));
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

fn dot_float(ty: GgmlType, row: &[u8], x: &[f32]) -> Result<f32> {
    match ty {
        GgmlType::F32 => {
            if let Ok(w) = bytemuck::try_cast_slice::<u8, f32>(row) {
                Ok(ds4_quant::dot_f32(w, x))
            } else {
                Ok(row
                    .chunks_exact(4)
                    .zip(x)
                    .map(|(c, b)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * b)
                    .sum())
            }
        }
        GgmlType::F16 => {
            if let Ok(w) = bytemuck::try_cast_slice::<u8, half::f16>(row) {
                Ok(ds4_quant::dot_f16_f32(w, x))
            } else {
                Ok(row
                    .chunks_exact(2)
                    .zip(x)
                    .map(|(c, b)| half::f16::from_le_bytes([c[0], c[1]]).to_f32() * b)
                    .sum())
            }
        }
        GgmlType::BF16 => Ok(row
            .chunks_exact(2)
            .zip(x)
            .map(|(c, b)| half::bf16::from_le_bytes([c[0], c[1]]).to_f32() * b)
            .sum()),
        other => Err(Error::Backend(format!(
            "{other:?} needs a quantised activation"
        ))),
    }
}

fn dot_bytes(ty: GgmlType, row: &[u8], x: Xq<'_>) -> Result<f32> {
    match (ty, x) {
        (_, Xq::F32(x)) => dot_float(ty, row, x),
        (GgmlType::Q8_0, Xq::Q8_0(x)) => Ok(ds4_quant::dot_q8_0(
            cast_blocks::<BlockQ8_0>(row).map_err(qerr)?,
            x,
        )),
        (GgmlType::Q2_K, Xq::Q8K(x)) => Ok(ds4_quant::dot_q2_k_q8_k(
            cast_blocks::<BlockQ2K>(row).map_err(qerr)?,
            x,
        )),
        (GgmlType::Q4_K, Xq::Q8K(x)) => Ok(ds4_quant::dot_q4_k_q8_k(
            cast_blocks::<BlockQ4K>(row).map_err(qerr)?,
            x,
        )),
        (GgmlType::IQ2_XXS, Xq::Q8K(x)) => Ok(ds4_quant::dot_iq2_xxs_q8_k(
            cast_blocks::<BlockIQ2XXS>(row).map_err(qerr)?,
            x,
        )),
        (ty, _) => Err(Error::Backend(format!(
            "{ty:?}: activation of the wrong kind"
        ))),
    }
}

fn row_bytes(w: &TensorView<'_>) -> Result<usize> {
    w.ty.row_bytes(w.row_len() as u64)
        .map(|b| b as usize)
        .ok_or_else(|| Error::Backend(format!("tensor {}: bad row size", w.name)))
}

fn row_slice<'a>(w: &TensorView<'a>, row: usize) -> Result<&'a [u8]> {
    let rb = row_bytes(w)?;
    w.data
        .get(row * rb..(row + 1) * rb)
        .ok_or_else(|| Error::Backend(format!("tensor {}: row {row} out of range", w.name)))
}

/// Dot of float weight row `row` (counting across experts for 3-D tensors) with f32 x.
pub fn dot_row(w: &TensorView<'_>, row: usize, x: &[f32]) -> Result<f32> {
    let k = w.row_len();
    if x.len() < k {
        return Err(Error::Backend(format!(
            "tensor {}: input of {} < row {k}",
            w.name,
            x.len()
        )));
    }
    dot_float(w.ty, row_slice(w, row)?, &x[..k])
}

/// Below this many weight elements a matvec runs on the calling thread (task overhead
/// would dominate).
const PAR_MIN_ELEMS: usize = 1 << 16;

/// out[o] = W[row0 + o] · x for o < n_rows (parallel over rows when `par` and worth it).
pub(crate) fn matvec(
    w: &TensorView<'_>,
    row0: usize,
    n_rows: usize,
    x: Xq<'_>,
    out: &mut [f32],
    par: bool,
) -> Result<()> {
    const ROWS: usize = 16;
    let one = |(c, o): (usize, &mut [f32])| -> Result<()> {
        for (j, v) in o.iter_mut().enumerate() {
            *v = dot_bytes(w.ty, row_slice(w, row0 + c * ROWS + j)?, x)?;
        }
        Ok(())
    };
    if par && n_rows * w.row_len() >= PAR_MIN_ELEMS {
        out[..n_rows]
            .par_chunks_mut(ROWS)
            .enumerate()
            .try_for_each(one)
    } else {
        out[..n_rows].chunks_mut(ROWS).enumerate().try_for_each(one)
    }
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
    qbuf: &mut QBuf,
) -> Result<()> {
    if xoff + k > x.cols || ooff + n_rows > out.cols || w.row_len() != k {
        return Err(Error::Backend(format!("matmul {}: shape mismatch", w.name)));
    }
    let kind = act_kind(w.ty)?;
    let bpr = qbuf.quantize_rows(kind, x, xoff, k, n)?;
    let mut tile_buf = std::mem::take(&mut qbuf.tile);
    let qb: &QBuf = qbuf;
    let xq_of = |i: usize| match kind {
        ActKind::F32 => Xq::F32(&x.data[i * x.cols + xoff..i * x.cols + xoff + k]),
        ActKind::Q8_0 => Xq::Q8_0(&qb.q8_0[i * bpr..(i + 1) * bpr]),
        ActKind::Q8K => Xq::Q8K(&qb.q8k[i * bpr..(i + 1) * bpr]),
    };
    let ocols = out.cols;
    let result = if n == 1 {
        matvec(
            w,
            row0,
            n_rows,
            xq_of(0),
            &mut out.data[ooff..ooff + n_rows],
            true,
        )
    } else {
        // Several tokens: each weight row is read once per tile of tokens (it stays in cache
        // while the tile's dots use it) instead of once per token.
        const TILE: usize = 16;
        const ROWS: usize = 16;
        if tile_buf.len() < n_rows * TILE {
            tile_buf.resize(n_rows * TILE, 0.0);
        }
        (0..n).step_by(TILE).try_for_each(|t0| -> Result<()> {
            let tn = TILE.min(n - t0);
            let tmp = &mut tile_buf[..n_rows * tn];
            tmp.par_chunks_mut(ROWS * tn)
                .enumerate()
                .try_for_each(|(c, chunk)| -> Result<()> {
                    for (r, dst) in chunk.chunks_mut(tn).enumerate() {
                        let wrow = row_slice(w, row0 + c * ROWS + r)?;
                        for (j, v) in dst.iter_mut().enumerate() {
                            *v = dot_bytes(w.ty, wrow, xq_of(t0 + j))?;
                        }
                    }
                    Ok(())
                })?;
            let tmp = &tile_buf[..n_rows * tn];
            out.data[t0 * ocols..(t0 + tn) * ocols]
                .par_chunks_mut(ocols)
                .enumerate()
                .for_each(|(j, orow)| {
                    for (o, v) in orow[ooff..ooff + n_rows].iter_mut().enumerate() {
                        *v = tmp[o * tn + j];
                    }
                });
            Ok(())
        })
    };
    qbuf.tile = tile_buf;
    result
}
