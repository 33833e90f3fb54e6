//! Block formats of the GGML quantisations ds4 uses (F32, F16, BF16, Q8_0, Q2_K,
//! Q4_K, IQ2_XXS; Q8_K for activations), their reference (de)quantisers, and the
//! fast dot products the CPU backend runs on (model.md §5).
//!
//! * [`dequantize_row`] matches gguf-py's `gguf.quants.dequantize` bit for bit.
//! * [`quantize_row`] follows ggml's reference quantisers (`quantize_row_*_ref`).
//! * [`quantize_act_q8_0`] / [`quantize_act_q8_k`] reproduce ds4's activation
//!   quantisation; the `dot_*` functions compute ds4's integer formulation
//!   (Σ_blocks d_w·d_x·Σ q_w q_x) with AVX2 when compiled for it, and a scalar
//!   version that gives the identical f32 result (same lanes, same order).
//! * [`dot_ref`] is the plain reference: dequantise, then an f32 dot.
//!
//! Two points where ds4's numerics shape the API: Q8_0 activations are
//! [`ActQ8_0`] blocks with an **f32** scale (ds4 never rounds the activation
//! scale to f16), and [`dot_ref`] returns a `Result` because it checks the row
//! length against `x`.

mod blocks;
mod dequant;
pub mod dot;
pub mod iq2_tables;
mod quantize;

pub use blocks::{
    ActQ8_0, Block, BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, QK_K, QK8_0, cast_blocks,
};
pub use dequant::dequantize_row;
pub use dot::{
    dot_f16_f32, dot_f32, dot_iq2_xxs_q8_k, dot_q2_k_q8_k, dot_q4_k_q8_k, dot_q8_0, dot_ref,
};
pub use ds4_gguf::GgmlType;
pub use quantize::{
    quantize_act_q8_0, quantize_act_q8_0_into, quantize_act_q8_k, quantize_act_q8_k_into,
    quantize_row,
};

/// Errors of this crate: bad lengths, alignment or an unsupported type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{what}: expected {expected} elements/bytes, got {actual}")]
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("{0} is not supported by {1}")]
    Unsupported(GgmlType, &'static str),
    #[error("block data is not aligned to {align} bytes")]
    Misaligned { align: usize },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Checks that `n_elems` fills whole blocks of `ty` and returns the row's byte size.
pub(crate) fn row_bytes(ty: GgmlType, n_elems: usize, what: &'static str) -> Result<usize> {
    let be = ty.block_elems() as usize;
    let bb = ty.block_bytes() as usize;
    if !n_elems.is_multiple_of(be) {
        return Err(Error::Length {
            what,
            expected: n_elems.div_ceil(be) * be,
            actual: n_elems,
        });
    }
    Ok(n_elems / be * bb)
}
