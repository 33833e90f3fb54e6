// Shared by ops.cu and matvec.cu (needs the i8 / i16 typedefs of the including file).
#pragma once

// ---------------------------------------------------------------------------
// Activation quantisation of rows held four consecutive values per thread (thread t
// owns elements 4t..4t+3 of its run), bit-identical to ds4-quant's quantize_act_q8_0 /
// quantize_act_q8_k (and matvec.cu's quant_act_*), so that a kernel that produces a
// row can also write the copy the next quantized product reads (SoA layout of
// kernels.rs ActBuf: qs int8[n], d f32[n/blk], bsums int16[n/16]). `e0` is the
// element index of o[0] in that layout.
// ---------------------------------------------------------------------------

// Warp-wide: the element of largest |x| (amax, its signed value mx, its index idx),
// the lowest index on ties, as ds4-quant's Q8_K scale picks it. Every lane ends with it.
__device__ __forceinline__ void warp_abs_max_first(float& amax, float& mx, int& idx) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
        const float oa = __shfl_xor_sync(0xffffffffu, amax, m);
        const float om = __shfl_xor_sync(0xffffffffu, mx, m);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, m);
        if (oa > amax || (oa == amax && oi < idx)) { amax = oa; mx = om; idx = oi; }
    }
}

// warp_abs_max_first by two redux instructions instead of 15 shuffles (sm_80+): |x|
// values are non-negative floats, ordered as their bit patterns, so the largest is a
// u32 maximum; among the lanes that hold it the first index (and its sign) is a u32
// minimum of (idx << 1 | sign). The same (amax, mx, idx), the all-zero case included
// (amax 0, mx +0, idx 0x7fffffff).
__device__ __forceinline__ void warp_abs_max_first_rx(float& amax, float& mx, int& idx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned mbits, kmin;
    asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(mbits) : "r"(__float_as_uint(amax)));
    const unsigned key = __float_as_uint(amax) == mbits
                             ? ((unsigned)idx << 1) | (__float_as_uint(mx) >> 31)
                             : 0xffffffffu;
    asm volatile("redux.sync.min.u32 %0, %1, 0xffffffff;" : "=r"(kmin) : "r"(key));
    amax = __uint_as_float(mbits);
    mx = (kmin & 1u) ? -amax : amax;
    idx = (int)(kmin >> 1);
#else
    warp_abs_max_first(amax, mx, idx);
#endif
}

// Q8_0: a 32-block is 8 consecutive lanes. Called by whole warps (all lanes active).
__device__ __forceinline__ void q8_0_quad(const float o[4], long long e0, i8* __restrict__ qs,
                                          float* __restrict__ d) {
    float a = fmaxf(fmaxf(fabsf(o[0]), fabsf(o[1])), fmaxf(fabsf(o[2]), fabsf(o[3])));
#pragma unroll
    for (int m = 1; m < 8; m <<= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, m));
    const float dd = a / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    char4 q;
    q.x = (signed char)max(-127, min(127, __float2int_rn(o[0] * id)));
    q.y = (signed char)max(-127, min(127, __float2int_rn(o[1] * id)));
    q.z = (signed char)max(-127, min(127, __float2int_rn(o[2] * id)));
    q.w = (signed char)max(-127, min(127, __float2int_rn(o[3] * id)));
    *(char4*)(qs + e0) = q;
    if ((e0 & 31) == 0) d[e0 >> 5] = dd;
}

// Q8_K: a 256-block is 64 consecutive threads (warps 2w and 2w + 1; blockDim a multiple
// of 64 and the block's rows 256-aligned). Called by every thread of the block (it
// synchronises); inactive threads (past the row) only take part in the reductions.
// The block maximum is the signed element of largest |x|, the first one on ties.
// `reused`: an earlier call of the block used `red` (its readers must be done first).
// RX: the warp maximum by warp_abs_max_first_rx (same result, fewer instructions).
struct Q8kRed {
    float amax[32];
    float mx[32];
    int idx[32];
};
template <bool RX = false>
__device__ void q8_k_quad(const float o[4], bool active, long long e0, Q8kRed& red,
                          i8* __restrict__ qs, float* __restrict__ d, i16* __restrict__ bsums,
                          bool reused = true) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float amax = 0.0f, mx = 0.0f;
    int idx = 0x7fffffff;
    const int loc = (int)(e0 & 255);
    if (active) {
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (fabsf(o[j]) > amax) { amax = fabsf(o[j]); mx = o[j]; idx = loc + j; }
    }
    if (RX)
        warp_abs_max_first_rx(amax, mx, idx);
    else
        warp_abs_max_first(amax, mx, idx);
    if (reused) __syncthreads();  // an earlier call's readers are done with `red`
    if (lane == 0) {
        red.amax[warp] = amax;
        red.mx[warp] = mx;
        red.idx[warp] = idx;
    }
    __syncthreads();
    {
        const int pw = warp ^ 1;
        const float oa = red.amax[pw], om = red.mx[pw];
        const int oi = red.idx[pw];
        if (oa > amax || (oa == amax && oi < idx)) { amax = oa; mx = om; }
    }
    int q[4] = {0, 0, 0, 0};
    if (amax != 0.0f) {
        const float iscale = -127.0f / mx;
#pragma unroll
        for (int j = 0; j < 4; j++) q[j] = max(-127, min(127, __float2int_rn(iscale * o[j])));
    }
    int s = (q[0] + q[1]) + (q[2] + q[3]);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    if (!active) return;
    *(char4*)(qs + e0) = make_char4(q[0], q[1], q[2], q[3]);
    if ((lane & 3) == 0) bsums[e0 >> 4] = (i16)s;
    if (loc == 0) d[e0 >> 8] = amax == 0.0f ? 0.0f : 1.0f / (-127.0f / mx);
}
