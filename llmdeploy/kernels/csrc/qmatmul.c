/* Weight-only quantized matmul over bit planes, for any width from 1 to 8 bits.
 *
 *   out[n, o] = bias[o] + sum_g scale[o, g] * sum_{i in g} (code[o, i] - zero[o, g]) * x[n, i]
 *
 * Kernel layout (repacked once from the checkpoint's codes, see kernels/quant.py): bit planes, where
 * bit j of the 16-bit word of output o, plane k, chunk c of group g is bit k of the code of input
 * g*gs + 16c + j; the words of 8 consecutive outputs sit together. Since code = sum_k 2^k bit_k,
 *
 *   sum_i code_i x_i = sum_k 2^k (sum of the x_i whose bit k is set),
 *
 * and with AVX-512 two bytes of a plane are directly the lane mask of 16 inputs: one masked add
 * consumes 16 weights of one plane while reading 2 bytes (x is pre-multiplied by 2^k per plane), so
 * a b-bit weight costs b/16 adds and b bits of memory traffic. The zero point enters once per group
 * through the group's sum of x. Parallel over blocks of 8 outputs (OpenMP), which share each load
 * of x and keep 8 independent accumulators. Without AVX-512 a portable loop computes the same sums.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define QM_AVX2 1
#include "simd.h"
/* 8 unsigned bytes at p as 8 floats */
static inline __m256 u8x8_ps(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#endif

/* which SIMD path this build compiled: 512 (AVX-512), 256 (AVX2+FMA) or 0 (portable C) */
int qmatmul_simd(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(QM_AVX2)
    return 256;
#else
    return 0;
#endif
}

#define OB 8 /* outputs per block: 8 independent accumulators hide the add latency, x loads are shared */

static inline float plane_scale(int k) { return (float)(1 << k); }

/* sum of x over each group of each row: xsum (n_rows, ng); the zero points enter through it */
static float *group_sums(const float *x, int64_t n_rows, int64_t n_in, int64_t gs) {
    int64_t ng = n_in / gs;
    float *xsum = malloc(sizeof(float) * (n_rows * ng > 0 ? n_rows * ng : 1));
    if (!xsum) return NULL;
    for (int64_t n = 0; n < n_rows; n++)
        for (int64_t g = 0; g < ng; g++) {
            float t = 0.0f;
            for (int64_t i = 0; i < gs; i++) t += x[n * n_in + g * gs + i];
            xsum[n * ng + g] = t;
        }
    return xsum;
}

/* out = sum_g s_g * (dot_g) - sum_g s_g * z_g * xsum_g + bias, given acc = sum_g s_g * dot_g */
static inline float finish(float acc, const float *scales, const float *zeros, const float *xsum, int64_t ng,
                           const float *bias, int64_t o) {
    float zt = 0.0f;
    for (int64_t g = 0; g < ng; g++) zt += scales[o * ng + g] * zeros[o * ng + g] * xsum[g];
    return acc - zt + (bias ? bias[o] : 0.0f);
}

/* x (n_rows, n_in) f32 contiguous; planes (ceil(n_out/8), groups, bits, gs/16, 8, 2) u8 (the 2 bytes
 * of the 8 outputs of a block for one 16-input chunk of one plane are adjacent, so a block streams
 * its codes in order); scales and zeros (n_out, groups) f32; bias (n_out,) f32 or NULL;
 * out (n_rows, n_out) f32. gs must be a multiple of 16. Returns 0, or -2 when out of memory. */
int qmatmul_planes(const float *x, const uint8_t *planes, const float *scales, const float *zeros,
                   const float *bias, float *out, int64_t n_rows, int64_t n_in, int64_t n_out, int bits,
                   int64_t gs, int threads) {
    int64_t ng = n_in / gs, nc = gs / 16, n_ob = (n_out + OB - 1) / OB;
    int64_t block_bytes = ng * bits * nc * OB * 2;
    /* per row: xsum per group (zero points) and x * 2^k per plane (so a plane's adds need no scaling) */
    float *xsum = group_sums(x, n_rows, n_in, gs);
    float *xk = malloc(sizeof(float) * (n_rows * bits * n_in > 0 ? n_rows * bits * n_in : 1));
    if (!xsum || !xk) {
        free(xsum);
        free(xk);
        return -2;
    }
    for (int64_t n = 0; n < n_rows; n++) {
        for (int k = 0; k < bits; k++)
            for (int64_t i = 0; i < n_in; i++) xk[(n * bits + k) * n_in + i] = x[n * n_in + i] * plane_scale(k);
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n_ob; ob++) {
        const uint8_t *wb = planes + ob * block_bytes;
        int64_t o0 = ob * OB, nr = n_out - o0 < OB ? n_out - o0 : OB;
        for (int64_t n = 0; n < n_rows; n++) {
            float res[OB] = {0};
            const float *xr = xk + n * bits * n_in;
#ifdef __AVX512F__
            __m512 tot[OB];
            for (int r = 0; r < OB; r++) tot[r] = _mm512_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                __m512 acc[OB];
                for (int r = 0; r < OB; r++) acc[r] = _mm512_setzero_ps();
                const uint8_t *pg = wb + g * bits * nc * OB * 2;
                for (int k = 0; k < bits; k++) {
                    const float *xg = xr + k * n_in + g * gs;
                    for (int64_t c = 0; c < nc; c++) {
                        __m512 xv = _mm512_loadu_ps(xg + c * 16);
                        const uint8_t *m = pg + (k * nc + c) * OB * 2;
                        for (int r = 0; r < OB; r++)
                            acc[r] = _mm512_mask_add_ps(acc[r], _load_mask16((__mmask16 *)(m + 2 * r)), acc[r], xv);
                    }
                }
                for (int r = 0; r < nr; r++)
                    tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(scales[(o0 + r) * ng + g]), acc[r], tot[r]);
            }
            for (int r = 0; r < nr; r++) res[r] = _mm512_reduce_add_ps(tot[r]);
#elif defined(QM_AVX2)
            /* no mask registers: the 16-bit word is broadcast and each lane tests its own bit */
            const __m256i sel_lo = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            const __m256i sel_hi = _mm256_setr_epi32(256, 512, 1024, 2048, 4096, 8192, 16384, 32768);
            __m256 tot[OB];
            for (int r = 0; r < OB; r++) tot[r] = _mm256_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                __m256 acc[OB];
                for (int r = 0; r < OB; r++) acc[r] = _mm256_setzero_ps();
                const uint8_t *pg = wb + g * bits * nc * OB * 2;
                for (int k = 0; k < bits; k++) {
                    const float *xg = xr + k * n_in + g * gs;
                    for (int64_t c = 0; c < nc; c++) {
                        __m256 xa = _mm256_loadu_ps(xg + c * 16), xb = _mm256_loadu_ps(xg + c * 16 + 8);
                        const uint8_t *m = pg + (k * nc + c) * OB * 2;
                        for (int r = 0; r < OB; r++) {
                            unsigned word = m[2 * r] | (m[2 * r + 1] << 8);
                            __m256 la = lanes_of_bits(word, sel_lo), lb = lanes_of_bits(word, sel_hi);
                            acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(la, xa));
                            acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(lb, xb));
                        }
                    }
                }
                for (int r = 0; r < nr; r++)
                    tot[r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[(o0 + r) * ng + g]), acc[r], tot[r]);
            }
            for (int r = 0; r < nr; r++) res[r] = hsum256_ps(tot[r]);
