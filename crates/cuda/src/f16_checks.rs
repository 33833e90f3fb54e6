//! GPU-vs-CPU checks of the F16 matvecs at every Flash decode shape: the router, the
//! compressor kv+gate pairs (CSA, HCA, indexer) launched as one multi-matrix product,
//! the indexer's q_b, and every register-streaming variant (`mv_f16_p*_r*_s*`) whatever
//! the default pick, so `DS4_MV_F16_V` tuning runs only choose among checked kernels.
//! The CPU side is `ds4_quant::dot_f16_f32` (f16 weights widened to f32, f32 sums).
//! Outputs are poisoned with NaN, and output rows are padded (ldy > rows) where the
//! backend pads them, so a missing or stray write fails.

use ds4_gguf::GgmlType;
use ds4_quant::dot_f16_f32;
use half::f16;

use crate::Result;
use crate::kernels::{DevBuf, F16Variant, Kernels, Matvec, MvInput, MvSeg};
use crate::selftest::{CheckResult, Rng, TOL_F16_DOT_REL, compare, random_act, random_weights};

/// One F16 product: matrices of `segs[i].0` rows of `k`, output rows `segs[i].1`
/// floats apart, over one input of `ntok` tokens.
struct F16Case {
    name: &'static str,
    k: usize,
    segs: &'static [(usize, usize)],
    ntok: usize,
}

/// A CSA layer's F16 launch: attention compressor kv + gate, indexer compressor kv +
/// gate (outputs 1024 apart), indexer proj.
const CSA_LAYER_SEGS: &[(usize, usize)] = &[
    (1024, 1024),
    (1024, 1024),
    (256, 1024),
    (256, 1024),
    (64, 64),
];

/// The decode launches of a Flash layer (forward.rs `matmul_multi`): the CSA layers'
/// attention compressor kv + gate, indexer compressor kv + gate and indexer proj in one
/// launch (2624 rows, the indexer's outputs in 1024-wide buffers), the HCA layers'
/// compressor kv + gate, the router, the indexer's q_b.
const CASES: &[F16Case] = &[
    F16Case {
        name: "f16 router      4096->256",
        k: 4096,
        segs: &[(256, 256)],
        ntok: 1,
    },
    F16Case {
        name: "f16 CSA layer   4096->1024+1024+256+256+64",
        k: 4096,
        segs: CSA_LAYER_SEGS,
        ntok: 1,
    },
    F16Case {
        name: "f16 HCA layer   4096->512+512",
        k: 4096,
        segs: &[(512, 512), (512, 512)],
        ntok: 1,
    },
    F16Case {
        name: "f16 idx q_b     1024->8192",
        k: 1024,
        segs: &[(8192, 8192)],
        ntok: 1,
    },
    F16Case {
        name: "f16 CSA layer   4096->1024+1024+256+256+64 x 3 tok",
        k: 4096,
        segs: CSA_LAYER_SEGS,
        ntok: 3,
    },
    F16Case {
        name: "f16 router      4096->256 x 5 tok",
        k: 4096,
        segs: &[(256, 256)],
        ntok: 5,
    },
];

/// The shapes every compiled variant runs on (per K: uneven row counts, two matrices,
/// padded output rows, two tokens).
const VARIANT_CASES: &[F16Case] = &[
    F16Case {
        name: "4096->300+212 ldy+4 x 2 tok",
        k: 4096,
        segs: &[(300, 304), (212, 216)],
        ntok: 2,
    },
    F16Case {
        name: "1024->8192+36 x 2 tok",
        k: 1024,
        segs: &[(8192, 8192), (36, 36)],
        ntok: 2,
    },
];

fn f16_row(bytes: &[u8]) -> Vec<f16> {
    bytes
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn run_f16_case(
    kern: &Kernels,
    rng: &mut Rng,
    name: String,
    c: &F16Case,
    variant: Option<F16Variant>,
) -> Result<CheckResult> {
    let stream = kern.stream();
    let k = c.k;
    let x = random_act(rng, c.ntok * k);
    let x_dev = DevBuf::from_f32(stream, &x)?;
    let mut cpu = Vec::new();
    let mut segs = Vec::new();
    // Device buffers stay alive until the outputs are read.
    let mut bufs = Vec::new();
    for &(rows, ldy) in c.segs {
        let w = random_weights(rng, GgmlType::F16, rows * k);
        for t in 0..c.ntok {
            let xr = &x[t * k..(t + 1) * k];
            for r in 0..rows {
                cpu.push(dot_f16_f32(&f16_row(&w[r * 2 * k..(r + 1) * 2 * k]), xr));
            }
        }
        let w_dev = DevBuf::from_bytes(stream, &w)?;
        let y_dev = DevBuf::from_bytes(stream, &vec![0xffu8; c.ntok * ldy * 4])?;
        segs.push(MvSeg {
            w: w_dev.ptr,
            rows,
            y: y_dev.ptr,
            ldy,
        });
        bufs.push((w_dev, y_dev));
    }
    let Some((first, extra)) = segs.split_first() else {
        return Ok(compare(name, &[], &[], TOL_F16_DOT_REL, "TOL_F16_DOT_REL"));
    };
    let m = Matvec {
        ty: GgmlType::F16,
        w: first.w,
        k,
        rows: first.rows,
        ntok: c.ntok,
        slots: 1,
        w_slot_stride: 0,
        ids: 0,
        x_group: 1,
        x: MvInput::F32(x_dev.ptr),
        y: first.y,
    };
    match variant {
        Some(v) => kern.matvec_f16_variant(stream, &m, first.ldy, extra, v)?,
        None => kern.matvec_segs(stream, &m, first.ldy, extra)?,
    }
    stream.synchronize()?;
    let mut gpu = Vec::with_capacity(cpu.len());
    let mut stray = 0usize;
    for ((_, y_dev), seg) in bufs.iter().zip(&segs) {
        let y = y_dev.to_f32(stream)?;
        for t in 0..c.ntok {
            let row = &y[t * seg.ldy..(t + 1) * seg.ldy];
            gpu.extend_from_slice(&row[..seg.rows]);
            // The padding must keep its poison bits (0xffffffff).
            stray += row[seg.rows..]
                .iter()
                .filter(|v| v.to_bits() != u32::MAX)
                .count();
        }
    }
    if stray > 0 {
        // A write past a matrix's rows: an infinite error fails the check.
        gpu.push(f32::INFINITY);
        cpu.push(0.0);
    }
    Ok(compare(
        name,
        &gpu,
        &cpu,
        TOL_F16_DOT_REL,
        "TOL_F16_DOT_REL",
    ))
}

/// Runs the F16 checks, calling `report` after each one: the Flash shapes through the
/// default dispatch, then every compiled register-streaming variant.
pub fn run_f16_checks(
    kern: &Kernels,
    mut report: impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>> {
    let mut rng = Rng(0x0f16_f16c_5eed);
    let mut out = Vec::new();
    for c in CASES {
        let r = run_f16_case(kern, &mut rng, c.name.to_string(), c, None)?;
        report(&r);
        out.push(r);
    }
    for v in kern.f16_regs_variants() {
        for c in VARIANT_CASES.iter().filter(|c| c.k == v.k()) {
            let name = format!("f16 mv_f16_p{}_r{}_s{} {}", v.ppl, v.rows, v.split, c.name);
            let r = run_f16_case(kern, &mut rng, name, c, Some(v))?;
            report(&r);
            out.push(r);
        }
    }
    Ok(out)
}
