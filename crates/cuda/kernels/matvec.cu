// ds4 CUDA kernels: activation quantisation and quantized matrix-vector products.
//
// Compiled at run time by NVRTC (no CUDA headers needed: f16 conversion and dp4a
// are inline PTX). Numerics follow ds4's integer formulation (model.md §5):
// Q8_0 weights meet Q8_0 activations, Q2_K / Q4_K / IQ2_XXS weights meet Q8_K
// activations, F16 weights meet f32 activations. Integer sums are exact, so the
// result differs from the CPU dot only by the order of the f32 block sums.
//
// Activations live on the device as structure-of-arrays:
//   Q8_0: qs int8[n], d f32[n/32]
//   Q8_K: qs int8[n], d f32[n/256], bsums int16[n/16]
//
// Matvec layout: warps walk output rows; a warp copies a whole weight row into
// shared memory with coalesced 16-byte cp.async pieces (double-buffered: the next
// row streams in while the current one is decoded), then decodes blocks from
// shared memory. Rows that are not a multiple of 16 bytes (tiny test models only)
// are staged with byte copies instead. Q8_0 (K = 512·PPL) and IQ2_XXS / Q2_K
// (K = 2048·PPL) rows take register-streaming kernels instead (mv_*_regs below).
// Q8_0, IQ2_XXS and Q2_K weights are in the GPU layout (crates/cuda/src/layout.rs).
//
// One kernel serves three shapes (blockIdx.y = slot s, token t < ntok):
//   weights  = W + e * w_expert_stride,  e = ids ? ids[s] : s   (ids null: e = s)
//   act row  = (s / x_group) * ntok + t
//   out row  = s * ntok + t   -> y[out_row * rows + r]
// dense decode: 1 slot, ntok 1; batched: 1 slot, ntok n; routed experts: slots =
// 6 per token with ids on the device; grouped projection (attn_output_a): slots =
// groups, ids null, x_group 1.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef unsigned long long u64;

#include "pdl.cuh"
#include "act_quad.cuh"
#include "f16_dot.cuh"

#define MV_WARPS 4
#define MAX_TOK 16

// Several weight matrices applied to the same input in one launch (e.g. q_a and kv of
// the normed layer input): rows are numbered across the segments, segment s covering
// rows [start[s], start[s+1]) of matrix w[s], written to y[s] (rows ldy[s] apart).
// A plain product is one segment. Layout shared with kernels.rs (`MvSegs`).
#define MV_MAX_SEGS 6
struct MvSegs {
    u64 w[MV_MAX_SEGS];
    u64 y[MV_MAX_SEGS];
    int start[MV_MAX_SEGS + 1];
    int ldy[MV_MAX_SEGS];
    int n;
};

__device__ __forceinline__ int mv_seg(const MvSegs& sg, int r) {
    int s = 0;
#pragma unroll
    for (int i = 1; i < MV_MAX_SEGS; i++) s += (i < sg.n && r >= sg.start[i]);
    return s;
}

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// The integer dot product of 16 Q8_0 weight codes with 16 activation codes.
__device__ __forceinline__ int dp4a_16(uint4 w, int4 x) {
    int sum = dp4a((int)w.x, x.x, 0);
    sum = dp4a((int)w.y, x.y, sum);
    sum = dp4a((int)w.z, x.z, sum);
    return dp4a((int)w.w, x.w, sum);
}

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---------------------------------------------------------------------------
// Activation quantisation (bit-identical to ds4-quant's quantize_act_*).
// ---------------------------------------------------------------------------

// One warp per 32-block, lane = element: d = amax/127, q = rint(x/d) (ties to even).
__device__ __forceinline__ void q8_0_block(float v, int blk, int lane, i8* __restrict__ qs,
                                           float* __restrict__ d) {
    float a = fabsf(v);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    const float dd = a / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    int q = __float2int_rn(v * id);
    q = max(-127, min(127, q));
    qs[blk * 32 + lane] = (i8)q;
    if (lane == 0) d[blk] = dd;
}

// One warp per 256-block; lane owns elements 8·lane .. 8·lane+7 (v).
// max = the signed element of largest |x| (first one on ties), iscale = -127/max.
__device__ __forceinline__ void q8_k_block(const float v[8], int blk, int lane,
                                           i8* __restrict__ qs, float* __restrict__ d,
                                           i16* __restrict__ bsums) {
    float amax = 0.0f, mx = 0.0f;
    int idx = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        if (fabsf(v[j]) > amax) { amax = fabsf(v[j]); mx = v[j]; idx = lane * 8 + j; }
    }
    warp_abs_max_first(amax, mx, idx);
    int s = 0;
    char4 q0, q1;
    if (amax == 0.0f) {
        q0 = make_char4(0, 0, 0, 0);
        q1 = q0;
    } else {
        const float iscale = -127.0f / mx;
        int q[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            q[j] = max(-127, min(127, __float2int_rn(iscale * v[j])));
            s += q[j];
        }
        q0 = make_char4(q[0], q[1], q[2], q[3]);
        q1 = make_char4(q[4], q[5], q[6], q[7]);
    }
    char4* qp = (char4*)(qs + blk * 256 + lane * 8);
    qp[0] = q0;
    qp[1] = q1;
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if ((lane & 1) == 0) bsums[blk * 16 + lane / 2] = (i16)s;
    if (lane == 0) d[blk] = amax == 0.0f ? 0.0f : 1.0f / (-127.0f / mx);
}

extern "C" __global__ void quant_act_q8_0(const float* __restrict__ x, int n,
                                          i8* __restrict__ qs, float* __restrict__ d) { PDL_START();
    const int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (blk >= n / 32) return;
    q8_0_block(x[blk * 32 + lane], blk, lane, qs, d);
}

extern "C" __global__ void quant_act_q8_k(const float* __restrict__ x, int n,
                                          i8* __restrict__ qs, float* __restrict__ d,
                                          i16* __restrict__ bsums) { PDL_START();
    const int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (blk >= n / 256) return;
    const float4* xp = (const float4*)(x + blk * 256 + lane * 8);
    const float4 v0 = xp[0], v1 = xp[1];
    const float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
    q8_k_block(v, blk, lane, qs, d, bsums);
}

// RMSNorm of one row of k (k / 4 threads, 4 consecutive elements each; w optional) in
// place, as ops.cu's rms_norm_seg computes it (sum of squares in f64), and its Q8_0
// quantisation: a 32-block is 8 threads, reduced with shuffles inside the warp.
extern "C" __global__ void __launch_bounds__(1024)
    norm_quant_q8_0(float* __restrict__ x, const float* __restrict__ w, int k, float eps,
                    i8* __restrict__ qs, float* __restrict__ d) {
    PDL_TRIGGER();
    __shared__ double red[32];
    float* p = x + (long long)blockIdx.x * k;
    const int j0 = 4 * threadIdx.x;
    // The norm weights load before the wait (on the chain they were an HBM round trip
    // after the sum of squares).
    const float4 wv = w ? ld_const_f32x4(w + j0) : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
    PDL_WAIT();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float4 v = *(const float4*)(p + j0);
    double ss = (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    double tot = 0.0;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) tot += red[i];
    const float r = (float)(1.0 / sqrt(tot / (double)k + (double)eps));
    float o[4] = {__fmul_rn(v.x, r), __fmul_rn(v.y, r), __fmul_rn(v.z, r), __fmul_rn(v.w, r)};
    if (w) {
        o[0] = __fmul_rn(wv.x, o[0]);
        o[1] = __fmul_rn(wv.y, o[1]);
        o[2] = __fmul_rn(wv.z, o[2]);
        o[3] = __fmul_rn(wv.w, o[3]);
    }
    *(float4*)(p + j0) = make_float4(o[0], o[1], o[2], o[3]);
    // k is a multiple of 128: every warp is whole, and e0 % 32 == 0 exactly for threads 8m.
    q8_0_quad(o, (long long)blockIdx.x * k + j0, qs, d);
}

#include "swiglu.cuh"
#include "hc_split.cuh"

// SwiGLU of `rows` rows of ff (gate g, up u; row weight wts[row] or 1) quantized
// straight to the down projection's input (the f32 product is never stored):
// Q8_K (q8k = 1, one warp per 256-block) or Q8_0 (one warp per 32-block).
// late_release: the next launch is released only after this grid's wait (all earlier
// kernels complete), so a routed product placed next may read its expert ids before
// its own wait (mv2f's RouteArgs::ids_early) and load its first weights under this one.
extern "C" __global__ void swiglu_quant(const float* __restrict__ g, const float* __restrict__ u,
                                        int ff, int rows, const float* __restrict__ wts,
                                        float clamp, int q8k, i8* __restrict__ qs,
                                        float* __restrict__ d, i16* __restrict__ bsums,
                                        int late_release, HcSplitJob split) {
    if (late_release) {
        PDL_WAIT();
        PDL_TRIGGER();
    } else {
        PDL_START();
    }
    // A deferred HC split carried by one extra block (the last), off the main chain
    // when this SwiGLU is on a side branch.
    if (split.part && blockIdx.x == gridDim.x - 1) {
        if (threadIdx.x < 32) hc_split_warp(split);
        return;
    }
    const int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int bw = q8k ? 256 : 32;
    if (blk >= rows * ff / bw) return;
    const long long e0 = (long long)blk * bw;
    const float wt = wts ? wts[e0 / ff] : 1.0f;
    if (q8k) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const long long idx = e0 + lane * 8 + j;
            v[j] = swiglu1(g[idx], u[idx], wt, clamp);
        }
        q8_k_block(v, blk, lane, qs, d, bsums);
    } else {
        const long long idx = e0 + lane;
        q8_0_block(swiglu1(g[idx], u[idx], wt, clamp), blk, lane, qs, d);
    }
}

// ---------------------------------------------------------------------------
// Per-type block decoders. Each computes one "unit" (a block or sub-block) of
// one row against one token's quantized activation and returns its f32 part.
// ---------------------------------------------------------------------------

struct ActQ {
    const i8* qs;      // this token's codes
    const float* d;    // this token's block scales
    const i16* bsums;  // Q8_K only
};

// (hi:lo) >> sh, low word; sh clamped to 32 (= hi).
__device__ __forceinline__ u32 funnel_r(u32 lo, u32 hi, u32 sh) {
    u32 r;
    asm("shf.r.clamp.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo), "r"(hi), "r"(sh));
    return r;
}

// A unit's share of one token's quantized activation, loaded once and used for every
// row a warp has staged (the rows of a group share the token).
struct ActU {
    int4 x0, x1;  // codes (x1 unused by Q2_K's 16-element units)
    float d;      // block scale
    int bs;       // Q2_K / Q4_K: the unit's bsums
};

__device__ __forceinline__ ActU act_q8_0(const ActQ& a, int u) {
    const int4* xq = (const int4*)(a.qs + u * 32);
    ActU r;
    r.x0 = xq[0];
    r.x1 = xq[1];
    r.d = a.d[u];
    r.bs = 0;
    return r;
}
__device__ __forceinline__ ActU act_q2_k(const ActQ& a, int u) {
    const int blk = u >> 4, k = u & 15;
    ActU r;
    r.x0 = *(const int4*)(a.qs + blk * 256 + 16 * k);
    r.x1 = r.x0;
    r.d = a.d[blk];
    r.bs = a.bsums[blk * 16 + k];
    return r;
}
__device__ __forceinline__ ActU act_q4_k(const ActQ& a, int u) {
    const int blk = u >> 3, k = u & 7;
    const int4* xp = (const int4*)(a.qs + blk * 256 + 32 * k);
    ActU r;
    r.x0 = xp[0];
    r.x1 = xp[1];
    r.d = a.d[blk];
    r.bs = (int)a.bsums[blk * 16 + 2 * k] + (int)a.bsums[blk * 16 + 2 * k + 1];
    return r;
}
__device__ __forceinline__ ActU act_iq2_xxs(const ActQ& a, int u) {
    const int blk = u >> 3, g = u & 7;
    const int4* xp = (const int4*)(a.qs + blk * 256 + 32 * g);
    ActU r;
    r.x0 = xp[0];
    r.x1 = xp[1];
    r.d = a.d[blk];
    r.bs = 0;
    return r;
}

// Q8_0 in the GPU layout (layout.rs): a row holds its K codes, then its K/32 f16
// scales; unit = one 32-element block. Staged rows that are 16-byte multiples give
// 16-byte aligned codes (two vector loads); tiny test rows are only 2-byte aligned.
__device__ __forceinline__ float unit_q8_0(const u8* row, int u, const ActU& a, int K,
                                           bool aligned) {
    const u8* q = row + 32 * u;
    int wv[8];
    if (aligned) {
        const int4 v0 = ((const int4*)q)[0], v1 = ((const int4*)q)[1];
        wv[0] = v0.x; wv[1] = v0.y; wv[2] = v0.z; wv[3] = v0.w;
        wv[4] = v1.x; wv[5] = v1.y; wv[6] = v1.z; wv[7] = v1.w;
    } else {
        const u16* h = (const u16*)q;
#pragma unroll
        for (int j = 0; j < 8; j++) wv[j] = (int)((u32)h[2 * j] | ((u32)h[2 * j + 1] << 16));
    }
    const float dw = h2f(*(const u16*)(row + K + 2 * u));
    const int xv[8] = {a.x0.x, a.x0.y, a.x0.z, a.x0.w, a.x1.x, a.x1.y, a.x1.z, a.x1.w};
    int s = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) s = dp4a(wv[j], xv[j], s);
    return (dw * a.d) * (float)s;
}

