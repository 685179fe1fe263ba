/* Helpers shared by the C kernels' AVX2 paths (included by the kernel sources; kernels/native.py hashes
 * this header with every source, so a change here rebuilds them). */
#ifndef LLMDEPLOY_SIMD_H
#define LLMDEPLOY_SIMD_H
#if defined(__AVX2__)
#include <immintrin.h>

/* the sum of the 8 lanes */
static inline float hsum256_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* all-ones in the lanes whose bit of b is set (lane k tests bit k of b; sel holds 1 << k per lane) */
static inline __m256 lanes_of_bits(unsigned b, __m256i sel) {
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)b), sel), sel));
}
#endif
#endif
