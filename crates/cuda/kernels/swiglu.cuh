// SwiGLU of one element, shared by ops.cu (swiglu) and matvec.cu (swiglu fused with
// the activation quantisation of the down projection): w · silu(min(g, clamp)) ·
// clamp(u, -clamp, clamp), as the CPU computes it.
#pragma once

__device__ __forceinline__ float sigmoidf_stable(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}
__device__ __forceinline__ float siluf(float x) { return x * sigmoidf_stable(x); }

__device__ __forceinline__ float swiglu1(float g, float u, float wt, float clamp) {
    const float gc = fminf(g, clamp);
    const float uc = fminf(fmaxf(u, -clamp), clamp);
    return wt * siluf(gc) * uc;
}