// Q2_K in the GPU layout (layout.rs): a row of nb = K/256 blocks holds every block's
// 64 qs bytes, then every block's 16 scale bytes, then every block's (f16 d, f16 dmin);
// unit = 16-element sub-block. All fields are 4-byte aligned in a staged row.
__device__ __forceinline__ float unit_q2_k(const u8* row, int u, const ActU& a, int K) {
    const int blk = u >> 4, k = u & 15, nb = K >> 8;
    const int n = k >> 3, j = (k & 7) >> 1, l0 = (k & 1) * 16;
    const u32* q = (const u32*)(row + 64 * blk + 32 * n + l0);
    const int4 xv = a.x0;
    const int sh = 2 * j;
    int s = 0;
    s = dp4a((int)((q[0] >> sh) & 0x03030303u), xv.x, s);
    s = dp4a((int)((q[1] >> sh) & 0x03030303u), xv.y, s);
    s = dp4a((int)((q[2] >> sh) & 0x03030303u), xv.z, s);
    s = dp4a((int)((q[3] >> sh) & 0x03030303u), xv.w, s);
    const int sc = row[64 * nb + 16 * blk + k];
    const u8* dd = row + 80 * nb + 4 * blk;
    const float xd = a.d;
    const float dall = xd * h2f(*(const u16*)dd);
    const float dmin = xd * h2f(*(const u16*)(dd + 2));
    return dall * (float)((sc & 15) * s) - dmin * (float)((sc >> 4) * a.bs);
}

// Q4_K: 144-byte block {f16 d, f16 dmin, scales[12], qs[128]}; unit = 32-element sub-block.
__device__ __forceinline__ float unit_q4_k(const u8* row, int u, const ActU& a) {
    const int blk = u >> 3, k = u & 7;
    const u8* b = row + blk * 144;
    const u8* sc = b + 4;
    int scale, mn;
    if (k < 4) {
        scale = sc[k] & 63;
        mn = sc[k + 4] & 63;
    } else {
        scale = (sc[k + 4] & 15) | ((sc[k - 4] >> 6) << 4);
        mn = (sc[k + 4] >> 4) | ((sc[k] >> 6) << 4);
    }
    const int c = k >> 1, sh = 4 * (k & 1);
    const uint4* qp = (const uint4*)(b + 16 + 32 * c);
    const uint4 q0 = qp[0], q1 = qp[1];
    const int4 x0 = a.x0, x1 = a.x1;
    int s = 0;
    s = dp4a((int)((q0.x >> sh) & 0x0f0f0f0fu), x0.x, s);
    s = dp4a((int)((q0.y >> sh) & 0x0f0f0f0fu), x0.y, s);
    s = dp4a((int)((q0.z >> sh) & 0x0f0f0f0fu), x0.z, s);
    s = dp4a((int)((q0.w >> sh) & 0x0f0f0f0fu), x0.w, s);
    s = dp4a((int)((q1.x >> sh) & 0x0f0f0f0fu), x1.x, s);
    s = dp4a((int)((q1.y >> sh) & 0x0f0f0f0fu), x1.y, s);
    s = dp4a((int)((q1.z >> sh) & 0x0f0f0f0fu), x1.z, s);
    s = dp4a((int)((q1.w >> sh) & 0x0f0f0f0fu), x1.w, s);
    const int bs = a.bs;
    const float xd = a.d;
    const float dall = xd * h2f(*(const u16*)b);
    const float dmin = xd * h2f(*(const u16*)(b + 2));
    return dall * (float)(scale * s) - dmin * (float)(mn * bs);
}

// IQ2_XXS: 66-byte block {f16 d, u16 qs[32]}; unit = 32-element group.
// Signs: ksigns[i] = i with bit 7 set when popcount(i) is odd (model.md §5). The sign
// masks are computed, not looked up: the grid lookups already make this kernel bound
// by shared-memory bank conflicts (random indices), a second table doubled them.
__device__ __forceinline__ u32 sign_mask4(u32 bits4) {  // 4 sign bits -> 4 byte masks
    return ((bits4 * 0x00204081u) & 0x01010101u) * 0xffu;
}

// A grid byte g (8..43) with mask byte m (0 or 0xff) becomes ±g as (g ^ m) + (m & 1) on
// the whole word: ~g + 1 = 256 - g stays inside its byte, so no carry crosses bytes.
__device__ __forceinline__ int apply_sign4(u32 g, u32 m) { return (int)((g ^ m) + (m & 0x01010101u)); }

// IQ2_XXS in the GPU layout (layout.rs): a row of nb = K/256 blocks holds every
// block's 64 code bytes, then the nb f16 scales; unit = 32-element group (8 code
// bytes). Staged rows are only 2-byte aligned in general (66-byte tiny rows).
__device__ __forceinline__ float unit_iq2_xxs(const u8* row, int u, const ActU& a,
                                              const u64* __restrict__ grid, int K) {
    const int blk = u >> 3, g = u & 7;
    const u16* q = (const u16*)(row + 64 * blk + 8 * g);
    const u32 a0 = (u32)q[0] | ((u32)q[1] << 16);
    const u32 a1 = (u32)q[2] | ((u32)q[3] << 16);
    const int xw[8] = {a.x0.x, a.x0.y, a.x0.z, a.x0.w, a.x1.x, a.x1.y, a.x1.z, a.x1.w};
    int s = 0;
#pragma unroll
    for (int l = 0; l < 4; l++) {
        const u64 gv = grid[(a0 >> (8 * l)) & 255u];
        u32 sg = (a1 >> (7 * l)) & 127u;
        sg |= (__popc(sg) & 1u) << 7;
        s = dp4a(apply_sign4((u32)gv, sign_mask4(sg & 15u)), xw[2 * l], s);
        s = dp4a(apply_sign4((u32)(gv >> 32), sign_mask4(sg >> 4)), xw[2 * l + 1], s);
    }
    const int ls = (int)(a1 >> 28);
    const float dw = h2f(*(const u16*)(row + 64 * (K >> 8) + 2 * blk));
    return 0.125f * (dw * a.d) * (float)(s * (2 * ls + 1));
}

#include "iq2xxs_grid.cuh"
#include "route.cuh"

// ---------------------------------------------------------------------------
// Matvec driver: stage a row in shared memory, then each lane takes units.
// ---------------------------------------------------------------------------

#define TY_Q8_0 0
#define TY_Q2_K 1
#define TY_Q4_K 2
#define TY_IQ2_XXS 3

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned long long sa;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(sa) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((u32)sa), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Each warp walks rows r, r + stride, ... with two shared-memory row buffers:
// the next row streams in (cp.async, 16-byte pieces, no registers) while the
// current one is decoded, so the warp's memory pipe never idles on compute.
template <int TY>
__device__ __forceinline__ void mv_quant(const MvSegs& sg, long long w_expert_stride,
                                         const int* __restrict__ ids, const i8* __restrict__ xq,
                                         const float* __restrict__ xd, const i16* __restrict__ xbs,
                                         int K, int ntok, int x_group, int rpw) {
    extern __shared__ uint4 smem[];
    __shared__ u64 grid_s[TY == TY_IQ2_XXS ? 256 : 1];
    PDL_TRIGGER();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    u64 g0 = 0, g1 = 0;
    if (TY == TY_IQ2_XXS) {  // in flight together with the first row
        g0 = IQ2XXS_GRID[threadIdx.x & 255];
        g1 = IQ2XXS_GRID[(threadIdx.x + 128) & 255];
    }
    const int slot = blockIdx.y;
    // Routed slots learn their expert from the previous kernel: wait first. Dense
    // products start streaming their first rows while the previous kernel finishes.
    if (ids) PDL_WAIT();
    const int e = ids ? ids[slot] : slot;

    int blk_elems, blk_bytes, units_per_blk;
    if (TY == TY_Q8_0) { blk_elems = 32; blk_bytes = 34; units_per_blk = 1; }
    else if (TY == TY_Q2_K) { blk_elems = 256; blk_bytes = 84; units_per_blk = 16; }
    else if (TY == TY_Q4_K) { blk_elems = 256; blk_bytes = 144; units_per_blk = 8; }
    else { blk_elems = 256; blk_bytes = 66; units_per_blk = 8; }
    const int nblk = K / blk_elems;
    const int row_bytes = nblk * blk_bytes;
    // A warp stages and reduces `rpw` consecutive rows at a time (1, 2 or 4; the host
    // picks it so a group is ~4 KB): short rows otherwise pay the per-row overhead
    // (staging loop, reduction, barriers) for a few hundred bytes each.
    const int n16 = (rpw * row_bytes + 15) >> 4;
    // Rows of tiny test models need not be 16-byte multiples: those are staged with
    // plain byte copies (made visible by the __syncwarp before use).
    const bool aligned = (row_bytes & 15) == 0;
    const long long e_off = (long long)e * w_expert_stride;
    const int rows = sg.start[sg.n] / rpw;  // row groups
    auto row_src = [&](int row) {
        const int sgi = mv_seg(sg, row);
        return (const u8*)sg.w[sgi] + e_off + (long long)(row - sg.start[sgi]) * row_bytes;
    };
    const int group_bytes = rpw * row_bytes;
    uint4* bufs = smem + warp * 2 * n16;
    const int rstep = gridDim.x * MV_WARPS;
    int r = blockIdx.x * MV_WARPS + warp;

    if (r < rows) {
        const u8* src = row_src(r * rpw);
        if (aligned) for (int i = lane; i < n16; i += 32) cp_async16(bufs + i, (const uint4*)src + i);
        else for (int i = lane; i < group_bytes; i += 32) ((u8*)bufs)[i] = src[i];
    }
    cp_async_commit();
    if (!ids) PDL_WAIT();
    if (TY == TY_IQ2_XXS) {
        if (threadIdx.x < 128) { grid_s[threadIdx.x] = g0; grid_s[threadIdx.x + 128] = g1; }
        __syncthreads();
    }
    const int nunits = nblk * units_per_blk;
    const int sblk = K / (TY == TY_Q8_0 ? 32 : 256);
    int cur = 0;
    for (; r < rows; r += rstep) {
        const int rn = r + rstep;
        if (rn < rows) {
            const u8* src = row_src(rn * rpw);
            uint4* dst = bufs + (cur ^ 1) * n16;
            if (aligned) for (int i = lane; i < n16; i += 32) cp_async16(dst + i, (const uint4*)src + i);
            else for (int i = lane; i < group_bytes; i += 32) ((u8*)dst)[i] = src[i];
        }
        cp_async_commit();
        cp_async_wait_1();  // this lane's pieces of row r have landed
        __syncwarp();       // ... and every other lane's
        const u8* grp = (const u8*)(bufs + cur * n16);
        const int sgi = mv_seg(sg, r * rpw);
        float* ys = (float*)sg.y[sgi];
        const int ldy = sg.ldy[sgi], ry = r * rpw - sg.start[sgi];
        for (int t = 0; t < ntok; t++) {
            const long long arow = (long long)(slot / x_group) * ntok + t;
            ActQ a;
            a.qs = xq + arow * K;
            a.d = xd + arow * sblk;
            a.bsums = xbs ? xbs + arow * (K / 16) : 0;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int u = lane; u < nunits; u += 32) {
                ActU x;
                if (TY == TY_Q8_0) x = act_q8_0(a, u);
                else if (TY == TY_Q2_K) x = act_q2_k(a, u);
                else if (TY == TY_Q4_K) x = act_q4_k(a, u);
                else x = act_iq2_xxs(a, u);
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    if (q < rpw) {
                        const u8* row = grp + q * row_bytes;
                        if (TY == TY_Q8_0) acc[q] += unit_q8_0(row, u, x, K, aligned);
                        else if (TY == TY_Q2_K) acc[q] += unit_q2_k(row, u, x, K);
                        else if (TY == TY_Q4_K) acc[q] += unit_q4_k(row, u, x);
                        else acc[q] += unit_iq2_xxs(row, u, x, grid_s, K);
                    }
                }
            }
#pragma unroll
            for (int q = 0; q < 4; q++) {
                if (q < rpw) {
                    const float v = warp_sum(acc[q]);
                    if (lane == 0) ys[((long long)slot * ntok + t) * ldy + ry + q] = v;
                }
            }
        }
        __syncwarp();  // all lanes are done with this buffer before it is refilled
        cur ^= 1;
    }
}

#define MV_KERNEL(name, TY)                                                                     \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32)                                 \
        name(MvSegs sg, long long w_expert_stride, const int* __restrict__ ids,                 \
             const i8* __restrict__ xq, const float* __restrict__ xd,                           \
             const i16* __restrict__ xbs, int K, int ntok, int x_group, int rpw) {                           \
        mv_quant<TY>(sg, w_expert_stride, ids, xq, xd, xbs, K, ntok, x_group, rpw);            \
    }

MV_KERNEL(mv_q8_0, TY_Q8_0)
MV_KERNEL(mv_q2_k, TY_Q2_K)
MV_KERNEL(mv_q4_k, TY_Q4_K)
MV_KERNEL(mv_iq2_xxs, TY_IQ2_XXS)

__device__ __forceinline__ void mv_store(const MvSegs& sg, int r, int slot, int ntok, int t,
                                         float v) {
    const int sgi = mv_seg(sg, r);
    float* ys = (float*)sg.y[sgi];
    ys[((long long)slot * ntok + t) * sg.ldy[sgi] + (r - sg.start[sgi])] = v;
}

// Output rows r0 .. r0 + R - 1 of token t in slot `slot`: each lane's partial sums
// added over the warp, lane 0 stores the rows that exist.
template <int R>
__device__ __forceinline__ void mv_store_rows(const MvSegs& sg, const float (&acc)[R], int lane,
                                              int r0, int total, int slot, int ntok, int t) {
#pragma unroll
    for (int q = 0; q < R; q++) {
        const float v = warp_sum(acc[q]);
        if (lane == 0 && r0 + q < total) mv_store(sg, r0 + q, slot, ntok, t, v);
    }
}

