// ds4 CUDA kernels: every forward-pass operation other than the weight matvecs
// (matvec.cu): embedding, RMSNorm, hyper-connections, RoPE, the official FP8 /
// Hadamard+FP4 / f16 roundings, compressors, the lightning indexer, attention
// with sinks, the raw KV ring and the MoE routing glue.
//
// Every kernel that depends on the chunk's first position or token ids reads
// them from device memory (`pos_p`, `tok`), never from a kernel argument: a
// decode step captured once in a CUDA graph then replays at any position.
// Numerics mirror the CPU reference (crates/cpu, crates/model/src/numerics.rs)
// operation by operation; sums of squares accumulate in f64 as there.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef unsigned long long u64;

#include "pdl.cuh"
#include "route.cuh"

#define NEG_INF (__int_as_float(0xff800000))

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
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Element j of a float row of type ty (0 f32, 1 f16, 2 bf16).
__device__ __forceinline__ float ld_float(const u8* row, int ty, long long j) {
    if (ty == 0) return ((const float*)row)[j];
    if (ty == 1) return h2f(((const u16*)row)[j]);
    return bf2f(((const u16*)row)[j]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, ≤ 1024). Every thread gets the result.
__device__ double block_sum_d(double v) {
    __shared__ double red_d[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) red_d[warp] = v;
    __syncthreads();
    double s = 0.0;
    for (int i = 0; i < nw; i++) s += red_d[i];
    return s;
}
__device__ float block_sum(float v) {
    __shared__ float red_s[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red_s[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < nw; i++) s += red_s[i];
    return s;
}
__device__ float block_max(float v) {
    __shared__ float red_m[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red_m[warp] = v;
    __syncthreads();
    float s = NEG_INF;
    for (int i = 0; i < nw; i++) s = fmaxf(s, red_m[i]);
    return s;
}

#include "swiglu.cuh"
#include "hc_split.cuh"

#include "act_quad.cuh"
#include "att_merge.cuh"
#include "f16_dot.cuh"



// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

extern "C" __global__ void fill_f32(float* p, long long n, float v) { PDL_START();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        p[i] = v;
}

// Converts a float tensor (ty 0/1/2) to f32.
extern "C" __global__ void to_f32(const u8* src, int ty, long long n, float* dst) { PDL_START();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] = ld_float(src, ty, i);
}

// Copies an f32 matrix block: dst[r*ldd + c] = src[r*lds + c] for r < rows, c < cols.
extern "C" __global__ void copy_rows(const float* src, int lds, float* dst, int ldd, int rows,
                                     int cols) { PDL_START();
    const int r = blockIdx.y;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
        dst[(long long)r * ldd + c] = src[(long long)r * lds + c];
}

// Group-major <-> token-major for the grouped output projection with several tokens:
// gm[(g*n + t)*k + c] <-> tm[t*ld + g*k + c].
extern "C" __global__ void group_permute(const float* src, float* dst, int n, int groups, int k,
                                         int ld, int to_group_major) { PDL_START();
    const int t = blockIdx.y, g = blockIdx.z;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < k; c += gridDim.x * blockDim.x) {
        const long long gm = ((long long)g * n + t) * k + c, tm = (long long)t * ld + g * k + c;
        if (to_group_major) dst[gm] = src[tm];
        else dst[tm] = src[gm];
    }
}

// ---------------------------------------------------------------------------
// Float-weight matrix-vector products (F32 / F16 / BF16) with the routed/grouped
// addressing of matvec.cu: slot s uses matrix ids ? ids[s] : s, activation row
// (s / x_group) * ntok + t, output row s * ntok + t. One warp per output row.
// Used for small / tiny-model float weights; the real model's F16 tensors use
// matvec.cu's register-resident kernels.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(128)
    mv_float(const u8* __restrict__ W, int ty, long long w_slot_stride, const int* __restrict__ ids,
             const float* __restrict__ x, int ldx, int K, int rows, int ntok, int x_group,
             float* __restrict__ y, int ldy) { PDL_START();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.x * 4 + warp;
    if (r >= rows) return;
    const int slot = blockIdx.y;
    const int e = ids ? ids[slot] : slot;
    const int esz = ty == 0 ? 4 : 2;
    const u8* row = W + (long long)e * w_slot_stride + (long long)r * K * esz;
    for (int t = 0; t < ntok; t++) {
        const float* xr = x + ((long long)(slot / x_group) * ntok + t) * ldx;
        float acc = 0.0f;
        for (int k = lane; k < K; k += 32) acc = fmaf(ld_float(row, ty, k), xr[k], acc);
        acc = warp_sum(acc);
        if (lane == 0) y[((long long)slot * ntok + t) * ldy + r] = acc;
    }
}

// ---------------------------------------------------------------------------
// Embedding: out[i][s*e + j] = table[tok[i]][j] for s < hc.
// ---------------------------------------------------------------------------
extern "C" __global__ void embed_rows(const u8* table, int ty, int e, const int* tok, int hc,
                                      float* out, int ld_out) { PDL_START();
    const int i = blockIdx.y;
    const int esz = ty == 0 ? 4 : 2;
    const u8* row = table + (long long)tok[i] * e * esz;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < e; j += gridDim.x * blockDim.x) {
        const float v = ld_float(row, ty, j);
        for (int s = 0; s < hc; s++) out[(long long)i * ld_out + s * e + j] = v;
    }
}

// ---------------------------------------------------------------------------
// RMSNorm of each seg-wide piece of each row (grid: pieces per row, rows).
// ---------------------------------------------------------------------------
extern "C" __global__ void rms_norm_seg(float* x, int ld, const float* w, int seg, float eps) { PDL_START();
    float* p = x + (long long)blockIdx.y * ld + (long long)blockIdx.x * seg;
    double ss = 0.0;
    for (int j = threadIdx.x; j < seg; j += blockDim.x) ss += (double)p[j] * (double)p[j];
    ss = block_sum_d(ss);
    const float r = (float)(1.0 / sqrt(ss / (double)seg + (double)eps));
    for (int j = threadIdx.x; j < seg; j += blockDim.x) {
        const float v = __fmul_rn(p[j], r);
        p[j] = w ? __fmul_rn(w[j], v) : v;
    }
}

// ---------------------------------------------------------------------------
// Hyper-connections (model.md §7). `mixes` = fn · state (un-normalised) from a matvec.
// ---------------------------------------------------------------------------
// ss / n exactly as the division gives it, by a multiplication with inv = 1 / n when
// n is a power of two (n_embd, hc·n_embd): an f64 division is ~100 cycles of a
// latency-bound chain, and inv can be computed before the chain starts.
__device__ __forceinline__ double div_count(double ss, int n, double inv) {
    return (n & (n - 1)) == 0 ? ss * inv : ss / (double)n;
}

__device__ float row_rms_inv(const float* x, int n, float eps) {
    double ss = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) ss += (double)x[j] * (double)x[j];
    ss = block_sum_d(ss);
    return (float)(1.0 / sqrt(ss / (double)n + (double)eps));
}

// Sinkhorn split of model.md §7.1 on one warp: lane a*hc + b owns comb[a][b]
// (hc*hc <= 32). Row and column sums read the elements in the CPU's order.
// HC is the compile-time hc_mult (0: read `hc_rt`): with it known, the row/column
// shuffles of an iteration are independent and issue together.
template <int HC>
__device__ void hc_split_warp_t(const float* m, float r, const float* scale3, const float* base,
                                int hc_rt, int iters, float eps, float* pre_s, float* post,
                                float* comb) {
    const int hc = HC > 0 ? HC : hc_rt;
    const int lane = threadIdx.x & 31;
    const int nn = hc * hc;
    const int a = lane / hc, b = lane % hc;
    const bool own = lane < nn;
    const float s0 = scale3[0], s1 = scale3[1], s2 = scale3[2];
    if (lane < hc) {
        pre_s[lane] = sigmoidf_stable(__fadd_rn(__fmul_rn(s0, __fmul_rn(m[lane], r)), base[lane])) + eps;
        post[lane] = 2.0f * sigmoidf_stable(__fadd_rn(__fmul_rn(s1, __fmul_rn(m[hc + lane], r)), base[hc + lane]));
    }
    const int k = 2 * hc + lane;
    float v = own ? __fadd_rn(__fmul_rn(s2, __fmul_rn(m[k], r)), base[k]) : 0.0f;
    auto row_get = [&](int bb) { return __shfl_sync(0xffffffffu, v, (a * hc + bb) & 31); };
    auto col_get = [&](int aa) { return __shfl_sync(0xffffffffu, v, (aa * hc + b) & 31); };
    float mx = NEG_INF;
#pragma unroll
    for (int bb = 0; bb < (HC > 0 ? HC : 32); bb++)
        if (HC > 0 || bb < hc) mx = fmaxf(mx, row_get(bb));
    v = expf(v - mx);
    float sum = 0.0f;
#pragma unroll
    for (int bb = 0; bb < (HC > 0 ? HC : 32); bb++)
        if (HC > 0 || bb < hc) sum += row_get(bb);
    v = v / sum + eps;
    for (int it = 0; it < (iters > 0 ? iters : 1); it++) {
        if (it > 0) {
            float g[HC > 0 ? HC : 1];
            float rs = 0.0f;
            if (HC > 0) {
#pragma unroll
                for (int bb = 0; bb < (HC > 0 ? HC : 1); bb++) g[bb] = row_get(bb);
#pragma unroll
                for (int bb = 0; bb < (HC > 0 ? HC : 1); bb++) rs += g[bb];
            } else {
                for (int bb = 0; bb < hc; bb++) rs += row_get(bb);
            }
            v /= rs + eps;
        }
        float g[HC > 0 ? HC : 1];
        float cs = 0.0f;
        if (HC > 0) {
#pragma unroll
            for (int aa = 0; aa < (HC > 0 ? HC : 1); aa++) g[aa] = col_get(aa);
#pragma unroll
            for (int aa = 0; aa < (HC > 0 ? HC : 1); aa++) cs += g[aa];
        } else {
            for (int aa = 0; aa < hc; aa++) cs += col_get(aa);
        }
        v /= cs + eps;
    }
    if (own) comb[lane] = v;
}

__device__ void hc_split_warp(const float* m, float r, const float* scale3, const float* base,
                              int hc, int iters, float eps, float* pre_s, float* post,
                              float* comb) {
    if (hc == 4) hc_split_warp_t<4>(m, r, scale3, base, hc, iters, eps, pre_s, post, comb);
    else hc_split_warp_t<0>(m, r, scale3, base, hc, iters, eps, pre_s, post, comb);
}

// HC split + weighted collapse; one block per token.
extern "C" __global__ void hc_pre_finish(const float* state, int ld_state, const float* mixes,
                                         int ld_mix, const float* scale3, const float* base,
                                         int hc, int e, int iters, float hc_eps, float rms_eps,
                                         float* y, int ld_y, float* post, float* comb) { PDL_START();
    __shared__ float pre_s[16];
    const int i = blockIdx.x;
    const float* x = state + (long long)i * ld_state;
    const float r = row_rms_inv(x, hc * e, rms_eps);
    if (hc * hc <= 32) {
        if (threadIdx.x < 32)
            hc_split_warp(mixes + (long long)i * ld_mix, r, scale3, base, hc, iters, hc_eps,
                          pre_s, post + (long long)i * hc, comb + (long long)i * hc * hc);
    } else if (threadIdx.x == 0) {
        const float* m = mixes + (long long)i * ld_mix;
        float* po = post + (long long)i * hc;
        float* c = comb + (long long)i * hc * hc;
        const float s0 = scale3[0], s1 = scale3[1], s2 = scale3[2];
        for (int s = 0; s < hc; s++) {
            pre_s[s] = sigmoidf_stable(__fadd_rn(__fmul_rn(s0, __fmul_rn(m[s], r)), base[s])) + hc_eps;
            po[s] = 2.0f * sigmoidf_stable(__fadd_rn(__fmul_rn(s1, __fmul_rn(m[hc + s], r)), base[hc + s]));
        }
        for (int a = 0; a < hc; a++) {
            float* row = c + a * hc;
            float mx = NEG_INF;
            for (int b = 0; b < hc; b++) {
                const int k = 2 * hc + a * hc + b;
                row[b] = __fadd_rn(__fmul_rn(s2, __fmul_rn(m[k], r)), base[k]);
                mx = fmaxf(mx, row[b]);
            }
            float sum = 0.0f;
            for (int b = 0; b < hc; b++) {
                row[b] = expf(row[b] - mx);
                sum += row[b];
            }
            for (int b = 0; b < hc; b++) row[b] = row[b] / sum + hc_eps;
        }
        for (int it = 0; it < (iters > 0 ? iters : 1); it++) {
            if (it > 0) {
                for (int a = 0; a < hc; a++) {
                    float s = 0.0f;
                    for (int b = 0; b < hc; b++) s += c[a * hc + b];
                    s += hc_eps;
                    for (int b = 0; b < hc; b++) c[a * hc + b] /= s;
                }
            }
            for (int b = 0; b < hc; b++) {
                float s = 0.0f;
                for (int a = 0; a < hc; a++) s += c[a * hc + b];
                s += hc_eps;
                for (int a = 0; a < hc; a++) c[a * hc + b] /= s;
            }
        }
    }
    __syncthreads();
    float* yr = y + (long long)i * ld_y;
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < hc; s++) acc += pre_s[s] * x[s * e + j];
        yr[j] = acc;
    }
}

// Partial HC mixes over K slices, so that a token's 24 dot products (and the sum of
// squares its RMS needs) spread over many blocks instead of one row per block:
//   part[(p·n + t)·(nm + 1) + r] = Σ_{k in slice p} fn[r][k]·state[t][k]  (r < nm)
//   part[(p·n + t)·(nm + 1) + nm] = Σ_{k in slice p} state[t][k]²
// Grid (K / kslice, ⌈n / tt⌉), 256 threads. tt = 8: warp w takes token 8·by + w;
// tt = 1 (few tokens): warp 0 alone. fn slices are staged in shared memory (F16).
#define HCM_ROWS 24
#define HCM_PIECE 512
extern "C" __global__ void __launch_bounds__(256)
    hc_mix_part(const u16* __restrict__ fn, int nm, const float* __restrict__ state,
                int ld_state, int K, int n, int kslice, int tt, float* __restrict__ part) { PDL_START();
    __shared__ __align__(16) u16 wsm[HCM_ROWS * HCM_PIECE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.y * tt + (tt == 1 ? 0 : warp);
    const bool active = t < n && (tt != 1 || warp == 0);
    const int k0 = blockIdx.x * kslice;
    const float* x = state + (long long)(active ? t : 0) * ld_state;
    float acc[HCM_ROWS];
#pragma unroll
    for (int r = 0; r < HCM_ROWS; r++) acc[r] = 0.0f;
    double ss = 0.0;
    for (int p0 = k0; p0 < k0 + kslice; p0 += HCM_PIECE) {
        const int plen = min(HCM_PIECE, k0 + kslice - p0);
        const int c8 = plen >> 3;
        __syncthreads();
        for (int i = threadIdx.x; i < nm * c8; i += blockDim.x) {
            const int r = i / c8, c = i - r * c8;
            *(uint4*)(wsm + r * HCM_PIECE + 8 * c) = *(const uint4*)(fn + (long long)r * K + p0 + 8 * c);
        }
        __syncthreads();
        if (active) {
            for (int k = 4 * lane; k < plen; k += 128) {
                const float4 xv = *(const float4*)(x + p0 + k);
                ss += (double)xv.x * xv.x + (double)xv.y * xv.y + (double)xv.z * xv.z +
                      (double)xv.w * xv.w;
#pragma unroll
                for (int r = 0; r < HCM_ROWS; r++) {
                    if (r < nm) {
                        const uint2 w = *(const uint2*)(wsm + r * HCM_PIECE + k);
                        float a = acc[r];
                        a = fmaf(h2f((u16)(w.x & 0xffff)), xv.x, a);
                        a = fmaf(h2f((u16)(w.x >> 16)), xv.y, a);
                        a = fmaf(h2f((u16)(w.y & 0xffff)), xv.z, a);
                        a = fmaf(h2f((u16)(w.y >> 16)), xv.w, a);
                        acc[r] = a;
                    }
                }
            }
        }
    }
    if (!active) return;
    float* out = part + ((long long)blockIdx.x * n + t) * (nm + 1);
#pragma unroll
    for (int r = 0; r < HCM_ROWS; r++) {
        if (r < nm) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) out[r] = v;
        }
    }
    ss = warp_sum_d(ss);
    if (lane == 0) out[nm] = (float)ss;
}

// Row r of token i's mixes (r = nm: the sum of squares) summed over the `np` partial
// slices of `part` (layout of hc_mix_part) by one warp: every lane has it. All of a
// lane's first four loads are in flight together.
__device__ __forceinline__ float hc_part_row(const float* part, int np, int n, int i, int nm,
                                             int r) {
    const int lane = threadIdx.x & 31;
    float pv[4];
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const int p = lane + 32 * c;
        pv[c] = p < np ? part[((long long)p * n + i) * (nm + 1) + r] : 0.0f;
    }
    float v = (pv[0] + pv[1]) + (pv[2] + pv[3]);
    for (int p = lane + 128; p < np; p += 32) v += part[((long long)p * n + i) * (nm + 1) + r];
    return warp_sum(v);
}

// HC split + weighted collapse from the partial mixes (hc_mix_part, `np` slices), and
// optionally the RMSNorm of the result with `norm_w` (the sublayer's input norm): one
// block per token. Thread t owns the float4 columns 4t + 4·blockDim·c (c < HCF_MAX4) and
// issues all their loads before using any: this kernel is one block, bound by latency.
#define HCF_MAX4 4
template <int HC>
__device__ __forceinline__ void hc_collapse4(const float* x, int e, const float* pre_s,
                                             int hc_rt, int j, float4& out,
                                             const float4* pre_v = 0) {
    const int hc = HC > 0 ? HC : hc_rt;
    float4 v[HC > 0 ? HC : 1];
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (HC > 0) {
#pragma unroll
        for (int s = 0; s < (HC > 0 ? HC : 1); s++)
            v[s] = pre_v ? pre_v[s] : *(const float4*)(x + s * e + j);
#pragma unroll
        for (int s = 0; s < (HC > 0 ? HC : 1); s++) {
            const float p = pre_s[s];
            acc.x += p * v[s].x; acc.y += p * v[s].y; acc.z += p * v[s].z; acc.w += p * v[s].w;
        }
    } else {
        for (int s = 0; s < hc; s++) {
            const float4 w = *(const float4*)(x + s * e + j);
            const float p = pre_s[s];
            acc.x += p * w.x; acc.y += p * w.y; acc.z += p * w.z; acc.w += p * w.w;
        }
    }
    out = acc;
}

