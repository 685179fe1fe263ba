/* W8A8 dynamic linear: int8 weights (per output channel scale), activations quantized per row
 * at run time, an exact int8 x int8 -> int32 product, then the scales.
 *
 *   s_n = max(max_i |x[n, i]| / 127, 1e-12),  q[n, i] = clamp(round(x[n, i] / s_n), -127, 127)
 *   out[n, o] = ((float)(sum_i q[n, i] * w[o, i]) * s_n) * wscale[o] + bias[o]
 *
 * Every step is the same fp32 operation as the torch reference (llmdeploy/quant/dynamic_int8.py),
 * and the integer sum is exact, so the result is bit-identical to it.
 *
 * With AVX512-VNNI, vpdpbusd multiplies 64 unsigned x signed byte pairs and adds them into 16
 * int32 lanes in one instruction. The activations are made unsigned by adding 128 (the stored
 * byte is q + 128), and 128 * sum_i w[o, i] (precomputed per output) is subtracted afterwards.
 * Tiles: 8 outputs x 1 row for decoding (x stays in registers' reach, the weight streams once),
 * 4 outputs x 4 rows for longer inputs (each load feeds 4 products). OpenMP over output blocks.
 *
 * With AVX2 (no VNNI): both operands sign-extended to int16 and vpmaddwd (16 products, summed in
 * pairs into 8 int32 lanes; |q w| <= 127 * 127, so pairs and sums are exact in int32); tiles of
 * 8 outputs x 1 row, or 4 outputs x 2 rows for longer inputs. The portable loop is the same sum.
 * For fewer than 4 rows the AVX2 path reads the weight repacked once by w8a8_pack_blocks (blocks
 * of 8 outputs whose 16-byte chunks of one 16-input step are adjacent, zero-padded): one
 * sequential stream per thread instead of 8 row streams (a 1536x576 weight read from memory: 127 us
 * row-major, 76 us packed, 56 us from cache; 2 threads, AMD EPYC), and no tail case. The activations are quantized
 * with AVX2 (the same IEEE division and round-half-to-even as the scalar loop).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define W8_VNNI 1
#elif defined(__AVX2__)
#define W8_AVX2 1
#endif

int w8a8_has_vnni(void) {
#ifdef W8_VNNI
    return 1;
#else
    return 0;
#endif
}

/* which path this build has: 2 (AVX512-VNNI), 1 (AVX2), 0 (portable C) */
int w8a8_simd(void) {
#if defined(W8_VNNI)
    return 2;
#elif defined(W8_AVX2)
    return 1;
#else
    return 0;
#endif
}