// The start of a register-streaming matvec (mv_*_regs): PDL trigger, then (ids given:
// after the wait, as ids come from the previous kernel) the slot's expert offset, and
// the warp's first row r0 of R in block `bx` (blockIdx.x, or the block's index among
// those of its role in a paired grid).
struct MvRegsWarp {
    int lane, slot, total, r0;
    long long e_off;
};

template <int R>
__device__ __forceinline__ MvRegsWarp mv_regs_warp(const MvSegs& sg, long long w_expert_stride,
                                                   const int* __restrict__ ids, int bx) {
    PDL_TRIGGER();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int slot = blockIdx.y;
    if (ids) PDL_WAIT();
    const int e = ids ? ids[slot] : slot;
    const long long e_off = (long long)e * w_expert_stride;
    const int total = sg.start[sg.n];
    const int r0 = (bx * MV_WARPS + warp) * R;
    return MvRegsWarp{lane, slot, total, r0, e_off};
}

// ---------------------------------------------------------------------------
// Q8_0 (GPU layout) straight into registers, for rows of K = 512·PPL elements:
// lane l of a warp loads the 16-byte code pieces l, l + 32, ... of R = NL / PPL
// consecutive rows at once (NL loads in flight per lane, no shared memory), with
// the f16 scale of each piece's block. A block is MV_WARPS warps; the grid covers
// every row once (blockIdx.y = slot, as in mv_quant). A piece is half a block: its
// integer sum is scaled on its own (the CPU sums whole blocks first; the two
// differ by f32 rounding only).
// ---------------------------------------------------------------------------
template <int PPL, int NL>
__device__ __forceinline__ void mv_q8_0_regs(const MvSegs& sg, long long w_expert_stride,
                                             const int* __restrict__ ids,
                                             const i8* __restrict__ xq,
                                             const float* __restrict__ xd, int ntok,
                                             int x_group, int bx) {
    constexpr int R = NL / PPL;
    constexpr int K = 512 * PPL;
    constexpr int ROW_BYTES = K / 32 * 34;
    // Trace marks (DS4_TRACE builds only): placed, wait returned, stored.
    constexpr unsigned long long TB = PPL == 8 ? 16 : 20;
    TRACE_BLOCK(TB);
    const auto [lane, slot, total, r0, e_off] = mv_regs_warp<R>(sg, w_expert_stride, ids, bx);
    uint4 w[R][PPL];
    u16 wd[R][PPL];
#pragma unroll
    for (int q = 0; q < R; q++) {
        const int r = r0 + q;
        if (r < total) {
            const int sgi = mv_seg(sg, r);
            const u8* row = (const u8*)sg.w[sgi] + e_off + (long long)(r - sg.start[sgi]) * ROW_BYTES;
#pragma unroll
            for (int i = 0; i < PPL; i++) w[q][i] = ld_stream16(row + 16 * (lane + 32 * i));
#pragma unroll
            for (int i = 0; i < PPL; i++) wd[q][i] = *(const u16*)(row + K + 2 * ((lane + 32 * i) >> 1));
        } else {
#pragma unroll
            for (int i = 0; i < PPL; i++) { w[q][i] = make_uint4(0, 0, 0, 0); wd[q][i] = 0; }
        }
    }
    if (!ids) PDL_WAIT();  // the weights above stream in while the previous kernel finishes
    TRACE_BLOCK(TB + 1);
    if (r0 >= total) return;
    for (int t = 0; t < ntok; t++) {
        const long long arow = (long long)(slot / x_group) * ntok + t;
        const i8* xa = xq + arow * K;
        const float* xs = xd + arow * (K / 32);
        float acc[R];
#pragma unroll
        for (int q = 0; q < R; q++) acc[q] = 0.0f;
#pragma unroll
        for (int i = 0; i < PPL; i++) {
            const int p = lane + 32 * i;
            const int4 xv = *(const int4*)(xa + 16 * p);
            const float xsc = xs[p >> 1];
#pragma unroll
            for (int q = 0; q < R; q++)
                acc[q] += (h2f(wd[q][i]) * xsc) * (float)dp4a_16(w[q][i], xv);
        }
        mv_store_rows<R>(sg, acc, lane, r0, total, slot, ntok, t);
    }
    TRACE_BLOCK(TB + 3);
}

#define MV_Q8_REGS(PPL, NL)                                                                     \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32) mv_q8_0_p##PPL##_l##NL(         \
        MvSegs sg, long long w_expert_stride, const int* __restrict__ ids,                      \
        const i8* __restrict__ xq, const float* __restrict__ xd, int ntok, int x_group) {       \
        mv_q8_0_regs<PPL, NL>(sg, w_expert_stride, ids, xq, xd, ntok, x_group, blockIdx.x);     \
    }
MV_Q8_REGS(1, 4)
MV_Q8_REGS(1, 8)
MV_Q8_REGS(1, 16)
MV_Q8_REGS(2, 4)
MV_Q8_REGS(2, 8)
MV_Q8_REGS(2, 16)
MV_Q8_REGS(4, 4)
MV_Q8_REGS(4, 8)
MV_Q8_REGS(4, 16)
MV_Q8_REGS(8, 8)
MV_Q8_REGS(8, 16)
MV_Q8_REGS(16, 16)

// ---------------------------------------------------------------------------
// Q8_0 decode products through shared memory filled by TMA bulk copies, for the big
// matrices (mv_q8_0_tma_p{PPL}_r{SR}, K = 512·PPL). One block per multiprocessor
// (most of its shared memory); each warp owns a contiguous run of `rpw` rows of the
// flattened (slot, row) space and streams it through a ring of `nbuf` stages of SR
// rows, one mbarrier per stage. The ring's first fill is requested before the PDL
// wait (weights are never written), so a ring's worth of weights per warp arrives
// while the kernels before this one still run: the register kernels preload only what
// their resident blocks' registers hold, and beside the previous product's blocks that
// is little. A stage is refilled as soon as its rows are done. The arithmetic is
// mv_q8_0_regs's lane for lane (lane l takes pieces l, l + 32, ... of a row, summed in
// that order, then warp_sum): the results are bit-identical to it. Slots are contiguous (stride = rows · row bytes), each with
// its own activation row (x_group 1); one token, no expert ids, one segment; rows and
// rpw are multiples of SR, so a stage never straddles two slots.
// ---------------------------------------------------------------------------
// TMA bulk copies and transaction-counting mbarriers are sm_90 features.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TMA_WARPS 16  // at most; 8 for K = 8192 (its registers)
#define TMA_MAX_BUF 16
#define TMA_HEAD (TMA_WARPS * TMA_MAX_BUF * 8)  // an mbarrier per stage

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// `bytes` from global `src` to shared `dst`, completing on `bar` (which expects them).
__device__ __forceinline__ void tma_load(void* dst, const void* src, u32 bytes, u64* bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
                 "r"(bytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(bar))
        : "memory");
}

__device__ __forceinline__ bool mbar_done(u64* bar, u32 parity) {
    u32 ok;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(ok)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    return ok != 0;
}

