// The HC split's Sinkhorn (model.md §5), shared by ops.cu (the HC step kernels) and
// matvec.cu (kernels that carry a deferred split off the main chain).
#pragma once

#ifndef NEG_INF
#define NEG_INF (__int_as_float(0xff800000))
#endif

// a / s through the fast path of the compiler's division (MUFU.RCP, one Newton step on
// the reciprocal, one correction of the quotient: the same five FMAs), without its
// range check and slow-path branch. With |a| and |s| in [2^-40, 2^40] (div_mid_ok) no
// step under- or overflows, the remainder is exact and the result is a / s correctly
// rounded, i.e. the bits of the division.
__device__ __forceinline__ float div_rn_mid(float a, float s) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
    const float e = __fmaf_rn(-s, r, 1.0f);
    const float r1 = __fmaf_rn(r, e, r);
    const float q0 = __fmul_rn(a, r1);
    const float rem = __fmaf_rn(-s, q0, a);
    return __fmaf_rn(r1, rem, q0);
}
__device__ __forceinline__ bool div_mid_ok(float a, float s) {
    const unsigned ea = (__float_as_uint(a) >> 23) & 0xffu;
    const unsigned es = (__float_as_uint(s) >> 23) & 0xffu;
    return ea - 87u <= 80u && es - 87u <= 80u;  // biased exponents 87..167
}

// Sinkhorn split (hc = 4) of hc_split_warp_t on one warp, writing comb only (post is
// another warp's, the pre weights the collapse block's). Lane a*4+b owns comb[a][b]. The row and
// column sums start from their first element instead of 0 + it: the values are never
// -0 (softmax outputs plus eps, then quotients of those), so 0 + g == g bit for bit.
// The 39 normalising divisions use div_rn_mid, branch-free; a lane that met an
// operand outside its range makes the warp redo the iterations with the division.
// Both save latency on the serial chain (one add and the branch per step).
// `m`: this lane's comb mix row (row 8 + lane for lanes < 16; others ignored).
__device__ __forceinline__ void hc_sinkhorn4_warp_v(float m, float r, float s2, float bcomb,
                                                    int iters, float eps, float* comb) {
    constexpr int HC = 4;
    const int lane = threadIdx.x & 31;
    const int a = lane / HC, b = lane % HC;
    const bool own = lane < HC * HC;
    float v = own ? __fadd_rn(__fmul_rn(s2, __fmul_rn(m, r)), bcomb) : 0.0f;
    float g[HC];
#pragma unroll
    for (int bb = 0; bb < HC; bb++) g[bb] = __shfl_sync(0xffffffffu, v, (a * HC + bb) & 31);
    float mx = NEG_INF;
#pragma unroll
    for (int bb = 0; bb < HC; bb++) mx = fmaxf(mx, g[bb]);
    v = expf(v - mx);
#pragma unroll
    for (int bb = 0; bb < HC; bb++) g[bb] = __shfl_sync(0xffffffffu, v, (a * HC + bb) & 31);
    v = v / (((g[0] + g[1]) + g[2]) + g[3]) + eps;
    const float v0 = v;
    const int n_it = iters > 0 ? iters : 1;
    bool ok = true;
    for (int it = 0; it < n_it; it++) {
        if (it > 0) {
#pragma unroll
            for (int bb = 0; bb < HC; bb++) g[bb] = __shfl_sync(0xffffffffu, v, (a * HC + bb) & 31);
            const float s = (((g[0] + g[1]) + g[2]) + g[3]) + eps;
            ok = ok && div_mid_ok(v, s);
            v = div_rn_mid(v, s);
        }
#pragma unroll
        for (int aa = 0; aa < HC; aa++) g[aa] = __shfl_sync(0xffffffffu, v, (aa * HC + b) & 31);
        const float s = (((g[0] + g[1]) + g[2]) + g[3]) + eps;
        ok = ok && div_mid_ok(v, s);
        v = div_rn_mid(v, s);
    }
    if (!__all_sync(0xffffffffu, ok || !own)) {
        v = v0;
        for (int it = 0; it < n_it; it++) {
            if (it > 0) {
#pragma unroll
                for (int bb = 0; bb < HC; bb++) g[bb] = __shfl_sync(0xffffffffu, v, (a * HC + bb) & 31);
                v /= (((g[0] + g[1]) + g[2]) + g[3]) + eps;
            }
#pragma unroll
            for (int aa = 0; aa < HC; aa++) g[aa] = __shfl_sync(0xffffffffu, v, (aa * HC + b) & 31);
            v /= (((g[0] + g[1]) + g[2]) + g[3]) + eps;
        }
    }
    if (own) comb[lane] = v;
}

__device__ __forceinline__ void hc_sinkhorn4_warp(const float* mix, float r, float s2, float bcomb,
                                                  int iters, float eps, float* comb) {
    hc_sinkhorn4_warp_v(mix[8 + (threadIdx.x & 15)], r, s2, bcomb, iters, eps, comb);
}

// The split (post, comb) of one token's HC step from the np partial rows of
// hc_post_mix_v3 (24 mix rows + Σx², floats, HC_PART_STRIDE apart), on one warp: lane l
// < 21 sums row 24 (l = 0) or row l + 3 over the rows in order, lane 0's Σx² gives r,
// lanes 0..3 the post sigmoids, the Sinkhorn on every lane. Run by a kernel that sits
// between the HC step that wrote the rows and the merge that reads post/comb (the
// TMA product's waiting warp, an extra block of a SwiGLU), off the main chain.
#define HC_PART_STRIDE 25
struct HcSplitJob {
    const float* part;
    const float* scale3;
    const float* base;
    float* post;
    float* comb;
    int np, e, iters;
    float hc_eps, rms_eps;
};
__device__ __forceinline__ void hc_split_warp(const HcSplitJob& j) {
    constexpr int HC = 4, NM = 24;
    const int lane = threadIdx.x & 31;
    const int row = lane == 0 ? NM : lane + 3;
    float v = 0.0f;
    if (lane <= 20) {
        float t[16];
        for (int p0 = 0; p0 < j.np; p0 += 16) {
#pragma unroll
            for (int q = 0; q < 16; q++)
                t[q] = p0 + q < j.np ? j.part[(long long)(p0 + q) * HC_PART_STRIDE + row] : 0.0f;
#pragma unroll
            for (int q = 0; q < 16; q++)
                if (p0 + q < j.np) v += t[q];
        }
    }
    const float ssq = __shfl_sync(0xffffffffu, v, 0);
    const float r = (float)(1.0 / sqrt((double)ssq / (double)(HC * j.e) + (double)j.rms_eps));
    const float mp = __shfl_sync(0xffffffffu, v, (lane & 3) + 1);
    const float mc = __shfl_sync(0xffffffffu, v, (lane & 15) + 5);
    if (lane < HC)
        j.post[lane] = 2.0f * sigmoidf_stable(
                                  __fadd_rn(__fmul_rn(j.scale3[1], __fmul_rn(mp, r)), j.base[HC + lane]));
    hc_sinkhorn4_warp_v(mc, r, j.scale3[2], lane < HC * HC ? j.base[2 * HC + lane] : 0.0f, j.iters,
                        j.hc_eps, j.comb);
}
