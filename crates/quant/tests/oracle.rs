//! Bit-exact comparison with gguf-py 0.19.0 (fixtures made by `oracles/gen_dequant.py`).
#![allow(clippy::unwrap_used)]

use ds4_quant::{GgmlType, dequantize_row, quantize_row};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/dequant")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&fixture("manifest.json")).unwrap()
}

/// Dequantises every fixture block of `name` and checks it bit for bit: element
/// by element for the blocks stored in full, by per-block hash for the rest.
/// Returns the number of blocks checked.
fn check_dequant(name: &str, ty: GgmlType) -> usize {
    let m = manifest();
    let info = &m["dequant"][name];
    let n_blocks = info["blocks"].as_u64().unwrap() as usize;
    let full = info["full_blocks"].as_u64().unwrap() as usize;
    let elems = ty.block_elems() as usize;
    let bbytes = ty.block_bytes() as usize;
    assert_eq!(info["block_bytes"].as_u64().unwrap() as usize, bbytes);
    assert_eq!(info["block_elems"].as_u64().unwrap() as usize, elems);

    let raw = fixture(&format!("{name}.blocks"));
    assert_eq!(raw.len(), n_blocks * bbytes);
    let expected = f32s(&fixture(&format!("{name}.f32")));
    assert_eq!(expected.len(), full * elems);
    let hashes: Vec<u64> = if full < n_blocks {
        fixture(&format!("{name}.fnv"))
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        Vec::new()
    };

    // The whole fixture as one row, as a tensor row would be dequantised.
    let mut out = vec![0f32; n_blocks * elems];
    dequantize_row(ty, &raw, &mut out).unwrap();
    for b in 0..n_blocks {
        let got = &out[b * elems..(b + 1) * elems];
        if b < full {
            for (i, (g, e)) in got.iter().zip(&expected[b * elems..]).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    e.to_bits(),
                    "{name} block {b} elem {i}: got {g:e} ({:#010x}), gguf-py {e:e} ({:#010x})",
                    g.to_bits(),
                    e.to_bits()
                );
            }
        } else {
            let bytes: Vec<u8> = got.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(
                fnv1a64(&bytes),
                hashes[b],
                "{name} block {b}: output differs from gguf-py"
            );
        }
    }
    // Block by block gives the same as the whole row.
    let mut one = vec![0f32; elems];
    for b in (0..n_blocks).step_by(97) {
        dequantize_row(ty, &raw[b * bbytes..(b + 1) * bbytes], &mut one).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one), bits(&out[b * elems..(b + 1) * elems]));
    }
    n_blocks
}

#[test]
fn dequant_q8_0_bit_exact() {
    assert_eq!(check_dequant("q8_0", GgmlType::Q8_0), 1024);
}

#[test]
fn dequant_q2_k_bit_exact() {
    assert_eq!(check_dequant("q2_k", GgmlType::Q2_K), 1024);
}

#[test]
fn dequant_q4_k_bit_exact() {
    assert_eq!(check_dequant("q4_k", GgmlType::Q4_K), 1024);
}

#[test]
fn dequant_iq2_xxs_bit_exact() {
    assert_eq!(check_dequant("iq2_xxs", GgmlType::IQ2_XXS), 1024);
}

#[test]
fn dequant_f16_all_bit_patterns() {
    assert_eq!(check_dequant("f16", GgmlType::F16), 65536);
}

#[test]
fn dequant_bf16_all_bit_patterns() {
    assert_eq!(check_dequant("bf16", GgmlType::BF16), 65536);
}

fn check_quant(name: &str, ty: GgmlType) -> usize {
    let x = f32s(&fixture(&format!("quant_{name}.in")));
    let expected = fixture(&format!("quant_{name}.out"));
    let got = quantize_row(ty, &x).unwrap();
    assert_eq!(got.len(), expected.len());
    let bb = ty.block_bytes() as usize;
    let be = ty.block_elems() as usize;
    for (b, (g, e)) in got.chunks(bb).zip(expected.chunks(bb)).enumerate() {
        assert_eq!(
            g,
            e,
            "{name} block {b}: input {:?}",
            &x[b * be..(b + 1) * be]
        );
    }
    got.len() / bb
}

#[test]
fn quant_q8_0_matches_gguf_py() {
    assert_eq!(check_quant("q8_0", GgmlType::Q8_0), 1024);
}

#[test]
fn quant_f16_matches_gguf_py() {
    assert_eq!(check_quant("f16", GgmlType::F16), 16384);
}

#[test]
fn quant_bf16_matches_gguf_py() {
    assert_eq!(check_quant("bf16", GgmlType::BF16), 16384);
}