// qout / dout (optional): the products' Q8_0 quantisation as well (the input of the
// next product: attn_output_b after attn_output_a), so no quantising launch follows.
// The host keeps rpw <= 32 and a block's rows whole 32-blocks of the flattened output
// (slots contiguous in y); each warp keeps its values in registers (value i in lane
// i), the block meets at a named barrier (the waiting warp has left), and warp j
// quantizes the block's 32-block j as quant_act_q8_0 does (q8_0_block).
// SEGS: several matrices of one input (q_a + kv), one slot; a stage's rows lie in one
// matrix (the host keeps every segment start a multiple of SR).
template <int PPL, int SR, bool SEGS>
__device__ __forceinline__ void mv_q8_0_tma(const MvSegs& sg, int rows, int total, int rpw,
                                            int nbuf, int depth, const i8* __restrict__ xq,
                                            const float* __restrict__ xd, int waiter,
                                            i8* __restrict__ qout, float* __restrict__ dout,
                                            const HcSplitJob& split) {
    constexpr int K = 512 * PPL;
    constexpr int RB = K / 32 * 34;
    extern __shared__ __align__(128) u8 tma_smem[];
    // Set once the PDL wait has returned (waiter: by the block's last warp, which does
    // nothing else): the warps stop pacing their first ring fill then. The pacing keeps
    // the early requests from crowding the small kernels that run before this one; a
    // block placed only when they are done (its SM was busy) would otherwise fill its
    // ring one stage at a time before it starts streaming (traces: ~6 µs).
    __shared__ volatile int dep_done;
    PDL_TRIGGER();
    TRACE_BLOCK(0);
    if (waiter) {
        if (threadIdx.x == 0) dep_done = 0;
        __syncthreads();
    }
    // Up to TMA_WARPS warps a block (fewer leave registers for the attention kernels
    // that share the SM while this product preloads), plus the waiting warp.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x >> 5) - waiter;
    if (warp == nw) {
        PDL_WAIT();
        if (lane == 0) dep_done = 1;
        // A deferred HC split, carried by block 0's waiting warp (the product's blocks
        // stream for several µs after the wait; the split is done well before).
        if (split.part && blockIdx.x == 0) hc_split_warp(split);
        return;
    }
    u64* bars = (u64*)tma_smem + warp * TMA_MAX_BUF;
    u8* ring = tma_smem + TMA_HEAD + (long long)warp * nbuf * SR * RB;
    const int f0 = (blockIdx.x * nw + warp) * rpw;
    const int n = max(0, min(rpw, total - f0));
    const int nst = (n + SR - 1) / SR;
    const u8* w = (const u8*)sg.w[0];
    // The first byte of flattened row r.
    auto wrow = [&](int r) -> const u8* {
        if (SEGS) {
            const int g = mv_seg(sg, r);
            return (const u8*)sg.w[g] + (long long)(r - sg.start[g]) * RB;
        }
        return w + (long long)r * RB;
    };
    if (lane == 0 && nst > 0) {
        for (int b = 0; b < nbuf; b++) mbar_init(bars + b, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        // At most `depth` stages of the warp in flight before the wait (0: no limit):
        // a deep queue of early requests delays the loads of the small kernels that
        // run meanwhile on the critical path (measured: depth 1 is the fastest step).
        for (int s = 0; s < min(nbuf, nst); s++) {
            if (depth > 0 && s >= depth && !(waiter && dep_done))
                while (!mbar_done(bars + s - depth, 0)) {
                    if (waiter && dep_done) break;
                }
            tma_load(ring + (long long)s * SR * RB, wrow(f0 + s * SR),
                     (u32)(min(SR, n - s * SR) * RB), bars + s);
        }
    }
    __syncwarp();
    PDL_WAIT();
    TRACE_BLOCK(1);
    int cur = -1;
    int4 xv[PPL];
    float xs[PPL];
    float mine = 0.0f;  // qout: this warp's value `lane`
    float* y = (float*)sg.y[0];
    const int ldy = sg.ldy[0];
    for (int s = 0; s < nst; s++) {
        const int b = s % nbuf;
        while (!mbar_done(bars + b, (u32)((s / nbuf) & 1))) {
        }
        const u8* st = ring + (long long)b * SR * RB;
        const int m = min(SR, n - s * SR);
        const int fs = f0 + s * SR;
        const int slot = fs / rows;  // the host keeps rows and rpw multiples of SR
        if (slot != cur) {
            cur = slot;
#pragma unroll
            for (int i = 0; i < PPL; i++) {
                const int p = lane + 32 * i;
                xv[i] = *(const int4*)(xq + (long long)slot * K + 16 * p);
                xs[i] = xd[(long long)slot * (K / 32) + (p >> 1)];
            }
        }
        float acc[SR];
#pragma unroll
        for (int q = 0; q < SR; q++) {
            acc[q] = 0.0f;
            if (q < m) {
                const u8* row = st + q * RB;
#pragma unroll
                for (int i = 0; i < PPL; i++) {
                    const int p = lane + 32 * i;
                    const uint4 wv = *(const uint4*)(row + 16 * p);
                    const u16 wd = *(const u16*)(row + K + 2 * (p >> 1));
                    acc[q] += (h2f(wd) * xs[i]) * (float)dp4a_16(wv, xv[i]);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < SR; q++) acc[q] = warp_sum(acc[q]);
        if (lane == 0) {
            if (SEGS) {
                const int g = mv_seg(sg, fs);
#pragma unroll
                for (int q = 0; q < SR; q++)
                    if (q < m) ((float*)sg.y[g])[fs + q - sg.start[g]] = acc[q];
            } else {
#pragma unroll
                for (int q = 0; q < SR; q++)
                    if (q < m) y[(long long)slot * ldy + (fs + q - slot * rows)] = acc[q];
            }
        }
#pragma unroll
        for (int q = 0; q < SR; q++)
            if (lane == s * SR + q) mine = acc[q];
        __syncwarp();
        if (lane == 0 && s + nbuf < nst) {
            // The stage's generic reads are done (syncwarp); order them before the
            // asynchronous proxy writes the next rows over them.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            const int t = s + nbuf;
            tma_load(ring + (long long)b * SR * RB, wrow(f0 + t * SR),
                     (u32)(min(SR, n - t * SR) * RB), bars + b);
        }
        if (s == min(nbuf, nst) - 1 && warp == 0) TRACE_BLOCK(2);
    }
    if (qout) {
        // The warp's values go where its mbarriers were (TMA_MAX_BUF · 8 bytes = 32
        // floats): every copy has completed, so they are invalidated first.
        static_assert(TMA_MAX_BUF * 8 == 32 * sizeof(float), "a warp's values");
        if (lane == 0 && nst > 0)
            for (int b = 0; b < nbuf; b++)
                asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(smem_u32(bars + b)) : "memory");
        __syncwarp();
        float* vals = (float*)tma_smem;
        vals[warp * 32 + lane] = mine;
        asm volatile("bar.sync 1, %0;" ::"r"(nw * 32) : "memory");
        const int fb = blockIdx.x * nw * rpw;  // the block's first row
        for (int j = warp; j < nw * rpw / 32; j += nw) {
            const int v = 32 * j + lane;
            if (fb + 32 * j < total)
                q8_0_block(vals[(v / rpw) * 32 + v % rpw], (fb >> 5) + j, lane, qout, dout);
        }
    }
    TRACE_BLOCK(3);
}

// SEGS (several matrices of one input): rows = total, no quantized copy.
#define MV_Q8_TMA_K(NAME, PPL, SR, SEGS)                                                        \
    extern "C" __global__ void __launch_bounds__(((PPL < 16 ? 16 : 8) + 1) * 32, 1) NAME(        \
        MvSegs sg, int rows, int total, int rpw, int nbuf, int depth,                           \
        const i8* __restrict__ xq, const float* __restrict__ xd, int waiter,                    \
        i8* __restrict__ qout, float* __restrict__ dout, HcSplitJob split) {                    \
        mv_q8_0_tma<PPL, SR, SEGS>(sg, rows, total, rpw, nbuf, depth, xq, xd, waiter, qout,     \
                                   dout, split);                                                \
    }
#define MV_Q8_TMA(PPL, SR) MV_Q8_TMA_K(mv_q8_0_tma_p##PPL##_r##SR, PPL, SR, false)
MV_Q8_TMA(2, 4)
MV_Q8_TMA(4, 2)
MV_Q8_TMA(8, 1)
MV_Q8_TMA(16, 1)
// Several matrices of one input in one launch (q_a + kv).
MV_Q8_TMA_K(mv_q8_0_tma_segs_p8_r1, 8, 1, true)
#endif

// ---------------------------------------------------------------------------
// IQ2_XXS and Q2_K (GPU layout, layout.rs) straight into registers, for rows of
// K = 2048·PPL elements: a row's codes are K/4 bytes = 32·PPL pieces of 16 bytes,
// lane l takes pieces l, l + 32, ... of R consecutive rows, all loads (codes and the
// scales of each piece's block) issued before any is used; no shared memory for the
// weights. A block is MV_WARPS warps; the grid covers every row once (blockIdx.y =
// slot, as in mv_quant). The integer sums are the smem units' (unit_iq2_xxs,
// unit_q2_k); the units of one piece (same block, same scales d, dmin) are summed
// as integers before the one f32 scaling, as the CPU sums a whole block.
// ---------------------------------------------------------------------------

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// dp4a with unsigned bytes in a (Q2_K codes left in place: up to 3 << 6).
__device__ __forceinline__ int dp4a_us(u32 a, int b, int c) {
    int r;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

__device__ __forceinline__ uint2 ld_nc8(const void* p) {
    uint2 v;
    asm("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 ld_nc4(const void* p) {
    u32 v;
    asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ u16 ld_nc2(const void* p) {
    u16 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// One IQ2_XXS group (code words a0: 4 grid indices; a1: 4 x 7 sign bits, 4-bit ls)
// against 32 activation codes: (2ls + 1) · Σ ±grid · x, the integer of unit_iq2_xxs.
// Sign bits to byte masks: (sg & 15) · 0x10204080 puts bit i at bit 8i + 7 (the
// shifted copies do not overlap, so no carries), prmt 0xba98 replicates each byte's
// top bit; likewise (sg & 0x70) · 0x01020408 for bits 4..6, with the parity (the 8th
// sign) or-ed in at bit 31. With m = 0 or -1 per byte, ±g = (g ^ m) - m, and Σ m·x
// is one more dp4a instead of an and + add.
__device__ __forceinline__ int iq2_group(u32 a0, u32 a1, const int4& xa, const int4& xb,
                                         const u64* __restrict__ grid) {
    const int xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    int s = 0, t = 0;
#pragma unroll
    for (int l = 0; l < 4; l++) {
        const u64 gv = grid[(a0 >> (8 * l)) & 255u];
        const u32 sg = (a1 >> (7 * l)) & 127u;
        const u32 mlo = prmt((sg & 15u) * 0x10204080u, 0u, 0xba98u);
        // the 8th sign (parity) goes straight to bit 31, the top of byte 3
        const u32 mhi = prmt(((sg & 0x70u) * 0x01020408u) | ((u32)__popc(sg) << 31), 0u, 0xba98u);
        s = dp4a((int)((u32)gv ^ mlo), xw[2 * l], s);
        t = dp4a((int)mlo, xw[2 * l], t);
        s = dp4a((int)((u32)(gv >> 32) ^ mhi), xw[2 * l + 1], s);
        t = dp4a((int)mhi, xw[2 * l + 1], t);
    }
    return (s - t) * (2 * (int)(a1 >> 28) + 1);
}

// The row of segment-numbered row r (weights of expert e_off), or null past the end.
__device__ __forceinline__ const u8* mv_row(const MvSegs& sg, long long e_off, int r,
                                            int row_bytes) {
    if (r >= sg.start[sg.n]) return 0;
    const int sgi = mv_seg(sg, r);
    return (const u8*)sg.w[sgi] + e_off + (long long)(r - sg.start[sgi]) * row_bytes;
}

// IQ2_XXS: piece p = the 64 code bytes' quarter of block p / 4 = groups 2(p & 3) and
// 2(p & 3) + 1 (words x, y and z, w); the block's f16 d at K/4 + 2·(p / 4).
template <int PPL, int R>
__device__ __forceinline__ void mv_iq2_xxs_regs(const MvSegs& sg, long long w_expert_stride,
                                                const int* __restrict__ ids,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd, int ntok,
                                                int x_group) {
    constexpr int K = 2048 * PPL;
    constexpr int ROW_BYTES = K / 256 * 66;
    __shared__ u64 grid_s[256];
    const auto [lane, slot, total, r0, e_off] = mv_regs_warp<R>(sg, w_expert_stride, ids, blockIdx.x);
    uint4 w[R][PPL];
    u16 wd[R][PPL];
#pragma unroll
    for (int q = 0; q < R; q++) {
        const u8* row = mv_row(sg, e_off, r0 + q, ROW_BYTES);
        if (row) {
#pragma unroll
            for (int i = 0; i < PPL; i++) w[q][i] = ld_stream16(row + 16 * (lane + 32 * i));
#pragma unroll
            for (int i = 0; i < PPL; i++) wd[q][i] = ld_nc2(row + K / 4 + 2 * ((lane + 32 * i) >> 2));
        } else {
#pragma unroll
            for (int i = 0; i < PPL; i++) { w[q][i] = make_uint4(0, 0, 0, 0); wd[q][i] = 0; }
        }
    }
    grid_s[threadIdx.x] = IQ2XXS_GRID[threadIdx.x];
    grid_s[threadIdx.x + 128] = IQ2XXS_GRID[threadIdx.x + 128];
    __syncthreads();
    if (!ids) PDL_WAIT();  // the weights above stream in while the previous kernel finishes
    if (r0 >= total) return;
    for (int t = 0; t < ntok; t++) {
        const long long arow = (long long)(slot / x_group) * ntok + t;
        const i8* xa = xq + arow * K;
        const float* xs = xd + arow * (K / 256);
        float acc[R];
#pragma unroll
        for (int q = 0; q < R; q++) acc[q] = 0.0f;
#pragma unroll
        for (int i = 0; i < PPL; i++) {
            const int p = lane + 32 * i;
            const int4* xp = (const int4*)(xa + 64 * p);
            const int4 x0 = xp[0], x1 = xp[1], x2 = xp[2], x3 = xp[3];
            const float xsc = 0.125f * xs[p >> 2];
#pragma unroll
            for (int q = 0; q < R; q++) {
                const int sum = iq2_group(w[q][i].x, w[q][i].y, x0, x1, grid_s) +
                                iq2_group(w[q][i].z, w[q][i].w, x2, x3, grid_s);
                acc[q] += (h2f(wd[q][i]) * xsc) * (float)sum;
            }
        }
        mv_store_rows<R>(sg, acc, lane, r0, total, slot, ntok, t);
    }
}

// Q2_K: piece p = qs bytes 16m .. 16m + 15 of block b = p / 4 (m = p & 3, n = m / 2,
// h = m & 1); bit pair j of its bytes is sub-block k = 8n + 2j + h, j = 0..3. Its
// scale bytes k are among the 8 at K/4 + 16b + 8n (every other one from h), its
// (d, dmin) at K/4 + K/16 + 4b. Activation: the 16 codes of sub-block k at
// 256b + 16k, bsums[16b + k] among the 8 at 16b + 8n.
template <int PPL, int R>
__device__ __forceinline__ void mv_q2_k_regs(const MvSegs& sg, long long w_expert_stride,
                                             const int* __restrict__ ids,
                                             const i8* __restrict__ xq,
                                             const float* __restrict__ xd,
                                             const i16* __restrict__ xbs, int ntok,
                                             int x_group) {
    constexpr int K = 2048 * PPL;
    constexpr int ROW_BYTES = K / 256 * 84;
    const auto [lane, slot, total, r0, e_off] = mv_regs_warp<R>(sg, w_expert_stride, ids, blockIdx.x);
    uint4 w[R][PPL];
    uint2 wsc[R][PPL];
    u32 wdm[R][PPL];
#pragma unroll
    for (int q = 0; q < R; q++) {
        const u8* row = mv_row(sg, e_off, r0 + q, ROW_BYTES);
        if (row) {
#pragma unroll
            for (int i = 0; i < PPL; i++) w[q][i] = ld_stream16(row + 16 * (lane + 32 * i));
#pragma unroll
            for (int i = 0; i < PPL; i++) {
                const int p = lane + 32 * i;
                wsc[q][i] = ld_nc8(row + K / 4 + 16 * (p >> 2) + 8 * ((p >> 1) & 1));
                wdm[q][i] = ld_nc4(row + K / 4 + K / 16 + 4 * (p >> 2));
            }
        } else {
#pragma unroll
            for (int i = 0; i < PPL; i++) {
                w[q][i] = make_uint4(0, 0, 0, 0);
                wsc[q][i] = make_uint2(0, 0);
                wdm[q][i] = 0;
            }
        }
    }
    if (!ids) PDL_WAIT();  // the weights above stream in while the previous kernel finishes
    if (r0 >= total) return;
    const int h = lane & 1;  // p & 1 for every piece of this lane
    for (int t = 0; t < ntok; t++) {
        const long long arow = (long long)(slot / x_group) * ntok + t;
        const i8* xa = xq + arow * K;
        const float* xs = xd + arow * (K / 256);
        const i16* xb = xbs + arow * (K / 16);
        float acc[R];
#pragma unroll
        for (int q = 0; q < R; q++) acc[q] = 0.0f;
#pragma unroll
        for (int i = 0; i < PPL; i++) {
            const int p = lane + 32 * i;
            const int b = p >> 2, n = (p >> 1) & 1;
            int4 xv[4];
#pragma unroll
            for (int j = 0; j < 4; j++) xv[j] = *(const int4*)(xa + 256 * b + 128 * n + 32 * j + 16 * h);
            const uint4 bsw = *(const uint4*)(xb + 16 * b + 8 * n);
            // bsums of sub-blocks 8n + 2j + h: the low (h = 0) or high half of word j
            const u32 bw[4] = {bsw.x, bsw.y, bsw.z, bsw.w};
            int bs[4];
#pragma unroll
            for (int j = 0; j < 4; j++) bs[j] = h ? (int)bw[j] >> 16 : (int)(short)(bw[j] & 0xffffu);
            const float xsc = xs[b];
#pragma unroll
            for (int q = 0; q < R; q++) {
                const uint4 c = w[q][i];
                // scale bytes 2j + h of the 8: after >> 8h, j = 0, 1 in word x at bytes 0, 2
                const u32 s01 = wsc[q][i].x >> (8 * h), s23 = wsc[q][i].y >> (8 * h);
                int S = 0, M = 0;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const u32 mask = 0x03030303u << (2 * j);
                    int s = dp4a_us(c.x & mask, xv[j].x, 0);
                    s = dp4a_us(c.y & mask, xv[j].y, s);
                    s = dp4a_us(c.z & mask, xv[j].z, s);
                    s = dp4a_us(c.w & mask, xv[j].w, s);
                    s >>= 2 * j;  // exact: every code was 4^j times too large
                    const u32 sc = ((j < 2 ? s01 : s23) >> (16 * (j & 1))) & 0xffu;
                    S += (int)(sc & 15u) * s;
                    M += (int)(sc >> 4) * bs[j];
                }
                const float dall = xsc * h2f((u16)(wdm[q][i] & 0xffffu));
                const float dmin = xsc * h2f((u16)(wdm[q][i] >> 16));
                acc[q] += dall * (float)S - dmin * (float)M;
            }
        }
        mv_store_rows<R>(sg, acc, lane, r0, total, slot, ntok, t);
    }
}

// Register caps (blocks per multiprocessor): left alone, ptxas interleaves the R rows'
// decodes (grid lookups hoisted) and takes up to 255 registers. 2 pieces per lane:
// <= 128 registers; 4: <= 168; 8: <= 255.
#define MV_K_MIN_BLOCKS(PPL, R) ((PPL) * (R) >= 8 ? 2 : (PPL) * (R) >= 4 ? 3 : 4)
#define MV_K_REGS(PPL, R)                                                                       \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_K_MIN_BLOCKS(PPL, R))                \
        mv_iq2_xxs_p##PPL##_r##R(                                                               \
        MvSegs sg, long long w_expert_stride, const int* __restrict__ ids,                      \
        const i8* __restrict__ xq, const float* __restrict__ xd,                                \
        const i16* __restrict__ xbs, int ntok, int x_group) {                                   \
        mv_iq2_xxs_regs<PPL, R>(sg, w_expert_stride, ids, xq, xd, ntok, x_group);               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_K_MIN_BLOCKS(PPL, R))                \
        mv_q2_k_p##PPL##_r##R(                                                                  \
        MvSegs sg, long long w_expert_stride, const int* __restrict__ ids,                      \
        const i8* __restrict__ xq, const float* __restrict__ xd,                                \
        const i16* __restrict__ xbs, int ntok, int x_group) {                                   \
        mv_q2_k_regs<PPL, R>(sg, w_expert_stride, ids, xq, xd, xbs, ntok, x_group);             \
    }
// (PPL, R) with PPL·R <= 8 pieces per lane: kernels.rs `K_REGS_VARIANTS`.
MV_K_REGS(1, 1)
MV_K_REGS(1, 2)
MV_K_REGS(1, 4)
MV_K_REGS(1, 8)
MV_K_REGS(2, 1)
MV_K_REGS(2, 2)
MV_K_REGS(2, 4)
MV_K_REGS(4, 1)
MV_K_REGS(4, 2)

// ---------------------------------------------------------------------------
// IQ2_XXS / Q2_K decode matvec, version 2 (one token, K = 2048·PPL, GPU layout).
// The grid is one wave of resident blocks (the host sizes it); each warp walks rows
// gw, gw + nw, ... of its slot through an NST-deep cp.async ring: lane l copies its
// own pieces (l + 32i, as in mv_*_regs) of the coming rows into its own slots of
// shared memory and reads back only those, so no barrier is needed and NST - 1 rows
// per warp stay in flight while one is decoded. A lane's share of the activation is
// the same for every row: it is loaded into registers once. Integer sums and their
// f32 scaling are mv_*_regs' exactly.
// IQ2_XXS, MATH 0: grid point e is a table word of eight 4-bit level codes (0, 1, 2
// for 8, 25, 43) and sign field s (7 bits) a word with the eight signs of ksigns[s]
// at bit 2 of the same nibbles, so their or selects each signed byte out of
// {8, 25, 43, 0, -8, -25, -43, 0} with one prmt: per 8 weights two shared loads, an
// or, a shift, two prmt and two dp4a. Entry e fills the 32 words 32e .. 32e + 31 and
// lane l reads word l, so random indices never conflict in the banks (48 KB a block).
// MATH 1: mv_iq2_xxs_regs' iq2_group (2 KB grid, signs computed) in this pipeline.
// Rows: with ctr null a warp takes rows gw, gw + nw, ... (static); else each warp
// takes its next row from the slot's counter ctr[2·slot] (atomicAdd), so blocks that
// start late (other kernels still on their multiprocessor) take fewer rows; the last
// warp of a slot to finish (counted in ctr[2·slot + 1]) sets both back to 0 for the
// next launch, which reads them only after PDL_WAIT (this grid complete).
// ---------------------------------------------------------------------------
#define IQ2_TAB_ROWS 384  // 256 grid points, then 128 sign fields

extern __shared__ __align__(16) u8 mv2_smem[];

// cp.async to a shared-window address (`smem_addr`), so the ring's addresses are
// 32-bit adds with immediate offsets.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    size_t sa;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(sa) : "l"(p));
    return (u32)sa;
}
__device__ __forceinline__ void cp_async16s(u32 sa, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async8s(u32 sa, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(sa), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async4s(u32 sa, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(sa), "l"(gmem) : "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait_n() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// The level-code and sign tables (MATH 0) at `tab`, 384 rows of 32 equal words.
// Needs at least 256 threads.
// Grid point g's level codes: a nibble per weight (0, 1, 2 for the levels 8, 25, 43).
__device__ __forceinline__ u32 iq2_level_word(int g) {
    const u64 grid = IQ2XXS_GRID[g];
    u32 v = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const u32 b = (u32)(grid >> (8 * i)) & 255u;
        v |= (b == 0x08u ? 0u : b == 0x19u ? 1u : 2u) << (4 * i);
    }
    return v;
}

// Sign field f (7 bits, the eighth its parity) as bit 2 of each weight's nibble.
__device__ __forceinline__ u32 iq2_sign_word(u32 f) {
    const u32 s = f | ((u32)(__popc(f) & 1) << 7);
    u32 v = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) v |= ((s >> i) & 1u) << (4 * i + 2);
    return v;
}

// Copies word 0 of every 8-word group of tab[0, n) to its other seven (between barriers).
__device__ __forceinline__ void iq2_tables_replicate(uint4* tab, int n) {
    __syncthreads();
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        if ((c & 7) == 0) continue;  // written before
        const u32 v = tab[c & ~7].x;
        tab[c] = make_uint4(v, v, v, v);
    }
    __syncthreads();
}

__device__ __forceinline__ void iq2_tables_fill(uint4* tab) {
    const int t = threadIdx.x;
    if (t < 256) {
        const u32 v = iq2_level_word(t);
        tab[8 * t] = make_uint4(v, v, v, v);
    }
    if (t < 128) {
        const u32 v = iq2_sign_word((u32)t);
        tab[8 * (256 + t)] = make_uint4(v, v, v, v);
    }
    iq2_tables_replicate(tab, IQ2_TAB_ROWS * 8);
}

__device__ __forceinline__ u32 tab_word(const u8* tab, u32 off) { return *(const u32*)(tab + off); }

// The positive levels 8, 25, 43 as bytes 0..2. Read once from memory (volatile) so
// they sit in an ordinary register: prmt takes only its second source as an
// immediate, and a constant would be re-created from a uniform register before every
// prmt.
__device__ const u32 IQ2_LV_POS = 0x002b1908u;
__device__ __forceinline__ u32 iq2_lv_pos() { return *(const volatile u32*)&IQ2_LV_POS; }

// prmt with the negative levels as the immediate second source.
__device__ __forceinline__ u32 iq2_signed4(u32 pos, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, 0x00d5e7f8, %2;" : "=r"(r) : "r"(pos), "r"(sel));
    return r;
}

// One IQ2_XXS group with the tables: the integer of iq2_group / unit_iq2_xxs.
// lane4 = 4·lane, lane4s = lane4 + the sign table's base (256 rows of 128 bytes):
// field offsets are built in place (a row is 128 bytes) and or-ed with them, one
// and-or after the shift.
__device__ __forceinline__ int iq2_group_tab(const u8* tab, u32 a0, u32 a1, const int4& xa,
                                             const int4& xb, u32 lane4, u32 lane4s, u32 pos) {
    const int xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    int s = 0;
#pragma unroll
    for (int l = 0; l < 4; l++) {
        const u32 go = ((l == 0 ? a0 << 7 : a0 >> (8 * l - 7)) & 0x7f80u) | lane4;
        const u32 so = ((l == 0 ? a1 << 7 : a1 >> (7 * l - 7)) & 0x3f80u) | lane4s;
        const u32 sel = tab_word(tab, go) | tab_word(tab, so);
        s = dp4a((int)iq2_signed4(pos, sel), xw[2 * l], s);
        s = dp4a((int)iq2_signed4(pos, sel >> 16), xw[2 * l + 1], s);
    }
    return s * (2 * (int)(a1 >> 28) + 1);
}

// The sign table's offset in the IQ2_XXS tables, read once from memory (volatile) so
// that lane4 + it stays one register: left a constant, ptxas rebuilds the sum (one more
// or per lookup) to save the register.
__device__ const u32 IQ2_SIGN_TAB = 256u * 128u;
__device__ __forceinline__ u32 iq2_sign_tab() { return *(const volatile u32*)&IQ2_SIGN_TAB; }

// Shared memory of a version-2 kernel (kernels.rs `KV2Variant::smem` computes the same).
#define MV2_AUX(TY) ((TY) == TY_IQ2_XXS ? 4 : 16)
#define MV2_TAB(TY, MATH) ((TY) == TY_IQ2_XXS ? ((MATH) == 0 ? IQ2_TAB_ROWS * 128 : 2048) : 0)
#define MV2_STAGE(TY, PPL) ((PPL) * 32 * (16 + MV2_AUX(TY)))

// A version-2 row's layout per lane (piece p = lane + 32i): its 16-byte code pieces
// at 16·lane + 512i; beyond the codes IQ2_XXS the f16 pair holding d of block p / 4 at
// K/4 + 4(p / 8); Q2_K the 8 scale bytes at K/4 + 16(p / 4) + 8((p / 2) & 1) and (d,
// dmin) at K/4 + K/16 + 4(p / 4). Copies this lane's part of `row` into a stage row
// whose codes start at `sa` (this lane's first piece) and aux bytes at `sx` (the row's
// aux area, lane 0).
template <int TY, int PPL>
__device__ __forceinline__ void mv2_copy_row(u32 sa, u32 sx, const u8* row, int lane) {
    constexpr int K = 2048 * PPL;
    constexpr int AUX = MV2_AUX(TY);
    const int aux_off = TY == TY_IQ2_XXS ? K / 4 + 4 * (lane >> 3)
                                         : K / 4 + 16 * (lane >> 2) + 8 * ((lane >> 1) & 1);
    const int dm_off = K / 4 + K / 16 + 4 * (lane >> 2);  // Q2_K
    const u8* ra = row + aux_off;
    sx += AUX * lane;
#pragma unroll
    for (int i = 0; i < PPL; i++) {
        cp_async16s(sa + 512 * i, row + 16 * lane + 512 * i);
        if (TY == TY_IQ2_XXS) {
            cp_async4s(sx + 4 * 32 * i, ra + 16 * i);
        } else {
            cp_async8s(sx + 16 * 32 * i, ra + 128 * i);
            cp_async4s(sx + 16 * 32 * i + 8, row + dm_off + 32 * i);
        }
    }
}

// This lane's share of one token's quantized activation (row `arow`): 64 codes per
// piece (IQ2_XXS: groups 2(p & 3), +1 of block p / 4; Q2_K: the four 16-code runs of
// sub-blocks 8n + 2j + h), the block scale (IQ2_XXS with its 1/8) and, Q2_K, the word
// of bsums of sub-blocks 8n + 0..7 (the kernels pick their halves).
template <int TY, int PPL>
__device__ __forceinline__ void mv2_act_share(const i8* __restrict__ xq, const float* __restrict__ xd,
                                              const i16* __restrict__ xbs, long long arow,
                                              int lane, int4 (&xv)[PPL][4], float (&xsc)[PPL],
                                              uint4 (&bsw)[PPL]) {
    constexpr int K = 2048 * PPL;
    const i8* xa = xq + arow * K;
    const int h = lane & 1;
#pragma unroll
    for (int i = 0; i < PPL; i++) {
        const int p = lane + 32 * i;
        if (TY == TY_IQ2_XXS) {
            const int4* xp = (const int4*)(xa + 64 * p);
#pragma unroll
            for (int j = 0; j < 4; j++) xv[i][j] = xp[j];
            xsc[i] = 0.125f * xd[arow * (K / 256) + (p >> 2)];
            bsw[i] = make_uint4(0, 0, 0, 0);
        } else {
            const int b = p >> 2, n = (p >> 1) & 1;
#pragma unroll
            for (int j = 0; j < 4; j++)
                xv[i][j] = *(const int4*)(xa + 256 * b + 128 * n + 32 * j + 16 * h);
            bsw[i] = *(const uint4*)(xbs + arow * (K / 16) + 16 * b + 8 * n);
            xsc[i] = xd[arow * (K / 256) + b];
        }
    }
}

template <int TY, int PPL, int NST, int MATH, int W>
__device__ __forceinline__ void mv_k_v2(const MvSegs& sg, long long w_expert_stride,
                                        const int* __restrict__ ids, const i8* __restrict__ xq,
                                        const float* __restrict__ xd,
                                        const i16* __restrict__ xbs, int x_group,
                                        unsigned* __restrict__ ctr) {
    constexpr int K = 2048 * PPL;
    constexpr int ROW_BYTES = TY == TY_IQ2_XXS ? K / 256 * 66 : K / 256 * 84;
    constexpr int AUX = MV2_AUX(TY);
    constexpr int STAGE = MV2_STAGE(TY, PPL);
    PDL_TRIGGER();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // The tables come from constant data: built before the wait, under the previous
    // kernel's tail.
    if (TY == TY_IQ2_XXS) {
        if (MATH == 0) {
            iq2_tables_fill((uint4*)mv2_smem);
        } else {
            if (threadIdx.x < 256) ((u64*)mv2_smem)[threadIdx.x] = IQ2XXS_GRID[threadIdx.x];
            __syncthreads();
        }
    }
    const int slot = blockIdx.y;
    if (ids || ctr) PDL_WAIT();
    const int e = ids ? ids[slot] : slot;
    const long long e_off = (long long)e * w_expert_stride;
    const int total = sg.start[sg.n];
    const int gw = blockIdx.x * W + warp, nw = gridDim.x * W;
    u8* ring = mv2_smem + MV2_TAB(TY, MATH) + warp * (NST * STAGE);
    const u32 ring_sa = smem_addr(ring) + 16 * lane;  // this lane's codes in stage 0
    // Copies row r's pieces of this lane into stage st; one commit group either way.
    // Rows come in increasing order, so the segment is found by stepping on.
    int isg = 0;
    auto issue = [&](int r, int st) {
        if (r < total) {
            while (isg + 1 < sg.n && r >= sg.start[isg + 1]) isg++;
            const u8* row =
                (const u8*)sg.w[isg] + e_off + (long long)(r - sg.start[isg]) * ROW_BYTES;
            const u32 sa = ring_sa + st * STAGE;
            mv2_copy_row<TY, PPL>(sa, sa - 16 * lane + PPL * 512, row, lane);
        }
        cp_async_commit();
    };
    // This warp's rows in increasing order: static, or from the slot's counter.
    int next_static = gw;
    auto grab = [&]() -> int {
        if (!ctr) {
            const int r = next_static;
            next_static += nw;
            return r;
        }
        int r = 0;
        if (lane == 0) r = (int)atomicAdd(ctr + 2 * slot, 1u);
        return __shfl_sync(0xffffffffu, r, 0);
    };
    int rq[NST - 1];  // rows in flight, stage order
#pragma unroll
    for (int st = 0; st < NST - 1; st++) {
        rq[st] = grab();
        issue(rq[st], st);
    }
    if (!ids && !ctr) PDL_WAIT();  // the first rows above stream in while the previous kernel finishes
    if (!ctr && gw >= total) {
        cp_async_wait_n<0>();
        return;
    }
    // This lane's activation share.
    const long long arow = slot / x_group;
    const int h = lane & 1;
    int4 xv[PPL][4];
    float xsc[PPL];
    uint4 bsw[PPL];
    mv2_act_share<TY, PPL>(xq, xd, xbs, arow, lane, xv, xsc, bsw);
    int bs[PPL][4];
#pragma unroll
    for (int i = 0; i < PPL; i++) {
        const u32 bw[4] = {bsw[i].x, bsw[i].y, bsw[i].z, bsw[i].w};
#pragma unroll
        for (int j = 0; j < 4; j++) bs[i][j] = h ? (int)bw[j] >> 16 : (int)(short)(bw[j] & 0xffffu);
    }
    const u32 lane4 = 4u * (u32)lane;
    const u32 lane4s = lane4 + 256u * 128u;
    const u32 lv_pos = iq2_lv_pos();
    const u32 dsh = (lane & 4) ? 16u : 0u;  // IQ2_XXS: d of block p / 4 in the pair
    int st = 0, csg = 0;  // stage and segment of row r
    for (;;) {
        const int r = rq[0];
        if (r >= total) break;
        const int ahead = st == 0 ? NST - 1 : st - 1;  // the stage read one row ago
        const int nxt = grab();
#pragma unroll
        for (int q = 0; q < NST - 2; q++) rq[q] = rq[q + 1];
        rq[NST - 2] = nxt;
        issue(nxt, ahead);
        cp_async_wait_n<NST - 1>();
        const u8* s = ring + st * STAGE;
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < PPL; i++) {
            const int p = lane + 32 * i;
            const uint4 c = *(const uint4*)(s + 16 * p);
            const u8* aux = s + PPL * 512 + AUX * p;
            if (TY == TY_IQ2_XXS) {
                const u16 d = (u16)(*(const u32*)aux >> dsh);
                int sum;
                if (MATH == 0) {
                    sum = iq2_group_tab(mv2_smem, c.x, c.y, xv[i][0], xv[i][1], lane4, lane4s, lv_pos) +
                          iq2_group_tab(mv2_smem, c.z, c.w, xv[i][2], xv[i][3], lane4, lane4s, lv_pos);
                } else {
                    const u64* grid = (const u64*)mv2_smem;
                    sum = iq2_group(c.x, c.y, xv[i][0], xv[i][1], grid) +
                          iq2_group(c.z, c.w, xv[i][2], xv[i][3], grid);
                }
                acc += (h2f(d) * xsc[i]) * (float)sum;
            } else {
                const uint2 wsc = *(const uint2*)aux;
                const u32 wdm = *(const u32*)(aux + 8);
                const u32 s01 = wsc.x >> (8 * h), s23 = wsc.y >> (8 * h);
                int S = 0, M = 0;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const u32 mask = 0x03030303u << (2 * j);
                    int t = dp4a_us(c.x & mask, xv[i][j].x, 0);
                    t = dp4a_us(c.y & mask, xv[i][j].y, t);
                    t = dp4a_us(c.z & mask, xv[i][j].z, t);
                    t = dp4a_us(c.w & mask, xv[i][j].w, t);
                    t >>= 2 * j;  // exact: every code was 4^j times too large
                    const u32 sc = ((j < 2 ? s01 : s23) >> (16 * (j & 1))) & 0xffu;
                    S += (int)(sc & 15u) * t;
                    M += (int)(sc >> 4) * bs[i][j];
                }
                const float dall = xsc[i] * h2f((u16)(wdm & 0xffffu));
                const float dmin = xsc[i] * h2f((u16)(wdm >> 16));
                acc += dall * (float)S - dmin * (float)M;
            }
        }
        const float v = warp_sum(acc);
        while (csg + 1 < sg.n && r >= sg.start[csg + 1]) csg++;
        if (lane == 0) ((float*)sg.y[csg])[(long long)slot * sg.ldy[csg] + (r - sg.start[csg])] = v;
        st = st == NST - 1 ? 0 : st + 1;
    }
    cp_async_wait_n<0>();
    if (ctr && lane == 0) {
        __threadfence();  // this warp's last grab before its count
        if (atomicAdd(ctr + 2 * slot + 1, 1u) == gridDim.x * W - 1) {
            ctr[2 * slot] = 0;
            ctr[2 * slot + 1] = 0;
        }
    }
}

