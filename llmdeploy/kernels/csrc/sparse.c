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
 * 4 at a time so that their value pointers' popcount chains overlap. Without AVX-512 a portable
 * loop computes the same sums.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define RB 4 /* rows interleaved */

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
#ifdef __AVX512F__
            __m512 acc[RB];
            const float *vp[RB];
            const uint16_t *mp[RB];
            for (int r = 0; r < RB; r++) {
                int64_t o = o0 + (r < nr ? r : 0);
                acc[r] = _mm512_setzero_ps();
                vp[r] = values + row_start[o];
                mp[r] = mask + o * nc;
            }
            for (int64_t c = 0; c < nc; c++) {
                __m512 xv = _mm512_loadu_ps(xr + c * 16);
                for (int r = 0; r < RB; r++) {
                    __mmask16 m = mp[r][c];
                    acc[r] = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m, vp[r]), xv, acc[r]);
                    vp[r] += _mm_popcnt_u32(m);
                }
            }
            for (int r = 0; r < nr; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
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
