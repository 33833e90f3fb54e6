// ds4 CUDA kernels: tiled matrix-matrix products for prefill (tensor cores).
//
// Compiled by NVRTC without CUDA headers (MMA and conversions are inline PTX).
// Numerics are the decode matvec's (matvec.cu, model.md §5): quantized weights
// meet the SAME quantized activations (Q8_0 for Q8_0 weights, Q8_K for Q2_K /
// Q4_K / IQ2_XXS), with exact integer sums per block or sub-block, scaled into
// f32 accumulators. Only the order of the f32 additions differs from the CPU.
//
// Tiling: a block of 256 threads (8 warps) computes BM = 128 weight rows x
// BN = 64 tokens. Per K chunk of 256 elements (one Q8_K super-block, or eight
// Q8_0 blocks) the block decodes its 128 weight rows to int8 in shared memory
// and copies the 64 tokens' int8 codes next to them; each warp then runs
// mma.sync m16n8k32 (s8 x s8 -> s32) over a 32-row x 32-token sub-tile.
// Per-unit scales that fit int8 are folded into the weight bytes (Q2_K's 4-bit
// scale x 2-bit q <= 45); the others (Q4_K's 6-bit scale, IQ2_XXS's 2ls+1) are
// applied to each unit's integer sum with an integer multiply-add. The K-quant
// min term (dmin · Σ m_k · bsum_k) is Σ_i m(i) · x_i: a second MMA of the
// per-element min bytes against the same activation codes, so no bsums needed.
//
// F16 weights (and F32, for the small test models) take f32 activations: the
// activation is split into f16 hi + lo (x = hi + lo to ~2^-22), weights are f16
// (F32 weights split the same way), and m16n8k16 f16 MMAs accumulate in f32.
// Activations must lie within the f16 range (|x| < 65504).
//
// Shared-memory rows are 272 bytes (256 + 16 padding): the fragment loads of
// the 8 row-groups x 4 lanes then hit 32 distinct banks.
//
// The same kernels serve the dense product (token tile = blockIdx.x) and the
// routed experts (blockIdx.x = entry of a tile list built on the device by
// gemm_group: expert, first position in the expert-sorted slot list, count).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define GM_BM 128
#define GM_BN 64
#define GM_THREADS 256
#define GM_LD 272

#define TY_Q8_0 0
#define TY_Q2_K 1
#define TY_Q4_K 2
#define TY_IQ2_XXS 3

__device__ __forceinline__ float g_h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 g_f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Exact int -> float for |v| < 2^22 with two full-rate ops (I2F is slow).
__device__ __forceinline__ float i2f_small(int v) {
    return __int_as_float(v + 0x4B400000) - 12582912.0f;
}

__device__ __forceinline__ u32 ld_u32_a2(const u8* p) {  // 4 bytes at a 2-aligned address
    const u16* h = (const u16*)p;
    return (u32)h[0] | ((u32)h[1] << 16);
}

__device__ __forceinline__ void mma_s8(int* c, const int* a, const int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// m16n8k16 s8: A {row g, row g+8} x 4 bytes at k 4t; B 4 bytes at k 4t, column g.
__device__ __forceinline__ void mma_s8_k16(int* c, const int* a, int b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b));
}

__device__ __forceinline__ void mma_f16(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A fragment (16 rows x 32 bytes) at `p` = row (g) , byte 4t of the k-slab:
// {row g word t, row g+8 word t, row g word t+4, row g+8 word t+4}. The same
// word positions serve s8 k32 and f16 k16.
__device__ __forceinline__ void ld_frag_a(int* a, const u8* p) {
    a[0] = *(const int*)p;
    a[1] = *(const int*)(p + 8 * GM_LD);
    a[2] = *(const int*)(p + 16);
    a[3] = *(const int*)(p + 8 * GM_LD + 16);
}

__device__ __forceinline__ void ld_frag_b(int* b, const u8* p) {
    b[0] = *(const int*)p;
    b[1] = *(const int*)(p + 16);
}

__device__ __forceinline__ void g_cp_async16(void* smem, const void* gmem) {
    const u32 sa = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(gmem) : "memory");
}
__device__ __forceinline__ void g_cp_async4(void* smem, const void* gmem) {
    const u32 sa = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(sa), "l"(gmem) : "memory");
}
__device__ __forceinline__ void g_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void g_cp_wait_1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
__device__ __forceinline__ void g_cp_wait_0() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

__device__ __forceinline__ u32 sign_mask4_g(u32 bits4) {  // 4 sign bits -> 4 byte masks
    return ((bits4 * 0x00204081u) & 0x01010101u) * 0xffu;
}

// Bytes with mask 0xff negated (values <= 43, so no carry crosses a byte).
__device__ __forceinline__ u32 apply_signs(u32 v, u32 m) {
    return (v ^ m) + (m & 0x01010101u);
}

#include "iq2xxs_grid.cuh"

// ---------------------------------------------------------------------------
// Token tile: which activation row feeds each of the BN columns and which
// output row receives it. Returns false when the block has no work.
// ---------------------------------------------------------------------------