// W warps per block (>= 8: the table fill takes 256 threads); 8-warp blocks are
// capped at 128 registers (two resident), larger ones run one per multiprocessor.
#define MV_K_V2(NAME, TY, PPL, NST, MATH, W)                                                   \
    extern "C" __global__ void __launch_bounds__((W) * 32, (W) <= 8 ? 2 : 1) NAME(              \
        MvSegs sg, long long w_expert_stride, const int* __restrict__ ids,                      \
        const i8* __restrict__ xq, const float* __restrict__ xd,                                \
        const i16* __restrict__ xbs, int x_group, unsigned* __restrict__ ctr) {                \
        mv_k_v2<TY, PPL, NST, MATH, W>(sg, w_expert_stride, ids, xq, xd, xbs, x_group, ctr);   \
    }
// Names: mv2_{iq2_xxs,q2_k}_p{PPL}_s{NST}_m{MATH}_w{W}; kernels.rs `K_V2_VARIANTS`.
#define MV_K_V2_IQ2(PPL, NST, MATH, W) \
    MV_K_V2(mv2_iq2_xxs_p##PPL##_s##NST##_m##MATH##_w##W, TY_IQ2_XXS, PPL, NST, MATH, W)
#define MV_K_V2_Q2K(PPL, NST, W) MV_K_V2(mv2_q2_k_p##PPL##_s##NST##_m0_w##W, TY_Q2_K, PPL, NST, 0, W)
MV_K_V2_IQ2(1, 3, 0, 8)
MV_K_V2_IQ2(1, 4, 0, 8)
MV_K_V2_IQ2(1, 6, 0, 8)
MV_K_V2_IQ2(1, 4, 1, 8)
MV_K_V2_IQ2(2, 3, 0, 8)
MV_K_V2_IQ2(2, 4, 0, 8)
MV_K_V2_IQ2(2, 6, 0, 8)
MV_K_V2_IQ2(2, 4, 1, 8)
MV_K_V2_IQ2(2, 4, 0, 16)
MV_K_V2_IQ2(2, 3, 0, 24)
MV_K_V2_Q2K(1, 4, 8)
MV_K_V2_Q2K(1, 8, 8)
MV_K_V2_Q2K(1, 12, 8)
MV_K_V2_Q2K(1, 8, 16)
MV_K_V2_Q2K(1, 4, 32)
MV_K_V2_Q2K(2, 4, 8)
MV_K_V2_Q2K(2, 8, 8)

// ---------------------------------------------------------------------------
// IQ2_XXS / Q2_K decode matvec, version 2 fast (`mv2f`): version 2's ring and
// arithmetic with fewer instructions a row and more independent work a warp.
// - R rows a step: a warp takes rows R·g .. R·g + R - 1 of groups g = gw, gw + nw, ...
//   (static), decodes them interleaved (independent chains) and reduces them together:
//   each butterfly step halves the rows a lane holds (rows_reduce), so R rows cost
//   5 shuffles, not 5·R. The adds pair the lanes as warp_sum does: sums are bit-equal
//   to version 2's.
// - A stage holds R rows laid out as version 2's stage (a lane copies and reads back
//   only its own bytes: no warp barrier, which would also cost the table lookups their
//   uniform base register).
// - Rows find their matrix through cursors that step on only at a segment end (rows
//   come in increasing order), not by a search per row.
// - Q2_K: the four scale bytes of a lane gathered with one prmt; Σ sc·t and Σ m·bsums
//   as two dp2a each (t and the per-lane bsums packed in 16-bit pairs): exact integers.
// - IQ2_XXS tables: MATH 0 version 2's (MATH 0) in static shared memory (constant
//   addresses); MATH 1 the prmt-addressed tables (iq2_group_prmt: one op less per
//   8 weights) in the first 64 KB of dynamic memory. Then W·NST stages of R rows
//   (kernels.rs `KV2Variant::smem`).
// No row counters (the host keeps version 2 for DS4_MV_K_V2_DYN).
// ---------------------------------------------------------------------------
__device__ __forceinline__ int dp2a_lo_su(int a, u32 b, int c) {
    int r;
    asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
__device__ __forceinline__ int dp2a_hi_su(int a, u32 b, int c) {
    int r;
    asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// IQ2_XXS tables of the fast form's MATH 1 (64 KB, dynamic shared memory): row e
// (256 bytes) holds grid point e's level-code word in bytes 0..127 and the sign word of
// field e & 127 in bytes 128..255, each 32 times (lane l reads word l). A row offset
// is then a byte of the codes moved up one byte by a prmt that also brings in the
// lane's word offset: grid index byte l of a0; sign field l is byte l of a1 << l (its
// eighth bit belongs to the next field or the scale: the table ignores it).
// Needs at least 256 threads.
__device__ __forceinline__ void iq2_tables_fill_prmt(uint4* tab) {
    const int t = threadIdx.x;
    if (t < 256) {
        const u32 v = iq2_level_word(t);
        tab[16 * t] = make_uint4(v, v, v, v);
        const u32 w = iq2_sign_word((u32)t & 127u);
        tab[16 * t + 8] = make_uint4(w, w, w, w);
    }
    iq2_tables_replicate(tab, 256 * 16);
}

// One IQ2_XXS group with the MATH 1 tables (the integer of iq2_group_tab).
// lane4 = 4·lane, lane4s = lane4 + 128.
__device__ __forceinline__ int iq2_group_prmt(const u8* tab, u32 a0, u32 a1, const int4& xa,
                                              const int4& xb, u32 lane4, u32 lane4s, u32 pos) {
    const int xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    const u32 af[4] = {a1, a1 << 1, a1 << 2, a1 << 3};
    int s = 0;
#pragma unroll
    for (int l = 0; l < 4; l++) {
        // result bytes: lane word offset, code byte l, 0, 0
        const u32 go = prmt(a0, lane4, 0x5504u | (l << 4));
        const u32 so = prmt(af[l], lane4s, 0x5504u | (l << 4));
        const u32 sel = tab_word(tab, go) | tab_word(tab, so);
        s = dp4a((int)iq2_signed4(pos, sel), xw[2 * l], s);
        s = dp4a((int)iq2_signed4(pos, sel >> 16), xw[2 * l + 1], s);
    }
    return s * (2 * (int)(a1 >> 28) + 1);
}

// Rows of one matrix segment for a warp walking rows upwards: `base` + r·(row bytes,
// or 4 for outputs) is row r's address while r < `end`.
struct MvCursor {
    int seg, end;
    long long base;
};

// The cursor of row r's segment, stepping on from `c` (r never decreases). OUT: output
// rows of slot `slot`, else weight rows of expert offset e_off.
template <bool OUT, int ROW_BYTES>
__device__ __forceinline__ void mv_cursor_step(const MvSegs& sg, MvCursor& c, int r,
                                               long long e_off, int slot) {
    if (r < c.end) return;
    int s = c.seg;
    while (s + 1 < sg.n && r >= sg.start[s + 1]) s++;
    c.seg = s;
    c.end = s + 1 < sg.n ? sg.start[s + 1] : 0x7fffffff;
    if (OUT)
        c.base = (long long)sg.y[s] + 4ll * ((long long)slot * sg.ldy[s] - sg.start[s]);
    else
        c.base = (long long)sg.w[s] + e_off - (long long)sg.start[s] * ROW_BYTES;
}

// v[q] = lane partials of row q (R a power of two <= 32): on return v[0] holds the
// warp sum of row lane / (32 / R) in lanes that are multiples of 32 / R. A step at
// offset o keeps the upper half of the rows in lanes with bit o, the lower in the
// others, and adds the partner's: the same pairs, in the same order, as warp_sum.
template <int R>
__device__ __forceinline__ void rows_reduce(float (&v)[R], int lane) {
    int o = 16;
#pragma unroll
    for (int n = R; n > 1; n >>= 1, o >>= 1) {
        const bool up = (lane & o) != 0;
#pragma unroll
        for (int i = 0; i < n / 2; i++) {
            const float keep = up ? v[i + n / 2] : v[i];
            const float send = up ? v[i] : v[i + n / 2];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
    }
#pragma unroll
    for (; o > 0; o >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
}

// How a routed mv2f product learns its experts (kernels.rs `RouteArgsDev`). logits null:
// from `ids`, read after the PDL wait, or before it with ids_early (the previous
// launch released this one only after its own wait: swiglu_quant's late_release).
// logits set (decode, one token): every block chooses the experts itself from the
// router's logits (moe_route_pick, as moe_route does; no moe_route launch between the
// router and this product), and block (0, 0) writes the ids and routing weights
// (`ids_out`, `wts`) for the kernels after it.
struct RouteArgs {
    const float* logits;
    const float* bias;
    const int* tid2eid;
    const int* tok;
    int* ids_out;
    float* wts;
    int ne, k, norm;
    float wscale;
    int ids_early;
};

template <int TY, int PPL, int R, int NST, int MATH, int W>
__device__ __forceinline__ void mv_k_v2f(const MvSegs& sg, long long w_expert_stride,
                                         const int* __restrict__ ids, const i8* __restrict__ xq,
                                         const float* __restrict__ xd,
                                         const i16* __restrict__ xbs, int x_group,
                                         const RouteArgs& ra) {
    constexpr int K = 2048 * PPL;
    constexpr int ROW_BYTES = TY == TY_IQ2_XXS ? K / 256 * 66 : K / 256 * 84;
    constexpr int AUX = MV2_AUX(TY);
    constexpr int RS = MV2_STAGE(TY, PPL);  // a row in a stage
    constexpr int STAGE = R * RS;
    // The IQ2_XXS tables in static shared memory: their addresses are constants, so a
    // lookup is one LDS [offset + constant] (no base register add).
    // MATH 1: the prmt-addressed tables (iq2_tables_fill_prmt) in the first 64 KB of
    // dynamic shared memory instead.
    __shared__ __align__(16) u8 tab_s[TY == TY_IQ2_XXS && MATH == 0 ? IQ2_TAB_ROWS * 128 : 16];
    constexpr int DYN_TAB = TY == TY_IQ2_XXS && MATH == 1 ? 65536 : 0;
    const u8* tab = DYN_TAB ? mv2_smem : tab_s;
    // Trace marks (DS4_TRACE builds only): placed, experts known, first stage in, done.
    constexpr unsigned long long TB = TY == TY_IQ2_XXS ? 8 : 12;
    TRACE_BLOCK(TB);
    PDL_TRIGGER();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // constant data: under the previous kernel's tail
    if (TY == TY_IQ2_XXS) {
        if (MATH == 0)
            iq2_tables_fill((uint4*)tab_s);
        else
            iq2_tables_fill_prmt((uint4*)mv2_smem);
    }
    const int slot = blockIdx.y;
    // Waits here when the experts depend on the previous kernels, else after the first
    // weight requests below.
    const bool wait_first = ra.logits || (ids && !ra.ids_early);
    int expert = slot;
    if (ra.logits) {
        static_assert(W * 32 >= 256, "one thread an expert");
        __shared__ int s_ids[64];
        __shared__ float s_sc[64];
        const int ex = threadIdx.x;
        const float bex = ra.bias && ex < ra.ne ? ld_const_f32(ra.bias + ex) : 0.0f;
        PDL_WAIT();
        const float l = ex < ra.ne ? ra.logits[ex] : 0.0f;
        moe_route_pick<W * 32>(l, bex, 0, ra.ne, ra.k, ra.tid2eid, ra.tok, s_ids, s_sc);
        expert = s_ids[slot];
        if ((blockIdx.x | blockIdx.y) == 0 && ex < ra.k) {
            ra.ids_out[ex] = s_ids[ex];
            ra.wts[ex] = moe_route_weight(s_sc, ex, ra.k, ra.norm, ra.wscale);
        }
    } else if (ids) {
        if (wait_first) PDL_WAIT();
        // Early: written before the previous launch's wait returned; read past L1.
        expert = ra.ids_early ? __ldcg(ids + slot) : ids[slot];
    }
    TRACE_BLOCK(TB + 1);
    const long long e_off = (long long)expert * w_expert_stride;
    const int total = sg.start[sg.n];
    const int gw = blockIdx.x * W + warp, nw = gridDim.x * W;
    const u32 ring_sa = smem_addr(mv2_smem) + DYN_TAB + warp * (NST * STAGE);
    const u8* ring = mv2_smem + DYN_TAB + warp * (NST * STAGE);
    MvCursor wc{-1, -1, 0};  // weight rows (issue order)
    // Copies row r (at `row`) into row q of stage st.
    auto copy_row = [&](const u8* row, int st, int q) {
        const u32 base = ring_sa + st * STAGE + q * RS;
        mv2_copy_row<TY, PPL>(base + 16 * lane, base + PPL * 512, row, lane);
    };
    // Copies the rows of group g into stage st; one commit group either way. Rows of
    // one matrix (nearly always) are ROW_BYTES apart: one address for the group.
    auto issue = [&](int g, int st) {
        const int r0 = R * g;
        if (r0 < total) {
            mv_cursor_step<false, ROW_BYTES>(sg, wc, r0, e_off, slot);
            if (r0 + R - 1 < wc.end && r0 + R - 1 < total) {
                const u8* row0 = (const u8*)(wc.base + (long long)r0 * ROW_BYTES);
#pragma unroll
                for (int q = 0; q < R; q++) copy_row(row0 + q * ROW_BYTES, st, q);
            } else {
#pragma unroll
                for (int q = 0; q < R; q++) {
                    const int r = r0 + q;
                    if (r < total) {
                        mv_cursor_step<false, ROW_BYTES>(sg, wc, r, e_off, slot);
                        copy_row((const u8*)(wc.base + (long long)r * ROW_BYTES), st, q);
                    }
                }
            }
        }
        cp_async_commit();
    };
    int g_next = gw;
#pragma unroll
    for (int st = 0; st < NST - 1; st++) {
        issue(g_next, st);
        g_next += nw;
    }
    if (!wait_first) PDL_WAIT();  // the first rows above stream in while the previous kernel finishes
    if (R * gw >= total) {
        cp_async_wait_n<0>();
        return;
    }
    // This lane's activation share.
    const long long arow = slot / x_group;
    const int h = lane & 1;
    int4 xv[PPL][4];
    float xsc[PPL];
    uint4 bsw[PPL];
    mv2_act_share<TY, PPL>(xq, xd, xbs, arow, lane, xv, xsc, bsw);
    int bs01[PPL], bs23[PPL];  // Q2_K: bsums of sub-blocks 8n + 2j + h, j = 0, 1 / 2, 3
#pragma unroll
    for (int i = 0; i < PPL; i++) {
        const u32 sel = h ? 0x7632u : 0x5410u;
        bs01[i] = (int)prmt(bsw[i].x, bsw[i].y, sel);
        bs23[i] = (int)prmt(bsw[i].z, bsw[i].w, sel);
    }
    const u32 lane4 = 4u * (u32)lane;
    const u32 lane4s = MATH == 0 ? lane4 + iq2_sign_tab() : lane4 + 128u;
    const u32 lv_pos = iq2_lv_pos();
    const u32 sc_sel = h ? 0x7531u : 0x6420u;  // Q2_K: scale bytes h, 2 + h of two words
    const u32 dsh = (lane & 4) ? 16u : 0u;       // IQ2_XXS: d of block p / 4 in the pair
    constexpr int LSH = R == 1 ? 5 : R == 2 ? 4 : R == 4 ? 3 : 2;  // log2(32 / R)
    static_assert(R == 1 || R == 2 || R == 4 || R == 8, "rows a step");
    const int my_q = lane >> LSH;  // the row this lane stores (lanes 32/R·q)
    const bool storer = (lane & ((1 << LSH) - 1)) == 0;
    MvCursor yc{-1, -1, 0};  // output rows (this lane's row of each group)
    int st = 0;
    for (int g = gw; R * g < total; g += nw) {
        const int ahead = st == 0 ? NST - 1 : st - 1;  // the stage read one step ago
        issue(g_next, ahead);
        g_next += nw;
        cp_async_wait_n<NST - 1>();
        if (g == gw) TRACE_BLOCK(TB + 2);
        const u8* s = ring + st * STAGE;
        float acc[R];
#pragma unroll
        for (int q = 0; q < R; q++) acc[q] = 0.0f;
#pragma unroll
        for (int i = 0; i < PPL; i++) {
            const int p = lane + 32 * i;
#pragma unroll
            for (int q = 0; q < R; q++) {
                const u8* sr = s + q * RS;
                const uint4 c = *(const uint4*)(sr + 16 * p);
                const u8* aux = sr + PPL * 512 + AUX * p;
                if (TY == TY_IQ2_XXS) {
                    const u16 d = (u16)(*(const u32*)aux >> dsh);
                    const int sum =
                        MATH == 0
                            ? iq2_group_tab(tab, c.x, c.y, xv[i][0], xv[i][1], lane4, lane4s, lv_pos) +
                                  iq2_group_tab(tab, c.z, c.w, xv[i][2], xv[i][3], lane4, lane4s, lv_pos)
                            : iq2_group_prmt(tab, c.x, c.y, xv[i][0], xv[i][1], lane4, lane4s, lv_pos) +
                                  iq2_group_prmt(tab, c.z, c.w, xv[i][2], xv[i][3], lane4, lane4s, lv_pos);
                    acc[q] += (h2f(d) * xsc[i]) * (float)sum;
                } else {
                    const uint2 wsc = *(const uint2*)aux;
                    const u32 wdm = *(const u32*)(aux + 8);
                    const u32 sc4 = prmt(wsc.x, wsc.y, sc_sel);  // byte j: sub-block 8n + 2j + h
                    int t[4];
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        const u32 mask = 0x03030303u << (2 * j);
                        int u = dp4a_us(c.x & mask, xv[i][j].x, 0);
                        u = dp4a_us(c.y & mask, xv[i][j].y, u);
                        u = dp4a_us(c.z & mask, xv[i][j].z, u);
                        u = dp4a_us(c.w & mask, xv[i][j].w, u);
                        t[j] = u >> (2 * j);  // exact: every code was 4^j times too large
                    }
                    // |t| <= 16·3·127: the 16-bit halves hold them exactly
                    const u32 lo = sc4 & 0x0f0f0f0fu, hi = (sc4 >> 4) & 0x0f0f0f0fu;
                    int S = dp2a_lo_su((int)prmt((u32)t[0], (u32)t[1], 0x5410u), lo, 0);
                    S = dp2a_hi_su((int)prmt((u32)t[2], (u32)t[3], 0x5410u), lo, S);
                    int M = dp2a_lo_su(bs01[i], hi, 0);
                    M = dp2a_hi_su(bs23[i], hi, M);
                    const float dall = xsc[i] * h2f((u16)(wdm & 0xffffu));
                    const float dmin = xsc[i] * h2f((u16)(wdm >> 16));
                    acc[q] += dall * (float)S - dmin * (float)M;
                }
            }
        }
        rows_reduce<R>(acc, lane);
        const int r = R * g + my_q;
        if (storer && r < total) {
            mv_cursor_step<true, 4>(sg, yc, r, 0, slot);
            asm volatile("st.global.f32 [%0], %1;" ::"l"(yc.base + 4ll * r), "f"(acc[0]) : "memory");
        }
        st = st == NST - 1 ? 0 : st + 1;
    }
    cp_async_wait_n<0>();
    TRACE_BLOCK(TB + 3);
}

// Blocks per multiprocessor asked of ptxas (register cap): two of up to 8 warps; Q2_K
// (small stages) also two of 16 warps (<= 64 registers); else one.
#define MV_K_V2F_MINB(TY, W) ((W) <= 8 || ((TY) == TY_Q2_K && (W) <= 16) ? 2 : 1)
#define MV_K_V2F(NAME, TY, PPL, R, NST, MATH, W)                                                \
    extern "C" __global__ void __launch_bounds__((W) * 32, MV_K_V2F_MINB(TY, W)) NAME(          \
        MvSegs sg, long long w_expert_stride, const int* __restrict__ ids,                      \
        const i8* __restrict__ xq, const float* __restrict__ xd,                                \
        const i16* __restrict__ xbs, int x_group, RouteArgs ra) {                              \
        mv_k_v2f<TY, PPL, R, NST, MATH, W>(sg, w_expert_stride, ids, xq, xd, xbs, x_group, ra); \
    }
// Names: mv2f_{iq2_xxs,q2_k}_p{PPL}_r{R}_s{NST}_m{MATH}_w{W}; kernels.rs `K_V2_VARIANTS`.
// Arguments as version 2's, with RouteArgs in place of the row counters. MATH: IQ2_XXS
// tables, 0 static (48 KB), 1 prmt-addressed (64 KB dynamic).
#define MV_K_V2F_IQ2(PPL, R, NST, MATH, W)                                                     \
    MV_K_V2F(mv2f_iq2_xxs_p##PPL##_r##R##_s##NST##_m##MATH##_w##W, TY_IQ2_XXS, PPL, R, NST, MATH, \
             W)
#define MV_K_V2F_Q2K(PPL, R, NST, W) \
    MV_K_V2F(mv2f_q2_k_p##PPL##_r##R##_s##NST##_m0_w##W, TY_Q2_K, PPL, R, NST, 0, W)
MV_K_V2F_IQ2(1, 2, 3, 0, 8)
MV_K_V2F_IQ2(2, 1, 3, 0, 8)
MV_K_V2F_IQ2(2, 2, 2, 0, 8)
MV_K_V2F_IQ2(2, 2, 3, 0, 8)
MV_K_V2F_IQ2(2, 4, 2, 0, 8)
MV_K_V2F_IQ2(2, 2, 3, 0, 16)
MV_K_V2F_IQ2(2, 2, 3, 0, 20)
MV_K_V2F_IQ2(2, 2, 2, 0, 24)
MV_K_V2F_IQ2(2, 2, 2, 0, 32)
MV_K_V2F_IQ2(1, 2, 2, 1, 8)
MV_K_V2F_IQ2(2, 2, 2, 1, 8)
MV_K_V2F_IQ2(2, 2, 3, 1, 16)
MV_K_V2F_IQ2(2, 2, 2, 1, 24)
MV_K_V2F_IQ2(2, 2, 2, 1, 32)
MV_K_V2F_IQ2(2, 4, 2, 1, 16)
MV_K_V2F_Q2K(1, 1, 4, 8)
MV_K_V2F_Q2K(1, 2, 3, 8)
MV_K_V2F_Q2K(1, 2, 4, 8)
MV_K_V2F_Q2K(1, 4, 2, 8)
MV_K_V2F_Q2K(1, 4, 3, 8)
MV_K_V2F_Q2K(2, 2, 3, 8)
MV_K_V2F_Q2K(1, 1, 4, 16)
MV_K_V2F_Q2K(1, 2, 3, 16)

// acc + Σ of 8 f16 weights (one 16-byte piece) times 8 f32 activations, in order.
__device__ __forceinline__ float fma8_f16(uint4 w, float4 xa, float4 xb, float acc) {
    acc = fmaf(h2f((u16)(w.x & 0xffff)), xa.x, acc);
    acc = fmaf(h2f((u16)(w.x >> 16)), xa.y, acc);
    acc = fmaf(h2f((u16)(w.y & 0xffff)), xa.z, acc);
    acc = fmaf(h2f((u16)(w.y >> 16)), xa.w, acc);
    acc = fmaf(h2f((u16)(w.z & 0xffff)), xb.x, acc);
    acc = fmaf(h2f((u16)(w.z >> 16)), xb.y, acc);
    acc = fmaf(h2f((u16)(w.w & 0xffff)), xb.z, acc);
    acc = fmaf(h2f((u16)(w.w >> 16)), xb.w, acc);
    return acc;
}

// F16 weights x f32 activations: one block of 128 threads per row; each thread
// keeps its 16-byte pieces of the row in registers and reuses them for every
// token. K/8 <= 128 * F16_MAX_CHUNKS (K <= 16384).
#define F16_THREADS 128
#define F16_MAX_CHUNKS 16
extern "C" __global__ void __launch_bounds__(F16_THREADS)
    mv_f16(MvSegs sg, const float* __restrict__ x, int K, int ntok) { PDL_TRIGGER();
    __shared__ float red[F16_THREADS / 32];
    const int r = blockIdx.x;
    if (r >= sg.start[sg.n]) return;
    const int sgi = mv_seg(sg, r);
    float* y = (float*)sg.y[sgi];
    const int ldy = sg.ldy[sgi], ry = r - sg.start[sgi];
    const int n8 = K >> 3;
    const uint4* src = (const uint4*)((const u16*)sg.w[sgi] + (long long)ry * K);
    uint4 w[F16_MAX_CHUNKS];
#pragma unroll
    for (int i = 0; i < F16_MAX_CHUNKS; i++) {
        const int k = i * F16_THREADS + threadIdx.x;
        if (k < n8) w[i] = ld_stream16(src + k);
    }
    PDL_WAIT();  // the weights above stream in while the previous kernel finishes
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int t = 0; t < ntok; t++) {
        const float4* xp = (const float4*)(x + (long long)t * K);
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < F16_MAX_CHUNKS; i++) {
            const int k = i * F16_THREADS + threadIdx.x;
            if (k < n8) {
                acc = fma8_f16(w[i], xp[2 * k], xp[2 * k + 1], acc);
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) red[warp] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < F16_THREADS / 32; i++) s += red[i];
            y[(long long)t * ldy + ry] = s;
        }
        __syncthreads();
    }
}

// F16 with short rows (K <= 2048, e.g. the indexer's q_b, K = 1024): one warp per
// row, 4 rows per block, so a block is not idle on a 2 KB row.
#define F16W_MAX_CHUNKS 8
extern "C" __global__ void __launch_bounds__(128)
    mv_f16_warp(MvSegs sg, const float* __restrict__ x, int K, int ntok) { PDL_TRIGGER();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.x * 4 + warp;
    if (r >= sg.start[sg.n]) return;
    const int sgi = mv_seg(sg, r);
    float* y = (float*)sg.y[sgi];
    const int ldy = sg.ldy[sgi], ry = r - sg.start[sgi];
    const int n8 = K >> 3;
    const uint4* src = (const uint4*)((const u16*)sg.w[sgi] + (long long)ry * K);
    uint4 w[F16W_MAX_CHUNKS];
#pragma unroll
    for (int i = 0; i < F16W_MAX_CHUNKS; i++) {
        const int k = i * 32 + lane;
        if (k < n8) w[i] = ld_stream16(src + k);
    }
    PDL_WAIT();
    for (int t = 0; t < ntok; t++) {
        const float4* xp = (const float4*)(x + (long long)t * K);
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < F16W_MAX_CHUNKS; i++) {
            const int k = i * 32 + lane;
            if (k < n8) {
                acc = fma8_f16(w[i], xp[2 * k], xp[2 * k + 1], acc);
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) y[(long long)t * ldy + ry] = acc;
    }
}

// ---------------------------------------------------------------------------
// F16 (row-major, as uploaded) straight into registers, for rows of K = 256·PPL·S
// elements: a row is 32·PPL·S pieces of 16 bytes (8 weights) split over S warps of a
// block; lane l of part j takes pieces 32·PPL·j + l + 32·i (i < PPL) of R consecutive
// rows, all issued before PDL_WAIT (weights are never written by a kernel). A block is
// MV_WARPS warps = MV_WARPS / S row groups of R rows; the grid covers every row once.
// Activations (f32) are read after the wait; each lane's sum runs over its pieces in
// order (f32 fma, as fma8_f16), then the warp and (S > 1) the row's warps are summed.
// The F16 path has one slot, so output row t of token t.
// ---------------------------------------------------------------------------
// The sums are f16_dot.cuh's f16_rows_dot (fma8_f16 with the f16 -> f32 conversions
// pinned inside the token loop; hoisted out of it they would double the registers the
// weights take), shared with ops.cu's moe_router_route.

template <int PPL, int R, int S>
__device__ __forceinline__ void mv_f16_regs(const MvSegs& sg, const float* __restrict__ x,
                                            int ntok, int bx) {
    constexpr int K = 256 * PPL * S;
    constexpr int GROUPS = MV_WARPS / S;
    static_assert(MV_WARPS % S == 0, "a row's warps share a block");
    PDL_TRIGGER();
    __shared__ float red[MV_WARPS * R];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = warp / S, part = warp % S;
    const int total = sg.start[sg.n];
    const int r0 = (bx * GROUPS + group) * R;
    const int p0 = part * 32 * PPL + lane;  // this lane's first piece of a row
    uint4 w[R][PPL];
#pragma unroll
    for (int q = 0; q < R; q++) {
        const int r = r0 + q;
        if (r < total) {
            const int sgi = mv_seg(sg, r);
            const uint4* row =
                (const uint4*)((const u16*)sg.w[sgi] + (long long)(r - sg.start[sgi]) * K) + p0;
#pragma unroll
            for (int i = 0; i < PPL; i++) w[q][i] = ld_stream16(row + 32 * i);
        } else {
#pragma unroll
            for (int i = 0; i < PPL; i++) w[q][i] = make_uint4(0, 0, 0, 0);
        }
    }
    PDL_WAIT();  // the weights above stream in while the previous kernel finishes
    // Warps of a split row meet at __syncthreads below, so only S == 1 leaves early.
    if (S == 1 && r0 >= total) return;
    for (int t = 0; t < ntok; t++) {
        const float4* xp = (const float4*)(x + (long long)t * K) + 2 * p0;
        float acc[R];
        f16_rows_dot<PPL, R>(w, xp, acc);
#pragma unroll
        for (int q = 0; q < R; q++) {
            const float v = warp_sum(acc[q]);
            if (S == 1) {
                const int r = r0 + q;
                if (lane == 0 && r < total) {
                    const int sgi = mv_seg(sg, r);
                    ((float*)sg.y[sgi])[(long long)t * sg.ldy[sgi] + (r - sg.start[sgi])] = v;
                }
            } else if (lane == 0) {
                red[warp * R + q] = v;
            }
        }
        if (S > 1) {
            __syncthreads();
            const int r = r0 + lane;
            if (part == 0 && lane < R && r < total) {
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < S; j++) s += red[(group * S + j) * R + lane];
                const int sgi = mv_seg(sg, r);
                ((float*)sg.y[sgi])[(long long)t * sg.ldy[sgi] + (r - sg.start[sgi])] = s;
            }
            __syncthreads();
        }
    }
}

// At most 128 registers (4 resident blocks per SM): a grid of up to 4·132 blocks is then
// one wave (Flash's largest F16 products are 512 blocks with 16 pieces per lane).
#define MV_F16_REGS(PPL, R, S)                                                                  \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, 4)                              \
        mv_f16_p##PPL##_r##R##_s##S(MvSegs sg, const float* __restrict__ x, int ntok) {         \
        mv_f16_regs<PPL, R, S>(sg, x, ntok, blockIdx.x);                                        \
    }
