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

// One split's term of an output element: a + w·v (w = 0: the split is empty and
// its values were never written, so they are selected away, never multiplied).
__device__ __forceinline__ float att_split_acc(float a, float w, float v) {
    return w > 0.0f ? __fmaf_rn(w, v, a) : a;
}