#ifdef W8_AVX2
static inline int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
/* 16 signed bytes at p as 16 int16 */
static inline __m256i s8x16_epi16(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
/* the first n (< 16) signed bytes at p as int16, zeros after */
static inline __m256i s8_tail_epi16(const int8_t *p, int64_t n) {
    int8_t buf[16] = {0};
    memcpy(buf, p, (size_t)n);
    return s8x16_epi16(buf);
}
#endif

/* sum_i w[o, i] for each output (int32), used to undo the +128 shift of the activations */
void w8a8_row_sums(const int8_t *w, int32_t *sums, int64_t n_out, int64_t k) {
    for (int64_t o = 0; o < n_out; o++) {
        int32_t t = 0;
        for (int64_t i = 0; i < k; i++) t += w[o * k + i];
        sums[o] = t;
    }
}

/* packed (ceil(n_out / 8), ceil(k / 16), 8, 16) s8: byte t of chunk c of output 8 * ob + j is
 * w[8 * ob + j, 16 * c + t], zeros past n_out and k (the AVX2 decode layout) */
void w8a8_pack_blocks(const int8_t *w, int8_t *packed, int64_t n_out, int64_t k) {
    int64_t n_ob = (n_out + 7) / 8, n_c = (k + 15) / 16;
    memset(packed, 0, (size_t)(n_ob * n_c * 128));
    for (int64_t o = 0; o < n_out; o++)
        for (int64_t i = 0; i < k; i++)
            packed[((o / 8 * n_c + i / 16) * 8 + o % 8) * 16 + i % 16] = w[o * k + i];
}

#ifdef W8_VNNI
static inline int32_t hsum(__m512i v) { return _mm512_reduce_add_epi32(v); }
#endif

#ifdef W8_AVX2
/* the per-row quantization of the reference (see the top), 16 inputs at a time, as int16 zero-padded
 * to kp16: the same IEEE division and round-half-to-even as the scalar loop, so the same codes */
static void quantize_rows_avx2(const float *x, int16_t *x16, float *xs, int64_t n, int64_t k, int64_t kp16) {
    const __m256 sign = _mm256_set1_ps(-0.0f), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * k;
        __m256 mv = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) mv = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xr + i)), mv);
        float lanes[8], m = 0.0f;
        _mm256_storeu_ps(lanes, mv);
        for (int t = 0; t < 8; t++) m = fmaxf(m, lanes[t]);
        for (; i < k; i++) m = fmaxf(m, fabsf(xr[i]));
        float s = m / 127.0f;
        if (s < 1e-12f) s = 1e-12f;
        xs[r] = s;
        const __m256 sv = _mm256_set1_ps(s);
        int16_t *qr = x16 + r * kp16;
        for (i = 0; i + 16 <= k; i += 16) {
            __m256 a = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + i), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256 b = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + i + 8), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            a = _mm256_min_ps(_mm256_max_ps(a, lo), hi);
            b = _mm256_min_ps(_mm256_max_ps(b, lo), hi);
            __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b)); /* lanes a0-3 b0-3 a4-7 b4-7 */
            _mm256_storeu_si256((__m256i *)(qr + i), _mm256_permute4x64_epi64(p, 0xD8));
        }
        for (; i < k; i++) {
            float q = nearbyintf(xr[i] / s);
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            qr[i] = (int16_t)q;
        }
        for (; i < kp16; i++) qr[i] = 0;
    }
}