__device__ __forceinline__ bool token_tile(const int* __restrict__ tiles,
                                           const int* __restrict__ sorted,
                                           const int* __restrict__ n_tiles, int ntok, int x_group,
                                           int* s_arow, int* s_orow, int* s_info) {
    // s_info: [0] expert, [1] tokens in the tile.
    if (threadIdx.x == 0) {
        int e = 0, count = 0, start = 0;
        if (tiles) {
            const int tile = blockIdx.x;
            if (tile < *n_tiles) {
                e = tiles[3 * tile];
                start = tiles[3 * tile + 1];
                count = tiles[3 * tile + 2];
            }
        } else {
            start = blockIdx.x * GM_BN;
            count = min(GM_BN, ntok - start);
        }
        s_info[0] = e;
        s_info[1] = count;
        s_info[2] = start;
    }
    __syncthreads();
    const int count = s_info[1];
    if (count <= 0) return false;
    if (threadIdx.x < GM_BN) {
        const int j = threadIdx.x;
        int arow = 0, orow = -1;
        if (j < count) {
            if (tiles) {
                const int slot = sorted[s_info[2] + j];
                arow = slot / x_group;
                orow = slot;
            } else {
                arow = s_info[2] + j;
                orow = arow;
            }
        }
        s_arow[j] = arow;
        s_orow[j] = orow;
    }
    __syncthreads();
    return true;
}

// ---------------------------------------------------------------------------
// Quantized GEMM.
// ---------------------------------------------------------------------------

// Dynamic shared memory layout (bytes).
#define SM_A 0
#define SM_M (SM_A + GM_BM * GM_LD)
#define SM_B (SM_M + GM_BM * GM_LD)
#define SM_WD (SM_B + GM_BN * GM_LD)        // f32 [BM][8]
#define SM_WS (SM_WD + GM_BM * 8 * 4)       // u8 [BM][8]
#define SM_XD (SM_WS + GM_BM * 8)           // f32 [BN][8]
#define SM_GRID (SM_XD + GM_BN * 8 * 4)     // u64 [256]
#define SM_TOTAL (SM_GRID + 256 * 8)
// K-quants reuse the SM_M area (the expanded Q8_0-less layout does not need it):
// raw block bytes of the next chunk, the per-16 mins of each row, and each
// token's per-16 activation sums split as bsum = lo + 128·hi (lo in [0,128),
// hi in [-16,16)), so the min term Σ_k m_k·bsum_k is two m16n8k16 s8 MMAs.
#define SMK_RAW 0
#define SMK_MIN (GM_BM * 144)
#define SMK_BS (SMK_MIN + GM_BM * 16)

// PIPE (Q2_K; IQ2_XXS when rows are 4-byte multiples): the raw weight bytes of
// chunk c+1 stream into shared memory with coalesced 4-byte cp.async while
// chunk c is multiplied, and the activation tile streams in while the weights
// are decoded. Without PIPE each thread loads its half row straight from
// global memory (any shape).