// K = 4096 (router, compressors); kernels.rs F16_REGS_VARIANTS lists them in its order
MV_F16_REGS(4, 4, 4)
MV_F16_REGS(8, 2, 2)
MV_F16_REGS(16, 1, 1)
MV_F16_REGS(4, 2, 4)
MV_F16_REGS(8, 1, 2)
MV_F16_REGS(4, 1, 4)
// K = 1024 (indexer q_b)
MV_F16_REGS(2, 8, 2)
MV_F16_REGS(4, 4, 1)
MV_F16_REGS(2, 4, 2)
MV_F16_REGS(4, 2, 1)
MV_F16_REGS(1, 4, 4)
MV_F16_REGS(4, 1, 1)

// ---------------------------------------------------------------------------
// Two decode products of one input row in one grid (`mv_pair_*`): blocks below n_q8
// run the Q8_0 body (mv_q8_0_p{QPPL}_l{QNL} on the row's Q8_0 copy), the rest the F16
// body (mv_f16_p{FPPL}_r{FR}_s{FS} on the f32 row), each on its own block index and
// matrices (segments): the same code, so the same bits, as the two launches, one
// kernel boundary fewer. Both bodies load their weights before their PDL_WAIT. At
// most 128 registers, as the F16 kernels (both bodies fit: ptxas -v).
// ---------------------------------------------------------------------------
#define MV_PAIR(QPPL, QNL, FPPL, FR, FS)                                                        \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, 4)                              \
        mv_pair_q##QPPL##_l##QNL##_f##FPPL##_r##FR##_s##FS(                                     \
            MvSegs q8, const i8* __restrict__ xq, const float* __restrict__ xd, MvSegs f16,     \
            const float* __restrict__ x, int ntok, int n_q8) {                                  \
        if ((int)blockIdx.x < n_q8)                                                             \
            mv_q8_0_regs<QPPL, QNL>(q8, 0, nullptr, xq, xd, ntok, 1, blockIdx.x);               \
        else                                                                                    \
            mv_f16_regs<FPPL, FR, FS>(f16, x, ntok, blockIdx.x - n_q8);                         \
    }
