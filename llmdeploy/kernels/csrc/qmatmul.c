/* Weight-only quantized matmul over bit planes, for any width from 1 to 8 bits.
 *
 *   out[n, o] = bias[o] + sum_g scale[o, g] * sum_{i in g} (code[o, i] - zero[o, g]) * x[n, i]
 *
 * Kernel layout (repacked once from the checkpoint's codes, see kernels/quant.py): for output o and
 * group g, `bits` planes of group_size/8 bytes each; bit (i % 8) of byte i / 8 of plane k is bit k
 * of the code of input i of the group. Since code = sum_k 2^k bit_k,
 *
 *   sum_i code_i x_i = sum_k 2^k (sum of the x_i whose bit k is set),
 *
 * and with AVX-512 two bytes of a plane are directly the lane mask of 16 inputs: one masked add
 * consumes 16 weights of one plane while reading 2 bytes, so a b-bit weight costs b/16 adds and
 * b bits of memory traffic. The zero point enters once per group through the group's sum of x.
 * Parallel over outputs (OpenMP): the few bytes of one output's codes stay in L1 while the rows
 * of x are reused. Without AVX-512 a portable loop computes the same sums bit by bit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* sum over the inputs of one group (x: gs floats) of code * x, from the group's planes */
static float group_dot(const float *x, const uint8_t *planes, int bits, int64_t gs) {
    int64_t nb = gs / 8;
    float acc = 0.0f;
    int64_t i0 = 0;
#ifdef __AVX512F__
    __m512 total = _mm512_setzero_ps();
    int64_t full = gs - gs % 16;
    for (int k = 0; k < bits; k++) {
        const uint8_t *p = planes + k * nb;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= full; i += 32) { /* two accumulators hide the add latency */
            uint16_t m0, m1;
            memcpy(&m0, p + i / 8, 2);
            memcpy(&m1, p + i / 8 + 2, 2);
            a = _mm512_mask_add_ps(a, (__mmask16)m0, a, _mm512_loadu_ps(x + i));
            b = _mm512_mask_add_ps(b, (__mmask16)m1, b, _mm512_loadu_ps(x + i + 16));
        }
        for (; i < full; i += 16) {
            uint16_t m;
            memcpy(&m, p + i / 8, 2);
            a = _mm512_mask_add_ps(a, (__mmask16)m, a, _mm512_loadu_ps(x + i));
        }
        total = _mm512_fmadd_ps(_mm512_set1_ps((float)(1 << k)), _mm512_add_ps(a, b), total);
    }
    acc = _mm512_reduce_add_ps(total);
    i0 = full;
#endif
    for (int k = 0; k < bits; k++) {
        const uint8_t *p = planes + k * nb;
        float s = 0.0f;
        for (int64_t i = i0; i < gs; i++)
            if ((p[i >> 3] >> (i & 7)) & 1) s += x[i];
        acc += (float)(1 << k) * s;
    }
    return acc;
}

/* x (n_rows, n_in) f32 contiguous; planes (n_out, n_groups, bits, gs/8) u8; scales and zeros
 * (n_out, n_groups) f32; bias (n_out,) f32 or NULL; out (n_rows, n_out) f32.
 * Returns 0, or -2 when out of memory (nothing computed). */
int qmatmul_planes(const float *x, const uint8_t *planes, const float *scales, const float *zeros,
                   const float *bias, float *out, int64_t n_rows, int64_t n_in, int64_t n_out, int bits,
                   int64_t gs, int threads) {
    int64_t ng = n_in / gs, per_group = (int64_t)bits * (gs / 8);
    float *xsum = malloc(sizeof(float) * (n_rows * ng > 0 ? n_rows * ng : 1));
    if (!xsum) return -2;
    for (int64_t n = 0; n < n_rows; n++)
        for (int64_t g = 0; g < ng; g++) {
            float t = 0.0f;
            for (int64_t i = 0; i < gs; i++) t += x[n * n_in + g * gs + i];
            xsum[n * ng + g] = t;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        const uint8_t *wp = planes + o * ng * per_group;
        const float *s = scales + o * ng, *z = zeros + o * ng;
        for (int64_t n = 0; n < n_rows; n++) {
            const float *xr = x + n * n_in;
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++)
                acc += s[g] * (group_dot(xr + g * gs, wp + g * per_group, bits, gs) - z[g] * xsum[n * ng + g]);
            out[n * n_out + o] = acc + (bias ? bias[o] : 0.0f);
        }
    }
    free(xsum);
    return 0;
}

/* The dense weight (n_out, n_in) f32 of the same planes: w[o, i] = (code - zero) * scale. */
void dequant_planes(const uint8_t *planes, const float *scales, const float *zeros, float *w, int64_t n_in,
                    int64_t n_out, int bits, int64_t gs, int threads) {
    int64_t ng = n_in / gs, nb = gs / 8, per_group = (int64_t)bits * nb;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *p = planes + (o * ng + g) * per_group;
            float s = scales[o * ng + g], z = zeros[o * ng + g];
            float *dst = w + o * n_in + g * gs;
            int64_t i0 = 0;
#ifdef __AVX512F__
            for (; i0 + 16 <= gs; i0 += 16) {
                __m512 c = _mm512_setzero_ps();
                for (int k = 0; k < bits; k++) {
                    uint16_t m;
                    memcpy(&m, p + k * nb + i0 / 8, 2);
                    c = _mm512_mask_add_ps(c, (__mmask16)m, c, _mm512_set1_ps((float)(1 << k)));
                }
                _mm512_storeu_ps(dst + i0, _mm512_mul_ps(_mm512_sub_ps(c, _mm512_set1_ps(z)), _mm512_set1_ps(s)));
            }
#endif
            for (int64_t i = i0; i < gs; i++) {
                int c = 0;
                for (int k = 0; k < bits; k++) c |= ((p[k * nb + (i >> 3)] >> (i & 7)) & 1) << k;
                dst[i] = ((float)c - z) * s;
            }
        }
    }
}