// y = norm_w · (yv · scale) (yv unchanged without norm_w), stored at yr and kept in yv,
// then y's optional Q8_0 / Q8_K copies; the HC collapse's last step, shared by
// hc_norm_store_quant and hc_pre_finish_v2. nwv[c] for c < n_pre: this thread's norm
// weights loaded early (the rest are read here). RX: the Q8_K warp maximum by redux.
// `reuse_first`: an earlier call of the block used `qred` before the first Q8_K block.
template <bool RX>
__device__ __forceinline__ void hc_store_quant(float4 (&yv)[HCF_MAX4], float scale,
                                               const float* norm_w,
                                               const float4 (&nwv)[HCF_MAX4], int n_pre, int e,
                                               int i, float* yr, i8* q0_qs, float* q0_d,
                                               i8* qk_qs, float* qk_d, i16* qk_bs,
                                               Q8kRed& qred, bool reuse_first) {
#pragma unroll
    for (int c = 0; c < HCF_MAX4; c++) {
        const int j = 4 * (threadIdx.x + c * blockDim.x);
        if (j < e) {
            float4 o = yv[c];
            if (norm_w) {
                const float4 w = c < n_pre ? nwv[c] : *(const float4*)(norm_w + j);
                o.x = __fmul_rn(w.x, __fmul_rn(o.x, scale));
                o.y = __fmul_rn(w.y, __fmul_rn(o.y, scale));
                o.z = __fmul_rn(w.z, __fmul_rn(o.z, scale));
                o.w = __fmul_rn(w.w, __fmul_rn(o.w, scale));
            }
            *(float4*)(yr + j) = o;
            yv[c] = o;
        }
    }
    if (!q0_qs && !qk_qs) return;
#pragma unroll
    for (int c = 0; c < HCF_MAX4; c++) {
        const int j = 4 * (threadIdx.x + c * blockDim.x);
        if (4 * c * (int)blockDim.x >= e) break;  // uniform over the block
        const float o[4] = {yv[c].x, yv[c].y, yv[c].z, yv[c].w};
        const long long e0 = (long long)i * e + j;
        // e is a multiple of 128: a warp is wholly inside or past the row.
        if (q0_qs && j < e) q8_0_quad(o, e0, q0_qs, q0_d);
        if (qk_qs) q8_k_quad<RX>(o, j < e, e0, qred, qk_qs, qk_d, qk_bs, reuse_first || c > 0);
    }
}

// The end of the HC collapse for one token: the sublayer's input RMSNorm (`norm_w`, 0
// for none; `ss` is this thread's share of Σy², `nw0` its first norm weights, loaded
// early), the store of y and its optional Q8_0 / Q8_K copies. Every thread of the block
// calls it (it synchronises); yv[c] holds y's columns 4·(threadIdx.x + c·blockDim.x).
// LEAN (hc_pre_finish_split): one barrier for the sum of squares (the warps' partials
// summed as a tree, not in warp order) and none before the first Q8_K block.
template <bool LEAN>
__device__ __forceinline__ void hc_norm_store_quant(float4 (&yv)[HCF_MAX4], double ss,
                                                    const float* norm_w, float4 nw0,
                                                    float norm_eps, int e, int i, float* yr,
                                                    i8* q0_qs, float* q0_d, i8* qk_qs,
                                                    float* qk_d, i16* qk_bs, Q8kRed& qred,
                                                    double inv_e = 0.0) {
    float scale = 1.0f;
    if (norm_w) {
        if (LEAN) {
            // Called once per block: red_d has no earlier readers to wait for.
            __shared__ double red_d[32];
            const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
            ss = warp_sum_d(ss);
            if (lane == 0) red_d[threadIdx.x >> 5] = ss;
            __syncthreads();
            ss = warp_sum_d(lane < nw ? red_d[lane] : 0.0);
        } else {
            ss = block_sum_d(ss);
        }
        scale = LEAN ? (float)(1.0 / sqrt(div_count(ss, e, inv_e) + (double)norm_eps))
                     : (float)(1.0 / sqrt(ss / (double)e + (double)norm_eps));
    }
    const float4 nwv[HCF_MAX4] = {nw0, nw0, nw0, nw0};
    hc_store_quant<false>(yv, scale, norm_w, nwv, 1, e, i, yr, q0_qs, q0_d, qk_qs, qk_d, qk_bs,
                          qred, !LEAN);
}

// hc_pre_finish_norm: the split + collapse (+ norm) above. Optionally (pointers
// non-null) the written rows are also quantized for the next
// products: Q8_0 (q0_*; e a multiple of 128) and Q8_K (qk_*; e a multiple of 256,
// blockDim of 64), rows of e values, as quant_act_q8_0 / quant_act_q8_k would.
extern "C" __global__ void __launch_bounds__(1024) hc_pre_finish_norm(
    const float* state, int ld_state, const float* part, int np, int n, const float* scale3,
    const float* base, int hc, int e, int iters, float hc_eps, float rms_eps,
    const float* norm_w, float norm_eps, float* y, int ld_y, float* post, float* comb,
    i8* q0_qs, float* q0_d, i8* qk_qs, float* qk_d, i16* qk_bs) {
    __shared__ float pre_s[16];
    __shared__ Q8kRed qred;
    __shared__ float mix_s[HCM_ROWS + 1];
    __shared__ float scale_s[3], base_s[HCM_ROWS];
    const int i = blockIdx.x;
    const int nm = (2 + hc) * hc;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* x = state + (long long)i * ld_state;
    // Weights (never written by a kernel) load before the wait for the previous kernel,
    // so that no global round trip of theirs is left on the serial path: the split's
    // scale/base go to shared memory (read after the mixes' barrier), the norm weight of
    // the first columns stays in registers.
    PDL_TRIGGER();
    if (threadIdx.x < 32) {
        if (lane < 3) scale_s[lane] = scale3[lane];
        if (lane < nm) base_s[lane] = base[lane];
    }
    float4 nw0 = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
    if (norm_w && 4 * (int)threadIdx.x < e) nw0 = *(const float4*)(norm_w + 4 * threadIdx.x);
    PDL_WAIT();
    // The first columns' state loads do not depend on the split: start them now
    // (hc = 4), so their latency hides behind the mixes' reduction and Sinkhorn.
    float4 x0[4];
    const int j00 = 4 * threadIdx.x;
    if (hc == 4 && j00 < e) {
#pragma unroll
        for (int s = 0; s < 4; s++) x0[s] = *(const float4*)(x + s * e + j00);
    }
    // Row r of the mixes (r = nm: the sum of squares) = Σ over the slices; warp w sums
    // rows w, w + nw, ... (all of a lane's loads in flight together).
    for (int r = warp; r <= nm; r += nw) {
        const float v = hc_part_row(part, np, n, i, nm, r);
        if (lane == 0) mix_s[r] = v;
    }
    __syncthreads();
    const float r_inv = (float)(1.0 / sqrt((double)mix_s[nm] / (double)(hc * e) + (double)rms_eps));
    if (threadIdx.x < 32)
        hc_split_warp(mix_s, r_inv, scale_s, base_s, hc, iters, hc_eps, pre_s,
                      post + (long long)i * hc, comb + (long long)i * hc * hc);
    __syncthreads();
    float4 yv[HCF_MAX4];
    double ss = 0.0;
#pragma unroll
    for (int c = 0; c < HCF_MAX4; c++) {
        const int j = 4 * (threadIdx.x + c * blockDim.x);
        yv[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (j < e) {
            if (hc == 4) hc_collapse4<4>(x, e, pre_s, hc, j, yv[c], c == 0 ? x0 : 0);
            else hc_collapse4<0>(x, e, pre_s, hc, j, yv[c]);
            ss += (double)yv[c].x * yv[c].x + (double)yv[c].y * yv[c].y +
                  (double)yv[c].z * yv[c].z + (double)yv[c].w * yv[c].w;
        }
    }
    hc_norm_store_quant<false>(yv, ss, norm_w, nw0, norm_eps, e, i, y + (long long)i * ld_y, q0_qs, q0_d,
                        qk_qs, qk_d, qk_bs, qred);
}

// hc_pre_finish_norm for hc = 4 (nm = 24) on two blocks per token, grid (2, n), same
// arguments. The collapse needs only the pre mixes and the sum of squares, not the
// Sinkhorn's comb: block 0 sums mix rows 0..3 and the sum of squares, then collapses,
// norms, stores y and its quantized copies; block 1 sums rows 4..24 and runs the split
// (post, comb: 20 serial Sinkhorn iterations on one warp) at the same time, instead of
// before the collapse. Block x has role x + first_role: grid (1, n) with first_role 0
// or 1 runs one of the two (decode puts the split on a side branch, backend.rs).
extern "C" __global__ void __launch_bounds__(1024) hc_pre_finish_split(
    const float* state, int ld_state, const float* part, int np, int n, const float* scale3,
    const float* base, int hc, int e, int iters, float hc_eps, float rms_eps,
    const float* norm_w, float norm_eps, float* y, int ld_y, float* post, float* comb,
    i8* q0_qs, float* q0_d, i8* qk_qs, float* qk_d, i16* qk_bs, int first_role) {
    constexpr int HC = 4, NM = (2 + HC) * HC;
    __shared__ float mix_s[NM + 1];
    const int i = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    PDL_TRIGGER();
    double inv_k = 1.0 / (double)(HC * e), inv_e = 1.0 / (double)e;
    // Pinned here, before the wait (the compiler would sink them to their uses).
    asm volatile("" : "+d"(inv_k), "+d"(inv_e));
    if (blockIdx.x + first_role == 1) {
        __shared__ float scale_s[3], base_s[NM], pre_unused[HC];
        if (warp == 0) {
            if (lane < 3) scale_s[lane] = scale3[lane];
            if (lane < NM) base_s[lane] = base[lane];
        }
        PDL_WAIT();
        // Warp w sums mix rows HC + w, HC + w + nw, ... (the last: the sum of squares).
        for (int r = HC + warp; r <= NM; r += (int)(blockDim.x >> 5)) {
            const float v = hc_part_row(part, np, n, i, NM, r);
            if (lane == 0) mix_s[r] = v;
        }
        __syncthreads();
        if (warp == 0) {
            const float r_inv =
                (float)(1.0 / sqrt(div_count((double)mix_s[NM], HC * e, inv_k) + (double)rms_eps));
            // Rows 0..HC-1 (pre) are not summed here: the split's pre output is unused.
            if (lane < HC) mix_s[lane] = 0.0f;
            __syncwarp();
            hc_split_warp_t<HC>(mix_s, r_inv, scale_s, base_s, HC, iters, hc_eps, pre_unused,
                                post + (long long)i * HC, comb + (long long)i * HC * HC);
        }
        return;
    }
    __shared__ Q8kRed qred;
    const float* x = state + (long long)i * ld_state;
    // Weights before the wait (module comment of pdl.cuh): the pre split's scale and
    // base in registers of every thread, the first norm weights.
    const float s0 = scale3[0];
    float b[HC];
#pragma unroll
    for (int s = 0; s < HC; s++) b[s] = base[s];
    float4 nw0 = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
    if (norm_w && 4 * (int)threadIdx.x < e) nw0 = *(const float4*)(norm_w + 4 * threadIdx.x);
    PDL_WAIT();
    // The state loads of the first columns and the partial mixes go out together.
    float4 x0[HC];
    const int j00 = 4 * threadIdx.x;
    if (j00 < e) {
#pragma unroll
        for (int s = 0; s < HC; s++) x0[s] = *(const float4*)(x + s * e + j00);
    }
    // Warps 0..HC-1 sum the pre rows, warp HC the sum of squares (row NM).
    if (warp <= HC) {
        const int r = warp < HC ? warp : NM;
        const float v = hc_part_row(part, np, n, i, NM, r);
        if (lane == 0) mix_s[r] = v;
    }
    __syncthreads();
    // Every thread computes the pre weights itself (no second barrier), as
    // hc_split_warp_t does.
    const float r_inv =
        (float)(1.0 / sqrt(div_count((double)mix_s[NM], HC * e, inv_k) + (double)rms_eps));
    float pre[HC];
#pragma unroll
    for (int s = 0; s < HC; s++)
        pre[s] = sigmoidf_stable(__fadd_rn(__fmul_rn(s0, __fmul_rn(mix_s[s], r_inv)), b[s])) +
                 hc_eps;
    float4 yv[HCF_MAX4];
    double ss = 0.0;
#pragma unroll
    for (int c = 0; c < HCF_MAX4; c++) {
        const int j = 4 * (threadIdx.x + c * blockDim.x);
        yv[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (j < e) {
            hc_collapse4<HC>(x, e, pre, HC, j, yv[c], c == 0 ? x0 : 0);
            ss += (double)yv[c].x * yv[c].x + (double)yv[c].y * yv[c].y +
                  (double)yv[c].z * yv[c].z + (double)yv[c].w * yv[c].w;
        }
    }
    hc_norm_store_quant<true>(yv, ss, norm_w, nw0, norm_eps, e, i, y + (long long)i * ld_y, q0_qs,
                              q0_d, qk_qs, qk_d, qk_bs, qred, inv_e);
}

// HC merge: X'[d] = post_d·o + Σ_a comb[a][d]·X[a]. Grid (⌈e/256⌉, n). With hc = 4
// known at compile time the four old values stay in registers and load together.
template <int HC>
__device__ __forceinline__ void hc_post_t(const float* sub, int ld_sub, const float* post,
                                          const float* comb, int hc_rt, int e, float* state,
                                          int ld_state) {
    const int hc = HC > 0 ? HC : hc_rt;
    const int i = blockIdx.y;
    const float* p = post + (long long)i * hc;
    const float* c = comb + (long long)i * hc * hc;
    float* xr = state + (long long)i * ld_state;
    float old[HC > 0 ? HC : 16];
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < e; j += gridDim.x * blockDim.x) {
        const float o = sub[(long long)i * ld_sub + j];
#pragma unroll
        for (int a = 0; a < (HC > 0 ? HC : 16); a++)
            if (HC > 0 || a < hc) old[a] = xr[a * e + j];
#pragma unroll
        for (int d = 0; d < (HC > 0 ? HC : 16); d++) {
            if (HC > 0 || d < hc) {
                float acc = p[d] * o;
#pragma unroll
                for (int a = 0; a < (HC > 0 ? HC : 16); a++)
                    if (HC > 0 || a < hc) acc += c[a * hc + d] * old[a];
                xr[d * e + j] = acc;
            }
        }
    }
}

extern "C" __global__ void hc_post(const float* sub, int ld_sub, const float* post,
                                   const float* comb, int hc, int e, float* state, int ld_state) { PDL_START();
    if (hc == 4) hc_post_t<4>(sub, ld_sub, post, comb, hc, e, state, ld_state);
    else hc_post_t<0>(sub, ld_sub, post, comb, hc, e, state, ld_state);
}

// HC merge (hc = 4) fused with the next sublayer's partial mixes, for a few tokens:
// block b owns columns 64b..64b+63 of every stream. Its 256 threads form 4 groups of 64
// (one column each); every group merges its column (group 0 writes X') and sums the
// dot products of rows g, g+4, ... of the next HC fn over the block's columns, plus
// Σ X'^2 (group 0), into part[(b·n + t)·(nm + 1) + r] (the layout of hc_mix_part,
// np = gridDim.x slices). Grid (⌈e/64⌉, n).
// With `routed` non-null (the FFN sublayer) the sublayer output is not read from `sub`
// but summed here as moe_sum would: o = (Σ_{s<k} routed[t·k + s]) + shared[t], rows of e
// (the route weights are already in the routed rows).
#define HCPM_COLS 64

// The sublayer output at column j of token i: `sub`, or (routed non-null) the routed
// rows summed in moe_sum's order, then the shared row. The first 8 routed rows and
// the shared row load together.
__device__ __forceinline__ float hc_pm_sub_out(const float* sub, int ld_sub, const float* routed,
                                               const float* shared, int k_routed, int e, int i,
                                               int j) {
    if (!routed) return sub[(long long)i * ld_sub + j];
    const float* rr = routed + (long long)i * k_routed * e + j;
    float rv[8];
#pragma unroll
    for (int s = 0; s < 8; s++) rv[s] = s < k_routed ? rr[(long long)s * e] : 0.0f;
    const float sh = shared[(long long)i * e + j];
    float o = 0.0f;
#pragma unroll
    for (int s = 0; s < 8; s++)
        if (s < k_routed) o += rv[s];
    for (int s = 8; s < k_routed; s++) o += rr[(long long)s * e];
    return o + sh;
}

// The merged state of column j: nw[d] = post[d]·o + Σ_a comb[a][d]·X[a] (X at xr, rows
// of e), each square added to ss in f64. P / C: pointers or register arrays.
template <typename P, typename C>
__device__ __forceinline__ void hc_pm_new_state(const P& p, const C& c, float o, const float* xr,
                                                int e, int j, float (&nw)[4], double& ss) {
    float old[4];
#pragma unroll
    for (int a = 0; a < 4; a++) old[a] = xr[a * e + j];
#pragma unroll
    for (int d = 0; d < 4; d++) {
        float v = p[d] * o;
#pragma unroll
        for (int a = 0; a < 4; a++) v += c[a * 4 + d] * old[a];
        nw[d] = v;
        ss += (double)v * (double)v;
    }
}

// This thread's terms of its group's mix rows: acc[q] = Σ_d fn[g + 4q][d·e + j]·nw[d].
__device__ __forceinline__ void hc_pm_mix_terms(const u16 (&wv)[HCM_ROWS / 4][4],
                                                const float (&nw)[4],
                                                float (&acc)[HCM_ROWS / 4]) {
#pragma unroll
    for (int q = 0; q < HCM_ROWS / 4; q++) {
        float v = 0.0f;
#pragma unroll
        for (int d = 0; d < 4; d++) v = fmaf(h2f(wv[q][d]), nw[d], v);
        acc[q] = v;
    }
}

// Block `blk`'s partial mixes of token i from the two warps of each row group (after
// the barrier that follows their writes to red): rows 0..nm-1, then the sum of squares.
__device__ __forceinline__ void hc_pm_store_part(float* part, const float (*red)[HCM_ROWS + 1],
                                                 int nm, int blk, int n, int i) {
    float* pr = part + ((long long)blk * n + i) * (nm + 1);
    if ((int)threadIdx.x < nm) {
        const int r = threadIdx.x, gg = r & 3;
        pr[r] = red[2 * gg][r] + red[2 * gg + 1][r];
    } else if ((int)threadIdx.x == nm) {
        pr[nm] = red[0][HCM_ROWS] + red[1][HCM_ROWS];
    }
}
extern "C" __global__ void __launch_bounds__(256)
    hc_post_mix(const float* sub, int ld_sub, const float* post, const float* comb, int e,
                float* state, int ld_state, const u16* __restrict__ fn, int nm,
                float* __restrict__ part, const float* routed, const float* shared,
                int k_routed) {
    __shared__ float red[2 * 4][HCM_ROWS + 1];
    const int i = blockIdx.y, n = gridDim.y;
    const int g = threadIdx.x / HCPM_COLS;            // row group
    const int j = blockIdx.x * HCPM_COLS + (threadIdx.x % HCPM_COLS);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;  // 2 warps per group
    // The fn weights (never written by a kernel) load before the wait for the previous
    // kernel: their latency overlaps its tail instead of following it.
    PDL_TRIGGER();
    u16 wv[HCM_ROWS / 4][4];
    {
        const long long K = 4LL * e;
#pragma unroll
        for (int q = 0; q < HCM_ROWS / 4; q++) {
            const int r = g + 4 * q;
#pragma unroll
            for (int d = 0; d < 4; d++)
                wv[q][d] = (j < e && r < nm) ? fn[r * K + d * e + j] : (u16)0;
        }
    }
    PDL_WAIT();
    float acc[HCM_ROWS / 4];
#pragma unroll
    for (int q = 0; q < HCM_ROWS / 4; q++) acc[q] = 0.0f;
    double ss = 0.0;
    if (j < e) {
        const float* p = post + (long long)i * 4;
        const float* c = comb + (long long)i * 16;
        float* xr = state + (long long)i * ld_state;
        const float o = hc_pm_sub_out(sub, ld_sub, routed, shared, k_routed, e, i, j);
        float nw[4];
        hc_pm_new_state(p, c, o, xr, e, j, nw, ss);
        __syncthreads();  // every group has read the old state before group 0 overwrites it
        if (g == 0) {
#pragma unroll
            for (int d = 0; d < 4; d++) xr[d * e + j] = nw[d];
        }
        hc_pm_mix_terms(wv, nw, acc);
    } else {
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < HCM_ROWS / 4; q++) {
        const float v = warp_sum(acc[q]);
        if (lane == 0) red[warp][g + 4 * q] = v;  // warp = 2g or 2g + 1
    }
    ss = warp_sum_d(ss);
    if (warp < 2 && lane == 0) red[warp][HCM_ROWS] = (float)ss;
    __syncthreads();
    hc_pm_store_part(part, red, nm, blockIdx.x, n, i);
}

// ---------------------------------------------------------------------------
// HC step, second version (DS4_HC_FIN_V2, on by default; =0 runs hc_post_mix and
// hc_pre_finish_split). Same arguments, same grids, bit-identical outputs: every sum
// keeps the old kernels' order (the warp butterflies' pairs, the block trees), only
// the work around them moves. In the 1024-thread decode block every thread repeated
// work that queues on the SM's narrow pipes (f64 sqrt/div, sigmoids on the SFU, the
// final f64 tree on the shuffle unit, 15 shuffles per warp for the Q8_K maximum; by
// static count ~1500 SM cycles): here one warp does each shared step once and hands
// it over through shared memory. The Sinkhorn role (39 dependent steps of shuffles,
// four adds and a division, ~80 cycles each) is the longer of the two roles.
// ---------------------------------------------------------------------------

// Rows r0 and r1 of token i's mixes summed over the `np` partial slices by one warp,
// each exactly as hc_part_row sums it (every lane ends with both); all loads first.
__device__ __forceinline__ void hc_part_row2(const float* part, int np, int n, int i, int nm,
                                             int r0, int r1, float& v0, float& v1) {
    const int lane = threadIdx.x & 31;
    float pa[4], pb[4];
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const int p = lane + 32 * c;
        const long long at = ((long long)p * n + i) * (nm + 1);
        pa[c] = p < np ? part[at + r0] : 0.0f;
        pb[c] = p < np ? part[at + r1] : 0.0f;
    }
    float a = (pa[0] + pa[1]) + (pa[2] + pa[3]);
    float b = (pb[0] + pb[1]) + (pb[2] + pb[3]);
    for (int p = lane + 128; p < np; p += 32) {
        const long long at = ((long long)p * n + i) * (nm + 1);
        a += part[at + r0];
        b += part[at + r1];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    v0 = a;
    v1 = b;
}

// Up to three rows (r0, r0 + step, r0 + 2 step; rows >= nm skipped) of token i's mixes
// summed by one warp, each as hc_part_row sums it, all their loads in flight together.
// Lane 0 writes them to mix_s.
__device__ __forceinline__ void hc_part_rows3(const float* part, int np, int n, int i, int nm,
                                              int r0, int step, float* mix_s) {
    const int lane = threadIdx.x & 31;
    float pv[3][4];
#pragma unroll
    for (int k = 0; k < 3; k++) {
        const int r = r0 + k * step;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int p = lane + 32 * c;
            pv[k][c] = (r < nm && p < np) ? part[((long long)p * n + i) * (nm + 1) + r] : 0.0f;
        }
    }
    float v[3];
#pragma unroll
    for (int k = 0; k < 3; k++) {
        const int r = r0 + k * step;
        v[k] = (pv[k][0] + pv[k][1]) + (pv[k][2] + pv[k][3]);
        if (r < nm)
            for (int p = lane + 128; p < np; p += 32) v[k] += part[((long long)p * n + i) * (nm + 1) + r];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int k = 0; k < 3; k++) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    }
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < 3; k++)
            if (r0 + k * step < nm) mix_s[r0 + k * step] = v[k];
    }
}