template <int TY, bool PIPE>
__device__ __forceinline__ void gemm_quant(
    const u8* __restrict__ W, long long w_expert_stride, int K, int rows,
    const i8* __restrict__ xq, const float* __restrict__ xd, const i16* __restrict__ xbs,
    int x_row_len, int x_col0,
    int ntok, float* __restrict__ y, long long y_row_stride, int y_col0,
    const int* __restrict__ tiles, const int* __restrict__ sorted, const int* __restrict__ n_tiles,
    int x_group) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ int s_arow[GM_BN], s_orow[GM_BN], s_info[3];
    u8* sA = smem + SM_A;
    u8* sM = smem + SM_M;
    u8* sB = smem + SM_B;
    float* sWd = (float*)(smem + SM_WD);
    u8* sWs = smem + SM_WS;
    float* sXd = (float*)(smem + SM_XD);
    u64* sGrid = (u64*)(smem + SM_GRID);

    if (!token_tile(tiles, sorted, n_tiles, ntok, x_group, s_arow, s_orow, s_info)) return;
    const int count = s_info[1];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp & 3, wn = warp >> 2;  // warp tile: rows wm*32, tokens wn*32
    const int row0 = blockIdx.y * GM_BM;

    if (TY == TY_IQ2_XXS) sGrid[tid] = IQ2XXS_GRID[tid];

    const int blk_elems = TY == TY_Q8_0 ? 32 : 256;
    const int blk_bytes = TY == TY_Q8_0 ? 34 : TY == TY_Q2_K ? 84 : TY == TY_Q4_K ? 144 : 66;
    const long long row_bytes = (long long)(K / blk_elems) * blk_bytes;
    const int nchunks = (K + 255) / 256;
    // PIPE: words of raw bytes copied per row and chunk (one 256-block). Q2_K and
    // IQ2_XXS rows are in the GPU layout (layout.rs): the block's fields are gathered
    // from the row's regions into one smem row: Q2_K {qs 64, scales 16, d dmin 4}
    // (21 words); IQ2_XXS {codes 64, the 4-aligned word holding its f16 d} (17 words,
    // d at 64 + 2·(c & 1)).
    const int raw_words = TY == TY_Q2_K ? 21 : TY == TY_Q4_K ? 36 : 17;
    const int nbk = K >> 8;  // 256-blocks per row (Q2_K, Q4_K, IQ2_XXS)
    u8* sRaw = sM + SMK_RAW;
    u8* sMin = sM + SMK_MIN;
    u8* sBs = sM + SMK_BS;
    const int nrows = min(GM_BM, rows - row0);
    const u8* wblock = W + (long long)s_info[0] * w_expert_stride + (long long)row0 * row_bytes;
    auto issue_raw = [&](int c) {
        for (int i = tid; i < GM_BM * raw_words; i += GM_THREADS) {
            const int r = i / raw_words, w = i - r * raw_words;
            long long off;
            if (TY == TY_Q4_K) off = (long long)c * 144 + 4 * w;
            else if (w < 16) off = 64LL * c + 4 * w;
            else if (TY == TY_Q2_K) off = w < 20 ? 64LL * nbk + 16 * c + 4 * (w - 16) : 80LL * nbk + 4 * c;
            else off = 64LL * nbk + 4 * (c >> 1);
            if (r < nrows) g_cp_async4(sRaw + r * raw_words * 4 + 4 * w, wblock + r * row_bytes + off);
        }
        g_cp_commit();
    };
    if (PIPE) issue_raw(0);

    // Decode role: thread owns half a row (128 elements) of the weight tile.
    const int drow = tid >> 1, dh = tid & 1;
    const int grow = row0 + drow;
    const bool row_ok = grow < rows;
    const u8* wrow = W + (long long)s_info[0] * w_expert_stride + (long long)grow * row_bytes;
    // Activation role: thread owns 64 bytes of one token's chunk.
    const int xj = tid >> 2, xqq = tid & 3;
    const bool tok_ok = xj < count;
    const long long xrow = (long long)s_arow[xj] * x_row_len + x_col0;

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int l = 0; l < 4; l++) acc[i][j][l] = 0.0f;

    for (int c = 0; c < nchunks; c++) {
        const int kvalid = min(256, K - c * 256);  // < 256 only for a Q8_0 tail
        // ---- activation codes and scales
        if (PIPE) {
            g_cp_wait_0();
            __syncthreads();  // raw chunk c landed; the previous chunk's products are done
            if (tok_ok) {
#pragma unroll
                for (int i = 0; i < 4; i++)
                    g_cp_async16(sB + xj * GM_LD + 64 * xqq + 16 * i, xq + xrow + c * 256 + 64 * xqq + 16 * i);
                if (xqq == 0) g_cp_async4(sXd + xj * 8, xd + xrow / 256 + c);
            }
            g_cp_commit();
        } else {
            uint4* dst = (uint4*)(sB + xj * GM_LD + 64 * xqq);
            const uint4* src = (const uint4*)(xq + xrow + c * 256 + 64 * xqq);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                uint4 v = make_uint4(0, 0, 0, 0);
                if (tok_ok && 64 * xqq + 16 * i < kvalid) v = src[i];
                dst[i] = v;
            }
            if (TY == TY_Q8_0) {
                const int nbk = kvalid / 32;
                const long long xb = xrow / 32 + c * 8;
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int b = 2 * xqq + i;
                    sXd[xj * 8 + b] = (tok_ok && b < nbk) ? xd[xb + b] : 0.0f;
                }
            } else if (xqq == 0) {
                sXd[xj * 8] = tok_ok ? xd[xrow / 256 + c] : 0.0f;
            }
        }
        if ((TY == TY_Q2_K || TY == TY_Q4_K) && xqq == 1 && tok_ok) {
            const uint4* bp = (const uint4*)(xbs + xrow / 16 + c * 16);
            const uint4 v0 = bp[0], v1 = bp[1];
            const u32 h[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
            u32 lo[4], hi[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int s0 = (int)(short)(h[2 * i] & 0xffffu), s1 = (int)(short)(h[2 * i] >> 16);
                const int s2 = (int)(short)(h[2 * i + 1] & 0xffffu), s3 = (int)(short)(h[2 * i + 1] >> 16);
                lo[i] = (u32)(s0 & 127) | ((u32)(s1 & 127) << 8) | ((u32)(s2 & 127) << 16) |
                        ((u32)(s3 & 127) << 24);
                hi[i] = (u32)((s0 >> 7) & 255) | ((u32)((s1 >> 7) & 255) << 8) |
                        ((u32)((s2 >> 7) & 255) << 16) | ((u32)((s3 >> 7) & 255) << 24);
            }
            *(uint4*)(sBs + xj * 32) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
            *(uint4*)(sBs + xj * 32 + 16) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
        }
        // ---- weights
        u8* arow_s = sA + drow * GM_LD;
        if (TY == TY_Q8_0) {
            const int nbk = kvalid / 32;
#pragma unroll
            for (int jb = 0; jb < 4; jb++) {
                const int b = 4 * dh + jb;
                const bool ok = row_ok && b < nbk;
                // GPU layout (layout.rs): the row's K codes, then its K/32 f16 scales.
                const int blk = c * 8 + b;
                const u8* p = wrow + 32 * blk;
                float d = 0.0f;
                if (ok) d = g_h2f(*(const u16*)(wrow + K + 2 * blk));
                sWd[drow * 8 + b] = d;
#pragma unroll
                for (int w = 0; w < 8; w++)
                    *(u32*)(arow_s + 32 * b + 4 * w) = ok ? ld_u32_a2(p + 4 * w) : 0u;
            }
        } else if (TY == TY_Q2_K) {
            // the block's qs, scales and (d, dmin): staged side by side, or in the row's regions
            const u8* pq = PIPE ? sRaw + drow * 84 : wrow + 64LL * c;
            const u8* ps = PIPE ? sRaw + drow * 84 + 64 : wrow + 64LL * nbk + 16 * c;
            const u8* pd = PIPE ? sRaw + drow * 84 + 80 : wrow + 80LL * nbk + 4 * c;
            u32 qw[8], scw[2];
            if (row_ok) {
#pragma unroll
                for (int w = 0; w < 8; w++) qw[w] = *(const u32*)(pq + 32 * dh + 4 * w);
                scw[0] = *(const u32*)(ps + 8 * dh);
                scw[1] = *(const u32*)(ps + 8 * dh + 4);
                if (dh == 0) {
                    sWd[drow * 8] = g_h2f(*(const u16*)pd);
                    sWd[drow * 8 + 1] = g_h2f(*(const u16*)(pd + 2));
                }
            } else {
#pragma unroll
                for (int w = 0; w < 8; w++) qw[w] = 0;
                scw[0] = scw[1] = 0;
                if (dh == 0) { sWd[drow * 8] = 0.0f; sWd[drow * 8 + 1] = 0.0f; }
            }
            // element 128h + 32j + l: q = (qs[32h + l] >> 2j) & 3, sub-block 8h + 2j + l/16
#pragma unroll
            for (int j = 0; j < 4; j++) {
#pragma unroll
                for (int w = 0; w < 8; w++) {
                    const int sb = 2 * j + (w >> 2);  // sub-block within this half
                    const u32 sc = (scw[sb >> 2] >> (8 * (sb & 3))) & 0xffu;
                    const u32 q4 = (qw[w] >> (2 * j)) & 0x03030303u;
                    const int off = 128 * dh + 32 * j + 4 * w;
                    *(u32*)(arow_s + off) = q4 * (sc & 15u);
                }
            }
            *(u32*)(sMin + drow * 16 + 8 * dh) = (scw[0] >> 4) & 0x0f0f0f0fu;
            *(u32*)(sMin + drow * 16 + 8 * dh + 4) = (scw[1] >> 4) & 0x0f0f0f0fu;
        } else if (TY == TY_Q4_K) {
            const u8* p = PIPE ? sRaw + drow * 144 : wrow + (long long)c * 144;
            u32 qw[16];
            if (row_ok) {
#pragma unroll
                for (int w = 0; w < 16; w++) qw[w] = *(const u32*)(p + 16 + 64 * dh + 4 * w);
                if (dh == 0) {
                    sWd[drow * 8] = g_h2f(*(const u16*)p);
                    sWd[drow * 8 + 1] = g_h2f(*(const u16*)(p + 2));
                }
            } else {
#pragma unroll
                for (int w = 0; w < 16; w++) qw[w] = 0;
                if (dh == 0) { sWd[drow * 8] = 0.0f; sWd[drow * 8 + 1] = 0.0f; }
            }
            const u8* sc = p + 4;  // 12 packed 6-bit scales / mins
#pragma unroll
            for (int uu = 0; uu < 4; uu++) {
                const int u = 4 * dh + uu;
                int scale = 0, mn = 0;
                if (!row_ok) {
                } else if (u < 4) {
                    scale = sc[u] & 63;
                    mn = sc[u + 4] & 63;
                } else {
                    scale = (sc[u + 4] & 15) | ((sc[u - 4] >> 6) << 4);
                    mn = (sc[u + 4] >> 4) | ((sc[u] >> 6) << 4);
                }
                sWs[drow * 8 + u] = (u8)scale;
                sMin[drow * 16 + 2 * u] = (u8)mn;  // the unit's two 16-element halves
                sMin[drow * 16 + 2 * u + 1] = (u8)mn;
                // unit u = 32 elements: qs bytes 32·(u/2).., nibble (u & 1)
                const int cw = 8 * (uu >> 1);  // word base in this half's qs
                const int sh = 4 * (uu & 1);
#pragma unroll
                for (int w = 0; w < 8; w++) {
                    *(u32*)(arow_s + 32 * u + 4 * w) = (qw[cw + w] >> sh) & 0x0f0f0f0fu;
                }
            }
        } else {  // IQ2_XXS
            // the block's 64 code bytes and its f16 d: staged, or in the row's two regions
            const u8* p = PIPE ? sRaw + drow * 68 : wrow + 64LL * c;
            const u8* pd = PIPE ? sRaw + drow * 68 + 64 + 2 * (c & 1) : wrow + 64LL * nbk + 2 * c;
            if (dh == 0) sWd[drow * 8] = row_ok ? g_h2f(*(const u16*)pd) : 0.0f;
            if (c == 0) __syncthreads();  // grid table stored
#pragma unroll
            for (int gg = 0; gg < 4; gg++) {
                const int gi = 4 * dh + gg;
                u32 a0 = 0, a1 = 0;
                if (row_ok) {
                    a0 = ld_u32_a2(p + 8 * gi);
                    a1 = ld_u32_a2(p + 4 + 8 * gi);
                }
                sWs[drow * 8 + gi] = (u8)(2 * (a1 >> 28) + 1);
#pragma unroll
                for (int l = 0; l < 4; l++) {
                    u64 gv = sGrid[(a0 >> (8 * l)) & 255u];
                    if (!row_ok) gv = 0;
                    u32 sg = (a1 >> (7 * l)) & 127u;
                    sg |= (__popc(sg) & 1u) << 7;
                    const u32 lo = apply_signs((u32)gv, sign_mask4_g(sg & 15u));
                    const u32 hi = apply_signs((u32)(gv >> 32), sign_mask4_g(sg >> 4));
                    *(u32*)(arow_s + 32 * gi + 8 * l) = lo;
                    *(u32*)(arow_s + 32 * gi + 8 * l + 4) = hi;
                }
            }
        }
        if (PIPE) {
            g_cp_wait_0();  // activation tile landed
            __syncthreads();  // ... for every thread; the raw buffer is free
            if (c + 1 < nchunks) issue_raw(c + 1);
        } else {
            __syncthreads();
        }

        // ---- tensor-core products
        const u8* a_base = sA + (wm * 32 + g) * GM_LD + 4 * t;
        const u8* b_base = sB + (wn * 32 + g) * GM_LD + 4 * t;
        const int rl0 = wm * 32 + g;  // local rows rl0 + 16·mt + 8·half
        const int tl0 = wn * 32 + 2 * t;  // local tokens tl0 + 8·nt + {0,1}
        if (TY == TY_Q8_0) {
            const int nbk = kvalid / 32;
            for (int ks = 0; ks < nbk; ks++) {
                int a[2][4], b[4][2];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) ld_frag_a(a[mt], a_base + mt * 16 * GM_LD + 32 * ks);
#pragma unroll
                for (int nt = 0; nt < 4; nt++) ld_frag_b(b[nt], b_base + nt * 8 * GM_LD + 32 * ks);
                float wd[2][2], xs[4][2];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    wd[mt][0] = sWd[(rl0 + 16 * mt) * 8 + ks];
                    wd[mt][1] = sWd[(rl0 + 16 * mt + 8) * 8 + ks];
                }
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    xs[nt][0] = sXd[(tl0 + 8 * nt) * 8 + ks];
                    xs[nt][1] = sXd[(tl0 + 8 * nt + 1) * 8 + ks];
                }
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) {
                        int cc[4] = {0, 0, 0, 0};
                        mma_s8(cc, a[mt], b[nt]);
#pragma unroll
                        for (int l = 0; l < 4; l++)
                            acc[mt][nt][l] += (wd[mt][l >> 1] * xs[nt][l & 1]) * i2f_small(cc[l]);
                    }
            }
        } else {
            int ci[2][4][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++)
#pragma unroll
                    for (int l = 0; l < 4; l++) ci[mt][nt][l] = 0;
#pragma unroll 2
            for (int ks = 0; ks < 8; ks++) {
                int a[2][4], b[4][2];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) ld_frag_a(a[mt], a_base + mt * 16 * GM_LD + 32 * ks);
#pragma unroll
                for (int nt = 0; nt < 4; nt++) ld_frag_b(b[nt], b_base + nt * 8 * GM_LD + 32 * ks);
                if (TY == TY_Q2_K) {
#pragma unroll
                    for (int mt = 0; mt < 2; mt++)
#pragma unroll
                        for (int nt = 0; nt < 4; nt++) mma_s8(ci[mt][nt], a[mt], b[nt]);
                } else {
                    int us[2][2];  // per-unit integer scale of this thread's 4 rows
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        us[mt][0] = sWs[(rl0 + 16 * mt) * 8 + ks];
                        us[mt][1] = sWs[(rl0 + 16 * mt + 8) * 8 + ks];
                    }
#pragma unroll
                    for (int mt = 0; mt < 2; mt++)
#pragma unroll
                        for (int nt = 0; nt < 4; nt++) {
                            int cc[4] = {0, 0, 0, 0};
                            mma_s8(cc, a[mt], b[nt]);
#pragma unroll
                            for (int l = 0; l < 4; l++) ci[mt][nt][l] += us[mt][l >> 1] * cc[l];
                        }
                }
            }
            // min term: Σ_k m_k·bsum_k = Σ m·lo + 128·Σ m·hi over the 16 sub-blocks
            int cm[2][4][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++)
