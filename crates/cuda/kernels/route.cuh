// MoE expert choice (model.md §7.4), shared by ops.cu (moe_route, moe_router_route) and
// matvec.cu (the routed gate/up products that choose their own experts).
#pragma once

#ifndef NEG_INF
#define NEG_INF (__int_as_float(0xff800000))
#endif

__device__ __forceinline__ float softplusf(float x) {
    if (x > 20.0f) return x;
    if (x < -20.0f) return expf(x);
    return log1pf(expf(x));
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One block of 256 threads per token, thread = expert: router score sqrt(softplus(l)),
// expert choice (hash table or biased top-k, higher first and the lower index on ties)
// and routing weights. The top-k has no serial arg-max rounds: the k-th largest of the
// 8 warps' maxima is a threshold that every expert of the top k reaches (k warp maxima
// are k experts at or above it), so each expert at or above it counts the ones that
// outrank it among those candidates only (typically a handful; all of them when k > 8
// or under massive ties) and that count is its place. ne ≤ 256, k ≤ 64.
#define ROUTE_THREADS 256
// The expert choice of token t on a block of NT threads (NT ≥ 256, a multiple of 32):
// thread ex holds its expert's logit `l` and bias `bex` (ignored for ex ≥ ne); every
// thread of the block calls it. On return (after a barrier) s_ids[j] / s_sc[j], j < k,
// hold the expert of place j and its score (shared memory of the caller).
template <int NT>
__device__ __forceinline__ void moe_route_pick(float l, float bex, int t, int ne, int k,
                                               const int* tid2eid, const int* tok, int* s_ids,
                                               float* s_sc) {
    __shared__ float s_s[NT];
    __shared__ float s_cb[NT];
    __shared__ int s_ci[NT];
    __shared__ float s_wmax[NT / 32];
    __shared__ float s_thr;
    __shared__ int s_nc;
    const int ex = threadIdx.x, lane = ex & 31, warp = ex >> 5;
    float sc = 0.0f, b = NEG_INF;
    if (ex < ne) {
        sc = sqrtf(softplusf(l));
        b = sc + bex;
    }
    s_s[ex] = sc;
    if (tid2eid) {
        int hashed = 0;
        if (ex < k) hashed = min(max(tid2eid[(long long)tok[t] * k + ex], 0), ne - 1);
        __syncthreads();
        if (ex < k) {
            s_ids[ex] = hashed;
            s_sc[ex] = s_s[hashed];
        }
    } else {
        const float wm = warp_max(b);
        if (lane == 0) s_wmax[warp] = wm;
        if (ex == 0) s_nc = 0;
        __syncthreads();
        if (warp == 0) {
            // The threshold: the largest warp maximum that at least k maxima reach.
            const int nwp = NT / 32;
            float thr = NEG_INF;
            for (int w0 = 0; w0 < nwp; w0 += 32) {
                const float m = w0 + lane < nwp ? s_wmax[w0 + lane] : NEG_INF;
                int ge = 0;
#pragma unroll
                for (int v = 0; v < NT / 32; v++) ge += s_wmax[v] >= m;
                thr = fmaxf(thr, warp_max(w0 + lane < nwp && ge >= k ? m : NEG_INF));
            }
            if (lane == 0) s_thr = thr;
        }
        __syncthreads();
        const bool cand = ex < ne && b >= s_thr;
        if (cand) {
            const int slot = atomicAdd(&s_nc, 1);
            s_cb[slot] = b;
            s_ci[slot] = ex;
        }
        __syncthreads();
        if (cand) {
            // The list's order is arbitrary; the count is not.
            const int nc = s_nc;
            int rank = 0;
            for (int c = 0; c < nc; c++) {
                const float o = s_cb[c];
                rank += (o > b) || (o == b && s_ci[c] < ex);
            }
            if (rank < k) {
                s_ids[rank] = ex;
                s_sc[rank] = sc;
            }
        }
    }
    __syncthreads();
}

// Routing weight of place j (< k) from the chosen experts' scores sc[0..k).
__device__ __forceinline__ float moe_route_weight(const float* sc, int j, int k, int norm,
                                                  float wscale) {
    float sum = 0.0f;
    for (int i = 0; i < k; i++) sum += sc[i];
    const float s = sc[j];
    return norm ? wscale * s / fmaxf(sum, 6.1035156e-5f) : wscale * s;
}

// moe_route's body for token t: moe_route_pick, then thread j < k writes place j.
template <int NT>
__device__ __forceinline__ void moe_route_block(float l, float bex, int t, int ne, int k,
                                                const int* tid2eid, const int* tok, int norm,
                                                float wscale, int* ids, float* wts) {
    __shared__ int s_ids[64];
    __shared__ float s_sc[64];
    moe_route_pick<NT>(l, bex, t, ne, k, tid2eid, tok, s_ids, s_sc);
    const int ex = threadIdx.x;
    if (ex < k) {
        ids[(long long)t * k + ex] = s_ids[ex];
        wts[(long long)t * k + ex] = moe_route_weight(s_sc, ex, k, norm, wscale);
    }
}