// hc_pre_finish_split, same arguments and grid (2, n) / (1, n) with first_role.
// hc_pre_finish_v2_t256 (EMU): 256 threads and e <= 4096, with the sums of the
// 1024-thread launch (decode), on a block that leaves half of the SM's registers to
// the kernels placed beside it (the 1024-thread block takes them all).
// Role 1 (post, comb): the scales and base it needs in registers before the wait,
// r computed by warp 0 while the other warps sum the rows (up to three each),
// hc_sinkhorn4_warp. Role 0 (y): warps 0..3 each sum their pre row and the sum of
// squares, and compute r and their pre weight once (not every thread: f64 and SFU work
// repeated by 1024 threads queued on the SM's few units); one barrier hands the four
// weights over. The norm's f64 tree ends on warp 0, which hands the scale over through
// a second barrier, and the Q8_K maximum takes two redux instructions.
// With tree = 4·blockDim, thread t holds the columns of the 1024-thread kernel's
// threads t + 256c (slot c) and keeps their sums of squares apart: warp w's slot c is
// that kernel's warp w + 8c, lane for lane.
template <bool EMU>
__device__ __forceinline__ void hc_pre_finish_v2_body(
    const float* state, int ld_state, const float* part, int np, int n, const float* scale3,
    const float* base, int e, int iters, float hc_eps, float rms_eps, const float* norm_w,
    float norm_eps, float* y, int ld_y, float* post, float* comb, i8* q0_qs, float* q0_d,
    i8* qk_qs, float* qk_d, i16* qk_bs, int first_role) {
    constexpr int HC = 4, NM = (2 + HC) * HC;
    const int tree = EMU ? 4 * (int)blockDim.x : (int)blockDim.x;
    const int i = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    PDL_TRIGGER();
    TRACE_BLOCK(0);
    double inv_k = 1.0 / (double)(HC * e), inv_e = 1.0 / (double)e;
    // Pinned here, before the wait (the compiler would sink them to their uses).
    asm volatile("" : "+d"(inv_k), "+d"(inv_e));
    if (blockIdx.x + first_role == 1) {
        __shared__ float mix_s[NM];
        __shared__ float r_s;
        float s1 = 0.0f, s2 = 0.0f, bpost = 0.0f, bcomb = 0.0f;
        if (warp == 0) {
            s2 = scale3[2];
            if (lane < HC * HC) bcomb = base[2 * HC + lane];
        } else if (warp == 1) {
            s1 = scale3[1];
            if (lane < HC) bpost = base[HC + lane];
        }
        PDL_WAIT();
        TRACE_BLOCK(1);
        // Warp 0 sums the sum of squares and computes r while warps 1.. sum the post and
        // comb rows (HC + w - 1, then every nw - 1): r's f64 chain is off the path.
        float r_inv = 0.0f;
        if (warp == 0) {
            const float ssq = hc_part_row(part, np, n, i, NM, NM);
            r_inv = (float)(1.0 / sqrt(div_count((double)ssq, HC * e, inv_k) + (double)rms_eps));
            if (lane == 0) r_s = r_inv;
        } else {
            for (int r = HC + warp - 1; r < NM; r += 3 * (nw - 1))
                hc_part_rows3(part, np, n, i, NM, r, nw - 1, mix_s);
        }
        __syncthreads();
        if (warp == 1) {
            // post on warp 1, off the Sinkhorn's warp (its sigmoids are a divergent
            // branch that warp 0 would run before the first shuffle).
            if (lane < HC)
                post[(long long)i * HC + lane] =
                    2.0f * sigmoidf_stable(__fadd_rn(__fmul_rn(s1, __fmul_rn(mix_s[HC + lane], r_s)), bpost));
            return;
        }
        if (warp != 0) return;
        hc_sinkhorn4_warp(mix_s, r_inv, s2, bcomb, iters, hc_eps, comb + (long long)i * HC * HC);
        TRACE_BLOCK(3);
        return;
    }
    __shared__ Q8kRed qred;
    __shared__ __align__(16) float pre_s[HC];
    __shared__ double red_d[32];
    __shared__ float scale_s;
    const float* x = state + (long long)i * ld_state;
    // Slots of separate sums: 4 when emulating the 1024-thread tree (then e <= 4096,
    // one column group per slot), else 1 (a thread's groups summed in order).
    constexpr bool emu = EMU;
    float s0 = 0.0f, bw = 0.0f;
    if (warp < HC) {
        s0 = scale3[0];
        bw = base[warp];
    }
    float4 nwv[HCF_MAX4];
#pragma unroll
    for (int c = 0; c < HCF_MAX4; c++) {
        const int j = 4 * (threadIdx.x + c * blockDim.x);
        nwv[c] = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
        if (norm_w && j < e && (c == 0 || emu)) nwv[c] = *(const float4*)(norm_w + j);
    }
    PDL_WAIT();
    TRACE_BLOCK(1);
    // The state loads of every slot (emulating) or the first (else) go out now.
    float4 xv[HCF_MAX4][HC];
#pragma unroll
    for (int c = 0; c < HCF_MAX4; c++) {
        const int j = 4 * (threadIdx.x + c * blockDim.x);
        if (j < e && (c == 0 || emu)) {
#pragma unroll
            for (int s = 0; s < HC; s++) xv[c][s] = *(const float4*)(x + s * e + j);
        }
    }
    if (warp < HC) {
        float m, ssq;
        hc_part_row2(part, np, n, i, NM, warp, NM, m, ssq);
        const float r_inv =
            (float)(1.0 / sqrt(div_count((double)ssq, HC * e, inv_k) + (double)rms_eps));
        if (lane == 0)
            pre_s[warp] = sigmoidf_stable(__fadd_rn(__fmul_rn(s0, __fmul_rn(m, r_inv)), bw)) + hc_eps;
    }
    __syncthreads();
    TRACE_BLOCK(4);
    const float4 pv = *(const float4*)pre_s;
    const float pre[HC] = {pv.x, pv.y, pv.z, pv.w};
    float4 yv[HCF_MAX4];
    double ssc[HCF_MAX4] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll
    for (int c = 0; c < HCF_MAX4; c++) {
        const int j = 4 * (threadIdx.x + c * blockDim.x);
        yv[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (j < e) {
            hc_collapse4<HC>(x, e, pre, HC, j, yv[c], (c == 0 || emu) ? xv[c] : 0);
            double& ss = ssc[emu ? c : 0];
            ss += (double)yv[c].x * yv[c].x + (double)yv[c].y * yv[c].y +
                  (double)yv[c].z * yv[c].z + (double)yv[c].w * yv[c].w;
        }
    }
    float scale = 1.0f;
    if (norm_w) {
        // The tree of hc_norm_store_quant<true>: warps (of the emulated block), then the
        // warps' sums on one warp.
        const int nslot = emu ? HCF_MAX4 : 1;
#pragma unroll
        for (int c = 0; c < HCF_MAX4; c++)
            if (c < nslot) ssc[c] = warp_sum_d(ssc[c]);
        if (lane == 0) {
#pragma unroll
            for (int c = 0; c < HCF_MAX4; c++)
                if (c < nslot) red_d[warp + c * nw] = ssc[c];
        }
        __syncthreads();
        if (warp == 0) {
            const double t = warp_sum_d(lane < (tree >> 5) ? red_d[lane] : 0.0);
            if (lane == 0)
                scale_s = (float)(1.0 / sqrt(div_count(t, e, inv_e) + (double)norm_eps));
        }
        __syncthreads();
        scale = scale_s;
        TRACE_BLOCK(5);
    }
    float* yr = y + (long long)i * ld_y;
    hc_store_quant<true>(yv, scale, norm_w, nwv, emu ? HCF_MAX4 : 1, e, i, yr, q0_qs, q0_d, qk_qs,
                         qk_d, qk_bs, qred, false);
    TRACE_BLOCK(3);
}

extern "C" __global__ void __launch_bounds__(1024) hc_pre_finish_v2(
    const float* state, int ld_state, const float* part, int np, int n, const float* scale3,
    const float* base, int hc, int e, int iters, float hc_eps, float rms_eps,
    const float* norm_w, float norm_eps, float* y, int ld_y, float* post, float* comb,
    i8* q0_qs, float* q0_d, i8* qk_qs, float* qk_d, i16* qk_bs, int first_role) {
    hc_pre_finish_v2_body<false>(state, ld_state, part, np, n, scale3, base, e, iters, hc_eps,
                                 rms_eps, norm_w, norm_eps, y, ld_y, post, comb, q0_qs, q0_d,
                                 qk_qs, qk_d, qk_bs, first_role);
}
extern "C" __global__ void __launch_bounds__(256) hc_pre_finish_v2_t256(
    const float* state, int ld_state, const float* part, int np, int n, const float* scale3,
    const float* base, int hc, int e, int iters, float hc_eps, float rms_eps,
    const float* norm_w, float norm_eps, float* y, int ld_y, float* post, float* comb,
    i8* q0_qs, float* q0_d, i8* qk_qs, float* qk_d, i16* qk_bs, int first_role) {
    hc_pre_finish_v2_body<true>(state, ld_state, part, np, n, scale3, base, e, iters, hc_eps,
                                rms_eps, norm_w, norm_eps, y, ld_y, post, comb, q0_qs, q0_d,
                                qk_qs, qk_d, qk_bs, first_role);
}

// A weight load kept where it is written (asm volatile, as matvec.cu's ld_stream16):
// plain loads of hc_post_mix's fn, meant to stream in before the PDL wait, were moved
// after it by the compiler (SASS: griddepcontrol.wait first, then all 24 loads).
__device__ __forceinline__ u16 ld_nc_u16_pinned(const u16* p) {
    u16 v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// hc_post_mix, same arguments and grid. The fn loads really go out before the PDL
// wait (ld_nc_u16_pinned). Group 0 writes X' after the block's one
// barrier (all groups have read the old state by then) instead of behind a barrier of
// its own, and the six dot-product sums and the f64 sum of squares leave each warp in
// 12 shuffles instead of 40: at each butterfly step a lane keeps half of its values
// and trades the other half with its partner, so every value still adds the same
// pairs in the same order as warp_sum / warp_sum_d (lane 4q ends with row q's sum,
// lane 24 with the sum of squares).
extern "C" __global__ void __launch_bounds__(256)
    hc_post_mix_v2(const float* sub, int ld_sub, const float* post, const float* comb, int e,
                   float* state, int ld_state, const u16* __restrict__ fn, int nm,
                   float* __restrict__ part, const float* routed, const float* shared,
                   int k_routed) {
    __shared__ float red[2 * 4][HCM_ROWS + 1];
    const int i = blockIdx.y, n = gridDim.y;
    const int g = threadIdx.x / HCPM_COLS;            // row group
    const int j = blockIdx.x * HCPM_COLS + (threadIdx.x % HCPM_COLS);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;  // 2 warps per group
    PDL_TRIGGER();
    TRACE_BLOCK(0);
    u16 wv[HCM_ROWS / 4][4];
    {
        const long long K = 4LL * e;
#pragma unroll
        for (int q = 0; q < HCM_ROWS / 4; q++) {
            const int r = g + 4 * q;
            const bool ok = j < e && r < nm;
#pragma unroll
            for (int d = 0; d < 4; d++) {
                // Out of range: a load of fn[0], then 0 (no branch around the load).
                const u16 w = ld_nc_u16_pinned(fn + (ok ? r * K + d * e + j : 0));
                wv[q][d] = ok ? w : (u16)0;
            }
        }
    }
    // The wait in a basic block of its own (e > 0 always: the backend launches no empty
    // rows): within one block the assembler schedules it above loads it does not feed.
    if (e > 0) PDL_WAIT();
    TRACE_BLOCK(1);
    float acc[HCM_ROWS / 4];
#pragma unroll
    for (int q = 0; q < HCM_ROWS / 4; q++) acc[q] = 0.0f;
    double ss = 0.0;
    float nw[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float* xr = state + (long long)i * ld_state;
    if (j < e) {
        // post and comb rows are 16-byte aligned (the backend checks the buffers).
        const float4 p4 = *(const float4*)(post + (long long)i * 4);
        const float4* c4 = (const float4*)(comb + (long long)i * 16);
        const float4 cr[4] = {c4[0], c4[1], c4[2], c4[3]};
        const float p[4] = {p4.x, p4.y, p4.z, p4.w};
        const float c[16] = {cr[0].x, cr[0].y, cr[0].z, cr[0].w, cr[1].x, cr[1].y,
                             cr[1].z, cr[1].w, cr[2].x, cr[2].y, cr[2].z, cr[2].w,
                             cr[3].x, cr[3].y, cr[3].z, cr[3].w};
        const float o = hc_pm_sub_out(sub, ld_sub, routed, shared, k_routed, e, i, j);
        hc_pm_new_state(p, c, o, xr, e, j, nw, ss);
        hc_pm_mix_terms(wv, nw, acc);
    }
    // Halving butterfly. Step 16: lanes < 16 keep rows 0..3, lanes >= 16 rows 4, 5 and
    // the sum of squares (two words).
    const bool hi16 = lane & 16, b8 = lane & 8, b4 = lane & 4;
    const unsigned FULL = 0xffffffffu;
    float w[4];
    {
        const float ss_lo = __int_as_float(__double2loint(ss));
        const float ss_hi = __int_as_float(__double2hiint(ss));
        const float snd[4] = {hi16 ? acc[0] : acc[4], hi16 ? acc[1] : acc[5],
                              hi16 ? acc[2] : ss_lo, hi16 ? acc[3] : ss_hi};
        float rcv[4];
#pragma unroll
        for (int k = 0; k < 4; k++) rcv[k] = __shfl_xor_sync(FULL, snd[k], 16);
        if (hi16) {
            w[0] = acc[4] + rcv[0];
            w[1] = acc[5] + rcv[1];
            const double t = ss + __hiloint2double(__float_as_int(rcv[3]), __float_as_int(rcv[2]));
            w[2] = __int_as_float(__double2loint(t));
            w[3] = __int_as_float(__double2hiint(t));
        } else {
#pragma unroll
            for (int k = 0; k < 4; k++) w[k] = acc[k] + rcv[k];
        }
    }
    // Step 8: lanes with bit 3 clear keep w[0..1], set keep w[2..3]; lanes 24..31 hold
    // the sum of squares from here on.
    const bool sq = hi16 && b8;
    float z[2];
    {
        const float s0 = __shfl_xor_sync(FULL, b8 ? w[0] : w[2], 8);
        const float s1 = __shfl_xor_sync(FULL, b8 ? w[1] : w[3], 8);
        const float k0 = b8 ? w[2] : w[0], k1 = b8 ? w[3] : w[1];
        if (sq) {
            const double t = __hiloint2double(__float_as_int(k1), __float_as_int(k0)) +
                             __hiloint2double(__float_as_int(s1), __float_as_int(s0));
            z[0] = __int_as_float(__double2loint(t));
            z[1] = __int_as_float(__double2hiint(t));
        } else {
            z[0] = k0 + s0;
            z[1] = k1 + s1;
        }
    }
    // Step 4: float lanes keep one value (bit 2 clear: z[0]); the sum-of-squares lanes
    // trade both words. Steps 2 and 1: plain butterflies.
    float t0, t1;
    {
        const float s0 = __shfl_xor_sync(FULL, (sq || b4) ? z[0] : z[1], 4);
        const float s1 = __shfl_xor_sync(FULL, z[1], 4);
        if (sq) {
            const double t = __hiloint2double(__float_as_int(z[1]), __float_as_int(z[0])) +
                             __hiloint2double(__float_as_int(s1), __float_as_int(s0));
            t0 = __int_as_float(__double2loint(t));
            t1 = __int_as_float(__double2hiint(t));
        } else {
            t0 = (b4 ? z[1] : z[0]) + s0;
            t1 = 0.0f;
        }
    }
#pragma unroll
    for (int m = 2; m > 0; m >>= 1) {
        const float s0 = __shfl_xor_sync(FULL, t0, m);
        const float s1 = __shfl_xor_sync(FULL, t1, m);
        if (sq) {
            const double t = __hiloint2double(__float_as_int(t1), __float_as_int(t0)) +
                             __hiloint2double(__float_as_int(s1), __float_as_int(s0));
            t0 = __int_as_float(__double2loint(t));
            t1 = __int_as_float(__double2hiint(t));
        } else {
            t0 += s0;
        }
    }
    if ((lane & 3) == 0) {
        if (lane < 24) {
            red[warp][g + 4 * (lane >> 2)] = t0;  // warp = 2g or 2g + 1
        } else if (lane == 24 && warp < 2) {
            red[warp][HCM_ROWS] =
                (float)__hiloint2double(__float_as_int(t1), __float_as_int(t0));
        }
    }
    __syncthreads();
    hc_pm_store_part(part, red, nm, blockIdx.x, n, i);
    if (j < e && g == 0) {
#pragma unroll
        for (int d = 0; d < 4; d++) xr[d * e + j] = nw[d];
    }
    TRACE_BLOCK(3);
}

// ---------------------------------------------------------------------------
// The decode HC step in two short launches without the Sinkhorn on the chain (HC v3,
// one token). hc_post_mix_v3 (grid e / 256, 256 threads; thread t of block b owns
// columns 256b + 4(t % 64) .. + 3 of every stream, its group g = t / 64 sums mix
// rows g, g + 4, ...): the merge X'_d = post_d·o + Σ_a comb[a][d]·X_a, the next step's
// mix rows and Σx² as one partial row per block (floats, HC_PART_STRIDE apart), and
// the block's share of G, the Gram matrix of the four streams (f64, HC3_GRAM per
// block at `gram`). hc_pre_finish_v3 (same grid, 64 threads): every block sums the
// rows it needs itself (pre from rows 0..3 and Σx²; Σy² = Σ_st pre_s pre_t G_st, since
// y = Σ_s pre_s X'_s, so no second reduction), then collapses, norms and quantizes its
// own 256 columns. post/comb of the step (the Sinkhorn) are made later, off the chain,
// by hc_split_warp in a kernel placed between this step and the next merge.
// ---------------------------------------------------------------------------
#define HC3_COLS 256
#define HC3_GRAM 10  // G_00 G_01 G_02 G_03 G_11 G_12 G_13 G_22 G_23 G_33

__device__ __forceinline__ uint2 ld_nc_u32x2_pinned(const void* p) {
    uint2 v;
    asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// The sublayer output at columns j..j+3: `sub`, or the routed rows summed in
// moe_sum's order, then the shared row (hc_pm_sub_out's order, four columns).
__device__ __forceinline__ float4 hc3_sub_out(const float* sub, const float* routed,
                                              const float* shared, int k_routed, int e, int j) {
    if (!routed) return *(const float4*)(sub + j);
    float4 rv[8];
#pragma unroll
    for (int s = 0; s < 8; s++)
        rv[s] = s < k_routed ? *(const float4*)(routed + (long long)s * e + j) : make_float4(0, 0, 0, 0);
    const float4 sh = *(const float4*)(shared + j);
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int s = 0; s < 8; s++)
        if (s < k_routed) { o.x += rv[s].x; o.y += rv[s].y; o.z += rv[s].z; o.w += rv[s].w; }
    for (int s = 8; s < k_routed; s++) {
        const float4 r = *(const float4*)(routed + (long long)s * e + j);
        o.x += r.x; o.y += r.y; o.z += r.z; o.w += r.w;
    }
    o.x += sh.x; o.y += sh.y; o.z += sh.z; o.w += sh.w;
    return o;
}

extern "C" __global__ void __launch_bounds__(256)
    hc_post_mix_v3(const float* sub, const float* routed, const float* shared, int k_routed,
                   const float* post, const float* comb, float* state, int e,
                   const u16* __restrict__ fn, float* __restrict__ part, double* __restrict__ gram) {
    constexpr int HC = 4, NM = 24, NQ = NM / 4;
    __shared__ float redf[8][NQ];
    __shared__ double redd[8][4];
    const int blk = blockIdx.x;
    const int g = threadIdx.x >> 6;
    const int j = blk * HC3_COLS + 4 * (threadIdx.x & 63);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long K = 4LL * e;
    PDL_TRIGGER();
    TRACE_BLOCK(0);
    // This thread's fn weights (rows g + 4q, streams d, columns j..j+3), loaded while
    // the kernel before runs (pinned: the compiler would sink them past the wait).
    uint2 wv[NQ][4];
#pragma unroll
    for (int q = 0; q < NQ; q++)
#pragma unroll
        for (int d = 0; d < 4; d++) wv[q][d] = ld_nc_u32x2_pinned(fn + (g + 4 * q) * K + d * e + j);
    if (e > 0) PDL_WAIT();
    TRACE_BLOCK(1);
    const float4 p4 = *(const float4*)post;
    const float4* c4 = (const float4*)comb;
    const float4 cr[4] = {c4[0], c4[1], c4[2], c4[3]};
    const float4 o4 = hc3_sub_out(sub, routed, shared, k_routed, e, j);
    float4 old[HC];
#pragma unroll
    for (int a = 0; a < HC; a++) old[a] = *(const float4*)(state + (long long)a * e + j);
    const float p[4] = {p4.x, p4.y, p4.z, p4.w};
    const float c[16] = {cr[0].x, cr[0].y, cr[0].z, cr[0].w, cr[1].x, cr[1].y, cr[1].z, cr[1].w,
                         cr[2].x, cr[2].y, cr[2].z, cr[2].w, cr[3].x, cr[3].y, cr[3].z, cr[3].w};
    // The merge (hc_pm_new_state's order).
    float nw[HC][4];
    double ss = 0.0;
    {
        const float o[4] = {o4.x, o4.y, o4.z, o4.w};
        float x[HC][4];
#pragma unroll
        for (int a = 0; a < HC; a++) {
            x[a][0] = old[a].x; x[a][1] = old[a].y; x[a][2] = old[a].z; x[a][3] = old[a].w;
        }
#pragma unroll
        for (int d = 0; d < HC; d++) {
#pragma unroll
            for (int cc = 0; cc < 4; cc++) {
                float v = p[d] * o[cc];
#pragma unroll
                for (int a = 0; a < HC; a++) v += c[a * HC + d] * x[a][cc];
                nw[d][cc] = v;
                if (g == 0) ss += (double)v * (double)v;
            }
        }
    }
    // Mix rows g + 4q over the thread's columns, and the group's Gram entries.
    float acc[NQ];
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        float v = 0.0f;
#pragma unroll
        for (int d = 0; d < HC; d++) {
            v = fmaf(h2f((u16)(wv[q][d].x & 0xffffu)), nw[d][0], v);
            v = fmaf(h2f((u16)(wv[q][d].x >> 16)), nw[d][1], v);
            v = fmaf(h2f((u16)(wv[q][d].y & 0xffffu)), nw[d][2], v);
            v = fmaf(h2f((u16)(wv[q][d].y >> 16)), nw[d][3], v);
        }
        acc[q] = warp_sum(v);
    }
    double gm[3];
#pragma unroll
    for (int m = 0; m < 3; m++) {
        const int k = 3 * g + m;
        // (s, t) of entry k: rows of the upper triangle in order.
        const int s = k < 4 ? 0 : k < 7 ? 1 : k < 9 ? 2 : 3;
        const int t = k < 4 ? k : k < 7 ? k - 3 : k < 9 ? k - 5 : 3;
        double v = 0.0;
        if (k < HC3_GRAM) {
            // Selects, not indexing by the runtime s, t (that puts nw in local memory).
#pragma unroll
            for (int cc = 0; cc < 4; cc++) {
                const float a = s == 0 ? nw[0][cc] : s == 1 ? nw[1][cc] : s == 2 ? nw[2][cc] : nw[3][cc];
                const float b = t == 0 ? nw[0][cc] : t == 1 ? nw[1][cc] : t == 2 ? nw[2][cc] : nw[3][cc];
                v += (double)a * (double)b;
            }
        }
        gm[m] = warp_sum_d(v);
    }
    ss = warp_sum_d(ss);
    if (lane == 0) {
#pragma unroll
        for (int q = 0; q < NQ; q++) redf[warp][q] = acc[q];
#pragma unroll
        for (int m = 0; m < 3; m++) redd[warp][m] = gm[m];
        redd[warp][3] = ss;
    }
    __syncthreads();
    {
        float* pr = part + (long long)blk * HC_PART_STRIDE;
        const int t = threadIdx.x;
        if (t < NM) {
            const int gg = t & 3, q = t >> 2;
            pr[t] = redf[2 * gg][q] + redf[2 * gg + 1][q];
        } else if (t == NM) {
            pr[NM] = (float)(redd[0][3] + redd[1][3]);
        } else if (t >= 32 && t < 32 + HC3_GRAM) {
            const int k = t - 32, gg = k / 3, m = k % 3;
            gram[(long long)blk * HC3_GRAM + k] = redd[2 * gg][m] + redd[2 * gg + 1][m];
        }
    }
    // Every group has read the old state (the barrier above): group 0 writes X'.
    if (g == 0) {
#pragma unroll
        for (int d = 0; d < HC; d++)
            *(float4*)(state + (long long)d * e + j) = make_float4(nw[d][0], nw[d][1], nw[d][2], nw[d][3]);
    }
    TRACE_BLOCK(3);
}

// 64 threads a block, 256 columns (grid e / 256); np partial rows.
extern "C" __global__ void __launch_bounds__(64)
    hc_pre_finish_v3(const float* state, int e, const float* part, const double* gram, int np,
                     const float* scale3, const float* base, float hc_eps, float rms_eps,
                     const float* norm_w, float norm_eps, float* y, i8* q0_qs, float* q0_d,
                     i8* qk_qs, float* qk_d, i16* qk_bs) {
    constexpr int HC = 4, NM = 24;
    __shared__ __align__(16) float pre_s[HC];
    __shared__ double gt_s[HC3_GRAM];
    __shared__ Q8kRed qred;
    const int j = blockIdx.x * HC3_COLS + 4 * threadIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    PDL_TRIGGER();
    TRACE_BLOCK(0);
    float4 nwt = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
    if (norm_w) nwt = ld_const_f32x4(norm_w + j);
    float s0 = 0.0f, bw = 0.0f;
    if (warp == 0 && lane < HC) {
        s0 = ld_const_f32(scale3);
        bw = ld_const_f32(base + lane);
    }
    if (e > 0) PDL_WAIT();
    TRACE_BLOCK(1);
    float4 xs[HC];
#pragma unroll
    for (int a = 0; a < HC; a++) xs[a] = *(const float4*)(state + (long long)a * e + j);
    if (warp == 0) {
        // Lane p sums over partial rows p, p + 32, ...: mix rows 0..3 and Σx².
        float m[HC + 1] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int p = lane; p < np; p += 32) {
            const float* pr = part + (long long)p * HC_PART_STRIDE;
#pragma unroll
            for (int s = 0; s < HC; s++) m[s] += pr[s];
            m[HC] += pr[NM];
        }
#pragma unroll
        for (int s = 0; s <= HC; s++) m[s] = warp_sum(m[s]);
        const float r_inv = (float)(1.0 / sqrt((double)m[HC] / (double)(HC * e) + (double)rms_eps));
        const float ms = lane == 0 ? m[0] : lane == 1 ? m[1] : lane == 2 ? m[2] : m[3];
        if (lane < HC)
            pre_s[lane] = sigmoidf_stable(__fadd_rn(__fmul_rn(s0, __fmul_rn(ms, r_inv)), bw)) + hc_eps;
    } else {
        double gs[HC3_GRAM];
#pragma unroll
        for (int k = 0; k < HC3_GRAM; k++) gs[k] = 0.0;
        for (int p = lane; p < np; p += 32) {
#pragma unroll
            for (int k = 0; k < HC3_GRAM; k++) gs[k] += gram[(long long)p * HC3_GRAM + k];
        }
#pragma unroll
        for (int k = 0; k < HC3_GRAM; k++) gs[k] = warp_sum_d(gs[k]);
        if (lane == 0) {
#pragma unroll
            for (int k = 0; k < HC3_GRAM; k++) gt_s[k] = gs[k];
        }
    }
    __syncthreads();
    TRACE_BLOCK(4);
    const float4 pv = *(const float4*)pre_s;
    const float pre[HC] = {pv.x, pv.y, pv.z, pv.w};
    const double p0 = pv.x, p1 = pv.y, p2 = pv.z, p3 = pv.w;
    const double sy2 = p0 * p0 * gt_s[0] + p1 * p1 * gt_s[4] + p2 * p2 * gt_s[7] + p3 * p3 * gt_s[9] +
                       2.0 * (p0 * (p1 * gt_s[1] + p2 * gt_s[2] + p3 * gt_s[3]) +
                              p1 * (p2 * gt_s[5] + p3 * gt_s[6]) + p2 * p3 * gt_s[8]);
    const float sc = norm_w ? (float)(1.0 / sqrt(fmax(sy2, 0.0) / (double)e + (double)norm_eps)) : 1.0f;
    const float w[4] = {nwt.x, nwt.y, nwt.z, nwt.w};
    const float x[HC][4] = {{xs[0].x, xs[0].y, xs[0].z, xs[0].w},
                            {xs[1].x, xs[1].y, xs[1].z, xs[1].w},
                            {xs[2].x, xs[2].y, xs[2].z, xs[2].w},
                            {xs[3].x, xs[3].y, xs[3].z, xs[3].w}};
    float o[4];
#pragma unroll
    for (int c = 0; c < 4; c++) {
        float acc = 0.0f;
#pragma unroll
        for (int s = 0; s < HC; s++) acc += pre[s] * x[s][c];
        o[c] = norm_w ? __fmul_rn(w[c], __fmul_rn(acc, sc)) : acc;
    }
    *(float4*)(y + j) = make_float4(o[0], o[1], o[2], o[3]);
    if (q0_qs) q8_0_quad(o, j, q0_qs, q0_d);
    if (qk_qs) q8_k_quad<true>(o, true, j, qred, qk_qs, qk_d, qk_bs, false);
    TRACE_BLOCK(3);
}

// The split of hc_split_warp as a launch of its own (one warp), for a step whose
// deferred split found no kernel to carry it before the next merge.
extern "C" __global__ void __launch_bounds__(32) hc_split_v3(HcSplitJob job) {
    PDL_START();
    hc_split_warp(job);
}

// Final HC collapse; one block per token.
extern "C" __global__ void hc_head_finish(const float* state, int ld_state, const float* mixes,
                                          int ld_mix, const float* scale, const float* base,
                                          int hc, int e, float hc_eps, float rms_eps, float* out,
                                          int ld_out) { PDL_START();
    __shared__ float pre_s[16];
    const int i = blockIdx.x;
    const float* x = state + (long long)i * ld_state;
    const float r = row_rms_inv(x, hc * e, rms_eps);
    if (threadIdx.x < hc) {
        const float m = __fmul_rn(mixes[(long long)i * ld_mix + threadIdx.x], r);
        pre_s[threadIdx.x] = sigmoidf_stable(m * scale[0] + base[threadIdx.x]) + hc_eps;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < hc; s++) acc += pre_s[s] * x[s * e + j];
        out[(long long)i * ld_out + j] = acc;
    }
}

