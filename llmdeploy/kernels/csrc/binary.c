/* Sign-bit matmul with a tenant per row: out[n, o] = sum_i x[n, i] * s[tenant[n], o, i], where
 * s = +1 where the packed bit is set and -1 where not (bit k of byte j is input 8j + k).
 *
 * Since x.s = 2 * (sum of the x_i whose bit is set) - sum(x), each output is a masked sum: with
 * AVX-512 two packed bytes are directly the lane mask of 16 inputs, so one masked add consumes 16
 * weights while reading 2 bytes of them. With AVX2 a byte is broadcast and each of 8 lanes tests its
 * own bit (the lane mask), then an and + add; without either a portable loop does it per bit.
 * Parallel over outputs (OpenMP); x rows stay in L1 while the codes stream through.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__)
#define BIN_AVX2 1
#include "simd.h"
#endif

int binary_simd(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(BIN_AVX2)
    return 256;
#else
    return 0;
#endif
}

static float masked_sum(const float *x, const uint8_t *codes, int64_t n_in) {
    int64_t i = 0;
    float acc = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; i + 64 <= n_in; i += 64) { /* four independent accumulators hide the add latency */
        uint16_t m0, m1, m2, m3;
        memcpy(&m0, codes + i / 8, 2);
        memcpy(&m1, codes + i / 8 + 2, 2);
        memcpy(&m2, codes + i / 8 + 4, 2);
        memcpy(&m3, codes + i / 8 + 6, 2);
        a0 = _mm512_mask_add_ps(a0, (__mmask16)m0, a0, _mm512_loadu_ps(x + i));
        a1 = _mm512_mask_add_ps(a1, (__mmask16)m1, a1, _mm512_loadu_ps(x + i + 16));
        a2 = _mm512_mask_add_ps(a2, (__mmask16)m2, a2, _mm512_loadu_ps(x + i + 32));
        a3 = _mm512_mask_add_ps(a3, (__mmask16)m3, a3, _mm512_loadu_ps(x + i + 48));
    }
    for (; i + 16 <= n_in; i += 16) {
        uint16_t m;
        memcpy(&m, codes + i / 8, 2);
        a0 = _mm512_mask_add_ps(a0, (__mmask16)m, a0, _mm512_loadu_ps(x + i));
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(BIN_AVX2)
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= n_in; i += 32) { /* four independent accumulators hide the add latency */
        const uint8_t *c = codes + i / 8;
        a0 = _mm256_add_ps(a0, _mm256_and_ps(lanes_of_bits(c[0], sel), _mm256_loadu_ps(x + i)));
        a1 = _mm256_add_ps(a1, _mm256_and_ps(lanes_of_bits(c[1], sel), _mm256_loadu_ps(x + i + 8)));
        a2 = _mm256_add_ps(a2, _mm256_and_ps(lanes_of_bits(c[2], sel), _mm256_loadu_ps(x + i + 16)));
        a3 = _mm256_add_ps(a3, _mm256_and_ps(lanes_of_bits(c[3], sel), _mm256_loadu_ps(x + i + 24)));
    }
    for (; i + 8 <= n_in; i += 8)
        a0 = _mm256_add_ps(a0, _mm256_and_ps(lanes_of_bits(codes[i / 8], sel), _mm256_loadu_ps(x + i)));
    acc = hsum256_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < n_in; i++)
        if ((codes[i >> 3] >> (i & 7)) & 1) acc += x[i];
    return acc;
}

/* x (n_rows, n_in) f32 contiguous; packed (n_tenants, n_out, n_bytes) u8 contiguous;
 * tenant (n_rows,) i64 in [0, n_tenants); out (n_rows, n_out) f32 contiguous.
 * Returns 0, or -1 (nothing computed) if a tenant index is out of range, -2 if out of memory. */
int multi_binary_matmul(const float *x, const uint8_t *packed, const int64_t *tenant, float *out,
                        int64_t n_rows, int64_t n_in, int64_t n_out, int64_t n_bytes, int64_t n_tenants,
                        int threads) {
    for (int64_t n = 0; n < n_rows; n++)
        if (tenant[n] < 0 || tenant[n] >= n_tenants) return -1;
    float *total = malloc(sizeof(float) * (n_rows > 0 ? n_rows : 1));
    if (!total) return -2;
    for (int64_t n = 0; n < n_rows; n++) {
        float t = 0.0f;
        for (int64_t i = 0; i < n_in; i++) t += x[n * n_in + i];
        total[n] = t;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        for (int64_t n = 0; n < n_rows; n++) {
            const uint8_t *codes = packed + (tenant[n] * n_out + o) * n_bytes;
            out[n * n_out + o] = 2.0f * masked_sum(x + n * n_in, codes, n_in) - total[n];
        }
    }
    free(total);
    return 0;
}

/* out (n_out, n_in) = w + scale * s, s = ±1 from the packed bits: a tenant's merged weight, so a
 * long prefill runs one dense matmul per tenant instead of the base's plus the delta's. */
void merge_signs(const float *w, const uint8_t *packed, float scale, float *out,
                 int64_t n_out, int64_t n_in, int64_t n_bytes, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        const uint8_t *codes = packed + o * n_bytes;
        const float *wr = w + o * n_in;
        float *orow = out + o * n_in;
        int64_t i = 0;
#ifdef __AVX512F__
        const __m512 plus = _mm512_set1_ps(scale), minus = _mm512_set1_ps(-scale);
        for (; i + 16 <= n_in; i += 16) { /* two bytes of signs select +scale or -scale for 16 inputs */
            uint16_t m;
            memcpy(&m, codes + i / 8, 2);
            __m512 s = _mm512_mask_blend_ps((__mmask16)m, minus, plus);
            _mm512_storeu_ps(orow + i, _mm512_add_ps(_mm512_loadu_ps(wr + i), s));
        }
#elif defined(BIN_AVX2)
        const __m256 plus = _mm256_set1_ps(scale), minus = _mm256_set1_ps(-scale);
        const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (; i + 8 <= n_in; i += 8) { /* a byte of signs selects +scale or -scale for 8 inputs */
            __m256 s = _mm256_blendv_ps(minus, plus, lanes_of_bits(codes[i / 8], sel));
            _mm256_storeu_ps(orow + i, _mm256_add_ps(_mm256_loadu_ps(wr + i), s));
        }
#endif
        for (; i < n_in; i++)
            orow[i] = wr[i] + (((codes[i >> 3] >> (i & 7)) & 1) ? scale : -scale);
    }
}