#pragma unroll
                    for (int l = 0; l < 4; l++) cm[mt][nt][l] = 0;
            if (TY == TY_Q2_K || TY == TY_Q4_K) {
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    int am[2];
                    am[0] = *(const int*)(sMin + (rl0 + 16 * mt) * 16 + 4 * t);
                    am[1] = *(const int*)(sMin + (rl0 + 16 * mt + 8) * 16 + 4 * t);
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) {
                        const u8* bp = sBs + (wn * 32 + 8 * nt + g) * 32 + 4 * t;
                        int c1[4] = {0, 0, 0, 0}, c2[4] = {0, 0, 0, 0};
                        mma_s8_k16(c1, am, *(const int*)bp);
                        mma_s8_k16(c2, am, *(const int*)(bp + 16));
#pragma unroll
                        for (int l = 0; l < 4; l++) cm[mt][nt][l] = c1[l] + 128 * c2[l];
                    }
                }
            }
            float xs[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                xs[nt][0] = sXd[(tl0 + 8 * nt) * 8];
                xs[nt][1] = sXd[(tl0 + 8 * nt + 1) * 8];
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    const int rl = rl0 + 16 * mt + 8 * hf;
                    const float d0 = sWd[rl * 8];
                    const float d1 = (TY == TY_IQ2_XXS) ? 0.0f : sWd[rl * 8 + 1];
#pragma unroll
                    for (int nt = 0; nt < 4; nt++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const int l = 2 * hf + e;
                            const float x = xs[nt][e];
                            if (TY == TY_IQ2_XXS) {
                                acc[mt][nt][l] += 0.125f * (d0 * x) * (float)ci[mt][nt][l];
                            } else {
                                acc[mt][nt][l] += (d0 * x) * (float)ci[mt][nt][l] -
                                                  (d1 * x) * (float)cm[mt][nt][l];
                            }
                        }
                }
        }
        if (!PIPE) __syncthreads();
    }

    // ---- store
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int l = 0; l < 4; l++) {
                const int r = row0 + wm * 32 + 16 * mt + g + 8 * (l >> 1);
                const int j = wn * 32 + 8 * nt + 2 * t + (l & 1);
                if (r < rows && j < count)
                    y[(long long)s_orow[j] * y_row_stride + y_col0 + r] = acc[mt][nt][l];
            }
}

