// ds4 attention with sinks on the tensor cores (model.md §10; the SIMT kernels
// attention_N in ops.cu are the reference and the fallback).
//
// One KV head serves every query head (MQA, K = V), so a CTA takes a group of
// 16·MT heads of one token and reads each key tile once for all of them:
//   S = (q/√hd)·Kᵀ   [16·MT heads × 32 keys]  (mma m16n8k16, f32 accumulate)
//   online softmax per head in f32 (running max m, sum l)
//   O += P·K         [16·MT heads × hd dims]
// Each f32 operand is split into f16 hi + lo (x = hi + lo, ~22 bits) and every
// product is hi·hi + hi·lo + lo·hi, so results are close to f32 dots (inputs
// must stay inside the f16 range, |x| < 65504, as the model's normalised rows do).
//
// Keys of token i (position p = pos0 + i, pos0 read from the device): the raw
// window (positions max(0, p+1-window)..p; this chunk's rows from pos0 on, the
// ring before), then the visible compressed rows (the indexer's picks, -1
// padded, or all c < (p+1)/ratio). Grid (split, head group, token): a split
// covers keys [split·kps, split·kps + kps). With part == 0 the CTA owns all the
// token's keys and writes the output with the sink; otherwise it writes its
// partial (m, l, acc) to part and att_combine merges the splits (decode:
// flash-decoding over many CTAs). Surplus splits write m = -inf and exit.
// att_dc_<HD> (sm_90+) is the decode variant on a thread-block cluster of AT_CL
// CTAs per head group: rank r takes key tiles r, r + AT_CL, ..., and the
// cluster merges its partials through distributed shared memory, each rank
// writing a slice of the dims, so decode needs neither scratch nor a second
// kernel.

#include "pdl.cuh"
#include "att_merge.cuh"

typedef unsigned short u16;
typedef unsigned int u32;

#define NEG_INF (__int_as_float(0xff800000))
#define AT_THREADS 512
#define AT_WARPS 16
#define AT_KT 32  // keys per tile
// P enters the MMA as p·2^12 (exact), so the lo parts of small weights stay
// normal f16 numbers; the output is scaled back by 2^-12.
#define AT_PSCALE 4096.0f
#define AT_PUNSCALE (1.0f / 4096.0f)

__device__ __forceinline__ u16 at_f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float at_h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// x = hi + lo with both parts f16.
__device__ __forceinline__ void at_split(float x, u16& hi, u16& lo) {
    hi = at_f2h(x);
    lo = at_f2h(x - at_h2f(hi));
}
__device__ __forceinline__ u32 at_pack(u16 a, u16 b) { return (u32)a | ((u32)b << 16); }