#else
            for (int64_t g = 0; g < ng; g++) {
                const uint8_t *pg = wb + g * bits * nc * OB * 2;
                for (int r = 0; r < nr; r++) {
                    float t = 0.0f;
                    for (int k = 0; k < bits; k++)
                        for (int64_t c = 0; c < nc; c++) {
                            const uint8_t *m = pg + ((k * nc + c) * OB + r) * 2;
                            unsigned mask = m[0] | (m[1] << 8);
                            const float *xg = xr + k * n_in + g * gs + c * 16;
                            for (int j = 0; j < 16; j++)
                                if ((mask >> j) & 1) t += xg[j];
                        }
                    res[r] += scales[(o0 + r) * ng + g] * t;
                }
            }
#endif
            for (int r = 0; r < nr; r++)
                out[n * n_out + o0 + r] = finish(res[r], scales, zeros, xsum + n * ng, ng, bias, o0 + r);
        }
    }
    free(xsum);
    free(xk);
    return 0;
}

/* The dense weight (n_out, n_in) f32 of the same planes: w[o, i] = (code - zero) * scale. */
void dequant_planes(const uint8_t *planes, const float *scales, const float *zeros, float *w, int64_t n_in,
                    int64_t n_out, int bits, int64_t gs, int threads) {
    int64_t ng = n_in / gs, nc = gs / 16, n_ob = (n_out + OB - 1) / OB;
    int64_t block_bytes = ng * bits * nc * OB * 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n_ob; ob++) {
        int64_t o0 = ob * OB, nr = n_out - o0 < OB ? n_out - o0 : OB;
        for (int r = 0; r < nr; r++) {
            int64_t o = o0 + r;
            for (int64_t g = 0; g < ng; g++) {
                const uint8_t *pg = planes + ob * block_bytes + g * bits * nc * OB * 2;
                float s = scales[o * ng + g], z = zeros[o * ng + g];
                for (int64_t c = 0; c < nc; c++) {
                    float *dst = w + o * n_in + g * gs + c * 16;
#ifdef __AVX512F__
                    __m512 v = _mm512_setzero_ps();
                    for (int k = 0; k < bits; k++) {
                        __mmask16 m = _load_mask16((__mmask16 *)(pg + ((k * nc + c) * OB + r) * 2));
                        v = _mm512_mask_add_ps(v, m, v, _mm512_set1_ps(plane_scale(k)));
                    }
                    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(z)), _mm512_set1_ps(s)));
#else
                    for (int j = 0; j < 16; j++) {
                        int code = 0;
                        for (int k = 0; k < bits; k++) {
                            const uint8_t *m = pg + ((k * nc + c) * OB + r) * 2;
                            code |= (((m[0] | (m[1] << 8)) >> j) & 1) << k;
                        }
                        dst[j] = ((float)code - z) * s;
                    }
#endif
                }
            }
        }
    }
}