#define GEMM_Q_KERNEL(name, TY, PIPE)                                                                \
    extern "C" __global__ void __launch_bounds__(GM_THREADS, 2) name(                            \
        const u8* __restrict__ W, long long w_expert_stride, int K, int rows,                    \
        const i8* __restrict__ xq, const float* __restrict__ xd, const i16* __restrict__ xbs,     \
        int x_row_len, int x_col0,                                                               \
        int ntok, float* __restrict__ y, long long y_row_stride, int y_col0,                     \
        const int* __restrict__ tiles, const int* __restrict__ sorted,                           \
        const int* __restrict__ n_tiles, int x_group) {                                          \
        gemm_quant<TY, PIPE>(W, w_expert_stride, K, rows, xq, xd, xbs, x_row_len, x_col0, ntok, y,          \
                       y_row_stride, y_col0, tiles, sorted, n_tiles, x_group);                   \
    }

// Q2_K / Q4_K rows are always whole 4-byte words: only the streaming form.
GEMM_Q_KERNEL(gemm_q8_0, TY_Q8_0, false)
GEMM_Q_KERNEL(gemm_iq2_xxs, TY_IQ2_XXS, false)
GEMM_Q_KERNEL(gemm_q2_k_pipe, TY_Q2_K, true)
GEMM_Q_KERNEL(gemm_q4_k_pipe, TY_Q4_K, true)
GEMM_Q_KERNEL(gemm_iq2_xxs_pipe, TY_IQ2_XXS, true)