// kernels.rs MV_PAIR_VARIANTS. Flash: q_b Q8_0 [32768 x 1024] with the indexer's q_b
// F16 [8192 x 1024] (CSA layers).
MV_PAIR(2, 16, 2, 8, 2)
// The shared expert's gate + up Q8_0 [4096 x 4096] with the router F16 [256 x 4096].
MV_PAIR(8, 16, 4, 1, 4)

// ---------------------------------------------------------------------------
// Synthetic weights for `ds4 bench --synthetic`: generated on the device. No PDL
// trigger here: matvecs read weights before their PDL_WAIT, so a kernel that writes
// weights must only let its dependents start when it has finished.
// ---------------------------------------------------------------------------

__device__ __forceinline__ u32 hash32(u64 x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (u32)x;
}

// Random bytes everywhere (every code pattern is valid), then each block's f16
// scale fields (byte offsets f0, f1; f1 < 0: none) set to a small positive value.
extern "C" __global__ void synth_blocks(u8* __restrict__ p, long long n_blocks, int blk_bytes,
                                        int f0, int f1, u64 seed) {
    const long long n_words = n_blocks * blk_bytes / 4;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_words;
         i += (long long)gridDim.x * blockDim.x)
        ((u32*)p)[i] = hash32(seed ^ (u64)i * 0x9e3779b97f4a7c15ull);
}

