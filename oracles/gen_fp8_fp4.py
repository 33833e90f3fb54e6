#!/usr/bin/env python3
"""Official precision path oracle (model.md §6b, §6c): FP8-E4M3 round trip of KV rows and
FP4-E2M1 round trip of indexer rows, computed with ml_dtypes casts; the Walsh-Hadamard
transform computed as a float64 matrix product.

Usage: /opt/oracle-venv/bin/python oracles/gen_fp8_fp4.py [--out fixtures/precision]

Each file: u32 n_rows, u32 row_len, u32 param, f32 inputs [n_rows*row_len], f32 expected.
  fp8_kv.bin   param = n_nope (448): the first n_nope dims in blocks of 64 go through
               a = max(max|x|, 1e-4); s = 2^ceil(log2(a/448)); clip(x/s, ±448) -> e4m3fn -> ·s
  fp4.bin      param = 0: blocks of 32, a = max(max|x|, 7.052966104933725e-38);
               s = 2^ceil(log2(a/6)); clip(x/s, ±6) -> e2m1fn -> ·s
  hadamard.bin param = 0: rows of 128, H·x/sqrt(128) in float64 (Sylvester order), as f32
"""
import argparse
import os
import struct

import ml_dtypes
import numpy as np


def rows(rng, n, length):
    out = []
    for i in range(n):
        kind = i % 6
        scale = np.float32(10.0 ** rng.uniform(-6, 4))
        x = rng.standard_normal(length).astype(np.float32) * scale
        if kind == 1:  # heavy tails
            x = (rng.standard_cauchy(length) * scale).astype(np.float32)
        elif kind == 2:  # some exact zeros and tiny blocks
            x[rng.random(length) < 0.3] = 0.0
            x[: length // 4] *= np.float32(1e-9)
        elif kind == 3:  # values on a coarse grid: many exact ties after scaling
            x = (rng.integers(-64, 64, length) * np.float32(0.0625) * scale).astype(np.float32)
        elif kind == 4:  # all-zero block
            x[:64] = 0.0
        out.append(x)
    return np.stack(out).astype(np.float32)


def pow2_ceil_log2(a, maxv):
    # In float32 like ds4 (log2f / ceilf / exp2f).
    return np.exp2(np.ceil(np.log2(a / np.float32(maxv)).astype(np.float32))).astype(np.float32)


def fp8_kv(x, n_nope):
    y = x.copy()
    for r in range(x.shape[0]):
        for b in range(0, n_nope, 64):
            blk = x[r, b:b + 64]
            a = np.float32(max(np.abs(blk).max(), np.float32(1e-4)))
            s = pow2_ceil_log2(a, 448.0)
            v = np.clip(blk / s, -448.0, 448.0).astype(np.float32)
            y[r, b:b + 64] = v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    return y


def fp4(x):
    y = x.copy()
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            blk = x[r, b:b + 32]
            a = np.float32(max(np.abs(blk).max(), np.float32(7.052966104933725e-38)))
            s = pow2_ceil_log2(a, 6.0)
            v = np.clip(blk / s, -6.0, 6.0).astype(np.float32)
            y[r, b:b + 32] = v.astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s
    return y


def hadamard(x):
    n = x.shape[1]
    h = np.array([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)])
    return (x.astype(np.float64) @ h.T / np.sqrt(n)).astype(np.float32)


def write(path, x, y, param):
    with open(path, "wb") as f:
        f.write(struct.pack("<III", x.shape[0], x.shape[1], param))
        f.write(x.astype("<f4").tobytes())
        f.write(y.astype("<f4").tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fixtures", "precision"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(20261125)
    x8 = rows(rng, 96, 512)
    write(os.path.join(args.out, "fp8_kv.bin"), x8, fp8_kv(x8, 448), 448)
    x4 = rows(rng, 192, 128)
    write(os.path.join(args.out, "fp4.bin"), x4, fp4(x4), 0)
    xh = rows(rng, 32, 128)
    write(os.path.join(args.out, "hadamard.bin"), xh, hadamard(xh), 0)


if __name__ == "__main__":
    main()