// ---------------------------------------------------------------------------
// Q8_0, aligned shapes (K % 256 == 0, row bytes % 16 == 0, activation rows and
// x_col0 multiples of 256): no decode pass. A chunk of a weight row in the GPU
// layout (layout.rs) is 256 code bytes plus the 8 f16 scales of its blocks (16 bytes
// past the row's codes); both land side by side in one 272-byte smem row (codes at
// 0, scales at 256) with cp.async, as do the activation codes and scales, two
// stages deep, and the MMA fragments are read straight from there.
// ---------------------------------------------------------------------------



#define Q8F_A 0
#define Q8F_B (Q8F_A + GM_BM * GM_LD)
#define Q8F_XD (Q8F_B + GM_BN * GM_LD)
#define Q8F_STAGE (Q8F_XD + GM_BN * 8 * 4)
#define Q8F_TOTAL (2 * Q8F_STAGE)

extern "C" __global__ void __launch_bounds__(GM_THREADS, 2) gemm_q8_0_fast(
    const u8* __restrict__ W, long long w_expert_stride, int K, int rows,
    const i8* __restrict__ xq, const float* __restrict__ xd, const i16* __restrict__ xbs_unused,
    int x_row_len, int x_col0,
    int ntok, float* __restrict__ y, long long y_row_stride, int y_col0,
    const int* __restrict__ tiles, const int* __restrict__ sorted, const int* __restrict__ n_tiles,
    int x_group) {
    extern __shared__ __align__(16) u8 q8_smem[];
    __shared__ int s_arow[GM_BN], s_orow[GM_BN], s_info[3];
    if (!token_tile(tiles, sorted, n_tiles, ntok, x_group, s_arow, s_orow, s_info)) return;
    const int count = s_info[1];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp & 3, wn = warp >> 2;
    const int row0 = blockIdx.y * GM_BM;
    const long long row_bytes = (long long)(K / 32) * 34;
    const u8* wbase = W + (long long)s_info[0] * w_expert_stride + (long long)row0 * row_bytes;
    const int nchunks = K / 256;
    const int nrows = min(GM_BM, rows - row0);

    // Rows past `rows` and tokens past `count` keep stale bytes: they only feed
    // outputs that are never stored (MMA rows / columns don't mix).
    auto load = [&](int c, int stage) {
        u8* st = q8_smem + stage * Q8F_STAGE;
        for (int i = tid; i < GM_BM * 17; i += GM_THREADS) {
            const int r = i / 17, piece = i - r * 17;
            const u8* src = wbase + (long long)r * row_bytes +
                            (piece < 16 ? c * 256 + 16 * piece : K + 16 * c);
            if (r < nrows) g_cp_async16(st + Q8F_A + r * GM_LD + 16 * piece, src);
        }
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int i = tid + q * GM_THREADS;
            const int j = i >> 4, piece = i & 15;
            if (j < count)
                g_cp_async16(st + Q8F_B + j * GM_LD + 16 * piece,
                             xq + (long long)s_arow[j] * x_row_len + x_col0 + c * 256 + 16 * piece);
        }
        if (tid < 2 * GM_BN) {
            const int j = tid >> 1, piece = tid & 1;
            if (j < count)
                g_cp_async16(st + Q8F_XD + j * 32 + 16 * piece,
                             xd + ((long long)s_arow[j] * x_row_len + x_col0) / 32 + c * 8 + 4 * piece);
        }
    };

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int l = 0; l < 4; l++) acc[i][j][l] = 0.0f;

    load(0, 0);
    g_cp_commit();
    for (int c = 0; c < nchunks; c++) {
        if (c + 1 < nchunks) load(c + 1, (c + 1) & 1);
        g_cp_commit();
        g_cp_wait_1();
        __syncthreads();
        const u8* st = q8_smem + (c & 1) * Q8F_STAGE;
        const u8* a_row = st + Q8F_A + (wm * 32 + g) * GM_LD;
        const u8* b_base = st + Q8F_B + (wn * 32 + g) * GM_LD + 4 * t;
        const float* sXd = (const float*)(st + Q8F_XD);
        const int tl0 = wn * 32 + 2 * t;
#pragma unroll 2
        for (int ks = 0; ks < 8; ks++) {
            int a[2][4], b[4][2];
            float wd[2][2], xs[4][2];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const u8* p = a_row + mt * 16 * GM_LD;
                wd[mt][0] = g_h2f(*(const u16*)(p + 256 + 2 * ks));
                wd[mt][1] = g_h2f(*(const u16*)(p + 8 * GM_LD + 256 + 2 * ks));
                const u8* q = p + 32 * ks + 4 * t;
                a[mt][0] = *(const int*)q;
                a[mt][1] = *(const int*)(q + 8 * GM_LD);
                a[mt][2] = *(const int*)(q + 16);
                a[mt][3] = *(const int*)(q + 8 * GM_LD + 16);
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                ld_frag_b(b[nt], b_base + nt * 8 * GM_LD + 32 * ks);
                xs[nt][0] = sXd[(tl0 + 8 * nt) * 8 + ks];
                xs[nt][1] = sXd[(tl0 + 8 * nt + 1) * 8 + ks];
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    int cc[4] = {0, 0, 0, 0};
                    mma_s8(cc, a[mt], b[nt]);
#pragma unroll
                    for (int l = 0; l < 4; l++)
                        acc[mt][nt][l] += (wd[mt][l >> 1] * xs[nt][l & 1]) * i2f_small(cc[l]);
                }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int l = 0; l < 4; l++) {
                const int r = row0 + wm * 32 + 16 * mt + g + 8 * (l >> 1);
                const int j = wn * 32 + 8 * nt + 2 * t + (l & 1);
                if (r < rows && j < count)
                    y[(long long)s_orow[j] * y_row_stride + y_col0 + r] = acc[mt][nt][l];
            }
}

