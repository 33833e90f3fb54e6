// Shared by ops.cu and matvec.cu (needs the u16 / u32 typedefs of the including file).
#pragma once

// f16 -> f32 with the conversion pinned where it is written (asm volatile): kernels
// that hold F16 weights in registers across a token loop would otherwise have the
// conversions hoisted out of it, doubling the registers the weights take, and spill.
__device__ __forceinline__ float h2f_pinned(u32 h) {
    float f;
    asm volatile("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h));
    return f;
}

// Eight f16 weights (one 16-byte piece) against eight f32 activations, summed in order
// with f32 fma (as matvec.cu's fma8_f16), conversions pinned.
__device__ __forceinline__ float fma8_f16_pinned(uint4 w, float4 xa, float4 xb, float acc) {
    acc = fmaf(h2f_pinned(w.x & 0xffff), xa.x, acc);
    acc = fmaf(h2f_pinned(w.x >> 16), xa.y, acc);
    acc = fmaf(h2f_pinned(w.y & 0xffff), xa.z, acc);
    acc = fmaf(h2f_pinned(w.y >> 16), xa.w, acc);
    acc = fmaf(h2f_pinned(w.z & 0xffff), xb.x, acc);
    acc = fmaf(h2f_pinned(w.z >> 16), xb.y, acc);
    acc = fmaf(h2f_pinned(w.w & 0xffff), xb.z, acc);
    acc = fmaf(h2f_pinned(w.w >> 16), xb.w, acc);
    return acc;
}

// One token's partial sums for R rows held in registers, PPL pieces of 8 f16 weights
// per lane (piece i of a row at w[q][i], its activations at xp[64 i] and xp[64 i + 1]),
// each row's pieces summed in order from 0: the F16 register-streaming matvecs
// (matvec.cu mv_f16_regs) and moe_router_route (ops.cu) sum alike, bit for bit.
template <int PPL, int R>
__device__ __forceinline__ void f16_rows_dot(const uint4 (&w)[R][PPL], const float4* xp,
                                             float (&acc)[R]) {
#pragma unroll
    for (int q = 0; q < R; q++) acc[q] = 0.0f;
#pragma unroll
    for (int i = 0; i < PPL; i++) {
        const float4 xa = xp[64 * i], xb = xp[64 * i + 1];
#pragma unroll
        for (int q = 0; q < R; q++) acc[q] = fma8_f16_pinned(w[q][i], xa, xb, acc[q]);
    }
}
