#!/usr/bin/env python3
"""Dequantisation / quantisation fixtures for ds4-quant, made with gguf-py.

gguf-py (`gguf.quants`) is an independent numpy implementation of the GGML block
formats. This script writes random but valid blocks of every type ds4 reads, and
what gguf-py dequantises them to, plus gguf-py's quantisation of random f32 rows
for the types it can quantise (Q8_0, F16, BF16). `crates/quant/tests/oracle.rs`
compares the Rust code against these files bit for bit.

Files (all little-endian) in fixtures/dequant/:
  <t>.blocks   raw blocks (F16/BF16: every one of the 65,536 bit patterns)
  <t>.f32      expected dequantised values of the first `full_blocks` blocks
  <t>.fnv      (K-quants and IQ2_XXS, whose expected output would not fit the size
               budget) FNV-1a-64 of the expected f32 bytes of every block (u64 each),
               so every block is still checked bit-exactly
  quant_<t>.in / quant_<t>.out   f32 input rows and gguf-py's quantised bytes
  manifest.json  counts, sizes and tool versions

Run: /opt/oracle-venv/bin/python oracles/gen_dequant.py  (deterministic, seed 20261125)
"""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

SEED = 20261125
N_BLOCKS = 1024
OUT = Path(__file__).resolve().parent.parent / "fixtures" / "dequant"
rng = np.random.default_rng(SEED)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """(n,) float values -> (n, 2) uint8 of finite f16."""
    h = values.astype(np.float16)
    assert np.all(np.isfinite(h))
    return h.view(np.uint8).reshape(-1, 2)


def log_uniform(n: int, lo: float, hi: float) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))


def random_scale(n: int) -> np.ndarray:
    # Mostly positive scales of sane magnitude, a few negative ones (legal bytes).
    s = log_uniform(n, 1e-5, 4.0)
    s[rng.random(n) < 0.05] *= -1
    return s


def rand_bytes(n: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, width), dtype=np.uint8)


def blocks_q8_0(n):
    return np.concatenate([f16_bytes(random_scale(n)), rand_bytes(n, 32)], axis=1)


def blocks_q2_k(n):
    d = f16_bytes(random_scale(n))
    dmin = f16_bytes(log_uniform(n, 1e-5, 1.0))
    return np.concatenate([rand_bytes(n, 16), rand_bytes(n, 64), d, dmin], axis=1)


def blocks_q4_k(n):
    d = f16_bytes(random_scale(n))
    dmin = f16_bytes(log_uniform(n, 1e-5, 1.0))
    return np.concatenate([d, dmin, rand_bytes(n, 12), rand_bytes(n, 128)], axis=1)


def blocks_iq2_xxs(n):
    d = f16_bytes(random_scale(n))
    grid_idx = rng.integers(0, 256, size=(n, 8, 4), dtype=np.uint32)
    # Make sure every grid entry is exercised.
    grid_idx.reshape(-1)[:256] = rng.permutation(256)
    signs = rng.integers(0, 128, size=(n, 8, 4), dtype=np.uint32)
    ls = rng.integers(0, 16, size=(n, 8), dtype=np.uint32)
    a0 = grid_idx[..., 0] | (grid_idx[..., 1] << 8) | (grid_idx[..., 2] << 16) | (grid_idx[..., 3] << 24)
    a1 = signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21) | (ls << 28)
    words = np.stack([a0, a1], axis=-1).astype("<u4").reshape(n, 16)
    assert len(np.unique(grid_idx)) == 256
    return np.concatenate([d, words.view(np.uint8).reshape(n, 64)], axis=1)


def all_u16() -> np.ndarray:
    return np.arange(65536, dtype="<u2").view(np.uint8).reshape(-1, 2)


