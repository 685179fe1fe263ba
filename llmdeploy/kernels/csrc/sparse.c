/* Sparse matmul over a bitmask and the kept values, which are read and nothing else.
 *
 *   out[n, o] = bias[o] + sum over kept i of row o: value * x[n, i]
 *
 * Layout: mask (n_out, n_in / 16) 16-bit words, bit j of word c of row o set when input 16c + j is
 * kept (the checkpoint's packed bitmask read as little-endian words when n_in is a multiple of 16);
 * values: the kept values of all rows, row-major, f32; row_start (n_out + 1): where each row's
 * values begin. With AVX-512, one word of the mask is the lane mask of vexpandps, which loads
 * popcount(word) consecutive kept values into the kept lanes (zeros elsewhere): one FMA per 16
 * inputs, and only the kept values and one bit per weight cross the memory bus. An N:M layer is
 * the same thing with a fixed count per row (the repacking builds its bitmask). Rows are processed
 * 4 at a time so that their value pointers' popcount chains overlap.
 *
 * With AVX2 (no expand instruction) each byte of the word expands 8 lanes: 8 values are loaded from
 * the value pointer, vpermps moves value k to the lane of the k-th set bit (a 256-entry table of
 * permutations, one per byte), and the lanes whose bit is clear are zeroed. The value array is
 * padded by 8 floats (see kernels/sparse.py) so that these loads never leave it. Without either a
 * portable loop computes the same sums.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define RB 4 /* rows interleaved */

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define SP_AVX2 1
#include "simd.h"
/* EXPAND[b][lane] = how many set bits of b lie below lane: where lane's value sits in the packed run */
static int32_t EXPAND[256][8];
__attribute__((constructor)) static void init_expand(void) {
    for (int b = 0; b < 256; b++) {
        int k = 0;
        for (int lane = 0; lane < 8; lane++) {
            EXPAND[b][lane] = ((b >> lane) & 1) ? k : 0;
            k += (b >> lane) & 1;
        }
    }
}
/* the next popcount(bits) values at *v expanded into the lanes of the set bits of bits (8 lanes) */
static inline __m256 expand8(const float **v, unsigned bits, __m256i sel) {
    __m256 vals = _mm256_permutevar8x32_ps(_mm256_loadu_ps(*v), _mm256_loadu_si256((const __m256i *)EXPAND[bits]));
    *v += _mm_popcnt_u32(bits);
    return _mm256_and_ps(vals, lanes_of_bits(bits, sel));
}
#endif

int sparse_simd(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(SP_AVX2)
    return 256;
#else
    return 0;
#endif
}

/* x (n_rows, n_in) f32 contiguous; out (n_rows, n_out). n_in must be a multiple of 16. */
void sparse_bitmask_matmul(const float *x, const uint16_t *mask, const float *values, const int64_t *row_start,
                           const float *bias, float *out, int64_t n_rows, int64_t n_in, int64_t n_out, int threads) {
    int64_t nc = n_in / 16, n_rb = (n_out + RB - 1) / RB;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t rb = 0; rb < n_rb; rb++) {
        int64_t o0 = rb * RB, nr = n_out - o0 < RB ? n_out - o0 : RB;
        for (int64_t n = 0; n < n_rows; n++) {
            const float *xr = x + n * n_in;
            float res[RB] = {0};
#if defined(__AVX512F__) || defined(SP_AVX2)
            const float *vp[RB]; /* each row's next kept value and its mask words (ragged: row o0 again) */
            const uint16_t *mp[RB];
            for (int r = 0; r < RB; r++) {
                int64_t o = o0 + (r < nr ? r : 0);
                vp[r] = values + row_start[o];
                mp[r] = mask + o * nc;
            }
#endif
#ifdef __AVX512F__
            __m512 acc[RB];
            for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t c = 0; c < nc; c++) {
                __m512 xv = _mm512_loadu_ps(xr + c * 16);
                for (int r = 0; r < RB; r++) {
                    __mmask16 m = mp[r][c];
                    acc[r] = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m, vp[r]), xv, acc[r]);
                    vp[r] += _mm_popcnt_u32(m);
                }
            }
            for (int r = 0; r < nr; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(SP_AVX2)
            const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            __m256 acc[RB];
            for (int r = 0; r < RB; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t c = 0; c < nc; c++) {
                __m256 xa = _mm256_loadu_ps(xr + c * 16), xb = _mm256_loadu_ps(xr + c * 16 + 8);
                for (int r = 0; r < RB; r++) {
                    unsigned m = mp[r][c];
                    acc[r] = _mm256_fmadd_ps(expand8(&vp[r], m & 255u, sel), xa, acc[r]);
                    acc[r] = _mm256_fmadd_ps(expand8(&vp[r], m >> 8, sel), xb, acc[r]);
                }
            }
            for (int r = 0; r < nr; r++) res[r] = hsum256_ps(acc[r]);
#else
            for (int r = 0; r < nr; r++) {
                int64_t o = o0 + r;
                const float *v = values + row_start[o];
                float t = 0.0f;
                for (int64_t c = 0; c < nc; c++) {
                    unsigned m = mask[o * nc + c];
                    for (int j = 0; j < 16; j++)
                        if ((m >> j) & 1) t += *v++ * xr[c * 16 + j];
                }
                res[r] = t;
            }
#endif
            for (int r = 0; r < nr; r++) out[n * n_out + o0 + r] = res[r] + (bias ? bias[o0 + r] : 0.0f);
        }
    }
}

/* The dense weight (n_out, n_in) f32 with the zeros put back. */
void sparse_bitmask_dense(const uint16_t *mask, const float *values, const int64_t *row_start, float *w,
                          int64_t n_in, int64_t n_out, int threads) {
    int64_t nc = n_in / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        const float *v = values + row_start[o];
        for (int64_t c = 0; c < nc; c++) {
            unsigned m = mask[o * nc + c];
#ifdef __AVX512F__
            _mm512_storeu_ps(w + o * n_in + c * 16, _mm512_maskz_expandloadu_ps((__mmask16)m, v));
            v += _mm_popcnt_u32(m);
#elif defined(SP_AVX2)
            const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            _mm256_storeu_ps(w + o * n_in + c * 16, expand8(&v, m & 255u, sel));
            _mm256_storeu_ps(w + o * n_in + c * 16 + 8, expand8(&v, m >> 8, sel));
#else
            for (int j = 0; j < 16; j++) w[o * n_in + c * 16 + j] = ((m >> j) & 1) ? *v++ : 0.0f;
#endif
        }
    }
}

/* Evict [p, p + n) from every cache level (clflush per 64-byte line), so that a timing that
 * follows reads from memory, as a layer's weights are read once per token in a model. */
void evict_from_cache(const void *p, int64_t n) {
#if defined(__x86_64__) || defined(__i386__)
    const char *c = (const char *)p;
    for (int64_t i = 0; i < n; i += 64) _mm_clflush(c + i);
    _mm_mfence();
#else
    (void)p;
    (void)n;
#endif
}
