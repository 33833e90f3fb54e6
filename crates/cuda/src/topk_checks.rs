//! GPU-vs-CPU checks of the indexer top-k kernels on their own (`idx_topk_v2` and the
//! older `idx_topk` kept for A/B runs): scores made on the host, with the visible row
//! counts and tie patterns that steer the kernels' paths (keys in registers or re-read
//! from global, a threshold that splits equal rows or not), against the CPU's repeated
//! selection (`numerics::indexer_pick_top`). Picks must match exactly, order included.

use ds4_model::numerics;

use crate::Result;
use crate::backend::{CudaBackend, IdxTopkArgs};
use crate::fused_checks::pick_check;
use crate::kernels::DevBuf;
use crate::selftest::{CheckResult, Rng};

/// How a case fills its scores.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Uniform in [-1, 1): hardly any ties.
    Random,
    /// Most rows exactly 0 (as a score whose head dots are all negative), the rest
    /// positive: the threshold is 0 and splits the zero rows when fewer than k are
    /// positive.
    MostlyZero,
    /// Eight distinct values: long runs of equal rows on both sides of the threshold.
    FewValues,
    /// Every row the same score.
    AllEqual,
    /// -0.0 and +0.0 (equal for the CPU's float compares) and a few positive rows.
    SignedZeros,
}

impl Fill {
    fn name(self) -> &'static str {
        match self {
            Fill::Random => "random",
            Fill::MostlyZero => "mostly-zero ties",
            Fill::FewValues => "8-value ties",
            Fill::AllEqual => "all equal",
            Fill::SignedZeros => "signed zeros",
        }
    }

    fn value(self, rng: &mut Rng) -> f32 {
        match self {
            Fill::Random => rng.unit(),
            Fill::MostlyZero => {
                if rng.next() % 10 < 8 {
                    0.0
                } else {
                    rng.unit().abs() + 1e-3
                }
            }
            Fill::FewValues => (rng.next() % 8) as f32 * 0.25 - 0.5,
            Fill::AllEqual => 1.5,
            Fill::SignedZeros => match rng.next() % 16 {
                0 => rng.unit().abs() + 1e-3,
                1..=7 => -0.0,
                _ => 0.0,
            },
        }
    }
}

/// Indexer top-k picks at visible rows from 520 (decode at 2K context) to 65536, two
/// tokens a case (the second token's scores start unaligned), `top_k` = 512, four
/// extra slots that must read -1. Both kernels, except signed zeros: the older kernel
/// orders -0 below +0 (indexer scores are never -0: their sums start at +0).
pub(crate) fn topk_checks(
    be: &CudaBackend,
    top_k: usize,
    rng: &mut Rng,
    report: &mut dyn FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    let cases: &[(usize, Fill, bool)] = &[
        (520, Fill::Random, true),
        (520, Fill::MostlyZero, true),
        (1024, Fill::Random, true),
        (1024, Fill::FewValues, true),
        (1024, Fill::SignedZeros, false),
        (2000, Fill::AllEqual, true),
        (4096, Fill::Random, true),
        (4097, Fill::MostlyZero, true),
        (16384, Fill::Random, true),
        (16385, Fill::FewValues, true),
        (65536, Fill::FewValues, true),
        (65536, Fill::MostlyZero, true),
    ];
    let stream = &be.runtime().stream;
    let tokens = 2usize;
    let sel_k = top_k + 4;
    let ratio = 4usize;
    for &(visible, fill, both) in cases {
        // Rows a token: not a multiple of 4, so token 1's row starts unaligned.
        let ld = visible + 3;
        let scores: Vec<f32> = (0..tokens * ld).map(|_| fill.value(rng)).collect();
        let sc = DevBuf::from_f32(stream, &scores)?;
        // Tokens at positions 4·visible − 1 and 4·visible both see `visible` rows.
        let pos0 = ratio * visible - 1;
        let pos = DevBuf::from_bytes(stream, &(pos0 as i32).to_le_bytes())?;
        let mut want = vec![-1i32; tokens * sel_k];
        for t in 0..tokens {
            let mut s = scores[t * ld..t * ld + visible].to_vec();
            numerics::indexer_pick_top(&mut s, &mut want[t * sel_k..t * sel_k + top_k]);
        }
        for v2 in [true, false] {
            if !v2 && !both {
                continue;
            }
            // Poisoned: a slot the kernel leaves unwritten mismatches.
            let sel = DevBuf::from_bytes(stream, &vec![0x7fu8; tokens * sel_k * 4])?;
            be.launch_idx_topk(
                v2,
                IdxTopkArgs {
                    scores: sc.ptr,
                    ld_scores: ld as i32,
                    pos_p: pos.ptr,
                    ratio: ratio as i32,
                    top_k: top_k as i32,
                    sel: sel.ptr,
                    sel_k: sel_k as i32,
                    tokens,
                },
            )?;
            let mut raw = vec![0u8; tokens * sel_k * 4];
            sel.read_at(stream, 0, &mut raw)?;
            let mismatches = raw
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .zip(&want)
                .filter(|(g, w)| g != *w)
                .count();
            let r = pick_check(
                format!(
                    "{} top-{top_k} rows {visible} {} picks (exact)",
                    if v2 { "idx_topk_v2" } else { "idx_topk" },
                    fill.name()
                ),
                mismatches,
            );
            report(&r);
            out.push(r);
        }
    }
    Ok(out)
}
