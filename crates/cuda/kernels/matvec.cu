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
// are staged with byte copies instead.
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
    PDL_START();
    __shared__ double red[32];
    float* p = x + (long long)blockIdx.x * k;
    const int j0 = 4 * threadIdx.x;
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
        const float4 wv = *(const float4*)(w + j0);
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

// SwiGLU of `rows` rows of ff (gate g, up u; row weight wts[row] or 1) quantized
// straight to the down projection's input (the f32 product is never stored):
// Q8_K (q8k = 1, one warp per 256-block) or Q8_0 (one warp per 32-block).
extern "C" __global__ void swiglu_quant(const float* __restrict__ g, const float* __restrict__ u,
                                        int ff, int rows, const float* __restrict__ wts,
                                        float clamp, int q8k, i8* __restrict__ qs,
                                        float* __restrict__ d, i16* __restrict__ bsums) {
    PDL_START();
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

// Q2_K: 84-byte block {scales[16], qs[64], f16 d, f16 dmin}; unit = 16-element sub-block.
__device__ __forceinline__ float unit_q2_k(const u8* row, int u, const ActU& a) {
    const int blk = u >> 4, k = u & 15;
    const u8* b = row + blk * 84;
    const int n = k >> 3, j = (k & 7) >> 1, l0 = (k & 1) * 16;
    const u32* q = (const u32*)(b + 16 + 32 * n + l0);
    const int4 xv = a.x0;
    const int sh = 2 * j;
    int s = 0;
    s = dp4a((int)((q[0] >> sh) & 0x03030303u), xv.x, s);
    s = dp4a((int)((q[1] >> sh) & 0x03030303u), xv.y, s);
    s = dp4a((int)((q[2] >> sh) & 0x03030303u), xv.z, s);
    s = dp4a((int)((q[3] >> sh) & 0x03030303u), xv.w, s);
    const int sc = b[k];
    const float xd = a.d;
    const float dall = xd * h2f(*(const u16*)(b + 80));
    const float dmin = xd * h2f(*(const u16*)(b + 82));
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

__device__ __forceinline__ float unit_iq2_xxs(const u8* row, int u, const ActU& a,
                                              const u64* __restrict__ grid) {
    const int blk = u >> 3, g = u & 7;
    const u8* b = row + blk * 66;
    const u16* q = (const u16*)(b + 2 + 8 * g);
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
    return 0.125f * (h2f(*(const u16*)b) * a.d) * (float)(s * (2 * ls + 1));
}

#include "iq2xxs_grid.cuh"

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
                        else if (TY == TY_Q2_K) acc[q] += unit_q2_k(row, u, x);
                        else if (TY == TY_Q4_K) acc[q] += unit_q4_k(row, u, x);
                        else acc[q] += unit_iq2_xxs(row, u, x, grid_s);
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
                                             int x_group) {
    constexpr int R = NL / PPL;
    constexpr int K = 512 * PPL;
    constexpr int ROW_BYTES = K / 32 * 34;
    PDL_TRIGGER();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int slot = blockIdx.y;
    if (ids) PDL_WAIT();
    const int e = ids ? ids[slot] : slot;
    const long long e_off = (long long)e * w_expert_stride;
    const int total = sg.start[sg.n];
    const int r0 = (blockIdx.x * MV_WARPS + warp) * R;
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
            for (int q = 0; q < R; q++) {
                int sum = dp4a((int)w[q][i].x, xv.x, 0);
                sum = dp4a((int)w[q][i].y, xv.y, sum);
                sum = dp4a((int)w[q][i].z, xv.z, sum);
                sum = dp4a((int)w[q][i].w, xv.w, sum);
                acc[q] += (h2f(wd[q][i]) * xsc) * (float)sum;
            }
        }
#pragma unroll
        for (int q = 0; q < R; q++) {
            const float v = warp_sum(acc[q]);
            const int r = r0 + q;
            if (lane == 0 && r < total) {
                const int sgi = mv_seg(sg, r);
                float* ys = (float*)sg.y[sgi];
                ys[((long long)slot * ntok + t) * sg.ldy[sgi] + (r - sg.start[sgi])] = v;
            }
        }
    }
}

#define MV_Q8_REGS(PPL, NL)                                                                     \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32) mv_q8_0_p##PPL##_l##NL(         \
        MvSegs sg, long long w_expert_stride, const int* __restrict__ ids,                      \
        const i8* __restrict__ xq, const float* __restrict__ xd, int ntok, int x_group) {       \
        mv_q8_0_regs<PPL, NL>(sg, w_expert_stride, ids, xq, xd, ntok, x_group);                 \
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

// row_k > 0: Q8_0 in the GPU layout with rows of row_k elements (scales after the codes).
extern "C" __global__ void synth_scales(u8* __restrict__ p, long long n_blocks, int blk_bytes,
                                        int f0, int f1, u64 seed, int row_k) {
    for (long long b = blockIdx.x * (long long)blockDim.x + threadIdx.x; b < n_blocks;
         b += (long long)gridDim.x * blockDim.x) {
        const u32 h = hash32(seed + 0x5bd1e995ull * (u64)b);
        const float s = 1e-3f * (1.0f + (float)(h & 0xffff) / 65536.0f);
        if (row_k > 0) {
            const long long per_row = row_k / 32, row = b / per_row;
            *(u16*)(p + row * per_row * blk_bytes + row_k + 2 * (b - row * per_row)) = f2h(s);
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