static int w8a8_linear_avx2(const float *x, const int8_t *w, const int8_t *wp, const float *wscale, const float *bias,
                            float *out, int64_t n, int64_t k, int64_t n_out, int threads) {
    int64_t kp16 = (k + 15) / 16 * 16, full = k / 16 * 16, rest = k - full, n_c = kp16 / 16;
    int16_t *x16 = malloc(sizeof(int16_t) * (size_t)(n > 0 ? n : 1) * kp16);
    float *xs = malloc(sizeof(float) * (n > 0 ? n : 1));
    if (!x16 || !xs) {
        free(x16);
        free(xs);
        return -2;
    }
    quantize_rows_avx2(x, x16, xs, n, k, kp16);
    if (n < 4 && wp) { /* the packed blocks: one sequential stream per thread */
        int64_t n_ob = (n_out + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t ob = 0; ob < n_ob; ob++) {
            int64_t o0 = ob * 8, nr = n_out - o0 < 8 ? n_out - o0 : 8;
            const int8_t *pb = wp + ob * n_c * 128;
            for (int64_t r = 0; r < n; r++) {
                const int16_t *xr = x16 + r * kp16;
                __m256i acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_si256();
                for (int64_t c = 0; c < n_c; c++) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + 16 * c));
                    const int8_t *pc = pb + c * 128;
                    for (int j = 0; j < 8; j++)
                        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(s8x16_epi16(pc + 16 * j), xv));
                }
                for (int j = 0; j < nr; j++) {
                    int64_t o = o0 + j;
                    out[r * n_out + o] = ((float)hsum8_epi32(acc[j]) * xs[r]) * wscale[o] + (bias ? bias[o] : 0.0f);
                }
            }
        }
    } else if (n < 4) { /* row-major weight (no packed copy given) */
        int64_t n_ob = (n_out + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t ob = 0; ob < n_ob; ob++) {
            int64_t o0 = ob * 8, nr = n_out - o0 < 8 ? n_out - o0 : 8;
            const int8_t *wr[8];
            for (int j = 0; j < 8; j++) wr[j] = w + (o0 + (j < nr ? j : 0)) * k; /* ragged: recomputed, not stored */
            for (int64_t r = 0; r < n; r++) {
                const int16_t *xr = x16 + r * kp16;
                __m256i acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_si256();
                for (int64_t i = 0; i < full; i += 16) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + i));
                    for (int j = 0; j < 8; j++)
                        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(s8x16_epi16(wr[j] + i), xv));
                }
                if (rest) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + full));
                    for (int j = 0; j < 8; j++)
                        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(s8_tail_epi16(wr[j] + full, rest), xv));
                }
                for (int j = 0; j < nr; j++) {
                    int64_t o = o0 + j;
                    out[r * n_out + o] = ((float)hsum8_epi32(acc[j]) * xs[r]) * wscale[o] + (bias ? bias[o] : 0.0f);
                }
            }
        }
    } else {
        int64_t n_ob = (n_out + 3) / 4, n_rb = (n + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
        for (int64_t ob = 0; ob < n_ob; ob++) {
            for (int64_t rb = 0; rb < n_rb; rb++) {
                int64_t o0 = ob * 4, r0 = rb * 2;
                int64_t no = n_out - o0 < 4 ? n_out - o0 : 4, nrw = n - r0 < 2 ? n - r0 : 2;
                const int8_t *wr[4];
                const int16_t *xr[2];
                for (int j = 0; j < 4; j++) wr[j] = w + (o0 + (j < no ? j : 0)) * k;
                for (int j = 0; j < 2; j++) xr[j] = x16 + (r0 + (j < nrw ? j : 0)) * kp16;
                __m256i acc[4][2];
                for (int a = 0; a < 4; a++) acc[a][0] = acc[a][1] = _mm256_setzero_si256();
                for (int64_t i = 0; i < kp16; i += 16) {
                    __m256i x0 = _mm256_loadu_si256((const __m256i *)(xr[0] + i));
                    __m256i x1 = _mm256_loadu_si256((const __m256i *)(xr[1] + i));
                    for (int a = 0; a < 4; a++) {
                        __m256i wv = i < full ? s8x16_epi16(wr[a] + i) : s8_tail_epi16(wr[a] + i, rest);
                        acc[a][0] = _mm256_add_epi32(acc[a][0], _mm256_madd_epi16(wv, x0));
                        acc[a][1] = _mm256_add_epi32(acc[a][1], _mm256_madd_epi16(wv, x1));
                    }
                }
                for (int a = 0; a < no; a++)
                    for (int b = 0; b < nrw; b++) {
                        int64_t o = o0 + a, r = r0 + b;
                        out[r * n_out + o] = ((float)hsum8_epi32(acc[a][b]) * xs[r]) * wscale[o] + (bias ? bias[o] : 0.0f);
                    }
            }
        }
    }
    free(x16);
    free(xs);
    return 0;
}
#endif

/* x (n, k) f32; w (n_out, k) s8; wp: w by w8a8_pack_blocks, or NULL (read by the AVX2 path for n < 4,
 * ignored by the others); wscale (n_out,) f32; wsum (n_out,) i32; bias (n_out,) f32 or NULL;
 * out (n, n_out) f32. Returns 0, or -2 when out of memory. */
int w8a8_linear(const float *x, const int8_t *w, const int8_t *wp, const float *wscale, const int32_t *wsum,
                const float *bias, float *out, int64_t n, int64_t k, int64_t n_out, int threads) {
    (void)wsum; /* not read by the AVX2 and portable paths (signed products: no +128 shift to undo) */
#ifdef W8_AVX2
    return w8a8_linear_avx2(x, w, wp, wscale, bias, out, n, k, n_out, threads);
#else
    (void)wp;
    int64_t kp = (k + 63) / 64 * 64;
    uint8_t *xq = malloc((size_t)(n > 0 ? n : 1) * kp);
    float *xs = malloc(sizeof(float) * (n > 0 ? n : 1));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -2;
    }
    for (int64_t r = 0; r < n; r++) { /* the reference's per-row quantization, op for op */
        const float *xr = x + r * k;
        float m = 0.0f;
        for (int64_t i = 0; i < k; i++) m = fmaxf(m, fabsf(xr[i]));
        float s = m / 127.0f;
        if (s < 1e-12f) s = 1e-12f;
        xs[r] = s;
        for (int64_t i = 0; i < k; i++) {
            float q = nearbyintf(xr[i] / s); /* round half to even, as torch.round */
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            xq[r * kp + i] = (uint8_t)((int)q + 128);
        }
        memset(xq + r * kp + k, 128, (size_t)(kp - k)); /* padding: q = 0 */
    }