// ---------------------------------------------------------------------------
// RoPE on the last n_rot dims of each head_dim head (interleaved pairs).
// Grid (⌈heads·n_rot/2 / 128⌉, n).
// ---------------------------------------------------------------------------
__device__ __forceinline__ void rope_pair(float* pair, float freq, int pos, int inverse) {
    const float theta = __fmul_rn((float)pos, freq);
    const float c = (float)cos((double)theta);
    float s = (float)sin((double)theta);
    if (inverse) s = -s;
    const float x0 = pair[0], x1 = pair[1];
    pair[0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    pair[1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

extern "C" __global__ void rope(float* x, int ld, int cols, int head_dim, int n_rot,
                                const float* freqs, const int* pos_p, int inverse) { PDL_START();
    const int i = blockIdx.y;
    const int half = n_rot / 2, heads = cols / head_dim;
    const int pos = *pos_p + i;
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < heads * half;
         idx += gridDim.x * blockDim.x) {
        const int h = idx / half, q = idx % half;
        float* pair = x + (long long)i * ld + h * head_dim + (head_dim - n_rot) + 2 * q;
        rope_pair(pair, freqs[q], pos, inverse);
    }
}

// RoPE (as `rope`) of n rows of `cols` (contiguous), quantized to Q8_0 as it is written
// (bit-identical to quant_act_q8_0 of the rotated rows): one warp per 32-block, lane =
// element; a RoPE pair is two neighbouring lanes (pairs start at even offsets).
// Grid (⌈cols/32 / 8⌉, n), 256 threads.
// The body of rope_quant_q8_0 for one lane: value v of column col of row i (lane =
// col % 32), RoPE when col lies in the last n_rot dims of its head, then the Q8_0
// code (and the block scale from lane 0). x_all: write the result to *p for every
// column (else only the rotated ones change).
// rope_lane_cs with the column's frequency already loaded (`freq`, any value for a
// column that does not rotate).
__device__ __forceinline__ bool rope_lane_cs_f(int i, int col, int head_dim, int n_rot, float freq,
                                               const int* pos_p, int inverse, float& c, float& s) {
    const int r0 = head_dim - n_rot;
    const int hc = col % head_dim;
    if (hc < r0) return false;
    const int pos = *pos_p + i;
    const float theta = __fmul_rn((float)pos, freq);
    c = (float)cos((double)theta);
    s = (float)sin((double)theta);
    if (inverse) s = -s;
    return true;
}
// Split in two (rope_lane_cs: whether the column rotates and its cos / sin, which
// need no value; rope_q8_0_lane_cs: the rest), so a caller can compute the angle
// while its values are still loading.
__device__ __forceinline__ bool rope_lane_cs(int i, int col, int head_dim, int n_rot,
                                             const float* freqs, const int* pos_p, int inverse,
                                             float& c, float& s) {
    const int r0 = head_dim - n_rot;
    const int hc = col % head_dim;
    return rope_lane_cs_f(i, col, head_dim, n_rot, hc < r0 ? 0.0f : freqs[(hc - r0) >> 1], pos_p,
                          inverse, c, s);
}

__device__ __forceinline__ void rope_q8_0_lane_cs(float v, float* p, int i, int col, int lane,
                                                  int cols, bool rot, float c, float s,
                                                  i8* __restrict__ qs, float* __restrict__ d,
                                                  bool x_all) {
    const float w = __shfl_xor_sync(0xffffffffu, v, 1);
    float o = v;
    if (rot) {
        // Even lane: x0 = v, x1 = w; odd lane: x0 = w, x1 = v (rope_pair's formulas).
        o = (lane & 1) == 0 ? __fsub_rn(__fmul_rn(v, c), __fmul_rn(w, s))
                            : __fadd_rn(__fmul_rn(w, s), __fmul_rn(v, c));
        if (!x_all) *p = o;
    }
    if (x_all) *p = o;
    const float a = warp_max(fabsf(o));
    const float dd = a / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    const long long e0 = (long long)i * cols + col;
    qs[e0] = (i8)max(-127, min(127, __float2int_rn(o * id)));
    if (lane == 0) d[e0 >> 5] = dd;
}

__device__ __forceinline__ void rope_q8_0_lane(float v, float* p, int i, int col, int lane,
                                               int cols, int head_dim, int n_rot,
                                               const float* freqs, const int* pos_p, int inverse,
                                               i8* __restrict__ qs, float* __restrict__ d,
                                               bool x_all) {
    float c = 0.0f, s = 0.0f;
    const bool rot = rope_lane_cs(i, col, head_dim, n_rot, freqs, pos_p, inverse, c, s);
    rope_q8_0_lane_cs(v, p, i, col, lane, cols, rot, c, s, qs, d, x_all);
}

extern "C" __global__ void rope_quant_q8_0(float* x, int cols, int head_dim, int n_rot,
                                           const float* freqs, const int* pos_p, int inverse,
                                           i8* __restrict__ qs, float* __restrict__ d) { PDL_START();
    const int i = blockIdx.y;
    const int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (blk >= cols / 32) return;  // whole warps
    const int col = blk * 32 + lane;
    float* p = x + (long long)i * cols + col;
    rope_q8_0_lane(*p, p, i, col, lane, cols, head_dim, n_rot, freqs, pos_p, inverse, qs, d,
                   false);
}

// Decode attention's split merge (att_combine) fused into rope_quant_q8_0: the warp of
// a 32-column block of head h merges that head's split partials (part: n_splits ×
// n_head × (head_dim + 2) floats per token, as att_tc writes them) with the sink, then
// rotates and quantizes as rope_quant_q8_0 and writes every column of x. Same
// arithmetic as att_combine (att_merge.cuh) + rope_quant_q8_0. n_splits <= 64: lane s
// keeps the weights of splits s and s + 32 in registers. Grid as rope_quant_q8_0.
extern "C" __global__ void att_merge_rope_q8_0(const float* part, int n_splits, int n_head,
                                               const float* sinks, float* x, int cols,
                                               int head_dim, int n_rot, const float* freqs,
                                               const int* pos_p, int inverse, i8* __restrict__ qs,
                                               float* __restrict__ d) { PDL_START();
    const int i = blockIdx.y;
    const int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (blk >= cols / 32) return;  // whole warps
    const int col = blk * 32 + lane;
    const int h = col / head_dim, dim = col % head_dim;  // a block never straddles heads
    const long long stride = (long long)n_head * (head_dim + 2);
    const float* base = part + (long long)i * n_splits * stride + (long long)h * (head_dim + 2);
    const int ns = min(n_splits, 64);
    float w_lo = 0.0f, w_hi = 0.0f;
    const float den = att_split_den(base, stride, ns, sinks[h], lane, [&](int s, float w) {
        if (s < 32) w_lo = w; else w_hi = w;
    });
    const float inv = 1.0f / den;
    float a = 0.0f;
    const float* src = base + 2 + dim;
#pragma unroll 4
    for (int s = 0; s < ns; s++) {
        const float w = __shfl_sync(0xffffffffu, s < 32 ? w_lo : w_hi, s & 31);
        a = att_split_acc(a, w, src[s * stride]);
    }
    float* p = x + (long long)i * cols + col;
    rope_q8_0_lane(a * inv, p, i, col, lane, cols, head_dim, n_rot, freqs, pos_p, inverse, qs,
                   d, true);
}

// att_merge_rope_q8_0 with one round trip of loads: every lane asks at once for the
// (m, l) of its splits, its column's partial value in every split and the RoPE
// angle's position and frequency, and computes cos / sin while they arrive (the
// original reads m, then l, then the values four splits at a time, then the position:
// ~8 dependent global round trips at 20 splits). Same arithmetic in the same order
// (att_split_den_regs = att_split_den; att_split_acc over the splits in order), so
// the bits agree. Same arguments and grid; n_splits <= 64.
#define MERGE_PRE_SPLITS 64
// MS: most splits a lane holds values of (64, or 32 for the lean variants below).
template <int MS>
__device__ __forceinline__ void att_merge_rope_q8_0_pre_body(
    const float* part, int n_splits, int n_head, const float* sinks, float* x, int cols,
    int head_dim, int n_rot, const float* freqs, const int* pos_p, int inverse,
    i8* __restrict__ qs, float* __restrict__ d) {
    PDL_TRIGGER();
    const int i = blockIdx.y;
    const int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (blk >= cols / 32) {  // whole warps
        PDL_WAIT();
        return;
    }
    const int col = blk * 32 + lane;
    const int h = col / head_dim, dim = col % head_dim;  // a block never straddles heads
    // The head's sink and the column's RoPE frequency (constants) load before the wait.
    const float sink = ld_const_f32(sinks + h);
    const int r0 = head_dim - n_rot;
    const float freq = dim >= r0 ? ld_const_f32(freqs + ((dim - r0) >> 1)) : 0.0f;
    PDL_WAIT();
    const long long stride = (long long)n_head * (head_dim + 2);
    const float* base = part + (long long)i * n_splits * stride + (long long)h * (head_dim + 2);
    const int ns = min(n_splits, MS);
    float m_lo = NEG_INF, l_lo = 0.0f, m_hi = NEG_INF, l_hi = 0.0f;
    if (lane < ns) {
        m_lo = base[lane * stride];
        l_lo = base[lane * stride + 1];
    }
    if (lane + 32 < ns) {
        m_hi = base[(lane + 32) * stride];
        l_hi = base[(lane + 32) * stride + 1];
    }
    // Values of empty splits were never written: loaded anyway, selected away below.
    const float* src = base + 2 + dim;
    float v[MS];
#pragma unroll
    for (int s = 0; s < MS; s++) v[s] = s < ns ? src[s * stride] : 0.0f;
    float c = 0.0f, sn = 0.0f;
    const bool rot = rope_lane_cs_f(i, col, head_dim, n_rot, freq, pos_p, inverse, c, sn);
    float w_lo = 0.0f, w_hi = 0.0f;
    const float den = att_split_den_regs(m_lo, l_lo, m_hi, l_hi, ns, sink, lane, w_lo, w_hi);
    const float inv = 1.0f / den;
    float a = 0.0f;
#pragma unroll
    for (int s = 0; s < MS; s++) {
        if (s >= ns) break;
        const float w = __shfl_sync(0xffffffffu, s < 32 ? w_lo : w_hi, s & 31);
        a = att_split_acc(a, w, v[s]);
    }
    float* p = x + (long long)i * cols + col;
    rope_q8_0_lane_cs(a * inv, p, i, col, lane, cols, rot, c, sn, qs, d, true);
}

#define MERGE_PRE_ARGS                                                                        \
    const float *part, int n_splits, int n_head, const float *sinks, float *x, int cols,      \
        int head_dim, int n_rot, const float *freqs, const int *pos_p, int inverse,           \
        i8 *__restrict__ qs, float *__restrict__ d
#define MERGE_PRE_PASS part, n_splits, n_head, sinks, x, cols, head_dim, n_rot, freqs, pos_p, inverse, qs, d
extern "C" __global__ void att_merge_rope_q8_0_pre(MERGE_PRE_ARGS) {
    att_merge_rope_q8_0_pre_body<MERGE_PRE_SPLITS>(MERGE_PRE_PASS);
}
// Lean variants for n_splits <= 32 (the host checks): fewer registers a block, so that
// the attention output product's blocks (placed while this merge runs, to preload their
// weights) still fit beside it on the multiprocessors the attention kernel leaves free.
// Same arithmetic, same bits. t256: 256 threads, at most 64 registers (4 blocks an SM);
// t512: 512 threads (one head a block), at most 64 registers.
extern "C" __global__ void __launch_bounds__(256, 4) att_merge_rope_q8_0_pre32_t256(MERGE_PRE_ARGS) {
    att_merge_rope_q8_0_pre_body<32>(MERGE_PRE_PASS);
}
extern "C" __global__ void __launch_bounds__(512, 2) att_merge_rope_q8_0_pre32_t512(MERGE_PRE_ARGS) {
    att_merge_rope_q8_0_pre_body<32>(MERGE_PRE_PASS);
}

// head_norm_rope4 with the weights (wv, when has_w) and the two RoPE frequencies (fa, fb,
// when j0 lies in the rotated dims) already loaded.
__device__ __forceinline__ void head_norm_rope4_pre(float4 v, double ss, int j0, int head_dim,
                                                    float eps, bool has_w, float4 wv, int n_rot,
                                                    float fa, float fb, const int* pos_p, int i,
                                                    float o[4]) {
    const float r = (float)(1.0 / sqrt(ss / (double)head_dim + (double)eps));
    o[0] = __fmul_rn(v.x, r);
    o[1] = __fmul_rn(v.y, r);
    o[2] = __fmul_rn(v.z, r);
    o[3] = __fmul_rn(v.w, r);
    if (has_w) {
        o[0] = __fmul_rn(wv.x, o[0]);
        o[1] = __fmul_rn(wv.y, o[1]);
        o[2] = __fmul_rn(wv.z, o[2]);
        o[3] = __fmul_rn(wv.w, o[3]);
    }
    const int r0 = head_dim - n_rot;
    if (j0 >= r0) {
        const int pos = *pos_p + i;
        rope_pair(o, fa, pos, 0);
        rope_pair(o + 2, fb, pos, 0);
    }
}
// Dims j0..j0+3 of a head (values v, the head's sum of squares ss): RMSNorm with the
// optional weight w, then RoPE when they lie in the last n_rot dims (row i at *pos_p + i).
// Shared by norm_rope and (through head_norm_rope4_pre) qkv_norm_rope.
__device__ __forceinline__ void head_norm_rope4(float4 v, double ss, int j0, int head_dim,
                                                float eps, const float* w, int n_rot,
                                                const float* freqs, const int* pos_p, int i,
                                                float o[4]) {
    const int r0 = head_dim - n_rot;
    const int q = (j0 - r0) / 2;
    const float4 wv = w ? make_float4(w[j0], w[j0 + 1], w[j0 + 2], w[j0 + 3])
                        : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
    const bool rot = j0 >= r0;
    head_norm_rope4_pre(v, ss, j0, head_dim, eps, w != 0, wv, n_rot, rot ? freqs[q] : 0.0f,
                        rot ? freqs[q + 1] : 0.0f, pos_p, i, o);
}

// RMSNorm of each head_dim head (optional weight w), then RoPE on its last n_rot dims
// (rms_norm_seg + rope in one pass). Grid (heads, n); thread t owns dims 4t..4t+3 (two
// RoPE pairs), so blockDim = head_dim / 4 rounded up to whole warps; head_dim and n_rot
// multiples of 4.
extern "C" __global__ void norm_rope(float* x, int ld, const float* w, int head_dim, float eps,
                                     int n_rot, const float* freqs, const int* pos_p) { PDL_START();
    const int i = blockIdx.y;
    float* p = x + (long long)i * ld + (long long)blockIdx.x * head_dim;
    const int j0 = 4 * threadIdx.x;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (j0 < head_dim) v = *(const float4*)(p + j0);
    double ss = (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
    ss = block_sum_d(ss);
    if (j0 >= head_dim) return;
    float o[4];
    head_norm_rope4(v, ss, j0, head_dim, eps, w, n_rot, freqs, pos_p, i, o);
    *(float4*)(p + j0) = make_float4(o[0], o[1], o[2], o[3]);
}

// ---------------------------------------------------------------------------
// Official precision round trips (model.md §6b–d), block-level on shared rows.
// ---------------------------------------------------------------------------
__device__ __forceinline__ float round_e4m3(float v) {
    const float a = fabsf(v);
    if (a == 0.0f || !isfinite(a)) return v;
    float spacing;
    if (a < 0.015625f) spacing = 0.001953125f;  // 2^-6, 2^-9
    else {
        const int e = (int)((__float_as_uint(a) >> 23) & 0xff) - 127;
        spacing = ldexpf(1.0f, e - 3);
    }
    const float q = fminf(rintf(a / spacing) * spacing, 448.0f);
    return copysignf(q, v);
}

__device__ __forceinline__ float round_e2m1(float v) {
    const float vals[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const float a = fminf(fabsf(v), 6.0f);
    int best = 0;
    float best_d = __int_as_float(0x7f800000);
    for (int i = 0; i < 8; i++) {
        const float d = fabsf(a - vals[i]);
        if (d < best_d || (d == best_d && (i % 2) == 0)) {
            best = i;
            best_d = d;
        }
    }
    return copysignf(vals[best], v);
}

__device__ __forceinline__ float pow2_scale(float a, float mx) {
    return (float)exp2((double)ceilf(log2f(a / mx)));
}

// FP8-E4M3 round trip of s[0..n_nope) in blocks of 64: one warp per block.
__device__ void block_fp8_row(float* s, int n_nope) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int b = warp; b * 64 < n_nope; b += nw) {
        float* blk = s + b * 64;
        const int n = min(64, n_nope - b * 64);
        float amax = 0.0f;
        for (int j = lane; j < n; j += 32) amax = fmaxf(amax, fabsf(blk[j]));
        amax = fmaxf(warp_max(amax), 1e-4f);
        const float sc = pow2_scale(amax, 448.0f);
        for (int j = lane; j < n; j += 32) {
            const float v = fminf(fmaxf(blk[j] / sc, -448.0f), 448.0f);
            blk[j] = round_e4m3(v) * sc;
        }
    }
    __syncthreads();
}

// Hadamard-128 (Sylvester order, same butterflies as the CPU) then FP4 in blocks of 32,
// per 128-dim head of s[0..cols). blockDim.x must be 128.
__device__ void block_indexer_qat(float* s, int cols) {
    const int t = threadIdx.x;
    for (int h0 = 0; h0 < cols; h0 += 128) {
        float* hd = s + h0;
        for (int h = 1; h < 128; h <<= 1) {
            if ((t & h) == 0) {
                const float a = hd[t], b = hd[t + h];
                hd[t] = a + b;
                hd[t + h] = a - b;
            }
            __syncthreads();
        }
        hd[t] *= 1.0f / sqrtf(128.0f);
        __syncwarp();
        // FP4: warp w rounds the 32-block w.
        float amax = warp_max(fabsf(hd[t]));
        amax = fmaxf(amax, 7.052966e-38f);
        const float sc = pow2_scale(amax, 6.0f);
        const float v = fminf(fmaxf(hd[t] / sc, -6.0f), 6.0f);
        hd[t] = round_e2m1(v) * sc;
        __syncthreads();
    }
}

__device__ void block_f16_round(float* s, int cols) {
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s[j] = h2f(f2h(s[j]));
    __syncthreads();
}

// mode 0: KV row (FP8 of the first n_nope dims, then f16); 1: indexer QAT.
// Block (piece, row) of 128 threads; a piece is the whole row (mode 0) or one
// 128-dim head (mode 1, `cols` = 128). Dynamic smem = cols floats.
extern "C" __global__ void __launch_bounds__(128)
    round_rows(float* x, int ld, int cols, int mode, int n_nope) { PDL_START();
    extern __shared__ float srow[];
    float* row = x + (long long)blockIdx.y * ld + (long long)blockIdx.x * cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) srow[j] = row[j];
    __syncthreads();
    if (mode == 0) {
        block_fp8_row(srow, n_nope);
        block_f16_round(srow, cols);
    } else {
        block_indexer_qat(srow, cols);
    }
    for (int j = threadIdx.x; j < cols; j += blockDim.x) row[j] = srow[j];
}

// The indexer queries' RoPE (rope, forward) and official rounding (round_rows mode 1)
// in one pass: block (head, row) of 128 threads on a shared copy of the 128-dim head;
// thread k < n_rot/2 rotates pair k of the last n_rot dims, then block_indexer_qat.
// Same arithmetic as rope + round_rows. Dynamic smem 128 floats. The body takes the
// head `bx` (blockIdx.x, or the block's index among the rope_qat blocks of a paired grid).
__device__ __forceinline__ void rope_qat_blk(float* x, int ld, int n_rot, const float* freqs,
                                             const int* pos_p, int bx) {
    extern __shared__ float srow[];
    const int i = blockIdx.y, t = threadIdx.x;
    float* row = x + (long long)i * ld + (long long)bx * 128;
    srow[t] = row[t];
    __syncthreads();
    if (t < n_rot / 2) rope_pair(srow + (128 - n_rot) + 2 * t, freqs[t], *pos_p + i, 0);
    __syncthreads();
    block_indexer_qat(srow, 128);
    row[t] = srow[t];
}

extern "C" __global__ void __launch_bounds__(128)
    rope_qat(float* x, int ld, int n_rot, const float* freqs, const int* pos_p) { PDL_START();
    rope_qat_blk(x, ld, n_rot, freqs, pos_p, blockIdx.x);
}

// The constants a qkv_norm_rope block's thread needs (the KV norm weights, the two RoPE
// frequencies of its dims), loaded before the PDL wait by qkv_consts (block bx of the
// n_blk qkv blocks): they used to be HBM round trips on the chain after the sum of
// squares.
struct QkvConsts {
    float4 wv;
    float fa, fb;
};
// None to load: unit weights (a thread without dims, a block past the qkv blocks).
__device__ __forceinline__ QkvConsts qkv_consts_none() {
    return QkvConsts{make_float4(1.0f, 1.0f, 1.0f, 1.0f), 0.0f, 0.0f};
}
__device__ __forceinline__ QkvConsts qkv_consts(const float* kv_w, int head_dim, int n_rot,
                                                const float* freqs, int bx, int n_blk) {
    QkvConsts kc = qkv_consts_none();
    const int j0 = 4 * threadIdx.x, r0 = head_dim - n_rot;
    if (j0 >= head_dim) return kc;
    if (bx == n_blk - 1 && kv_w) kc.wv = ld_const_f32x4(kv_w + j0);
    if (j0 >= r0) {
        kc.fa = ld_const_f32(freqs + (j0 - r0) / 2);
        kc.fb = ld_const_f32(freqs + (j0 - r0) / 2 + 1);
    }
    return kc;
}

// The attention inputs' per-head norms in one launch (decode): blocks x < q_heads do
// norm_rope of query head x (no weight); block x = q_heads does norm_rope of the KV row
// (weight kv_w, one head of head_dim) and, when `round_kv`, its official rounding
// (round_rows mode 0: FP8 of the first n_nope dims, then f16), on a shared copy of the
// row. Grid (q_heads + 1, n); blockDim = head_dim / 4 rounded up to whole warps; dynamic
// smem head_dim floats. Same arithmetic as norm_rope + norm_rope + round_rows.
// round_kv: 0 none, 1 the rounding on the shared copy, 2 the same in registers.
// The body takes the block `bx` of the q_heads + 1 = `n_blk` (blockIdx.x and gridDim.x,
// or the block's index and count among the qkv blocks of a paired grid).
__device__ __forceinline__ void qkv_norm_rope_blk(float* q, int ld_q, float* kv, int ld_kv,
                                                  const float* kv_w, int head_dim, float eps,
                                                  int n_rot, const float* freqs,
                                                  const int* pos_p, int round_kv, int n_nope,
                                                  int bx, int n_blk, const QkvConsts& kc) {
    extern __shared__ float srow[];
    const int i = blockIdx.y;
    const bool is_kv = bx == n_blk - 1;
    float* p = is_kv ? kv + (long long)i * ld_kv
                     : q + (long long)i * ld_q + (long long)bx * head_dim;
    const float* w = is_kv ? kv_w : 0;
    const int j0 = 4 * threadIdx.x;
    const bool own = j0 < head_dim;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (own) v = *(const float4*)(p + j0);
    double ss = (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
    ss = block_sum_d(ss);
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (own)
        head_norm_rope4_pre(v, ss, j0, head_dim, eps, w != 0, kc.wv, n_rot, kc.fa, kc.fb, pos_p,
                            i, o);
    if (!(is_kv && round_kv)) {  // uniform over the block
        if (own) *(float4*)(p + j0) = make_float4(o[0], o[1], o[2], o[3]);
        return;
    }
    if (round_kv == 2) {
        // The same rounding in registers: a 64-dim FP8 block is 16 consecutive threads
        // (half a warp), so its amax is a 4-step shuffle; no shared copy, no barrier.
        // Needs blockDim * 4 >= head_dim and n_nope % 4 == 0 (the host checks).
        float amax = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; c++)
            if (own && j0 + c < n_nope) amax = fmaxf(amax, fabsf(o[c]));
#pragma unroll
        for (int m = 8; m >= 1; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
        if (!own) return;
        const float sc = pow2_scale(fmaxf(amax, 1e-4f), 448.0f);
#pragma unroll
        for (int c = 0; c < 4; c++) {
            if (j0 + c < n_nope) {
                const float v = fminf(fmaxf(o[c] / sc, -448.0f), 448.0f);
                o[c] = round_e4m3(v) * sc;
            }
            o[c] = h2f(f2h(o[c]));
        }
        *(float4*)(p + j0) = make_float4(o[0], o[1], o[2], o[3]);
        return;
    }
    if (own) *(float4*)(srow + j0) = make_float4(o[0], o[1], o[2], o[3]);
    __syncthreads();
    block_fp8_row(srow, n_nope);
    block_f16_round(srow, head_dim);
    for (int j = threadIdx.x; j < head_dim; j += blockDim.x) p[j] = srow[j];
}

extern "C" __global__ void qkv_norm_rope(float* q, int ld_q, float* kv, int ld_kv,
                                         const float* kv_w, int head_dim, float eps, int n_rot,
                                         const float* freqs, const int* pos_p, int round_kv,
                                         int n_nope) {
    PDL_TRIGGER();
    const QkvConsts kc = qkv_consts(kv_w, head_dim, n_rot, freqs, blockIdx.x, gridDim.x);
    PDL_WAIT();
    qkv_norm_rope_blk(q, ld_q, kv, ld_kv, kv_w, head_dim, eps, n_rot, freqs, pos_p, round_kv,
                      n_nope, blockIdx.x, gridDim.x, kc);
}

// A CSA layer's per-head query steps in one grid (decode): blocks below n_qkv run
// qkv_norm_rope (query heads, then the KV row), the rest rope_qat of the indexer
// query heads (ix, ld_ix; frequencies ix_freqs). The same bodies, so the same bits,
// as the two launches. Both need 128 threads (head_dim in (384, 512]; the host checks);
// dynamic smem max(head_dim, 128) floats.
extern "C" __global__ void __launch_bounds__(128)
    qkv_rope_qat_pair(float* q, int ld_q, float* kv, int ld_kv, const float* kv_w, int head_dim,
                      float eps, int n_rot, const float* freqs, const int* pos_p, int round_kv,
                      int n_nope, int n_qkv, float* ix, int ld_ix, const float* ix_freqs) {
    PDL_TRIGGER();
    const QkvConsts kc = (int)blockIdx.x < n_qkv
                             ? qkv_consts(kv_w, head_dim, n_rot, freqs, blockIdx.x, n_qkv)
                             : qkv_consts_none();
    PDL_WAIT();
    if ((int)blockIdx.x < n_qkv)
        qkv_norm_rope_blk(q, ld_q, kv, ld_kv, kv_w, head_dim, eps, n_rot, freqs, pos_p,
                          round_kv, n_nope, blockIdx.x, n_qkv, kc);
    else
        rope_qat_blk(ix, ld_ix, n_rot, ix_freqs, pos_p, blockIdx.x - n_qkv);
}

// ---------------------------------------------------------------------------
// Compressors (model.md §8).
// comp_pool: one thread per output column j < dc walks the chunk's tokens in
// order, keeping the frontier exactly as the CPU does (columns j and dc+j are
// only ever touched by this thread), and writes un-normalised pooled rows.
// ---------------------------------------------------------------------------
// One token at position p for column j (and dc + j when coff == 2): the frontier
// update and, when a row closes at p, its un-normalised pooled value (returned true).
// kv_i / score_i are the token's projection rows. Shared by comp_pool and comp_step.
__device__ __forceinline__ bool comp_pool_token(const float* kv_i, const float* score_i, int p,
                                                const float* ape, int r, int coff, int dc,
                                                int j, float* fr_kv, float* fr_score,
                                                float* out_v) {
    const int wdt = coff * dc;
    const int phi = p % r;
    const int rho = coff == 2 ? r + phi : phi;
    for (int h = 0; h < coff; h++) {
        const int c = j + h * dc;
        fr_kv[(long long)rho * wdt + c] = kv_i[c];
        fr_score[(long long)rho * wdt + c] = score_i[c] + ape[(long long)phi * wdt + c];
    }
    if ((p + 1) % r != 0) return false;
    const int nc = coff * r;
    float m = NEG_INF;
    for (int c = 0; c < nc; c++) {
        const int col = (coff == 2 && c >= r) ? dc + j : j;
        m = fmaxf(m, fr_score[(long long)c * wdt + col]);
    }
    float out = 0.0f;
    if (m != NEG_INF) {
        float den = 0.0f, num = 0.0f;
        for (int c = 0; c < nc; c++) {
            const int col = (coff == 2 && c >= r) ? dc + j : j;
            const float e = expf(fr_score[(long long)c * wdt + col] - m);
            den += e;
            num += e * fr_kv[(long long)c * wdt + col];
        }
        out = num / den;
    }
    if (coff == 2) {
        for (int c = 0; c < r; c++)
            for (int h = 0; h < 2; h++) {
                const int col = j + h * dc;
                fr_kv[(long long)c * wdt + col] = fr_kv[(long long)(r + c) * wdt + col];
                fr_score[(long long)c * wdt + col] = fr_score[(long long)(r + c) * wdt + col];
            }
    }
    *out_v = out;
    return true;
}

extern "C" __global__ void comp_pool(const float* kv, const float* score, int ld_proj, int n,
                                     const int* pos_p, const float* ape, int r, int coff, int dc,
                                     float* fr_kv, float* fr_score, float* rows_out) { PDL_START();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dc) return;
    const int pos0 = *pos_p;
    for (int i = 0; i < n; i++) {
        const int p = pos0 + i;
        float out;
        if (comp_pool_token(kv + (long long)i * ld_proj, score + (long long)i * ld_proj, p, ape,
                            r, coff, dc, j, fr_kv, fr_score, &out))
            rows_out[(long long)((p + 1) / r - 1) * dc + j] = out;
    }
}

// Chunk form of comp_pool: every row that closes in the chunk is pooled in parallel
// (grid: column tiles × rows), reading each candidate position from the chunk's
// projections (positions >= pos0) or from the frontier as it was before the chunk;
// comp_frontier then leaves the frontier exactly as the sequential walk would.
// Candidate order and arithmetic are those of comp_pool.
__device__ __forceinline__ void comp_cand(const float* kv, const float* score, int ld_proj,
                                          const float* ape, const float* fr_kv,
                                          const float* fr_score, int pos0, int r, int coff,
                                          int dc, int t, int col, int fr_row, float* s,
                                          float* v) {
    const int wdt = coff * dc;
    if (t < 0) {
        *s = NEG_INF;
        *v = 0.0f;
    } else if (t >= pos0) {
        const long long o = (long long)(t - pos0) * ld_proj + col;
        *s = score[o] + ape[(long long)(t % r) * wdt + col];
        *v = kv[o];
    } else {
        *s = fr_score[(long long)fr_row * wdt + col];
        *v = fr_kv[(long long)fr_row * wdt + col];
    }
}

extern "C" __global__ void comp_pool_chunk(const float* kv, const float* score, int ld_proj,
                                           int n, const int* pos_p, const float* ape, int r,
                                           int coff, int dc, const float* fr_kv,
                                           const float* fr_score, float* rows_out) { PDL_START();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int pos0 = *pos_p;
    const int q = pos0 / r + blockIdx.y;
    if (j >= dc || q >= (pos0 + n) / r) return;
    const int b = q * r;          // first position of the closing block
    const int b0 = (pos0 / r) * r; // first position of the block open before the chunk
    const int nc = coff * r;
    float sc[2], vv[2];
    float m = NEG_INF;
    // Pass 1: max; pass 2: weighted sum (as comp_pool).
    for (int pass = 0; pass < 2; pass++) {
        float den = 0.0f, num = 0.0f;
        for (int c = 0; c < nc; c++) {
            int t, col, fr_row;
            if (coff == 2 && c < r) {  // previous block, first half of the width
                t = b - r + c;
                col = j;
                // Before the chunk: the previous half when it is the block that closed
                // last before pos0, otherwise the current half.
                fr_row = (b == b0) ? c : r + c;
            } else {
                const int cc = coff == 2 ? c - r : c;
                t = b + cc;
                col = coff == 2 ? dc + j : j;
                fr_row = coff == 2 ? r + cc : cc;
            }
            comp_cand(kv, score, ld_proj, ape, fr_kv, fr_score, pos0, r, coff, dc, t, col,
                      fr_row, &sc[0], &vv[0]);
            if (pass == 0) {
                m = fmaxf(m, sc[0]);
            } else {
                const float e = expf(sc[0] - m);
                den += e;
                num += e * vv[0];
            }
        }
        if (pass == 0 && m == NEG_INF) {
            rows_out[(long long)q * dc + j] = 0.0f;
            return;
        }
        if (pass == 1) rows_out[(long long)q * dc + j] = num / den;
    }
}

// The frontier after a chunk (see comp_pool_chunk). One thread per column j < dc
// (and dc + j for coff 2), so the reads of the old state precede its writes.
extern "C" __global__ void comp_frontier(const float* kv, const float* score, int ld_proj, int n,
                                         const int* pos_p, const float* ape, int r, int coff,
                                         int dc, float* fr_kv, float* fr_score) { PDL_START();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dc) return;
    const int wdt = coff * dc;
    const int pos0 = *pos_p, P = pos0 + n;
    const int b0 = (pos0 / r) * r, B = (P / r) * r;
    if (coff == 2 && B != b0) {
        // Previous half := the block [B - r, B), from the chunk or the old current half.
        for (int phi = 0; phi < r; phi++) {
            const int t = B - r + phi;
            for (int h = 0; h < 2; h++) {
                const int col = j + h * dc;
                float s, v;
                if (t >= pos0) {
                    const long long o = (long long)(t - pos0) * ld_proj + col;
                    s = score[o] + ape[(long long)phi * wdt + col];
                    v = kv[o];
                } else {
                    s = fr_score[(long long)(r + phi) * wdt + col];
                    v = fr_kv[(long long)(r + phi) * wdt + col];
                }
                fr_score[(long long)phi * wdt + col] = s;
                fr_kv[(long long)phi * wdt + col] = v;
            }
        }
    }
    // Current half (coff 2) / the rows (coff 1) := the latest position of each phase.
    for (int phi = 0; phi < r; phi++) {
        const int t = P - 1 - ((P - 1 - phi) % r + r) % r;  // latest t < P with t % r == phi
        if (t < pos0) continue;
        const int row = coff == 2 ? r + phi : phi;
        for (int h = 0; h < coff; h++) {
            const int col = j + h * dc;
            const long long o = (long long)(t - pos0) * ld_proj + col;
            fr_score[(long long)row * wdt + col] = score[o] + ape[(long long)phi * wdt + col];
            fr_kv[(long long)row * wdt + col] = kv[o];
        }
    }
}