// row_k > 0: rows of row_k elements in the GPU layout (layout.rs), whose scales are
// not inside the blocks: Q8_0 (blk_bytes 34): the f16 d of block j of a row at
// K + 2j; IQ2_XXS (66): at 64·nb + 2j; Q2_K (84): d at 80·nb + 4j, dmin 2 bytes on
// (nb = row_k / 256). Otherwise the fields are at f0, f1 inside each block.
extern "C" __global__ void synth_scales(u8* __restrict__ p, long long n_blocks, int blk_bytes,
                                        int f0, int f1, u64 seed, int row_k) {
    for (long long b = blockIdx.x * (long long)blockDim.x + threadIdx.x; b < n_blocks;
         b += (long long)gridDim.x * blockDim.x) {
        const u32 h = hash32(seed + 0x5bd1e995ull * (u64)b);
        const float s = 1e-3f * (1.0f + (float)(h & 0xffff) / 65536.0f);
        if (row_k > 0) {
            const long long per_row = blk_bytes == 34 ? row_k / 32 : row_k / 256;
            const long long row = b / per_row, j = b - row * per_row;
            u8* r = p + row * per_row * blk_bytes;
            if (blk_bytes == 34) {
                *(u16*)(r + row_k + 2 * j) = f2h(s);
            } else if (blk_bytes == 66) {
                *(u16*)(r + 64 * per_row + 2 * j) = f2h(s);
            } else {
                *(u16*)(r + 80 * per_row + 4 * j) = f2h(s);
                *(u16*)(r + 80 * per_row + 4 * j + 2) = f2h(0.5f * s);
            }
            continue;
        }
        *(u16*)(p + b * blk_bytes + f0) = f2h(s);
        if (f1 >= 0) *(u16*)(p + b * blk_bytes + f1) = f2h(0.5f * s);
    }
}

// F16 tensors and f32 vectors: uniform in [-scale, scale).
extern "C" __global__ void synth_f16(u16* __restrict__ p, long long n, float scale, u64 seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float u = (float)(hash32(seed ^ (u64)i * 0x9e3779b97f4a7c15ull) >> 8) / 16777216.0f;
        p[i] = f2h(scale * (2.0f * u - 1.0f));
    }
}

extern "C" __global__ void synth_f32(float* __restrict__ p, long long n, float scale, u64 seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float u = (float)(hash32(seed ^ (u64)i * 0x9e3779b97f4a7c15ull) >> 8) / 16777216.0f;
        p[i] = scale * (2.0f * u - 1.0f);
    }
}
