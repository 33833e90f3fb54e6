//! Block layouts of the GGML formats ds4 reads, as `#[repr(C)]` plain-old-data
//! structs that can be viewed in place over mmap'd tensor bytes.

use bytemuck::{Pod, Zeroable};
use half::f16;

/// Elements in one Q8_0 block.
pub const QK8_0: usize = 32;
/// Elements in one K-quant / IQ2 super-block.
pub const QK_K: usize = 256;

/// Q8_0 weight block: `x_i = d · qs_i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK8_0],
}

/// Q8_0-style activation block as ds4 keeps it for Q8_0 matmuls: the scale
/// stays an unrounded f32 (ds4's `xscale`), unlike the f16 of a weight block.
/// Invariant relied on by the SIMD dot: every `qs` lies in [-127, 127]
/// ([`crate::quantize_act_q8_0`] guarantees it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct ActQ8_0 {
    pub d: f32,
    pub qs: [i8; QK8_0],
}

/// Q2_K super-block: 16 sub-blocks of 16, 2-bit codes, 4-bit scale and min each.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ2K {
    /// Low nibble: scale, high nibble: min, one byte per 16-element sub-block.
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}

/// Q4_K super-block: 8 sub-blocks of 32, 4-bit codes, 6-bit packed scales and mins.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// IQ2_XXS super-block: 8 groups of 32, each two u32 (grid indices; signs + scale).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockIQ2XXS {
    pub d: f16,
    pub qs: [u16; QK_K / 8],
}

/// Q8_K activation block (ds4 numerics): `x ≈ d · qs`, with per-16 sums of `qs`.
/// Invariant relied on by the SIMD dots: every `qs` lies in [-127, 127].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<ActQ8_0>() == 36);
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockIQ2XXS>() == 66);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

impl BlockQ4K {
    /// 6-bit scale and min of sub-block `k` (0..8).
    #[inline(always)]
    pub fn scale_min(&self, k: usize) -> (u8, u8) {
        let s = &self.scales;
        if k < 4 {
            (s[k] & 63, s[k + 4] & 63)
        } else {
            (
                (s[k + 4] & 15) | ((s[k - 4] >> 6) << 4),
                (s[k + 4] >> 4) | ((s[k] >> 6) << 4),
            )
        }
    }

    /// All eight (scale, min) pairs.
    #[inline(always)]
    pub fn scales_mins(&self) -> ([u8; 8], [u8; 8]) {
        let mut sc = [0u8; 8];
        let mut m = [0u8; 8];
        for k in 0..8 {
            (sc[k], m[k]) = self.scale_min(k);
        }
        (sc, m)
    }
}

impl BlockIQ2XXS {
    /// The two u32 words of group `g` (0..8): grid indices, then signs + scale.
    #[inline(always)]
    pub fn group_words(&self, g: usize) -> (u32, u32) {
        let q = &self.qs[4 * g..4 * g + 4];
        (
            u32::from(q[0]) | (u32::from(q[1]) << 16),
            u32::from(q[2]) | (u32::from(q[3]) << 16),
        )
    }
}

/// A GGML type whose rows are made of fixed-size blocks of this struct.
pub trait Block: Pod {
    const ELEMS: usize;
}
impl Block for BlockQ8_0 {
    const ELEMS: usize = QK8_0;
}
impl Block for BlockQ2K {
    const ELEMS: usize = QK_K;
}
impl Block for BlockQ4K {
    const ELEMS: usize = QK_K;
}
impl Block for BlockIQ2XXS {
    const ELEMS: usize = QK_K;
}
impl Block for BlockQ8K {
    const ELEMS: usize = QK_K;
}

/// Views raw little-endian tensor bytes as blocks without copying.
/// Errors when the length is not a whole number of blocks or the bytes are
/// not aligned for `B` (GGUF data is 32-byte aligned, so weights always are).
pub fn cast_blocks<B: Block>(bytes: &[u8]) -> crate::Result<&[B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        return Err(crate::Error::Length {
            what: "block bytes",
            expected: bytes.len() / size * size,
            actual: bytes.len(),
        });
    }
    bytemuck::try_cast_slice(bytes).map_err(|_| crate::Error::Misaligned {
        align: std::mem::align_of::<B>(),
    })
}