// Normalises, rotates and rounds row q (at position q·r) held in srow (dc floats of
// shared memory, complete: the caller synchronised), then writes it to `row`. The sum
// of squares runs in the order of a 128-thread block whatever blockDim (a multiple of
// 128; exactly 128 for mode 2), so comp_finish and comp_step agree bit for bit.
__device__ void comp_finish_row(float* srow, float* row, int dc, int q, int r,
                                const float* norm_w, const float* freqs, int n_rot, float eps,
                                int mode) {
    __shared__ double red_fin[4];
    const int t = threadIdx.x;
    double ss = 0.0;
    if (t < 128)
        for (int j = t; j < dc; j += 128) ss += (double)srow[j] * (double)srow[j];
    ss = warp_sum_d(ss);
    if (t < 128 && (t & 31) == 0) red_fin[t >> 5] = ss;
    __syncthreads();
    ss = 0.0;
    for (int w = 0; w < 4; w++) ss += red_fin[w];
    const float rinv = (float)(1.0 / sqrt(ss / (double)dc + (double)eps));
    for (int j = t; j < dc; j += blockDim.x) srow[j] = __fmul_rn(norm_w[j], __fmul_rn(srow[j], rinv));
    __syncthreads();
    const int half = n_rot / 2;
    for (int k = t; k < half; k += blockDim.x)
        rope_pair(srow + (dc - n_rot) + 2 * k, freqs[k], q * r, 0);
    __syncthreads();
    if (mode == 1) {
        block_fp8_row(srow, dc - n_rot);
        block_f16_round(srow, dc);
    } else if (mode == 2) {
        block_indexer_qat(srow, dc);
        block_f16_round(srow, dc);
    }
    for (int j = t; j < dc; j += blockDim.x) row[j] = srow[j];
}