def write_dequant(name, qtype, raw: np.ndarray, full_blocks: int, manifest: dict):
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n, block_bytes = raw.shape
    expected = quants.dequantize(raw.reshape(-1), qtype).astype("<f4").reshape(n, -1)
    assert raw.shape[1] == quants.GGML_QUANT_SIZES[qtype][1]
    (OUT / f"{name}.blocks").write_bytes(raw.tobytes())
    (OUT / f"{name}.f32").write_bytes(expected[:full_blocks].tobytes())
    if full_blocks < n:
        hashes = np.array([fnv1a64(row.tobytes()) for row in expected], dtype="<u8")
        (OUT / f"{name}.fnv").write_bytes(hashes.tobytes())
    manifest["dequant"][name] = {
        "ggml_type": qtype.name,
        "blocks": n,
        "block_bytes": block_bytes,
        "block_elems": expected.shape[1],
        "full_blocks": full_blocks,
    }


def q8_0_inputs() -> np.ndarray:
    n = N_BLOCKS
    scale = 10.0 ** rng.uniform(-7, 4, size=(n, 1))
    x = (rng.standard_normal((n, 32)) * scale).astype(np.float32)
    x[0] = 0.0  # all-zero block: d = 0
    x[1] = 0.0
    x[1, 5] = -3.5  # single value
    # amax = 127 gives d = 1 exactly, so x·(1/d) = k + 0.5 are exact ties (round away).
    for b in range(2, 34):
        x[b] = rng.integers(-126, 126, size=32) + 0.5
        x[b, b % 32] = 127.0 if b % 2 else -127.0
    x[34] = 1e-6  # d underflows to an f16 subnormal
    return x


def f16_inputs() -> np.ndarray:
    n = 16384
    mant = rng.uniform(1, 2, size=n) * rng.choice([-1.0, 1.0], size=n)
    x = (mant * 2.0 ** rng.integers(-30, 18, size=n)).astype(np.float32)
    # Exact midpoints between neighbouring f16 values (ties to even).
    h = rng.integers(0, 0x7BFF, size=512, dtype=np.uint16).view(np.float16).astype(np.float32)
    h_bits = h.astype(np.float16).view(np.uint16)
    h_next = (h_bits + 1).astype(np.uint16).view(np.float16).astype(np.float32)
    x[:512] = ((h.astype(np.float64) + h_next.astype(np.float64)) / 2).astype(np.float32)
    x[512:516] = [np.inf, -np.inf, 0.0, -0.0]
    x[516] = 65520.0  # rounds to inf
    return x


def bf16_inputs() -> np.ndarray:
    n = 16384
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    # Exact ties: low 16 bits = 0x8000.
    bits[:1024] = (bits[:1024] & 0xFFFF0000) | 0x8000
    return bits.view(np.float32)


def write_quant(name, qtype, x: np.ndarray, manifest: dict, nan_free: bool):
    x = np.ascontiguousarray(x, dtype="<f4")
    out = quants.quantize(x, qtype)
    out = np.ascontiguousarray(out).view(np.uint8)
    (OUT / f"quant_{name}.in").write_bytes(x.tobytes())
    (OUT / f"quant_{name}.out").write_bytes(out.tobytes())
    manifest["quant"][name] = {
        "ggml_type": qtype.name,
        "input_shape": list(x.shape),
        "output_bytes": int(out.size),
        "input_has_nan": not nan_free,
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {
        "generator": "oracles/gen_dequant.py",
        "gguf": version("gguf"),
        "numpy": version("numpy"),
        "seed": SEED,
        "hash": "fnv1a64 over the little-endian f32 bytes of each block",
        "dequant": {},
        "quant": {},
    }
    write_dequant("q8_0", T.Q8_0, blocks_q8_0(N_BLOCKS), N_BLOCKS, manifest)
    write_dequant("q2_k", T.Q2_K, blocks_q2_k(N_BLOCKS), 128, manifest)
    write_dequant("q4_k", T.Q4_K, blocks_q4_k(N_BLOCKS), 128, manifest)
    write_dequant("iq2_xxs", T.IQ2_XXS, blocks_iq2_xxs(N_BLOCKS), 128, manifest)
    write_dequant("f16", T.F16, all_u16(), 65536, manifest)
    write_dequant("bf16", T.BF16, all_u16(), 65536, manifest)

    write_quant("q8_0", T.Q8_0, q8_0_inputs(), manifest, True)
    write_quant("f16", T.F16, f16_inputs(), manifest, True)
    write_quant("bf16", T.BF16, bf16_inputs(), manifest, False)

    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
