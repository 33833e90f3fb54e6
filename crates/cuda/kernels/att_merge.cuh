// Merging split-attention partials (flash-decoding), shared by att_combine
// (attention.cu) and att_merge_rope_q8_0 (ops.cu) so both give the same bits.
// A head's partials lie `stride` floats apart from `base`: (m, l, acc[hd]) per split.
#pragma once

// The softmax denominator of one head over its splits with the sink:
// M = max(sink, m_s), w_s = e^(m_s − M) (0 for an empty split, m_s = −inf),
// den = e^(sink − M) + Σ_s w_s·l_s. Lane s of the calling warp takes splits
// s, s + 32, … and hands each weight to put(s, w); the lane sums are added in a
// butterfly, so every lane returns the same den.
template <typename Put>
__device__ __forceinline__ float att_split_den(const float* base, long long stride, int ns,
                                               float sink, int lane, Put put) {
    float M = sink;
    for (int s = lane; s < ns; s += 32) M = fmaxf(M, base[s * stride]);
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float den = 0.0f;
    for (int s = lane; s < ns; s += 32) {
        const float m = base[s * stride];
        const float w = m == __int_as_float(0xff800000) ? 0.0f : expf(m - M);
        put(s, w);
        if (w > 0.0f) den = __fmaf_rn(w, base[s * stride + 1], den);
    }
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    return den + expf(sink - M);
}

// att_split_den for at most 64 splits whose (m, l) the lanes already hold: lane s
// has split s in (m_lo, l_lo) and split s + 32 in (m_hi, l_hi) (m = −inf, l = 0 where
// there is none). Same operations in the same order as att_split_den, so the same
// bits; w_lo / w_hi receive the two weights.
__device__ __forceinline__ float att_split_den_regs(float m_lo, float l_lo, float m_hi,
                                                    float l_hi, int ns, float sink, int lane,
                                                    float& w_lo, float& w_hi) {
    float M = sink;
    if (lane < ns) M = fmaxf(M, m_lo);
    if (lane + 32 < ns) M = fmaxf(M, m_hi);
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float den = 0.0f;
    if (lane < ns) {
        w_lo = m_lo == __int_as_float(0xff800000) ? 0.0f : expf(m_lo - M);
        if (w_lo > 0.0f) den = __fmaf_rn(w_lo, l_lo, den);
    }
    if (lane + 32 < ns) {
        w_hi = m_hi == __int_as_float(0xff800000) ? 0.0f : expf(m_hi - M);
        if (w_hi > 0.0f) den = __fmaf_rn(w_hi, l_hi, den);
    }
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    return den + expf(sink - M);
}

// One split's term of an output element: a + w·v (w = 0: the split is empty and
// its values were never written, so they are selected away, never multiplied).
__device__ __forceinline__ float att_split_acc(float a, float w, float v) {
    return w > 0.0f ? __fmaf_rn(w, v, a) : a;
}