// Normalises, rotates and rounds the rows comp_pool emitted for this chunk.
// Block b handles row q = pos0/r + b when q < (pos0+n)/r. 128 threads, smem dc floats.
// mode: 0 plain, 1 KV (FP8 + f16), 2 indexer (QAT + f16).
extern "C" __global__ void __launch_bounds__(128)
    comp_finish(float* rows, int dc, int n, const int* pos_p, int r, const float* norm_w,
                const float* freqs, int n_rot, float eps, int mode) { PDL_START();
    extern __shared__ float srow[];
    const int pos0 = *pos_p;
    const int q = pos0 / r + blockIdx.x;
    if (q >= (pos0 + n) / r) return;
    float* row = rows + (long long)q * dc;
    for (int j = threadIdx.x; j < dc; j += blockDim.x) srow[j] = row[j];
    __syncthreads();
    comp_finish_row(srow, row, dc, q, r, norm_w, freqs, n_rot, eps, mode);
}

// A decode compressor step's arguments (backend.rs `CompStepArgs`, same layout).
struct CompStepArgs {
    const float* kv;
    const float* score;
    const int* pos_p;
    const float* ape;
    float* fr_kv;
    float* fr_score;
    float* rows;
    const float* norm_w;
    const float* freqs;
    int r, coff, dc, n_rot;
    float eps;
    int mode;
};

// One decode token's compressor step: comp_pool (n = 1) then, when a row closes at
// this position, comp_finish of that row from shared memory (srow, dc floats). Run by
// threads 0 .. dc - 1 of a block of dc (a multiple of 128, at most 512; 128 for
// mode 2) or more threads whose warps past dc have exited (they would idle in every
// loop: the loops stride by blockDim but stop at dc). Thread j owns column j as in
// comp_pool. Same arithmetic as the two kernels.
__device__ void comp_step_body(const CompStepArgs& c, float* srow) {
    const int p = *c.pos_p;
    for (int j = threadIdx.x; j < c.dc; j += blockDim.x) {
        float out;
        if (comp_pool_token(c.kv, c.score, p, c.ape, c.r, c.coff, c.dc, j, c.fr_kv, c.fr_score, &out))
            srow[j] = out;
    }
    // (p + 1) % r is the same for every thread: the whole block returns or goes on.
    if ((p + 1) % c.r != 0) return;
    __syncthreads();
    const int q = (p + 1) / c.r - 1;
    comp_finish_row(srow, c.rows + (long long)q * c.dc, c.dc, q, c.r, c.norm_w, c.freqs, c.n_rot, c.eps,
                    c.mode);
}

// One token's compressor steps in one launch, block b running step c_b (c0 only with
// one block; a CSA layer's attention and indexer steps as two blocks instead of two
// launches in a row). blockDim = the larger dc (<= 512); a block's warps past its own
// dc exit first. Smem: the larger dc floats.
extern "C" __global__ void __launch_bounds__(512) comp_steps(CompStepArgs c0, CompStepArgs c1) {
    PDL_START();
    extern __shared__ float srow[];
    const CompStepArgs& c = blockIdx.x == 0 ? c0 : c1;
    if ((int)threadIdx.x >= c.dc) return;
    comp_step_body(c, srow);
}

// ---------------------------------------------------------------------------
// Lightning indexer (model.md §9).
// idx_scores: block (token t, tile of IDX_TILE rows), one thread per row. The sums run
// in the CPU's order without fused multiply-adds, so scores are bit-identical to the
// reference: with the official FP4 rounding many scores tie exactly, and the top-k
// must break those ties the same way (lower index first).
// Tokens whose visible rows all fit in top_k are skipped (nothing to choose).
#define IDX_TILE 32
#define IDX_KPAD 129
extern "C" __global__ void __launch_bounds__(IDX_TILE)
    idx_scores(const float* q, int ld_q, const float* w, int ld_w, int heads,
               const float* rows, const int* pos_p, int r, int top_k, float* scores, int ld_s) { PDL_START();
    __shared__ float ks[IDX_TILE * IDX_KPAD];
    const int t = blockIdx.y;
    const int p = *pos_p + t;
    const int visible = (p + 1) / r;
    const int c0 = blockIdx.x * IDX_TILE;
    if (visible <= top_k || c0 >= visible) return;
    const int nrow = min(IDX_TILE, visible - c0);
    for (int j = threadIdx.x; j < nrow * 128; j += blockDim.x)
        ks[(j >> 7) * IDX_KPAD + (j & 127)] = rows[(long long)c0 * 128 + j];
    __syncthreads();
    const int c = threadIdx.x;
    if (c >= nrow) return;
    const float qscale = 1.0f / sqrtf(128.0f);
    const float wscale = 1.0f / sqrtf((float)heads);
    const float* key = ks + c * IDX_KPAD;
    const float* qt = q + (long long)t * ld_q;  // every lane reads the same q element
    const float* wt = w + (long long)t * ld_w;
    float acc = 0.0f;
    for (int h = 0; h < heads; h++) {
        const float* qh = qt + h * 128;
        float d = 0.0f;
        for (int k = 0; k < 128; k++) d = __fadd_rn(d, __fmul_rn(qh[k], key[k]));
        acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(wt[h], wscale), __fmul_rn(fmaxf(d, 0.0f), qscale)));
    }
    scores[(long long)t * ld_s + c0 + c] = acc;
}