// ---------------------------------------------------------------------------
// F16 / F32 weights x f32 activations: f16 MMA with split operands.
// Chunk = 128 elements (256 bytes of f16 per row, the same smem rows).
// ---------------------------------------------------------------------------

#define SMF_A 0
#define SMF_A2 (SMF_A + GM_BM * GM_LD)    // F32 weights: low part
#define SMF_B (SMF_A2 + GM_BM * GM_LD)    // activation hi
#define SMF_B2 (SMF_B + GM_BN * GM_LD)    // activation lo
#define SMF_TOTAL (SMF_B2 + GM_BN * GM_LD)

__device__ __forceinline__ u32 pack_h2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

template <bool W32>
__device__ __forceinline__ void gemm_float(const u8* __restrict__ W, int K, int rows,
                                           const float* __restrict__ x, int x_row_len, int x_col0,
                                           int ntok, float* __restrict__ y,
                                           long long y_row_stride, int y_col0) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ int s_arow[GM_BN], s_orow[GM_BN], s_info[3];
    u8* sA = smem + SMF_A;
    u8* sA2 = smem + SMF_A2;
    u8* sB = smem + SMF_B;
    u8* sB2 = smem + SMF_B2;
    if (!token_tile(0, 0, 0, ntok, 1, s_arow, s_orow, s_info)) return;
    const int count = s_info[1];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp & 3, wn = warp >> 2;
    const int row0 = blockIdx.y * GM_BM;
    const int drow = tid >> 1, dh = tid & 1;
    const int grow = row0 + drow;
    const bool row_ok = grow < rows;
    const long long wrow_elem = (long long)grow * K;
    const int xj = tid >> 2, xqq = tid & 3;
    const bool tok_ok = xj < count;
    const float* xrow = x + (long long)s_arow[xj] * x_row_len + x_col0;
    const int nchunks = (K + 127) / 128;

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int l = 0; l < 4; l++) acc[i][j][l] = 0.0f;

    for (int c = 0; c < nchunks; c++) {
        const int k0 = c * 128;
        // activation: 32 elements per thread, split into f16 hi + lo
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int e = 32 * xqq + 4 * i;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (tok_ok && k0 + e < K) v = *(const float4*)(xrow + k0 + e);
            const float vv[4] = {v.x, v.y, v.z, v.w};
            u16 h[4], l[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                h[q] = g_f2h(vv[q]);
                l[q] = g_f2h(vv[q] - g_h2f(h[q]));
            }
            *(uint2*)(sB + xj * GM_LD + 2 * e) = make_uint2(pack_h2(h[0], h[1]), pack_h2(h[2], h[3]));
            *(uint2*)(sB2 + xj * GM_LD + 2 * e) = make_uint2(pack_h2(l[0], l[1]), pack_h2(l[2], l[3]));
        }
        // weights: 64 elements per thread
        if (W32) {
            const float* wp = (const float*)W + wrow_elem;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                const int e = 64 * dh + 4 * i;
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                if (row_ok && k0 + e < K) v = *(const float4*)(wp + k0 + e);
                const float vv[4] = {v.x, v.y, v.z, v.w};
                u16 h[4], l[4];
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    h[q] = g_f2h(vv[q]);
                    l[q] = g_f2h(vv[q] - g_h2f(h[q]));
                }
                *(uint2*)(sA + drow * GM_LD + 2 * e) = make_uint2(pack_h2(h[0], h[1]), pack_h2(h[2], h[3]));
                *(uint2*)(sA2 + drow * GM_LD + 2 * e) = make_uint2(pack_h2(l[0], l[1]), pack_h2(l[2], l[3]));
            }
        } else {
            const u16* wp = (const u16*)W + wrow_elem;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int e = 64 * dh + 8 * i;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (row_ok && k0 + e < K) v = *(const uint4*)(wp + k0 + e);
                *(uint4*)(sA + drow * GM_LD + 2 * e) = v;
            }
        }
        __syncthreads();
        const u8* a_base = sA + (wm * 32 + g) * GM_LD + 4 * t;
        const u8* a2_base = sA2 + (wm * 32 + g) * GM_LD + 4 * t;
        const u8* b_base = sB + (wn * 32 + g) * GM_LD + 4 * t;
        const u8* b2_base = sB2 + (wn * 32 + g) * GM_LD + 4 * t;