#if defined(W8_VNNI)
    int64_t full = k / 64 * 64;
    __mmask64 tail = (k - full) ? (((__mmask64)1 << (k - full)) - 1) : 0;
    if (n < 4) {
        int64_t n_ob = (n_out + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t ob = 0; ob < n_ob; ob++) {
            int64_t o0 = ob * 8, nr = n_out - o0 < 8 ? n_out - o0 : 8;
            for (int64_t r = 0; r < n; r++) {
                const uint8_t *xr = xq + r * kp;
                __m512i acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_si512();
                for (int64_t i = 0; i < full; i += 64) {
                    __m512i xv = _mm512_loadu_si512(xr + i);
                    for (int j = 0; j < 8; j++)
                        if (j < nr)
                            acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_loadu_si512(w + (o0 + j) * k + i));
                }
                if (tail) {
                    __m512i xv = _mm512_loadu_si512(xr + full);
                    for (int j = 0; j < nr; j++)
                        acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_maskz_loadu_epi8(tail, w + (o0 + j) * k + full));
                }
                for (int j = 0; j < nr; j++) {
                    int64_t o = o0 + j;
                    int32_t v = hsum(acc[j]) - 128 * wsum[o];
                    out[r * n_out + o] = ((float)v * xs[r]) * wscale[o] + (bias ? bias[o] : 0.0f);
                }
            }
        }
    } else {
        int64_t n_ob = (n_out + 3) / 4, n_rb = (n + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
        for (int64_t ob = 0; ob < n_ob; ob++) {
            for (int64_t rb = 0; rb < n_rb; rb++) {
                int64_t o0 = ob * 4, r0 = rb * 4;
                int64_t no = n_out - o0 < 4 ? n_out - o0 : 4, nrw = n - r0 < 4 ? n - r0 : 4;
                const int8_t *wr[4];
                const uint8_t *xr[4];
                for (int j = 0; j < 4; j++) wr[j] = w + (o0 + (j < no ? j : 0)) * k; /* ragged: recompute, not stored */
                for (int j = 0; j < 4; j++) xr[j] = xq + (r0 + (j < nrw ? j : 0)) * kp;
                __m512i acc[4][4];
                for (int a = 0; a < 4; a++)
                    for (int b = 0; b < 4; b++) acc[a][b] = _mm512_setzero_si512();
                for (int64_t i = 0; i < kp; i += 64) {
                    __m512i wv[4], xv[4];
                    __mmask64 m = i < full ? ~(__mmask64)0 : tail;
                    for (int j = 0; j < 4; j++) wv[j] = _mm512_maskz_loadu_epi8(m, wr[j] + i);
                    for (int j = 0; j < 4; j++) xv[j] = _mm512_loadu_si512(xr[j] + i);
                    for (int a = 0; a < 4; a++)
                        for (int b = 0; b < 4; b++) acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], xv[b], wv[a]);
                }
                for (int a = 0; a < no; a++)
                    for (int b = 0; b < nrw; b++) {
                        int64_t o = o0 + a, r = r0 + b;
                        int32_t v = hsum(acc[a][b]) - 128 * wsum[o];
                        out[r * n_out + o] = ((float)v * xs[r]) * wscale[o] + (bias ? bias[o] : 0.0f);
                    }
            }
        }
    }
#else
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++)
        for (int64_t r = 0; r < n; r++) {
            int32_t v = 0;
            for (int64_t i = 0; i < k; i++) v += ((int32_t)xq[r * kp + i] - 128) * (int32_t)w[o * k + i];
            out[r * n_out + o] = ((float)v * xs[r]) * wscale[o] + (bias ? bias[o] : 0.0f);
        }
#endif
    free(xq);
    free(xs);
    return 0;
#endif
}