// idx_scores_heads: the same scores, bit for bit, with the heads in parallel. The old
// kernel gave each thread a whole row: 64 heads x 128 dependent adds with a global q
// load in each, ~200 us per layer once more than top_k rows are visible. Here thread
// (h, g) runs head h's dot product for the 4 rows of group g (IDXH_ROWS rows per block),
// still summing k in order without FMA; one thread per row then adds the heads in order.
// q sits in shared memory with rows padded to 132 floats: 16-byte reads by consecutive
// heads fall in distinct banks; the keys are read as broadcasts. heads <= 64.
#define IDXH_ROWS 16
#define IDXH_THREADS 256
#define IDXH_QLD 132
extern "C" __global__ void __launch_bounds__(IDXH_THREADS)
    idx_scores_heads(const float* q, int ld_q, const float* w, int ld_w, int heads,
                     const float* rows, const int* pos_p, int r, int top_k, float* scores,
                     int ld_s) { PDL_START();
    extern __shared__ float4 idxh_smem[];
    float* qs = (float*)idxh_smem;              // heads x IDXH_QLD
    float* ks = qs + 64 * IDXH_QLD;             // IDXH_ROWS x 128
    float* ds = ks + IDXH_ROWS * 128;           // IDXH_ROWS x 64
    float* ws = ds + IDXH_ROWS * 64;            // 64
    const int t = blockIdx.y;
    const int p = *pos_p + t;
    const int visible = (p + 1) / r;
    const int c0 = blockIdx.x * IDXH_ROWS;
    if (visible <= top_k || c0 >= visible) return;
    const int nrow = min(IDXH_ROWS, visible - c0);
    const float* qt = q + (long long)t * ld_q;
    for (int j = threadIdx.x; j < heads * 32; j += blockDim.x) {
        const float4 v = *(const float4*)(qt + 4 * j);
        *(float4*)(qs + (j >> 5) * IDXH_QLD + 4 * (j & 31)) = v;
    }
    for (int j = threadIdx.x; j < nrow * 32; j += blockDim.x)
        *(float4*)(ks + 4 * j) = *(const float4*)(rows + (long long)c0 * 128 + 4 * j);
    if (threadIdx.x < heads) ws[threadIdx.x] = w[(long long)t * ld_w + threadIdx.x];
    __syncthreads();
    const int h = threadIdx.x & 63, g = threadIdx.x >> 6;
    if (h < heads && 4 * g < nrow) {
        const float* qh = qs + h * IDXH_QLD;
        const float* k0 = ks + (4 * g) * 128;
        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma unroll 4
        for (int k = 0; k < 128; k += 4) {
            const float4 qv = *(const float4*)(qh + k);
            const float4 a = *(const float4*)(k0 + k);
            const float4 b = *(const float4*)(k0 + 128 + k);
            const float4 c = *(const float4*)(k0 + 256 + k);
            const float4 e = *(const float4*)(k0 + 384 + k);
            d0 = __fadd_rn(d0, __fmul_rn(qv.x, a.x)); d1 = __fadd_rn(d1, __fmul_rn(qv.x, b.x));
            d2 = __fadd_rn(d2, __fmul_rn(qv.x, c.x)); d3 = __fadd_rn(d3, __fmul_rn(qv.x, e.x));
            d0 = __fadd_rn(d0, __fmul_rn(qv.y, a.y)); d1 = __fadd_rn(d1, __fmul_rn(qv.y, b.y));
            d2 = __fadd_rn(d2, __fmul_rn(qv.y, c.y)); d3 = __fadd_rn(d3, __fmul_rn(qv.y, e.y));
            d0 = __fadd_rn(d0, __fmul_rn(qv.z, a.z)); d1 = __fadd_rn(d1, __fmul_rn(qv.z, b.z));
            d2 = __fadd_rn(d2, __fmul_rn(qv.z, c.z)); d3 = __fadd_rn(d3, __fmul_rn(qv.z, e.z));
            d0 = __fadd_rn(d0, __fmul_rn(qv.w, a.w)); d1 = __fadd_rn(d1, __fmul_rn(qv.w, b.w));
            d2 = __fadd_rn(d2, __fmul_rn(qv.w, c.w)); d3 = __fadd_rn(d3, __fmul_rn(qv.w, e.w));
        }
        // Rows past nrow hold stale shared memory; their sums are never read.
        ds[(4 * g + 0) * 64 + h] = d0;
        ds[(4 * g + 1) * 64 + h] = d1;
        ds[(4 * g + 2) * 64 + h] = d2;
        ds[(4 * g + 3) * 64 + h] = d3;
    }
    __syncthreads();
    if (threadIdx.x < nrow) {
        const float qscale = 1.0f / sqrtf(128.0f);
        const float wscale = 1.0f / sqrtf((float)heads);
        const float* dr = ds + threadIdx.x * 64;
        float acc = 0.0f;
        for (int hh = 0; hh < heads; hh++)
            acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(ws[hh], wscale), __fmul_rn(fmaxf(dr[hh], 0.0f), qscale)));
        scores[(long long)t * ld_s + c0 + threadIdx.x] = acc;
    }
}

__device__ __forceinline__ u32 order_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// idx_topk: one block (1024 threads) per token. The k-th largest key is found by a
// bitwise search over the order-preserving integer keys; rows above it are taken, then
// rows equal to it in index order until k; the picks are sorted by (score desc, index
// asc) — the CPU's repeated-selection order. sel[t][0..k) = picks, −1 after.
#define TOPK_THREADS 1024
#define TOPK_MAX 1024
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    idx_topk(const float* scores, int ld_s, const int* pos_p, int r, int top_k, int* sel,
             int sel_k) { PDL_START();
    __shared__ u32 s_key[TOPK_MAX];
    __shared__ int s_idx[TOPK_MAX];
    __shared__ int s_count;
    __shared__ int s_scan[TOPK_THREADS / 32];
    const int t = blockIdx.x;
    const int p = *pos_p + t;
    const int visible = (p + 1) / r;
    int* out = sel + (long long)t * sel_k;
    if (visible <= top_k) {
        for (int j = threadIdx.x; j < sel_k; j += blockDim.x) out[j] = j < visible ? j : -1;
        return;
    }
    const float* sc = scores + (long long)t * ld_s;
    // Largest threshold T with count(key >= T) >= top_k, i.e. the top_k-th largest key:
    // a radix select, 8 bits a pass from the top, with a shared histogram of the keys
    // that match the digits chosen so far (4 passes instead of 32 block reductions).
    __shared__ int s_hist[256];
    __shared__ u32 s_prefix;
    __shared__ int s_need;
    if (threadIdx.x == 0) { s_prefix = 0; s_need = top_k; }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = threadIdx.x; j < 256; j += blockDim.x) s_hist[j] = 0;
        __syncthreads();
        const u32 prefix = s_prefix;
        const u32 high_mask = shift == 24 ? 0u : ~0u << (shift + 8);
        for (int c = threadIdx.x; c < visible; c += blockDim.x) {
            const u32 k = order_key(sc[c]);
            if ((k & high_mask) == prefix) atomicAdd(&s_hist[(k >> shift) & 255], 1);
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane l holds digits 255-8l down to 248-8l; counts are taken from the top.
            const int lane = threadIdx.x;
            int sum = 0;
            for (int b = 0; b < 8; b++) sum += s_hist[255 - 8 * lane - b];
            int before = sum;
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, before, o);
                if (lane >= o) before += v;
            }
            before -= sum;  // exclusive: keys in higher digits than this lane's
            const int need = s_need;
            if (before < need && need <= before + sum) {
                int cum = before;
                for (int b = 0; b < 8; b++) {
                    const int d = 255 - 8 * lane - b;
                    if (cum + s_hist[d] >= need) {
                        s_prefix = prefix | ((u32)d << shift);
                        s_need = need - cum;
                        break;
                    }
                    cum += s_hist[d];
                }
            }
        }
        __syncthreads();
    }
    const u32 T = s_prefix;
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    for (int c = threadIdx.x; c < visible; c += blockDim.x) {
        const u32 k = order_key(sc[c]);
        if (k > T) {
            const int at = atomicAdd(&s_count, 1);
            s_key[at] = k;
            s_idx[at] = c;
        }
    }
    __syncthreads();
    // Rows equal to T, lowest indices first, until top_k.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int base = 0; base < visible; base += blockDim.x) {
        const int need = top_k - s_count;
        __syncthreads();
        if (need <= 0) break;
        const int c = base + threadIdx.x;
        const bool eq = c < visible && order_key(sc[c]) == T;
        const u32 ballot = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) s_scan[warp] = __popc(ballot);
        __syncthreads();
        int before = 0;
        for (int i = 0; i < warp; i++) before += s_scan[i];
        before += __popc(ballot & ((1u << lane) - 1u));
        int total = 0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) total += s_scan[i];
        const int start = s_count;
        __syncthreads();
        if (eq && before < need) {
            s_key[start + before] = T;
            s_idx[start + before] = c;
        }
        __syncthreads();
        if (threadIdx.x == 0) s_count = start + min(total, need);
        __syncthreads();
    }
    // Pad to a power of two and bitonic-sort by (key desc, index asc).
    int n2 = 1;
    while (n2 < top_k) n2 <<= 1;
    for (int j = top_k + threadIdx.x; j < n2; j += blockDim.x) {
        s_key[j] = 0;
        s_idx[j] = 0x7fffffff;
    }
    __syncthreads();
    if (n2 <= (int)blockDim.x) {
        // The same network with one element per thread in registers (the attn helper's
        // design): strides below 32 exchange by warp shuffles, with no barrier; larger
        // strides go through shared memory. After a step the lower position of a pair
        // holds the earlier element in (key desc, index asc) order when the pair sorts
        // descending, the later one otherwise; thread p keeps the earlier one exactly
        // when (p is the lower) == (descending).
        const int p = threadIdx.x;
        const bool live = p < n2;
        u32 k = live ? s_key[p] : 0u;
        int ix = live ? s_idx[p] : 0x7fffffff;
        for (int size = 2; size <= n2; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                const int q = p ^ stride;
                u32 pk;
                int pi;
                if (stride >= 32) {
                    __syncthreads();  // the previous exchange has been read
                    if (live) { s_key[p] = k; s_idx[p] = ix; }
                    __syncthreads();
                    pk = live ? s_key[q] : 0u;
                    pi = live ? s_idx[q] : 0x7fffffff;
                } else {
                    pk = __shfl_xor_sync(0xffffffffu, k, stride);
                    pi = __shfl_xor_sync(0xffffffffu, ix, stride);
                }
                if (live) {
                    const bool lower = p < q;
                    const bool desc = ((lower ? p : q) & size) == 0;
                    const bool mine_first = k > pk || (k == pk && ix < pi);
                    if (mine_first != (lower == desc)) { k = pk; ix = pi; }
                }
            }
        }
        __syncthreads();
        if (live) { s_key[p] = k; s_idx[p] = ix; }
        __syncthreads();
    } else {
        for (int size = 2; size <= n2; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                for (int i = threadIdx.x; i < n2; i += blockDim.x) {
                    const int jx = i ^ stride;
                    if (jx > i) {
                        const bool desc = (i & size) == 0;
                        const u32 ka = s_key[i], kb = s_key[jx];
                        const int ia = s_idx[i], ib = s_idx[jx];
                        // "a before b" in (key desc, index asc) order.
                        const bool a_first = ka > kb || (ka == kb && ia < ib);
                        if (a_first != desc) {
                            s_key[i] = kb; s_key[jx] = ka;
                            s_idx[i] = ib; s_idx[jx] = ia;
                        }
                    }
                }
                __syncthreads();
            }
        }
    }
    for (int j = threadIdx.x; j < sel_k; j += blockDim.x) out[j] = j < top_k ? s_idx[j] : -1;
}

// idx_topk_v2: the same picks and order as idx_topk (DS4_IDX_TOPK_V2=0 restores it),
// with fewer block barriers and global reads on the decode main chain.
// - Each thread keeps its keys in registers (4 consecutive rows a round, up to
//   TK_REG_ROUNDS rounds = 16384 rows; more rows are re-read from global each pass).
// - The threshold is found by at most 3 histogram passes of 2048 bins spread linearly
//   over [min, max] of the keys (not over fixed digits), so the first pass usually
//   leaves a bin whose rows are all taken, which ends the search.
// - Rows equal to the threshold are ranked in index order only when the threshold
//   splits them.
// - The picks are ordered by a bucket sort: 4096 buckets over [T, max], then each
//   pick's slot = its bucket's start + picks of its bucket before it in (key desc,
//   index asc) order (two threads a pick when k <= 512). No sorting network.
// Keys are order_key(score + 0) (so -0 ties +0, as in the CPU's float compares),
// raised to at least 1: key 0 marks rows past `visible` and is below every row.
#define TK_THREADS 1024
#define TK_WARPS (TK_THREADS / 32)
#define TK_ROUND (TK_THREADS * 4)
#define TK_REG_ROUNDS 4
#define TK_BINS 2048
#define TK_BIN_BITS 11
#define TK_SORT_BINS 4096
#define TK_SORT_BITS 12
// Dynamic shared memory of a block (IDX_TOPK_V2_SMEM in backend.rs): >= sizeof(TkShared).
#define TK_SMEM_BYTES (56 * 1024)
#define TK_MAX_K 1024
#define TK_FULL 0xffffffffu
#define TK_ALL 0x7fffffff

struct TkShared {
    int hist[3][TK_BINS];  // one per select pass; [0] and [1] are the sort's scratch after
    int bucket[TK_SORT_BINS];  // pick counts a bucket, then bucket starts
    u32 pkey[TK_MAX_K];
    int pidx[TK_MAX_K];
    int pslot[TK_MAX_K];  // a pick's place within its bucket
    int wt[TK_WARPS];
    int wtr[2][TK_WARPS];
    u32 wmin[TK_WARPS], wmax[TK_WARPS];
    int sel_bin, sel_count, sel_need, npick;
};
static_assert(sizeof(TkShared) <= TK_SMEM_BYTES, "TK_SMEM_BYTES too small");

__device__ __forceinline__ u32 topk_key(float f) { return max(order_key(__fadd_rn(f, 0.0f)), 1u); }

__device__ __forceinline__ int tk_warp_incl(int v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(TK_FULL, v, o);
        if (lane >= o) v += u;
    }
    return v;
}

__device__ __forceinline__ u32 tk_warp_min(u32 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __reduce_min_sync(TK_FULL, v);
#else
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(TK_FULL, v, o));
    return v;
#endif
}

__device__ __forceinline__ u32 tk_warp_max(u32 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __reduce_max_sync(TK_FULL, v);
#else
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(TK_FULL, v, o));
    return v;
#endif
}

// Keys of rounds < TK_REG_ROUNDS held in registers (rounds(R, f) is unrolled).
struct TkRegKeys {
    u32 k[TK_REG_ROUNDS][4];
    template <class F>
    __device__ __forceinline__ void rounds(int R, F&& f) const {
#pragma unroll
        for (int i = 0; i < TK_REG_ROUNDS; i++)
            if (i < R) f(i, k[i]);
    }
};

// Keys of rows r0..r0+3 (0 past `visible`): one 16-byte load when aligned and whole.
__device__ __forceinline__ void tk_load4(const float* sc, int r0, int visible, u32 (&k)[4]) {
    if (r0 + 4 <= visible && ((unsigned long long)(sc + r0) & 15) == 0) {
        const float4 v = *(const float4*)(sc + r0);
        k[0] = topk_key(v.x);
        k[1] = topk_key(v.y);
        k[2] = topk_key(v.z);
        k[3] = topk_key(v.w);
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) k[e] = r0 + e < visible ? topk_key(sc[r0 + e]) : 0u;
    }
}

// Keys read from global memory on every use (more than TK_REG_ROUNDS rounds).
struct TkGlobalKeys {
    const float* sc;
    int visible;
    template <class F>
    __device__ __forceinline__ void rounds(int R, F&& f) const {
        for (int i = 0; i < R; i++) {
            u32 k[4];
            tk_load4(sc, i * TK_ROUND + threadIdx.x * 4, visible, k);
            f(i, k);
        }
    }
};

// Row of key e of round i held by this thread: rows are numbered round by round,
// 4 consecutive rows a thread.
__device__ __forceinline__ int tk_row(int i, int e) { return i * TK_ROUND + threadIdx.x * 4 + e; }

template <class Keys>
__device__ __forceinline__ void topk_v2_body(TkShared& s, const Keys& keys, int R, int top_k,
                                             int* out, int sel_k) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // Range of the keys: min over key - 1 (key 0, no row, wraps to the top).
    u32 mn = ~0u, mx = 0u;
    keys.rounds(R, [&](int, const u32(&k)[4]) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            mn = min(mn, k[e] - 1u);
            mx = max(mx, k[e]);
        }
    });
    mn = tk_warp_min(mn);
    mx = tk_warp_max(mx);
    if (lane == 0) {
        s.wmin[warp] = mn;
        s.wmax[warp] = mx;
    }
    __syncthreads();  // also orders the zeroed histograms before their atomics
    mn = tk_warp_min(s.wmin[lane]) + 1u;
    mx = tk_warp_max(s.wmax[lane]);

    // Threshold search. Invariant: `need` of the picks have keys in [lo, lo + hi]
    // (the rest are above lo + hi); bins of the pass are (key - lo) >> sh.
    u32 lo = mn, hi = mx - mn;
    int sh = max(0, 32 - __clz(hi) - TK_BIN_BITS);
    int need = top_k;
    u32 T = 0;
    int take = 0;  // rows equal to T taken, lowest index first (TK_ALL: all)
    for (int p = 0; p < 3; p++) {
        int* h = s.hist[p];
        keys.rounds(R, [&](int, const u32(&k)[4]) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const u32 d = k[e] - lo;
                if (d <= hi) atomicAdd(&h[d >> sh], 1);
            }
        });
        __syncthreads();
        // Thread tid owns bins 2047-2tid and 2046-2tid: counts from the top by thread.
        const int bhi = TK_BINS - 1 - 2 * tid;
        const int chi = h[bhi], clo = h[bhi - 1];
        const int sum = chi + clo;
        const int inc = tk_warp_incl(sum);
        if (lane == 31) s.wt[warp] = inc;
        __syncthreads();
        const int w = s.wt[lane];
        const int wi = tk_warp_incl(w);
        const int above = __shfl_sync(TK_FULL, wi - w, warp) + inc - sum;
        if (above < need && need <= above + sum) {
            if (need <= above + chi) {
                s.sel_bin = bhi;
                s.sel_count = chi;
                s.sel_need = need - above;
            } else {
                s.sel_bin = bhi - 1;
                s.sel_count = clo;
                s.sel_need = need - above - chi;
            }
        }
        __syncthreads();
        const int b = s.sel_bin, c = s.sel_count;
        need = s.sel_need;
        const u32 blo = lo + ((u32)b << sh);
        if (c == need || sh == 0) {
            // Every row of the bin is taken, or the bin is one key: T.
            T = blo;
            take = c == need ? TK_ALL : need;
            break;
        }
        lo = blo;
        hi = (1u << sh) - 1u;
        sh = max(sh - TK_BIN_BITS, 0);
    }
    // (Three passes reach sh == 0: sh starts at most 32 - 11 = 21.)

    // Collect the picks (any order) with their sort bucket; rows equal to T are
    // ranked in index order when T splits them.
    const bool split = take != TK_ALL;
    const u32 span = mx - T;
    const int bsh = max(0, 32 - __clz(span) - TK_SORT_BITS);
    int eq_base = 0;
    keys.rounds(R, [&](int i, const u32(&k)[4]) {
        int eqb = 0;
        if (split) {
            int ce = 0;
#pragma unroll
            for (int e = 0; e < 4; e++) ce += k[e] == T;
            const int inc = tk_warp_incl(ce);
            if (lane == 31) s.wtr[i & 1][warp] = inc;
            __syncthreads();
            const int w = s.wtr[i & 1][lane];
            const int wi = tk_warp_incl(w);
            eqb = eq_base + __shfl_sync(TK_FULL, wi - w, warp) + inc - ce;
            eq_base += __shfl_sync(TK_FULL, wi, 31);
        }
        bool pick[4];
        int cnt = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            pick[e] = k[e] > T || (k[e] == T && eqb < take);
            eqb += k[e] == T;
            cnt += pick[e];
        }
        const int inc = tk_warp_incl(cnt);
        int base = 0;
        if (lane == 31 && inc > 0) base = atomicAdd(&s.npick, inc);
        int q = __shfl_sync(TK_FULL, base, 31) + inc - cnt;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (pick[e] && q < TK_MAX_K) {
                s.pkey[q] = k[e];
                s.pidx[q] = tk_row(i, e);
                s.pslot[q] = atomicAdd(&s.bucket[(mx - k[e]) >> bsh], 1);
                q++;
            }
        }
    });
    __syncthreads();
    // Bucket starts (bucket 0 holds the largest keys): thread tid owns buckets 4tid..4tid+3.
    {
        int4* b4 = (int4*)s.bucket;
        const int4 c = b4[tid];
        const int sum = c.x + c.y + c.z + c.w;
        const int inc = tk_warp_incl(sum);
        if (lane == 31) s.wt[warp] = inc;
        __syncthreads();
        const int w = s.wt[lane];
        const int wi = tk_warp_incl(w);
        const int st = __shfl_sync(TK_FULL, wi - w, warp) + inc - sum;
        b4[tid] = make_int4(st, st + c.x, st + c.x + c.y, st + c.x + c.y + c.z);
        __syncthreads();
    }
    // Scatter the picks by bucket.
    u32* sk = (u32*)s.hist[0];
    int* si = s.hist[1];
    if (tid < top_k) {
        const u32 key = s.pkey[tid];
        const int at = s.bucket[(mx - key) >> bsh] + s.pslot[tid];
        sk[at] = key;
        si[at] = s.pidx[tid];
    }
    __syncthreads();
    // Rank within the bucket: picks before this one in (key desc, index asc) order.
    // Two threads a pick (alternate entries) when k <= 512.
    const int per = top_k <= TK_THREADS / 2 ? 2 : 1;
    const int q = tid / per, half = tid % per;
    u32 key = 0;
    int row = 0, st = 0, en = 0;
    if (q < top_k) {
        key = s.pkey[q];
        row = s.pidx[q];
        const int b = (mx - key) >> bsh;
        st = s.bucket[b];
        en = b + 1 < TK_SORT_BINS ? s.bucket[b + 1] : top_k;
    }
    int before = 0;
    for (int j = st + half; j < en; j += per) {
        const u32 kj = sk[j];
        before += kj > key || (kj == key && si[j] < row);
    }
    if (per == 2) before += __shfl_xor_sync(TK_FULL, before, 1);
    if (q < top_k && half == 0) out[st + before] = row;
    for (int j = top_k + tid; j < sel_k; j += TK_THREADS) out[j] = -1;
}