/* ---- 3- and 4-bit codes, one per nibble: a 16-entry lookup table per output and group ----
 * Layout: (ceil(n_out/8), groups, gs/32, 8, 16) bytes; byte j of the 16 of output r, chunk c holds
 * the code of input 32c + j (low nibble) and of input 32c + 16 + j (high nibble). The table of
 * output o, group g is (code - z) * s for code = 0..15 (exactly the reference's weights), and
 * vpermps, which reads only the low 4 bits of each index, turns 16 codes into 16 weights. */
int qmatmul_nibble(const float *x, const uint8_t *codes, const float *scales, const float *zeros,
                   const float *bias, float *out, int64_t n_rows, int64_t n_in, int64_t n_out, int64_t gs,
                   int threads) {
    int64_t ng = n_in / gs, nc = gs / 32, n_ob = (n_out + OB - 1) / OB;
    int64_t block_bytes = ng * nc * OB * 16;
#ifdef QM_AVX2
    /* AVX2 has no 16-entry permute: codes become floats (s * sum code * x per group), and the zero
     * points enter through the group sums of x, as in the byte kernel */
    float *xsum = group_sums(x, n_rows, n_in, gs);
    if (!xsum) return -2;
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n_ob; ob++) {
        const uint8_t *wb = codes + ob * block_bytes;
        int64_t o0 = ob * OB, nr = n_out - o0 < OB ? n_out - o0 : OB;
        for (int64_t n = 0; n < n_rows; n++) {
            const float *xr = x + n * n_in;
            float res[OB] = {0};
#ifdef __AVX512F__
            const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            __m512 tot[OB], lut[OB];
            for (int r = 0; r < OB; r++) tot[r] = _mm512_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                for (int r = 0; r < OB; r++) {
                    int64_t o = o0 + (r < nr ? r : 0);
                    lut[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zeros[o * ng + g])),
                                           _mm512_set1_ps(scales[o * ng + g]));
                }
                const uint8_t *pg = wb + g * nc * OB * 16;
                for (int64_t c = 0; c < nc; c++) {
                    __m512 x0 = _mm512_loadu_ps(xr + g * gs + c * 32), x1 = _mm512_loadu_ps(xr + g * gs + c * 32 + 16);
                    const uint8_t *p = pg + c * OB * 16;
                    for (int r = 0; r < OB; r++) {
                        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + r * 16)));
                        tot[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, lut[r]), x0, tot[r]);
                        tot[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut[r]), x1, tot[r]);
                    }
                }
            }
            for (int r = 0; r < nr; r++) res[r] = _mm512_reduce_add_ps(tot[r]);