#pragma unroll 2
        for (int ks = 0; ks < 8; ks++) {
            u32 a[2][4], b[4][2], b2[4][2];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) ld_frag_a((int*)a[mt], a_base + mt * 16 * GM_LD + 32 * ks);
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                ld_frag_b((int*)b[nt], b_base + nt * 8 * GM_LD + 32 * ks);
                ld_frag_b((int*)b2[nt], b2_base + nt * 8 * GM_LD + 32 * ks);
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    mma_f16(acc[mt][nt], a[mt], b2[nt]);
                    mma_f16(acc[mt][nt], a[mt], b[nt]);
                }
            if (W32) {
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    u32 a2[4];
                    ld_frag_a((int*)a2, a2_base + mt * 16 * GM_LD + 32 * ks);
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) mma_f16(acc[mt][nt], a2, b[nt]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int l = 0; l < 4; l++) {
                const int r = row0 + wm * 32 + 16 * mt + g + 8 * (l >> 1);
                const int j = wn * 32 + 8 * nt + 2 * t + (l & 1);
                if (r < rows && j < count)
                    y[(long long)s_orow[j] * y_row_stride + y_col0 + r] = acc[mt][nt][l];
            }
}

extern "C" __global__ void __launch_bounds__(GM_THREADS, 2)
    gemm_f16(const u8* __restrict__ W, int K, int rows, const float* __restrict__ x,
             int x_row_len, int x_col0, int ntok, float* __restrict__ y, long long y_row_stride,
             int y_col0) {
    gemm_float<false>(W, K, rows, x, x_row_len, x_col0, ntok, y, y_row_stride, y_col0);
}

extern "C" __global__ void __launch_bounds__(GM_THREADS, 2)
    gemm_f32(const u8* __restrict__ W, int K, int rows, const float* __restrict__ x,
             int x_row_len, int x_col0, int ntok, float* __restrict__ y, long long y_row_stride,
             int y_col0) {
    gemm_float<true>(W, K, rows, x, x_row_len, x_col0, ntok, y, y_row_stride, y_col0);
}

// ---------------------------------------------------------------------------
// Routed grouping: one block of 1024 threads. Counts slots per expert, scans,
// writes the tile list (expert, first sorted position, count <= BN) and the
// expert-sorted slot list. Slots with an expert id outside [0, n_expert) are
// left out (their output rows are not written).
// Dynamic shared memory: 2 · n_expert ints.
// ---------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(1024)
    gemm_group(const int* __restrict__ ids, int n_slots, int n_expert, int* __restrict__ sorted,
               int* __restrict__ tiles, int* __restrict__ n_tiles) {
    extern __shared__ int gsm[];
    int* cnt = gsm;
    int* off = gsm + n_expert;
    const int tid = threadIdx.x;
    for (int e = tid; e < n_expert; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int s = tid; s < n_slots; s += blockDim.x) {
        const int e = ids[s];
        if (e >= 0 && e < n_expert) atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    if (tid < 32) {
        const int lane = tid;
        const int per = (n_expert + 31) / 32;
        const int e0 = min(lane * per, n_expert), e1 = min(e0 + per, n_expert);
        int ns = 0, nt = 0;
        for (int e = e0; e < e1; e++) {
            ns += cnt[e];
            nt += (cnt[e] + GM_BN - 1) / GM_BN;
        }
        int is = ns, it = nt;  // inclusive scans over lanes
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int vs = __shfl_up_sync(0xffffffffu, is, o);
            const int vt = __shfl_up_sync(0xffffffffu, it, o);
            if (lane >= o) { is += vs; it += vt; }
        }
        int so = is - ns, to = it - nt;
        for (int e = e0; e < e1; e++) {
            const int c = cnt[e];
            off[e] = so;
            for (int i = 0; i < c; i += GM_BN) {
                tiles[3 * to] = e;
                tiles[3 * to + 1] = so + i;
                tiles[3 * to + 2] = min(GM_BN, c - i);
                to++;
            }
            so += c;
            cnt[e] = 0;  // reused as the scatter cursor
        }
        if (lane == 31) *n_tiles = it;
    }
    __syncthreads();
    for (int s = tid; s < n_slots; s += blockDim.x) {
        const int e = ids[s];
        if (e >= 0 && e < n_expert) sorted[off[e] + atomicAdd(&cnt[e], 1)] = s;
    }
}