__device__ __forceinline__ u32 at_smem(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
// ldmatrix from shared-space byte addresses: callers add compile-time offsets to a
// few per-thread bases, so the unrolled loops need no register per address.
__device__ __forceinline__ void at_ldm_x4(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void at_ldm_x2_t(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
}
__device__ __forceinline__ void at_mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// c += ah·bh + ah·bl + al·bh (the small terms first).
__device__ __forceinline__ void at_mma3(float* c, const u32* ah, const u32* al, u32 bh0, u32 bh1,
                                        u32 bl0, u32 bl1) {
    at_mma(c, al, bh0, bh1);
    at_mma(c, ah, bl0, bl1);
    at_mma(c, ah, bh0, bh1);
}

// Shared-memory layout of att_tc<MT, HD> in bytes (mirrored by crates/cuda/src/attention.rs).
// Rows of f16 are padded by 8 halves so ldmatrix rows fall in distinct banks.
#define AT_LDH(HD) ((HD) + 8)
// KT keys per tile (AT_KT, or 16 for the att_sd decode kernels).
#define AT_LDS(KT) ((KT) + 4)
#define AT_LDP(KT) ((KT) + 8)
#define AT_SM_Q(MT, HD) (16 * (MT) * AT_LDH(HD) * 2)
#define AT_SM_K(HD, KT) ((KT) * AT_LDH(HD) * 2)
#define AT_KSPLIT(MT, KT) (AT_WARPS / ((MT) * ((KT) / 8)))
#define AT_SM_S(MT, KT) (AT_KSPLIT(MT, KT) * 16 * (MT) * AT_LDS(KT) * 4)
#define AT_SM_P(MT, KT) (16 * (MT) * AT_LDP(KT) * 2)
#define AT_SMEM(MT, HD, KT)                                                                  \
    (2 * AT_SM_Q(MT, HD) + 2 * AT_SM_K(HD, KT) + AT_SM_S(MT, KT) + 2 * AT_SM_P(MT, KT) + \
     3 * 16 * (MT) * 4)

// Indexer picks a CTA keeps in shared memory (more go on being read from global).
#define AT_PICKS 1024

struct AtKeys {
    const float* rows; int ld_rows; const float* ring; int ring_cap; const float* comp;
    const int* srow; int sel_k; int first; int n_raw; int n_vis; int pos0; int hd;
    const int* spick;  // shared copy of srow once it is complete, else null
    // Row of key j: raw window keys first, then compressed rows; null when j names
    // no visible row (past the picks or the visible rows), so a key list read
    // ahead of its length stays in bounds.
    __device__ __forceinline__ const float* key_or_null(int j) const {
        if (j < n_raw) {
            const int tp = first + j;
            return tp >= pos0 ? rows + (long long)(tp - pos0) * ld_rows
                              : ring + (long long)(tp % ring_cap) * hd;
        }
        int c = j - n_raw;
        if (srow) c = c < sel_k ? (spick ? spick[c] : srow[c]) : -1;
        return c >= 0 && c < n_vis ? comp + (long long)c * hd : 0;
    }
};

// Thread-block cluster helpers (sm_90+): this CTA's rank, a shared address of
// this CTA mapped to the same offset in CTA `rank`, loads from such addresses,
// and a barrier over every thread of the cluster (release / acquire).
__device__ __forceinline__ u32 at_cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ u32 at_mapa(u32 addr, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
__device__ __forceinline__ float at_ld_cluster(u32 addr) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ void at_cluster_sync() {
    asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}

// CL = 0: grid (split, head group, token) as described above. CL > 0: a
// cluster of CL CTAs per (head group, token) shares the keys tile by tile and
// merges in shared memory (kps and part unused). KT: keys per tile (32, or 16 for
// the decode kernels att_sd: twice the CTAs, half the work and loads each).
// HOISTP: P·K loads each m-tile's P fragments once, not once per output n-tile
// (smem traffic of the decode tile: P 128 → 32 KB; same MMAs in the same order).
// QREG (MT 1, CL 0, HD 512): warp w takes dims [32w, 32w + 32) of every key n-tile
// for the scores, with its queries' A fragments loaded from global straight into
// registers: no query copy in shared memory, each key fragment read once (S smem
// traffic 192 → 64 KB at 32 keys); 16 score partials per key instead of 4.
// LEAN (the decode kernels): no barriers for a usable count that needs none (no
// indexer picks: every visible row), none at the top of a CTA's first tile.
// NW: warps per CTA (AT_WARPS; 8 for att_sq8: half the warps issuing the per-warp
// work of each phase, each with twice the dims).
template <int MT, int HD, int CL, int KT = AT_KT, bool HOISTP = false, bool QREG = false,
          bool LEAN = false, int NW = AT_WARPS>
__device__ __forceinline__ void att_tc_impl(
    const float* __restrict__ q, int ld_q, const float* rows, int ld_rows, const float* ring,
    int ring_cap, const float* comp, int ratio, const int* sel, int sel_k,
    const float* __restrict__ sinks, int window, const int* pos_p, int n_head, int kps,
    float* out, int ld_out, float* part, float* ring_app, int picks_first) {
    // Launched as a programmatic dependent (launch.rs): nothing an earlier kernel
    // wrote is read before the wait.
    PDL_START();
    constexpr int LDH = AT_LDH(HD);
    constexpr int R = 16 * MT;                    // head rows of the CTA
    constexpr int NT8 = KT / 8;                   // key n-tiles of S
    // Warps sharing one S tile (split dims).
    constexpr int THREADS = 32 * NW;
    constexpr int KSPLIT = QREG ? NW : NW / (MT * NT8);
    constexpr int QD = HD / NW;  // QREG: dims per warp
    static_assert(!QREG || (MT == 1 && CL == 0 && QD % 32 == 0), "QREG shape");
    static_assert(NW == AT_WARPS || (LEAN && QREG), "NW shape");
    static_assert(!LEAN || (CL == 0 && KT <= 32), "LEAN shape");  // a key per lane
    constexpr int KD = HD / KSPLIT;               // dims per S partial
    constexpr int NB = HD / NW / 8;               // output n-tiles per warp
    constexpr int PF = KT * HD / 4 / THREADS;     // float4 per thread per key tile
    // Softmax threads per head row (at most one per key), columns per thread.
    constexpr int TPR = THREADS / R < KT ? THREADS / R : KT;
    constexpr int CPT = KT / TPR;
    constexpr int LDS = AT_LDS(KT), LDP = AT_LDP(KT);  // sS and P row strides
    static_assert(KT % 16 == 0 && KSPLIT >= 1 && KD % 32 == 0 && NB % 2 == 0 && PF >= 1 &&
                      CPT >= 1 && (TPR & (TPR - 1)) == 0,
                  "shape");

    extern __shared__ __align__(16) unsigned char at_sm[];
    u16* qh = (u16*)at_sm;
    u16* ql = qh + R * LDH;
    u16* kh = ql + R * LDH;
    u16* kl = kh + KT * LDH;
    float* sS = (float*)(kl + KT * LDH);
    u16* ph = (u16*)(sS + KSPLIT * R * LDS);
    u16* pl = ph + R * LDP;
    float* sm_m = (float*)(pl + R * LDP);
    float* sm_l = sm_m + R;
    float* sm_c = sm_l + R;
    __shared__ int s_ncomp;
    __shared__ int s_pick[AT_PICKS];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int split = CL > 0 ? (int)at_cluster_rank() : blockIdx.x, n_splits = gridDim.x;
    const int h0 = blockIdx.y * R;
    const int i = blockIdx.z;
    const int n_rows_valid = min(R, n_head - h0);
    const int mt_valid = (n_rows_valid + 15) >> 4;

    // Independent loads first, so their latencies overlap: the position, this
    // thread's indexer pick (for the usable count), the queries; then the first
    // key tile (its addresses need only the position and the picks).
    const int pos0 = *pos_p;
    const int* srow = sel ? sel + (long long)i * sel_k : 0;
    const int my_pick = srow && tid < sel_k ? srow[tid] : 0;
    // Decode (one token, host-checked) appends its raw KV row to the ring here, so no
    // kv_append launch follows: the slot it takes held position pos0 - ring_cap,
    // outside every window this launch reads (ring_cap >= window or the context is
    // shorter than the ring). The first CTA of head group 0 copies it.
    if (ring_app && split == 0 && blockIdx.y == 0 && tid < HD / 4) {
        const float4 v = *(const float4*)(rows + (long long)i * ld_rows + 4 * tid);
        *(float4*)(ring_app + (long long)((pos0 + i) % ring_cap) * HD + 4 * tid) = v;
    }
    // Picks first (when they fit one per thread): the first key tile then finds its
    // compressed rows in shared memory, one global round trip (the pick, after the
    // position) off the chain before its loads; the queries load beside the keys.
    const bool early_picks = picks_first && srow && sel_k <= THREADS;
    if (early_picks) {
        if (tid < sel_k) s_pick[tid] = my_pick;
        __syncthreads();
    }

    // Queries split into hi/lo unscaled (1/√hd is applied to the f32 scores, so
    // the lo parts keep clear of f16 subnormals); rows of absent heads are zero.
    const float scale = 1.0f / sqrtf((float)HD);
    // QREG: A fragments of this warp's QD dims, k-steps j: register e holds
    // row g + 8·(e & 1), dims QD·warp + 16j + 8·(e >> 1) + 2·t4 + {0, 1}.
    u32 qfh[QREG ? QD / 16 : 1][4], qfl[QREG ? QD / 16 : 1][4];
    if constexpr (QREG) {
        const float* qb = q + (long long)i * ld_q + (long long)h0 * HD + warp * QD + 2 * t4;
#pragma unroll
        for (int j = 0; j < QD / 16; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = g + 8 * (e & 1);
                float2 v = make_float2(0.f, 0.f);
                if (r < n_rows_valid) v = *(const float2*)(qb + (long long)r * HD + 16 * j + 8 * (e >> 1));
                u16 a0, a1, b0, b1;
                at_split(v.x, a0, b0);
                at_split(v.y, a1, b1);
                qfh[j][e] = at_pack(a0, a1);
                qfl[j][e] = at_pack(b0, b1);
            }
    }
#pragma unroll
    for (int e0 = 0; e0 < (QREG ? 0 : R * HD / 4); e0 += THREADS) {
        const int e = e0 + tid;
        const int r = e / (HD / 4), c = 4 * (e % (HD / 4));
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < n_rows_valid) v = *(const float4*)(q + (long long)i * ld_q + (long long)(h0 + r) * HD + c);
        u16 a0, a1, a2, a3, b0, b1, b2, b3;
        at_split(v.x, a0, b0);
        at_split(v.y, a1, b1);
        at_split(v.z, a2, b2);
        at_split(v.w, a3, b3);
        *(uint2*)(qh + r * LDH + c) = make_uint2(at_pack(a0, a1), at_pack(a2, a3));
        *(uint2*)(ql + r * LDH + c) = make_uint2(at_pack(b0, b1), at_pack(b2, b3));
    }
    if (tid < R) { sm_m[tid] = NEG_INF; sm_l[tid] = 0.0f; sm_c[tid] = 0.0f; }

    // The token's key list (same rules as att_setup in ops.cu).
    const int p = pos0 + i;
    AtKeys K;
    K.rows = rows; K.ld_rows = ld_rows; K.ring = ring; K.ring_cap = ring_cap; K.comp = comp;
    K.srow = srow; K.sel_k = sel_k; K.spick = early_picks ? s_pick : 0;
    K.first = max(0, p + 1 - window);
    K.n_raw = p + 1 - K.first;
    K.pos0 = pos0; K.hd = HD;
    K.n_vis = ratio > 0 ? (p + 1) / ratio : 0;
    const int kb = CL > 0 ? split * KT : split * kps;
    constexpr int TSTEP = CL > 0 ? CL * KT : KT;  // from one tile of a CTA to its next

    // Key tile loads: float4 u of this thread is key (tid + 512u) / (HD/4), column
    // 4·(… % (HD/4)); keys at or past `lim` and keys that are no row read as zero.
    float4 pf[PF];
    auto load_tile = [&](int t0, int lim) {
        // LEAN: lane k finds the row of key t0 + k once and each load takes its key's
        // row from that lane (a shuffle), instead of every warp working out every row
        // it loads (~70 instructions per row: ring slot modulo, picks, 64-bit offsets;
        // half the instructions the kernel issues).
        const float* lane_row = 0;
        if constexpr (LEAN) lane_row = lane < KT && t0 + lane < lim ? K.key_or_null(t0 + lane) : 0;
#pragma unroll
        for (int u = 0; u < PF; u++) {
            const int e = tid + THREADS * u;
            const int r = e / (HD / 4), c = 4 * (e % (HD / 4));
            const float* kp;
            if constexpr (LEAN)
                kp = (const float*)__shfl_sync(0xffffffffu, (unsigned long long)lane_row, r);
            else
                kp = t0 + r < lim ? K.key_or_null(t0 + r) : 0;
            pf[u] = kp ? *(const float4*)(kp + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    // Before the usable count is known: keys past it are masked in the softmax.
    load_tile(kb, kb + (CL > 0 ? KT : min(kps, KT)));

    // Picks come first, then -1 padding: the usable count is the first index that
    // is not a visible row. The picks also go to shared memory, so later tiles
    // find their rows without a global round trip first.
    // LEAN without picks: the count is n_vis, known to every thread.
    const bool count_in_smem = !LEAN || srow;
    if (count_in_smem) {
        if (tid == 0) s_ncomp = srow ? sel_k : K.n_vis;
        if (srow && tid < sel_k) s_pick[tid] = my_pick;
        __syncthreads();
        if (srow) {
            if (tid < sel_k && (my_pick < 0 || my_pick >= K.n_vis)) atomicMin(&s_ncomp, tid);
            for (int j = tid + THREADS; j < sel_k; j += THREADS) {
                const int c = srow[j];
                if (j < AT_PICKS) s_pick[j] = c;
                if (c < 0 || c >= K.n_vis) atomicMin(&s_ncomp, j);
            }
        }
        __syncthreads();
    }
    if (srow && sel_k <= AT_PICKS) K.spick = s_pick;
    const int total = K.n_raw + (count_in_smem ? s_ncomp : K.n_vis);
    const int ke = CL > 0 ? total : min(total, kb + kps);
    float* prow = part ? part + ((long long)i * n_splits + split) * n_head * (HD + 2) : 0;
    // A cluster rank without keys stays: its empty partial (m = -inf, l = 0) is
    // merged like the others, and the cluster barriers need every CTA.
    if (CL == 0 && kb >= ke) {  // surplus split (host-sized grid): an empty partial
        if (part && tid < n_rows_valid) {
            prow[(long long)(h0 + tid) * (HD + 2)] = NEG_INF;
            prow[(long long)(h0 + tid) * (HD + 2) + 1] = 0.0f;
        }
        return;
    }

    if constexpr (CL > 0) {
        // A rank walks its tiles in sequence: ask L2 now for every tile after the
        // first (one 128-byte line per thread and step), so each later tile's
        // loads find their rows there instead of in DRAM.
        for (int t = kb + TSTEP; t < ke; t += TSTEP)
            for (int e = tid; e < KT * (HD / 32); e += THREADS) {
                const int j = t + e / (HD / 32);
                const float* kp = j < ke ? K.key_or_null(j) : 0;
                if (kp) asm volatile("prefetch.global.L2 [%0];" ::"l"(kp + 32 * (e % (HD / 32))));
            }
    }

    float acc[MT][NB][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nb = 0; nb < NB; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mt][nb][e] = 0.0f;

    for (int t0 = kb; t0 < ke; t0 += TSTEP) {
        const int nt = min(KT, ke - t0);
        // The previous tile's P·V is done with kh/kl/ph/pl (LEAN: no previous tile
        // at the first; the barriers after the K stores order everything else).
        if (!LEAN || t0 != kb) __syncthreads();
#pragma unroll
        for (int u = 0; u < PF; u++) {
            const int e = tid + THREADS * u;
            const int r = e / (HD / 4), c = 4 * (e % (HD / 4));
            u16 a0, a1, a2, a3, b0, b1, b2, b3;
            at_split(pf[u].x, a0, b0);
            at_split(pf[u].y, a1, b1);
            at_split(pf[u].z, a2, b2);
            at_split(pf[u].w, a3, b3);
            *(uint2*)(kh + r * LDH + c) = make_uint2(at_pack(a0, a1), at_pack(a2, a3));
            *(uint2*)(kl + r * LDH + c) = make_uint2(at_pack(b0, b1), at_pack(b2, b3));
        }
        __syncthreads();
        // The next tile's loads fly while this one is multiplied.
        if (t0 + TSTEP < ke) load_tile(t0 + TSTEP, ke);

        if constexpr (QREG) {
            // S partials: warp → dims [QD·warp, +QD) of every key n-tile; the same MMAs
            // per 32 dims as below (a fresh accumulator each, added in f32).
            const int ks = warp;
            const u32 ka = at_smem(kh + (lane & 7) * LDH + (lane >> 3) * 8 + ks * QD);
            constexpr u32 KLO = KT * LDH * 2;
#pragma unroll
            for (int n8 = 0; n8 < NT8; n8++) {
                float sc[4];
#pragma unroll
                for (int d32 = 0; d32 < QD / 32; d32++) {
                    u32 bh[4], bl[4];
                    float t[4] = {0.f, 0.f, 0.f, 0.f};
                    at_ldm_x4(bh, ka + 2 * (n8 * 8 * LDH + 32 * d32));
                    at_ldm_x4(bl, ka + KLO + 2 * (n8 * 8 * LDH + 32 * d32));
                    at_mma3(t, qfh[2 * d32], qfl[2 * d32], bh[0], bh[1], bl[0], bl[1]);
                    at_mma3(t, qfh[2 * d32 + 1], qfl[2 * d32 + 1], bh[2], bh[3], bl[2], bl[3]);
#pragma unroll
                    for (int e = 0; e < 4; e++) sc[e] = d32 == 0 ? t[e] : sc[e] + t[e];
                }
                float* so = sS + (ks * R + g) * LDS + n8 * 8 + 2 * t4;
                *(float2*)so = make_float2(sc[0], sc[1]);
                *(float2*)(so + 8 * LDS) = make_float2(sc[2], sc[3]);
            }
        } else {
            // S partials: warp → (m-tile, key n-tile, dim slice).
            const int tile = warp % (MT * NT8), ks = warp / (MT * NT8);
            const int mt = tile / NT8, n8 = tile % NT8;
            if (mt < mt_valid) {
                float s[4] = {0.f, 0.f, 0.f, 0.f};
                // Byte addresses; the lo halves sit a fixed distance after the hi.
                const u32 qa = at_smem(qh + (mt * 16 + (lane & 15)) * LDH + (lane >> 4) * 8);
                const u32 ka = at_smem(kh + (n8 * 8 + (lane & 7)) * LDH + (lane >> 3) * 8);
                constexpr u32 QLO = R * LDH * 2, KLO = KT * LDH * 2;
                // Each 32 dims go to a fresh accumulator, added to s in f32: the MMA
                // adder truncates, so long accumulations would drift.
#pragma unroll 2
                for (int d = ks * KD; d < (ks + 1) * KD; d += 32) {
                    u32 ah[4], al[4], bh[4], bl[4];
                    float t[4] = {0.f, 0.f, 0.f, 0.f};
                    at_ldm_x4(bh, ka + 2 * d);
                    at_ldm_x4(bl, ka + KLO + 2 * d);
                    at_ldm_x4(ah, qa + 2 * d);
                    at_ldm_x4(al, qa + QLO + 2 * d);
                    at_mma3(t, ah, al, bh[0], bh[1], bl[0], bl[1]);
                    at_ldm_x4(ah, qa + 2 * (d + 16));
                    at_ldm_x4(al, qa + QLO + 2 * (d + 16));
                    at_mma3(t, ah, al, bh[2], bh[3], bl[2], bl[3]);
#pragma unroll
                    for (int e = 0; e < 4; e++) s[e] += t[e];
                }
                float* so = sS + (ks * R + mt * 16 + g) * LDS + n8 * 8 + 2 * t4;
                *(float2*)so = make_float2(s[0], s[1]);
                *(float2*)(so + 8 * LDS) = make_float2(s[2], s[3]);
            }
        }
        __syncthreads();

        // Online softmax: TPR threads per head row, CPT keys each.
        {
            const int r = tid / TPR, sub = tid % TPR;
            if (r < 16 * mt_valid) {
                float sv[CPT];
                float mx = NEG_INF;
#pragma unroll
                for (int u = 0; u < CPT; u++) {
                    const int c = sub * CPT + u;
                    float x = 0.0f;
#pragma unroll
                    for (int ks = 0; ks < KSPLIT; ks++) x += sS[(ks * R + r) * LDS + c];
                    sv[u] = c < nt ? x * scale : NEG_INF;
                    mx = fmaxf(mx, sv[u]);
                }
#pragma unroll
                for (int o = TPR / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
                const float m_old = sm_m[r];
                const float m_new = fmaxf(m_old, mx);
                float sum = 0.0f;
#pragma unroll
                for (int u = 0; u < CPT; u++) {
                    const int c = sub * CPT + u;
                    const float pj = sub * CPT + u < nt ? expf(sv[u] - m_new) : 0.0f;
                    sum += pj;
                    u16 a, b;
                    at_split(pj * AT_PSCALE, a, b);
                    ph[r * LDP + c] = a;
                    pl[r * LDP + c] = b;
                }
#pragma unroll
                for (int o = TPR / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
                if (sub == 0) {
                    const float corr = expf(m_old - m_new);
                    sm_l[r] = sm_l[r] * corr + sum;
                    sm_m[r] = m_new;
                    sm_c[r] = corr;
                }
            }
        }
        __syncthreads();

        // O = O·corr + P·K over this warp's dims.
        {
            const int d0 = warp * (NB * 8);
            // Per-thread bases; (m-tile, key step, n-tile) offsets are immediates.
            const u32 pa = at_smem(ph + (lane & 15) * LDP + (lane >> 4) * 8);
            const u32 kt = at_smem(kh + (lane & 15) * LDH + d0);
            constexpr u32 PLO = R * LDP * 2, KLO = KT * LDH * 2;
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                if (mt < mt_valid) {
                    // The tile's products in a fresh accumulator (see the scores),
                    // then O = O·corr + tile in f32; one n-tile at a time (registers).
                    const float c_lo = sm_c[mt * 16 + g], c_hi = sm_c[mt * 16 + g + 8];
                    // HOISTP: this m-tile's P fragments for every key step, loaded once.
                    u32 pah[HOISTP ? KT / 16 : 1][4], pal[HOISTP ? KT / 16 : 1][4];
                    if constexpr (HOISTP) {
#pragma unroll
                        for (int kk = 0; kk < KT / 16; kk++) {
                            const u32 po = 2 * (mt * 16 * LDP + kk * 16);
                            at_ldm_x4(pah[kk], pa + po);
                            at_ldm_x4(pal[kk], pa + PLO + po);
                        }
                    }
#pragma unroll
                    for (int nb = 0; nb < NB; nb++) {
                        float t[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                        for (int kk = 0; kk < KT / 16; kk++) {
                            u32 ah[4], al[4], bh[2], bl[2];
                            if constexpr (HOISTP) {
#pragma unroll
                                for (int e = 0; e < 4; e++) { ah[e] = pah[kk][e]; al[e] = pal[kk][e]; }
                            } else {
                                const u32 po = 2 * (mt * 16 * LDP + kk * 16);
                                at_ldm_x4(ah, pa + po);
                                at_ldm_x4(al, pa + PLO + po);
                            }
                            // Lanes 0-15 address keys kk·16 + 0..15 of dims d0 + nb·8.
                            const u32 ko = 2 * (kk * 16 * LDH + nb * 8);
                            at_ldm_x2_t(bh, kt + ko);
                            at_ldm_x2_t(bl, kt + KLO + ko);
                            at_mma3(t, ah, al, bh[0], bh[1], bl[0], bl[1]);
                        }
                        acc[mt][nb][0] = fmaf(acc[mt][nb][0], c_lo, t[0]);
                        acc[mt][nb][1] = fmaf(acc[mt][nb][1], c_lo, t[1]);
                        acc[mt][nb][2] = fmaf(acc[mt][nb][2], c_hi, t[2]);
                        acc[mt][nb][3] = fmaf(acc[mt][nb][3], c_hi, t[3]);
                    }
                }
            }
        }
    }
    // The cluster merge reuses the query area; the partial / output writes read only
    // registers and the softmax state, ordered by the last tile's barriers (LEAN: none).
    if (CL > 0 || !LEAN) __syncthreads();

    // Rows g and g+8 of each m-tile; columns 2·t4, 2·t4+1 of each n-tile.
    const int d0 = warp * (NB * 8);
    if constexpr (CL > 0) {
        // The sink's load flies across the barrier.
        const int mr = tid >> 5;  // merge: 32 threads per head row
        const float sink = mr < n_rows_valid ? sinks[h0 + mr] : 0.0f;
        // This CTA's unnormalised output, [R][HD] f32 over the (now unused) queries.
        float* so = (float*)at_sm;
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int half = 0; half < 2; half++)
#pragma unroll
                for (int nb = 0; nb < NB; nb++)
                    *(float2*)(so + (mt * 16 + g + 8 * half) * HD + d0 + nb * 8 + 2 * t4) =
                        make_float2(acc[mt][nb][2 * half] * AT_PUNSCALE,
                                    acc[mt][nb][2 * half + 1] * AT_PUNSCALE);
        at_cluster_sync();
        // Rank `split` writes dims [split·HD/CL, (split+1)·HD/CL) of every head:
        // out = Σ_c o_c·e^(m_c−M) / (e^(sink−M) + Σ_c l_c·e^(m_c−M)), M = max(sink, m_c).
        static_assert(R * 32 == THREADS && (HD / CL) % 32 == 0, "merge shape");
        if (mr < n_rows_valid) {
            float w[CL];
            float M = sink;
#pragma unroll
            for (int c = 0; c < CL; c++) {
                w[c] = at_ld_cluster(at_mapa(at_smem(sm_m + mr), c));
                M = fmaxf(M, w[c]);
            }
            float den = expf(sink - M);
#pragma unroll
            for (int c = 0; c < CL; c++) {
                const float l = at_ld_cluster(at_mapa(at_smem(sm_l + mr), c));
                w[c] = w[c] == NEG_INF ? 0.0f : expf(w[c] - M);
                den += w[c] * l;
            }
            const float inv = 1.0f / den;
            float* o = out + (long long)i * ld_out + (long long)(h0 + mr) * HD;
#pragma unroll
            for (int dd = lane; dd < HD / CL; dd += 32) {
                const int d = split * (HD / CL) + dd;
                const u32 src = at_smem(so + mr * HD + d);
                float v[CL];
#pragma unroll
                for (int c = 0; c < CL; c++) v[c] = at_ld_cluster(at_mapa(src, c));
                float a = 0.0f;
#pragma unroll
                for (int c = 0; c < CL; c++) a += w[c] * v[c];
                o[d] = a * inv;
            }
        }
        // No CTA leaves while another may still read its shared memory.
        at_cluster_sync();
    } else {
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int r = mt * 16 + g + 8 * half;
                if (r >= n_rows_valid) continue;
                const int h = h0 + r;
                const float m = sm_m[r], l = sm_l[r];
                const float us = AT_PUNSCALE;
                if (part) {
                    float* pr = prow + (long long)h * (HD + 2);
                    if (warp == 0 && t4 == 0) { pr[0] = m; pr[1] = l; }
#pragma unroll
                    for (int nb = 0; nb < NB; nb++)
                        *(float2*)(pr + 2 + d0 + nb * 8 + 2 * t4) =
                            make_float2(acc[mt][nb][2 * half] * us, acc[mt][nb][2 * half + 1] * us);
                } else {
                    const float sink = sinks[h];
                    const float M = fmaxf(m, sink);
                    const float em = expf(m - M);
                    const float f = em / (l * em + expf(sink - M)) * us;
                    float* o = out + (long long)i * ld_out + (long long)h * HD + d0;
#pragma unroll
                    for (int nb = 0; nb < NB; nb++)
                        *(float2*)(o + nb * 8 + 2 * t4) =
                            make_float2(acc[mt][nb][2 * half] * f, acc[mt][nb][2 * half + 1] * f);
                }
            }
        }
    }
}

#define AT_KERNEL(MT, HD)                                                                        \
    extern "C" __global__ void __launch_bounds__(AT_THREADS, 1) att_tc_##MT##_##HD(             \
        const float* q, int ld_q, const float* rows, int ld_rows, const float* ring,             \
        int ring_cap, const float* comp, int ratio, const int* sel, int sel_k,                   \
        const float* sinks, int window, const int* pos_p, int n_head, int kps, float* out,       \
        int ld_out, float* part, float* ring_app, int picks_first) {                             \
        att_tc_impl<MT, HD, 0>(q, ld_q, rows, ld_rows, ring, ring_cap, comp, ratio, sel, sel_k,  \
                               sinks, window, pos_p, n_head, kps, out, ld_out, part, ring_app,   \
                               picks_first);                                                     \
    }
AT_KERNEL(4, 512)
AT_KERNEL(1, 512)
AT_KERNEL(4, 256)
AT_KERNEL(1, 256)

// Split decode (the att_tc_1 arguments, grid (splits, head groups of 16, tokens),
// kps a multiple of KT): KT-key tiles and P fragments loaded once per tile.
// KT = 16 doubles the CTAs of the small layers (window-only: 8 splits instead of 4).
#define AT_SD_KERNEL(KT, HD)                                                                     \
    extern "C" __global__ void __launch_bounds__(AT_THREADS, 1) att_sd_##KT##_##HD(             \
        const float* q, int ld_q, const float* rows, int ld_rows, const float* ring,             \
        int ring_cap, const float* comp, int ratio, const int* sel, int sel_k,                   \
        const float* sinks, int window, const int* pos_p, int n_head, int kps, float* out,       \
        int ld_out, float* part, float* ring_app, int picks_first) {                             \
        att_tc_impl<1, HD, 0, KT, true, false, true>(q, ld_q, rows, ld_rows, ring, ring_cap,     \
                                                     comp, ratio, sel, sel_k, sinks, window,     \
                                                     pos_p, n_head, kps, out, ld_out, part,      \
                                                     ring_app, picks_first);                     \
    }
AT_SD_KERNEL(32, 512)
AT_SD_KERNEL(16, 512)
AT_SD_KERNEL(32, 256)
AT_SD_KERNEL(16, 256)

// att_sd_<KT>_512 with the queries in registers (QREG; same arguments).
#define AT_SQ_KERNEL(KT)                                                                         \
    extern "C" __global__ void __launch_bounds__(AT_THREADS, 1) att_sq_##KT##_512(              \
        const float* q, int ld_q, const float* rows, int ld_rows, const float* ring,             \
        int ring_cap, const float* comp, int ratio, const int* sel, int sel_k,                   \
        const float* sinks, int window, const int* pos_p, int n_head, int kps, float* out,       \
        int ld_out, float* part, float* ring_app, int picks_first) {                             \
        att_tc_impl<1, 512, 0, KT, true, true, true>(q, ld_q, rows, ld_rows, ring, ring_cap,     \
                                                     comp, ratio, sel, sel_k, sinks, window,     \
                                                     pos_p, n_head, kps, out, ld_out, part,      \
                                                     ring_app, picks_first);                     \
    }
AT_SQ_KERNEL(32)
AT_SQ_KERNEL(16)

// att_sq_<KT>_512 on 8 warps (256 threads): each warp 64 dims of the scores and of
// the output (same arguments; grid as att_sq).
#define AT_SQ8_KERNEL(KT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 1) att_sq8_##KT##_512(                     \
        const float* q, int ld_q, const float* rows, int ld_rows, const float* ring,             \
        int ring_cap, const float* comp, int ratio, const int* sel, int sel_k,                   \
        const float* sinks, int window, const int* pos_p, int n_head, int kps, float* out,       \
        int ld_out, float* part, float* ring_app, int picks_first) {                             \
        att_tc_impl<1, 512, 0, KT, true, true, true, 8>(q, ld_q, rows, ld_rows, ring, ring_cap,  \
                                                        comp, ratio, sel, sel_k, sinks, window,  \
                                                        pos_p, n_head, kps, out, ld_out, part,   \
                                                        ring_app, picks_first);                  \
    }