// One 1024-thread block per token; top_k <= TK_MAX_K (the backend checks).
extern "C" __global__ void __launch_bounds__(TK_THREADS)
    idx_topk_v2(const float* scores, int ld_s, const int* pos_p, int r, int top_k, int* sel,
                int sel_k) {
    extern __shared__ __align__(16) unsigned char tk_smem[];
    TkShared& s = *(TkShared*)tk_smem;
    PDL_TRIGGER();
    {
        // Zero the histograms and buckets while the predecessor finishes.
        int4* z = (int4*)&s.hist[0][0];
        const int n4 = (3 * TK_BINS + TK_SORT_BINS) / 4;
        for (int j = threadIdx.x; j < n4; j += TK_THREADS) z[j] = make_int4(0, 0, 0, 0);
        if (threadIdx.x == 0) s.npick = 0;
    }
    PDL_WAIT();
    const int t = blockIdx.x;
    const float* sc = scores + (long long)t * ld_s;
    int* out = sel + (long long)t * sel_k;
    // Round 0 is read with the position (rows < ld_s are inside the buffer).
    const int pos = *pos_p;
    const int r0 = threadIdx.x * 4;
    float f0[4];
    if (r0 + 4 <= ld_s && ((unsigned long long)(sc + r0) & 15) == 0) {
        const float4 v = *(const float4*)(sc + r0);
        f0[0] = v.x; f0[1] = v.y; f0[2] = v.z; f0[3] = v.w;
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) f0[e] = r0 + e < ld_s ? sc[r0 + e] : 0.0f;
    }
    const int visible = min((pos + t + 1) / r, ld_s);
    if (visible <= top_k || top_k <= 0) {
        for (int j = threadIdx.x; j < sel_k; j += TK_THREADS)
            out[j] = j < visible && j < top_k ? j : -1;
        return;
    }
    const int R = (visible + TK_ROUND - 1) / TK_ROUND;
    if (R <= TK_REG_ROUNDS) {
        TkRegKeys keys;
#pragma unroll
        for (int e = 0; e < 4; e++) keys.k[0][e] = r0 + e < visible ? topk_key(f0[e]) : 0u;
#pragma unroll
        for (int i = 1; i < TK_REG_ROUNDS; i++) {
            if (i < R) {
                tk_load4(sc, tk_row(i, 0), visible, keys.k[i]);
            } else {
#pragma unroll
                for (int e = 0; e < 4; e++) keys.k[i][e] = 0u;
            }
        }
        topk_v2_body(s, keys, R, top_k, out, sel_k);
    } else {
        TkGlobalKeys keys{sc, visible};
        topk_v2_body(s, keys, R, top_k, out, sel_k);
    }
}

// ---------------------------------------------------------------------------
// Attention with sinks (model.md §10), one KV head shared by every query head.
// Keys of token i (position p): the raw window (ring for positions < pos0, this
// chunk's rows otherwise), then the visible compressed rows (the indexer's picks
// when sel is given). Softmax runs online (running max / sum per warp), then the
// warps' partial results are merged with the sink. head_dim must be a multiple of
// 128 and at most 512: lane L owns dims 4L + 128c (c < head_dim/128).
// ---------------------------------------------------------------------------
#define ATT_WARPS 8

struct AttKeys {
    const float* rows; int ld_rows; const float* ring; int ring_cap; const float* comp;
    const int* srow; int first; int n_raw; int pos0; int hd;
    __device__ __forceinline__ const float* key(int j) const {
        if (j < n_raw) {
            const int tp = first + j;
            return tp >= pos0 ? rows + (long long)(tp - pos0) * ld_rows
                              : ring + (long long)(tp % ring_cap) * hd;
        }
        const int c = srow ? srow[j - n_raw] : j - n_raw;
        return comp + (long long)c * hd;
    }
};

// Sets up the key list of token i; returns the number of keys.
__device__ int att_setup(AttKeys& K, const float* rows, int ld_rows, const float* ring,
                         int ring_cap, const float* comp, int ratio, const int* sel, int sel_k,
                         int hd, int window, int pos0, int i) {
    __shared__ int s_ncomp;
    const int p = pos0 + i;
    K.rows = rows; K.ld_rows = ld_rows; K.ring = ring; K.ring_cap = ring_cap; K.comp = comp;
    K.srow = sel ? sel + (long long)i * sel_k : 0;
    K.first = max(0, p + 1 - window);
    K.n_raw = p + 1 - K.first;
    K.pos0 = pos0; K.hd = hd;
    const int n_vis = ratio > 0 ? (p + 1) / ratio : 0;
    // Picks come first, then -1 padding: the usable count is the first index that is
    // not a visible row (found in parallel; a serial scan costs one load latency each).
    if (threadIdx.x == 0) s_ncomp = K.srow ? sel_k : n_vis;
    __syncthreads();
    if (K.srow)
        for (int j = threadIdx.x; j < sel_k; j += blockDim.x) {
            const int c = K.srow[j];
            if (c < 0 || c >= n_vis) atomicMin(&s_ncomp, j);
        }
    __syncthreads();
    return K.n_raw + s_ncomp;
}

// Online-softmax state of one warp: running max, sum, and the lane's dims.
template <int NC>
struct AttAcc {
    float m, den, acc[4 * NC];
    __device__ void init() {
        m = NEG_INF; den = 0.0f;
#pragma unroll
        for (int i = 0; i < 4 * NC; i++) acc[i] = 0.0f;
    }
};

// One step of a warp over 4 keys (row(u) for u < nk): lanes split the dims, so every
// load is coalesced and the 4 rows' loads are in flight together; the rows stay in
// registers for the value pass (K = V).
template <int NC, typename RowFn>
__device__ __forceinline__ void att_step4(AttAcc<NC>& a, const float4* qr, int nk, RowFn row,
                                          int lane) {
    float4 kv[4][NC];
    float d[4];
#pragma unroll
    for (int u = 0; u < 4; u++) {
        const float* kp = row(u < nk ? u : 0);
#pragma unroll
        for (int c = 0; c < NC; c++) kv[u][c] = *(const float4*)(kp + 4 * lane + 128 * c);
    }
#pragma unroll
    for (int u = 0; u < 4; u++) {
        float x = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++)
            x += qr[c].x * kv[u][c].x + qr[c].y * kv[u][c].y + qr[c].z * kv[u][c].z +
                 qr[c].w * kv[u][c].w;
        d[u] = warp_sum(x);
    }
    float mx = a.m;
#pragma unroll
    for (int u = 0; u < 4; u++)
        if (u < nk) mx = fmaxf(mx, d[u]);
    const float corr = expf(a.m - mx);
    float pj[4], psum = 0.0f;
#pragma unroll
    for (int u = 0; u < 4; u++) {
        pj[u] = u < nk ? expf(d[u] - mx) : 0.0f;
        psum += pj[u];
    }
    a.den = a.den * corr + psum;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        float4 o = make_float4(a.acc[4 * c] * corr, a.acc[4 * c + 1] * corr,
                               a.acc[4 * c + 2] * corr, a.acc[4 * c + 3] * corr);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            o.x += pj[u] * kv[u][c].x;
            o.y += pj[u] * kv[u][c].y;
            o.z += pj[u] * kv[u][c].z;
            o.w += pj[u] * kv[u][c].w;
        }
        a.acc[4 * c] = o.x; a.acc[4 * c + 1] = o.y;
        a.acc[4 * c + 2] = o.z; a.acc[4 * c + 3] = o.w;
    }
    a.m = mx;
}

// Merges the per-warp states of each head with the sink and writes the outputs.
// Warp w holds head (w mod hb); heads are finished by warps 0..hb-1.
// scratch: ATT_WARPS * (2 + head_dim) floats.
template <int NC>
__device__ void att_merge(const AttAcc<NC>& a, float* scratch, int hd, int lane, int warp,
                          int hb, const float* sinks, int h0, float* out_row) {
    float* sm_m = scratch;
    float* sm_d = scratch + ATT_WARPS;
    float* sm_acc = scratch + 2 * ATT_WARPS;
    if (lane == 0) { sm_m[warp] = a.m; sm_d[warp] = a.den; }
#pragma unroll
    for (int c = 0; c < NC; c++)
#pragma unroll
        for (int e = 0; e < 4; e++) sm_acc[warp * hd + 4 * lane + 128 * c + e] = a.acc[4 * c + e];
    __syncthreads();
    if (warp < hb) {
        const int h = warp;
        const float sink = sinks[h0 + h];
        float M = sink;
        for (int w = h; w < ATT_WARPS; w += hb) M = fmaxf(M, sm_m[w]);
        float den = expf(sink - M);
        for (int w = h; w < ATT_WARPS; w += hb)
            if (sm_m[w] != NEG_INF) den += sm_d[w] * expf(sm_m[w] - M);
        float* o = out_row + (long long)(h0 + h) * hd;
        for (int c = 0; c < NC; c++)
            for (int e = 0; e < 4; e++) {
                const int d = 4 * lane + 128 * c + e;
                float acc = 0.0f;
                for (int w = h; w < ATT_WARPS; w += hb)
                    if (sm_m[w] != NEG_INF) acc += sm_acc[w * hd + d] * expf(sm_m[w] - M);
                o[d] = acc / den;
            }
    }
}

// Block (group of hb heads, token i), 8 warps. Warp w serves head w mod hb and every
// (8/hb)-th group of 32 keys. tiled = 1: the block stages each group of 32 keys in
// shared memory once for its hb heads (prefill); tiled = 0: warps read their keys
// from global memory (decode: one head per block, warps split the keys).
// Dynamic smem: hb*hd (queries) + (tiled ? 32*(hd+4) : 0), at least the merge scratch.
template <int NC>
__device__ void attention_impl(const float* q, int ld_q, const float* rows, int ld_rows,
                               const float* ring, int ring_cap, const float* comp, int ratio,
                               const int* sel, int sel_k, const float* sinks, int window,
                               const int* pos_p, int hb, int tiled, float* out, int ld_out) {
    extern __shared__ float smem[];
    __shared__ const float* s_rowp[32];
    const int hd = NC * 128;
    const int i = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hw = warp % hb, ks = ATT_WARPS / hb, sub = warp / hb;
    const int h0 = blockIdx.x * hb;
    AttKeys K;
    const int total = att_setup(K, rows, ld_rows, ring, ring_cap, comp, ratio, sel, sel_k, hd,
                                window, *pos_p, i);
    const int ldt = hd + 4;
    float* qs = smem;
    float* tile = smem + hb * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int j = threadIdx.x; j < hb * hd; j += blockDim.x)
        qs[j] = q[(long long)i * ld_q + (long long)h0 * hd + j] * scale;
    __syncthreads();
    const float* qh = qs + hw * hd;
    // The lane's dims of this warp's (scaled) query.
    float4 qr[NC];
#pragma unroll
    for (int c = 0; c < NC; c++) qr[c] = *(const float4*)(qh + 4 * lane + 128 * c);
    AttAcc<NC> a;
    a.init();
    if (tiled) {
        for (int g = 0; g * 32 < total; g++) {
            const int t0 = g * 32, nt = min(32, total - t0);
            __syncthreads();
            // Row addresses first (the indexer's picks are a dependent load), then the
            // rows, all loads independent.
            if (threadIdx.x < nt) s_rowp[threadIdx.x] = K.key(t0 + threadIdx.x);
            __syncthreads();
            const int hd4 = hd >> 2;
            for (int idx = threadIdx.x; idx < nt * hd4; idx += blockDim.x) {
                const int r = idx / hd4, c4 = idx - r * hd4;
                *(float4*)(tile + r * ldt + 4 * c4) = ((const float4*)s_rowp[r])[c4];
            }
            __syncthreads();
            for (int r0 = sub * 4; r0 < nt; r0 += ks * 4)
                att_step4<NC>(a, qr, min(4, nt - r0),
                              [&](int u) { return tile + (r0 + u) * ldt; }, lane);
        }
    } else {
        for (int j0 = sub * 4; j0 < total; j0 += ks * 4)
            att_step4<NC>(a, qr, min(4, total - j0), [&](int u) { return K.key(j0 + u); }, lane);
    }
    __syncthreads();
    att_merge<NC>(a, smem, hd, lane, warp, hb, sinks, h0, out + (long long)i * ld_out);
}

// One kernel per head_dim / 128 (the per-lane accumulators must be registers).
#define ATT_KERNEL(NC)                                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_##NC(             \
        const float* q, int ld_q, const float* rows, int ld_rows, const float* ring,          \
        int ring_cap, const float* comp, int ratio, const int* sel, int sel_k,                \
        const float* sinks, int window, const int* pos_p, int hb, int tiled, float* out,      \
        int ld_out) { PDL_START();                                                                         \
        attention_impl<NC>(q, ld_q, rows, ld_rows, ring, ring_cap, comp, ratio, sel, sel_k,   \
                           sinks, window, pos_p, hb, tiled, out, ld_out);                     \
    }
ATT_KERNEL(1)
ATT_KERNEL(2)
ATT_KERNEL(3)
ATT_KERNEL(4)

// Appends the chunk's raw rows to the ring (only the last ring_cap of them matter).
extern "C" __global__ void kv_append(const float* rows, int ld_rows, int n, const int* pos_p,
                                     float* ring, int ring_cap, int hd) { PDL_START();
    const int i = blockIdx.y;
    if (i < n - ring_cap) return;
    const int slot = (*pos_p + i) % ring_cap;
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < hd; d += gridDim.x * blockDim.x)
        ring[(long long)slot * hd + d] = rows[(long long)i * ld_rows + d];
}

// ---------------------------------------------------------------------------
// MoE glue (model.md §7.4).
// ---------------------------------------------------------------------------

// The expert choice itself (moe_route_pick, moe_route_block) is in route.cuh, shared
// with the routed products of matvec.cu that choose their own experts.
extern "C" __global__ void __launch_bounds__(ROUTE_THREADS)
    moe_route(const float* logits, int ld_l, int ne, int k, const float* bias,
              const int* tid2eid, const int* tok, int norm, float wscale, int* ids,
              float* wts) {
    const int t = blockIdx.x, ex = threadIdx.x;
    // The bias is a weight (never written by a kernel): load it before the wait.
    PDL_TRIGGER();
    const float bex = (bias && ex < ne) ? bias[ex] : 0.0f;
    PDL_WAIT();
    const float l = ex < ne ? logits[(long long)t * ld_l + ex] : 0.0f;
    moe_route_block<ROUTE_THREADS>(l, bex, t, ne, k, tid2eid, tok, norm, wscale, ids, wts);
}

// Decode (one token): the F16 router product [RR_ROWS × RR_K] · x and moe_route in one
// launch on a thread-block cluster of RR_CL CTAs (sm_90+; the host loads it when the
// arch has it). Each CTA holds RR_ROWS / RR_CL rows in registers, issued before
// PDL_WAIT, laid out and summed exactly as matvec.cu's mv_f16_p4_r*_s4 (lane l of a
// row's part j takes 16-byte pieces 128·j + l + 32·i, i < 4, summed in order with f32
// fma; warp sum; the 4 parts added in order from 0), so the logits are bit-identical
// to the two-launch path's. The logits go to `logits` and, over distributed shared
// memory, to CTA 0, which after the cluster barrier runs moe_route_block on them.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define RR_CL 16
#define RR_K 4096
#define RR_ROWS 256
#define RR_PPL 4
#define RR_S 4
#define RR_WARPS 16
#define RR_R (RR_ROWS / RR_CL / (RR_WARPS / RR_S))
extern "C" __global__ void __cluster_dims__(RR_CL, 1, 1) __launch_bounds__(RR_WARPS * 32, 1)
    moe_router_route(const u16* __restrict__ wr, const float* __restrict__ x, int ne, int k,
                     const float* bias, const int* tid2eid, const int* tok, int norm,
                     float wscale, float* logits, int* ids, float* wts) {
    constexpr int GROUPS = RR_WARPS / RR_S;
    __shared__ float s_logit[RR_ROWS];
    __shared__ float red[RR_WARPS * RR_R];
    PDL_TRIGGER();
    u32 rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = warp / RR_S, part = warp % RR_S;
    const int r0 = ((int)rank * GROUPS + group) * RR_R;
    const int p0 = part * 32 * RR_PPL + lane;
    uint4 w[RR_R][RR_PPL];
#pragma unroll
    for (int q = 0; q < RR_R; q++) {
        const uint4* row = (const uint4*)(wr + (long long)(r0 + q) * RR_K) + p0;
#pragma unroll
        for (int i = 0; i < RR_PPL; i++) {
            uint4 v;
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                         : "l"(row + 32 * i));
            w[q][i] = v;
        }
    }
    const int ex = threadIdx.x;
    const float bex = (rank == 0 && bias && ex < ne) ? bias[ex] : 0.0f;
    PDL_WAIT();  // the weights above stream in while the previous kernel finishes
    const float4* xp = (const float4*)x + 2 * p0;
    float acc[RR_R];
    f16_rows_dot<RR_PPL, RR_R>(w, xp, acc);
#pragma unroll
    for (int q = 0; q < RR_R; q++) {
        const float v = warp_sum(acc[q]);
        if (lane == 0) red[warp * RR_R + q] = v;
    }
    __syncthreads();
    if (part == 0 && lane < RR_R) {
        const int r = r0 + lane;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < RR_S; j++) s += red[(group * RR_S + j) * RR_R + lane];
        logits[r] = s;
        // CTA 0's copy: its s_logit[r] over distributed shared memory.
        const u32 local = (u32)__cvta_generic_to_shared(&s_logit[r]);
        u32 remote;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(0));
        asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(s) : "memory");
    }
    // Release / acquire: every CTA's stores to CTA 0's shared memory are visible there.
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::
                     : "memory");
    if (rank != 0) return;
    const float l = ex < ne ? s_logit[ex] : 0.0f;
    moe_route_block<RR_WARPS * 32>(l, bex, 0, ne, k, tid2eid, tok, norm, wscale, ids, wts);
}
#endif

// mid = w · silu(min(g, clamp)) · clamp(u, −clamp, clamp); wts null → w = 1.
extern "C" __global__ void swiglu(const float* g, const float* u, int ff, long long rows,
                                  const float* wts, float clamp, float* out) { PDL_START();
    const long long n = rows * ff;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        out[idx] = swiglu1(g[idx], u[idx], wts ? wts[idx / ff] : 1.0f, clamp);
    }
}

// out[t][j] = (Σ_s routed[t·k + s][j]) + shared[t][j], summed in the CPU's order.
extern "C" __global__ void moe_sum(const float* routed, const float* shared, int k, int e,
                                   float* out, int ld_out) { PDL_START();
    const int t = blockIdx.y;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < e; j += gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < k; s++) acc += routed[((long long)t * k + s) * e + j];
        acc += shared[(long long)t * e + j];
        out[(long long)t * ld_out + j] = acc;
    }
}