#elif defined(QM_AVX2)
            /* per 8 code bytes: one zero-extending load to 8 lanes, then the low nibbles (inputs j)
             * and the high ones (inputs 16 + j) by a mask and a shift in the lanes — no shuffles; the
             * block's 8 outputs in two halves of 4, so that accumulators and x stay in registers */
            const __m256i m15 = _mm256_set1_epi32(15);
            __m256 tot[OB];
            for (int r = 0; r < OB; r++) tot[r] = _mm256_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                const uint8_t *pg = wb + g * nc * OB * 16;
                for (int h = 0; h < OB / 4; h++) {
                    __m256 acc[4];
                    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
                    for (int64_t c = 0; c < nc; c++) {
                        const float *xc = xr + g * gs + c * 32;
                        __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 8);
                        __m256 x2 = _mm256_loadu_ps(xc + 16), x3 = _mm256_loadu_ps(xc + 24);
                        const uint8_t *p = pg + c * OB * 16 + h * 64;
                        for (int r = 0; r < 4; r++) {
                            __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + r * 16)));
                            __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + r * 16 + 8)));
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, m15)), x0, acc[r]);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, m15)), x1, acc[r]);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), x2, acc[r]);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), x3, acc[r]);
                        }
                    }
                    for (int r = 0; r < 4; r++)
                        if (h * 4 + r < nr)
                            tot[h * 4 + r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[(o0 + h * 4 + r) * ng + g]), acc[r],
                                                             tot[h * 4 + r]);
                }
            }
            for (int r = 0; r < nr; r++)
                res[r] = finish(hsum256_ps(tot[r]), scales, zeros, xsum + n * ng, ng, NULL, o0 + r);
#else
            for (int r = 0; r < nr; r++) {
                int64_t o = o0 + r;
                float t = 0.0f;
                for (int64_t g = 0; g < ng; g++) {
                    float s = scales[o * ng + g], z = zeros[o * ng + g];
                    const uint8_t *pg = wb + g * nc * OB * 16;
                    for (int64_t c = 0; c < nc; c++)
                        for (int j = 0; j < 16; j++) {
                            uint8_t byte = pg[(c * OB + r) * 16 + j];
                            const float *xc = xr + g * gs + c * 32;
                            t += (((float)(byte & 15) - z) * s) * xc[j] + (((float)(byte >> 4) - z) * s) * xc[16 + j];
                        }
                }
                res[r] = t;
            }
#endif
            for (int r = 0; r < nr; r++)
                out[n * n_out + o0 + r] = res[r] + (bias ? bias[o0 + r] : 0.0f);
        }
    }
#ifdef QM_AVX2
    free(xsum);
#endif
    return 0;
}

void dequant_nibble(const uint8_t *codes, const float *scales, const float *zeros, float *w, int64_t n_in,
                    int64_t n_out, int64_t gs, int threads) {
    int64_t ng = n_in / gs, nc = gs / 32, n_ob = (n_out + OB - 1) / OB;
    int64_t block_bytes = ng * nc * OB * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n_ob; ob++) {
        int64_t o0 = ob * OB, nr = n_out - o0 < OB ? n_out - o0 : OB;
        for (int r = 0; r < nr; r++) {
            int64_t o = o0 + r;
            for (int64_t g = 0; g < ng; g++) {
                float s = scales[o * ng + g], z = zeros[o * ng + g];
                const uint8_t *pg = codes + ob * block_bytes + g * nc * OB * 16;
                for (int64_t c = 0; c < nc; c++) {
                    float *dst = w + o * n_in + g * gs + c * 32;
                    for (int j = 0; j < 16; j++) {
                        uint8_t byte = pg[(c * OB + r) * 16 + j];
                        dst[j] = ((float)(byte & 15) - z) * s;
                        dst[16 + j] = ((float)(byte >> 4) - z) * s;
                    }
                }
            }
        }
    }
}

/* ---- 8-bit codes, one per byte: unsigned bytes widened to floats, a dot product per group ----
 * Layout: (ceil(n_out/8), groups, gs/16, 8, 16) bytes (16 consecutive inputs of one output). */