AT_SQ8_KERNEL(32)
AT_SQ8_KERNEL(16)

// Decode on a cluster of AT_CL CTAs per 16 heads (grid (AT_CL, head groups,
// tokens)); Hopper and later only (the host loads them when the arch has them).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define AT_CL 8
#define AT_DC_KERNEL(HD)                                                                         \
    extern "C" __global__ void __cluster_dims__(AT_CL, 1, 1) __launch_bounds__(AT_THREADS, 1)   \
        att_dc_##HD(const float* q, int ld_q, const float* rows, int ld_rows, const float* ring, \
                    int ring_cap, const float* comp, int ratio, const int* sel, int sel_k,       \
                    const float* sinks, int window, const int* pos_p, int n_head, float* out,    \
                    int ld_out, float* ring_app, int picks_first) {                              \
        att_tc_impl<1, HD, AT_CL>(q, ld_q, rows, ld_rows, ring, ring_cap, comp, ratio, sel,      \
                                  sel_k, sinks, window, pos_p, n_head, 0, out, ld_out, 0,        \
                                  ring_app, picks_first);                                        \
    }
AT_DC_KERNEL(512)
AT_DC_KERNEL(256)
#endif

// Merges the splits' partials of (head blockIdx.x, token blockIdx.y) with the sink:
// out = Σ_s acc_s·e^(m_s−M) / (e^(sink−M) + Σ_s l_s·e^(m_s−M)), M = max(sink, m_s).
// hd/4 threads, a float4 of dims each; 8 splits' loads in flight per step.
#define AT_MAX_SPLITS 1024
extern "C" __global__ void att_combine(const float* part, int n_splits, int n_head, int hd,
                                       const float* sinks, float* out, int ld_out) {
    PDL_START();
    const int h = blockIdx.x, i = blockIdx.y;
    const long long stride = (long long)n_head * (hd + 2);
    const float* base = part + (long long)i * n_splits * stride + (long long)h * (hd + 2);
    __shared__ float s_w[AT_MAX_SPLITS];
    __shared__ float s_den;
    const int ns = min(n_splits, AT_MAX_SPLITS);
    const float sink = sinks[h];
    // Split weights e^(m_s − M) (0 for empty splits), computed once per block.
    if (threadIdx.x < 32) {
        const float den =
            att_split_den(base, stride, ns, sink, threadIdx.x, [&](int s, float w) { s_w[s] = w; });
        if (threadIdx.x == 0) s_den = den;
    }
    __syncthreads();
    const float inv = 1.0f / s_den;
    float* o = out + (long long)i * ld_out + (long long)h * hd;
    for (int d = 4 * threadIdx.x; d < hd; d += 4 * blockDim.x) {
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s0 = 0; s0 < ns; s0 += 8) {
            float2 v[8][2];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                // Partials are float2-aligned (hd + 2 floats per head).
                const float2* src = (const float2*)(base + (s0 + u) * stride + 2 + d);
                v[u][0] = s0 + u < ns ? src[0] : make_float2(0.f, 0.f);
                v[u][1] = s0 + u < ns ? src[1] : make_float2(0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const float w = s0 + u < ns ? s_w[s0 + u] : 0.0f;
                a.x = att_split_acc(a.x, w, v[u][0].x);
                a.y = att_split_acc(a.y, w, v[u][0].y);
                a.z = att_split_acc(a.z, w, v[u][1].x);
                a.w = att_split_acc(a.w, w, v[u][1].y);
            }
        }
        *(float2*)(o + d) = make_float2(a.x * inv, a.y * inv);
        *(float2*)(o + d + 2) = make_float2(a.z * inv, a.w * inv);
    }
}