int qmatmul_byte(const float *x, const uint8_t *codes, const float *scales, const float *zeros,
                 const float *bias, float *out, int64_t n_rows, int64_t n_in, int64_t n_out, int64_t gs,
                 int threads) {
    int64_t ng = n_in / gs, nc = gs / 16, n_ob = (n_out + OB - 1) / OB;
    int64_t block_bytes = ng * nc * OB * 16;
    float *xsum = group_sums(x, n_rows, n_in, gs);
    if (!xsum) return -2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n_ob; ob++) {
        const uint8_t *wb = codes + ob * block_bytes;
        int64_t o0 = ob * OB, nr = n_out - o0 < OB ? n_out - o0 : OB;
        for (int64_t n = 0; n < n_rows; n++) {
            const float *xr = x + n * n_in;
            float res[OB] = {0};
#ifdef __AVX512F__
            __m512 tot[OB];
            for (int r = 0; r < OB; r++) tot[r] = _mm512_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                __m512 acc[OB];
                for (int r = 0; r < OB; r++) acc[r] = _mm512_setzero_ps();
                const uint8_t *pg = wb + g * nc * OB * 16;
                for (int64_t c = 0; c < nc; c++) {
                    __m512 xv = _mm512_loadu_ps(xr + g * gs + c * 16);
                    const uint8_t *p = pg + c * OB * 16;
                    for (int r = 0; r < OB; r++) {
                        __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + r * 16))));
                        acc[r] = _mm512_fmadd_ps(wv, xv, acc[r]);
                    }
                }
                for (int r = 0; r < nr; r++)
                    tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(scales[(o0 + r) * ng + g]), acc[r], tot[r]);
            }
            for (int r = 0; r < nr; r++) res[r] = _mm512_reduce_add_ps(tot[r]);
#elif defined(QM_AVX2)
            __m256 tot[OB];
            for (int r = 0; r < OB; r++) tot[r] = _mm256_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                __m256 acc[OB];
                for (int r = 0; r < OB; r++) acc[r] = _mm256_setzero_ps();
                const uint8_t *pg = wb + g * nc * OB * 16;
                for (int64_t c = 0; c < nc; c++) {
                    __m256 x0 = _mm256_loadu_ps(xr + g * gs + c * 16), x1 = _mm256_loadu_ps(xr + g * gs + c * 16 + 8);
                    const uint8_t *p = pg + c * OB * 16;
                    for (int r = 0; r < OB; r++) {
                        acc[r] = _mm256_fmadd_ps(u8x8_ps(p + r * 16), x0, acc[r]);
                        acc[r] = _mm256_fmadd_ps(u8x8_ps(p + r * 16 + 8), x1, acc[r]);
                    }
                }
                for (int r = 0; r < nr; r++)
                    tot[r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[(o0 + r) * ng + g]), acc[r], tot[r]);
            }
            for (int r = 0; r < nr; r++) res[r] = hsum256_ps(tot[r]);
#else
            for (int r = 0; r < nr; r++)
                for (int64_t g = 0; g < ng; g++) {
                    const uint8_t *pg = wb + g * nc * OB * 16;
                    float t = 0.0f;
                    for (int64_t c = 0; c < nc; c++)
                        for (int j = 0; j < 16; j++) t += (float)pg[(c * OB + r) * 16 + j] * xr[g * gs + c * 16 + j];
                    res[r] += scales[(o0 + r) * ng + g] * t;
                }
#endif
            for (int r = 0; r < nr; r++)
                out[n * n_out + o0 + r] = finish(res[r], scales, zeros, xsum + n * ng, ng, bias, o0 + r);
        }
    }
    free(xsum);
    return 0;
}

void dequant_byte(const uint8_t *codes, const float *scales, const float *zeros, float *w, int64_t n_in,
                  int64_t n_out, int64_t gs, int threads) {
    int64_t ng = n_in / gs, nc = gs / 16, n_ob = (n_out + OB - 1) / OB;
    int64_t block_bytes = ng * nc * OB * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n_ob; ob++) {
        int64_t o0 = ob * OB, nr = n_out - o0 < OB ? n_out - o0 : OB;
        for (int r = 0; r < nr; r++) {
            int64_t o = o0 + r;
            for (int64_t g = 0; g < ng; g++) {
                float s = scales[o * ng + g], z = zeros[o * ng + g];
                const uint8_t *pg = codes + ob * block_bytes + g * nc * OB * 16;
                for (int64_t c = 0; c < nc; c++)
                    for (int j = 0; j < 16; j++)
                        w[o * n_in + g * gs + c * 16 + j] = ((float)pg[(c * OB + r) * 16 + j] - z) * s;
            }
        }
    }
}
