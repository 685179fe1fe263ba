/* AQLM matrix-vector products for a few tokens of fp32 input (out_group_size 1).
 *
 *   out[b, o] = scale[o] * sum_j sum_c codebook_c[code[o, j, c]] . x[b, group j]
 *
 * Codebooks of at most 256 entries (2x8, 1x8, 4x8...): a lookup table
 *   lut[b, j, c, k] = codebook_c[k] . x[b, group j]        (in/g x C x K floats per token)
 * is built first, then every output is a sum of in/g x C table entries read through its codes:
 * one byte per code instead of g fp32 weights. With AVX-512 and 256-entry codebooks, register
 * permutes do the lookups (perm512_partial below). Otherwise codes come tiled, (out / 64, groups, codebooks, 64), so
 * that 8 consecutive outputs' codes of one (group, codebook) are 8 adjacent bytes: one gather of 8
 * table entries (AVX2; scalar loads measured ~2x slower). Table rows are visited in blocks of JB
 * groups (JB x C x K floats stay in L1) while tiles of 64 outputs accumulate in registers. Each
 * thread takes an equal share of the input groups (it builds and reads only those table rows) and
 * sums into its own partial outputs; the partials are added at the end (aqlm_lut_matvec).
 *
 * Larger codebooks (1x16: 65536 entries, the table would be larger than the weight): each output
 * reads its codewords (g floats each) and multiplies them with x, NQ outputs at a time so that
 * their codebook loads (a 2 MiB fp32 codebook: mostly L2 misses) overlap. Software prefetching of
 * later groups' codewords measured slower on this kernel and is not used.
 *
 * Sums are in fp32 in a different order than the reference's dequantize-then-matmul, so results
 * agree to fp32 rounding (tested), not bit for bit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#include "simd.h"
#endif

#ifndef JB
#define JB 8 /* groups whose table rows stay in L1 while a chunk of outputs accumulates */
#endif
#define TILE 64 /* outputs accumulated in registers (8 vectors of 8) */
#ifndef NQ
#define NQ 8 /* outputs whose codeword loads overlap (1x16; 8 measured better than 4 and 12) */
#endif

int aqlm_simd(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

/* lut (n_b, G, C, K): lut[b, j, c, k] = sum_t x[b, j*g + t] * books_t[c, t, k]; books_t (C, g, K); the rows of
 * groups j in [j_lo, j_hi) only (each thread of the kernel builds the rows it reads). */
static void build_lut_rows(const float *x, const float *books_t, float *lut, int64_t n_b, int64_t n_g, int64_t g,
                           int64_t n_c, int64_t n_k, int64_t j_lo, int64_t j_hi) {
    for (int64_t task = 0; task < n_b * (j_hi - j_lo); task++) {
        int64_t b = task / (j_hi - j_lo), j = j_lo + task % (j_hi - j_lo);
        const float *xj = x + b * n_g * g + j * g;
        for (int64_t c = 0; c < n_c; c++) {
            float *row = lut + ((b * n_g + j) * n_c + c) * n_k;
            const float *bt = books_t + c * g * n_k;
            int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
            for (; k + 64 <= n_k; k += 64) { /* 8 independent FMA chains: one chain would wait on its latency */
                __m256 acc[8];
                for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
                for (int64_t t = 0; t < g; t++) {
                    __m256 xv = _mm256_set1_ps(xj[t]);
                    for (int v = 0; v < 8; v++)
                        acc[v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(bt + t * n_k + k + 8 * v), acc[v]);
                }
                for (int v = 0; v < 8; v++) _mm256_storeu_ps(row + k + 8 * v, acc[v]);
            }
            for (; k + 8 <= n_k; k += 8) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t t = 0; t < g; t++)
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(xj[t]), _mm256_loadu_ps(bt + t * n_k + k), acc);
                _mm256_storeu_ps(row + k, acc);
            }
#endif
            for (; k < n_k; k++) {
                float acc = 0.0f;
                for (int64_t t = 0; t < g; t++) acc += xj[t] * bt[t * n_k + k];
                row[k] = acc;
            }
        }
    }
}

/* part (n_o) = sum over groups j in [j_lo, j_hi) and codebooks c of lut[j, c, code(o, j, c) & mask], for one
 * token. codes_t tile-major, (ceil(n_o / TILE), G, C, TILE) u8: the codes of one tile for one (group,
 * codebook) are TILE adjacent bytes and a tile's group block is contiguous (measured faster on
 * 11008x4096 than (G, C, n_o)); the signed storage read as unsigned (for fewer than 8 bits the mask
 * K - 1 recovers the code). Outputs are walked in chunks of CHUNK whose partial sums (in part) stay
 * in L1 beside the JB table rows being read.
 *
 * Threads split the input groups, not the outputs: each builds and reads only its own table rows
 * (in its own core's cache), then the per-thread partial sums (n_o floats each) are added. Split
 * by outputs, every thread read every row, half of them written by the other core: on smollm2's
 * 1536x576 layer that cost ~60 us a call against ~40 us for the table and lookups apart. */
#ifndef CHUNK
#define CHUNK 2048
#endif

/* The outputs [lo, hi) of the calling thread of a parallel region: an equal share of whole tiles. */
static inline void thread_outputs(int64_t n_t, int64_t n_o, int64_t *lo, int64_t *hi) {
#ifdef _OPENMP
    int nth = omp_get_num_threads(), me = omp_get_thread_num();
#else
    int nth = 1, me = 0;
#endif
    *lo = n_t * me / nth * TILE;
    *hi = n_t * (me + 1) / nth * TILE;
    if (*hi > n_o) *hi = n_o;
}

#if defined(__AVX512F__)
/* AVX-512, 256-entry codebooks: the 256 floats of one table row (j, c) are held in 16 registers and
 * each code is looked up with register permutes instead of a gather (on the 11008x4096 benchmark
 * layer, 1.39 ms against the gather path's 1.98 ms; benchmarks/results/kernels/aqlm_cpu.md): vpermt2ps picks from 32 entries by the code's low 5 bits, and
 * three levels of blends on bits 5, 6 and 7 choose among the 8 results, for 16 outputs at a time.
 * Loops run row (j, c) outer and outputs inner, the sums in the thread's partial outputs (a chunk of
 * CHUNK outputs stays in L1), so every output adds its entries in the same order as the AVX2 path:
 * results are bit for bit the same. Codes row-major, (G, C, ceil(n_o / 64) * 64) u8 (the tiles' axes swapped: the
 * outputs of one (j, c) adjacent), so that this loop order reads them sequentially. */
static inline __m512 lookup256(const __m512 *t, __m512i idx) {
    const __m512i b5 = _mm512_set1_epi32(32), b6 = _mm512_set1_epi32(64), b7 = _mm512_set1_epi32(128);
    __mmask16 m5 = _mm512_test_epi32_mask(idx, b5), m6 = _mm512_test_epi32_mask(idx, b6),
              m7 = _mm512_test_epi32_mask(idx, b7);
    __m512 a0 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[0], idx, t[1]), _mm512_permutex2var_ps(t[2], idx, t[3]));
    __m512 a1 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[4], idx, t[5]), _mm512_permutex2var_ps(t[6], idx, t[7]));
    __m512 a2 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[8], idx, t[9]), _mm512_permutex2var_ps(t[10], idx, t[11]));
    __m512 a3 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[12], idx, t[13]), _mm512_permutex2var_ps(t[14], idx, t[15]));
    return _mm512_mask_blend_ps(m7, _mm512_mask_blend_ps(m6, a0, a1), _mm512_mask_blend_ps(m6, a2, a3));
}

static void perm512_partial(const float *lb, const uint8_t *codes_t, float *part, int64_t n_c, int64_t n_o,
                            int64_t n_t, int64_t j_lo, int64_t j_hi) {
    for (int64_t c0 = 0; c0 < n_o; c0 += CHUNK) {
        int64_t c1 = c0 + CHUNK < n_o ? c0 + CHUNK : n_o;
        for (int64_t j = j_lo; j < j_hi; j++)
            for (int64_t c = 0; c < n_c; c++) {
                __m512 t[16];
                const float *row = lb + (j * n_c + c) * 256;
                for (int r = 0; r < 16; r++) t[r] = _mm512_loadu_ps(row + 16 * r);
                for (int64_t i0 = c0; i0 < c1; i0 += TILE) {
                    const uint8_t *cj = codes_t + (j * n_c + c) * n_t * TILE + i0;
                    int64_t n = c1 - i0 < TILE ? c1 - i0 : TILE;
                    for (int v = 0; v < TILE / 16; v++) {
                        int64_t left = n - 16 * v;
                        if (left <= 0) break;
                        __mmask16 k = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                        __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cj + 16 * v)));
                        float *o = part + i0 + 16 * v;
                        _mm512_mask_storeu_ps(o, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, o), lookup256(t, idx)));
                    }
                }
            }
    }
}
#endif

static void lut_partial(const float *lb, const uint8_t *codes_t, float *part, int64_t n_g, int64_t n_c, int64_t n_k,
                        int64_t n_o, int mask, int64_t j_lo, int64_t j_hi) {
    memset(part, 0, sizeof(float) * (size_t)n_o);
#if defined(__AVX512F__)
    if (n_k == 256) {
        perm512_partial(lb, codes_t, part, n_c, n_o, (n_o + TILE - 1) / TILE, j_lo, j_hi);
        return;
    }
#endif
    for (int64_t c0 = 0; c0 < n_o; c0 += CHUNK) {
        int64_t c1 = c0 + CHUNK < n_o ? c0 + CHUNK : n_o;
        for (int64_t j0 = j_lo; j0 < j_hi; j0 += JB) {
            int64_t j1 = j0 + JB < j_hi ? j0 + JB : j_hi;
            for (int64_t i0 = c0; i0 < c1; i0 += TILE) {
                int64_t n = c1 - i0 < TILE ? c1 - i0 : TILE;
#if defined(__AVX2__) && defined(__FMA__)
                if (n == TILE) {
                    const __m256i mv = _mm256_set1_epi32(mask);
                    __m256 acc[TILE / 8];
                    for (int v = 0; v < TILE / 8; v++) acc[v] = _mm256_loadu_ps(part + i0 + 8 * v);
                    for (int64_t j = j0; j < j1; j++)
                        for (int64_t c = 0; c < n_c; c++) {
                            const float *row = lb + (j * n_c + c) * n_k;
                            const uint8_t *cj = codes_t + ((i0 / TILE * n_g + j) * n_c + c) * TILE;
                            for (int v = 0; v < TILE / 8; v++) {
                                __m256i idx = _mm256_and_si256(
                                    _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cj + 8 * v))), mv);
                                acc[v] = _mm256_add_ps(acc[v], _mm256_i32gather_ps(row, idx, 4));
                            }
                        }
                    for (int v = 0; v < TILE / 8; v++) _mm256_storeu_ps(part + i0 + 8 * v, acc[v]);
                    continue;
                }
#endif
                for (int64_t j = j0; j < j1; j++)
                    for (int64_t c = 0; c < n_c; c++) {
                        const float *row = lb + (j * n_c + c) * n_k;
                        const uint8_t *cj = codes_t + ((i0 / TILE * n_g + j) * n_c + c) * TILE;
                        for (int64_t i = 0; i < n; i++) part[i0 + i] += row[cj[i] & mask];
                    }
            }
        }
    }
}

/* out (n_b, n_o) = scales * sum_j sum_c books[c, code] . x[b, group j], code = codes[o, j, c] & mask, for any
 * codebook size; codes (n_o, G, C) u16 (the signed storage read as unsigned); books (C, K, g). */
void aqlm_gemv_direct(const float *x, const float *books, const uint16_t *codes, const float *scales, float *out,
                      int64_t n_b, int64_t n_g, int64_t g, int64_t n_c, int64_t n_k, int64_t n_o, int mask,
                      int threads) {
    int64_t n_q = (n_o + NQ - 1) / NQ;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < n_q; q++) {
        int64_t o0 = q * NQ, nr = n_o - o0 < NQ ? n_o - o0 : NQ;
        for (int64_t b = 0; b < n_b; b++) {
            const float *xb = x + b * n_g * g;
#if defined(__AVX2__) && defined(__FMA__)
            if (nr == NQ && g % 8 == 0) {
                __m256 acc[NQ];
                for (int r = 0; r < NQ; r++) acc[r] = _mm256_setzero_ps();
                const uint16_t *cr[NQ];
                for (int r = 0; r < NQ; r++) cr[r] = codes + (o0 + r) * n_g * n_c;
                for (int64_t j = 0; j < n_g; j++) {
                    for (int64_t c = 0; c < n_c; c++)
                        for (int64_t t = 0; t < g; t += 8) {
                            __m256 xv = _mm256_loadu_ps(xb + j * g + t);
                            for (int r = 0; r < NQ; r++)
                                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(books + (c * n_k + (cr[r][j * n_c + c] & mask)) * g + t),
                                                         xv, acc[r]);
                        }
                }
                for (int r = 0; r < NQ; r++) out[b * n_o + o0 + r] = hsum256_ps(acc[r]) * scales[o0 + r];
                continue;
            }
#endif
            for (int r = 0; r < nr; r++) {
                const uint16_t *co = codes + (o0 + r) * n_g * n_c;
                float acc = 0.0f;
                for (int64_t j = 0; j < n_g; j++)
                    for (int64_t c = 0; c < n_c; c++) {
                        const float *w = books + (c * n_k + (co[j * n_c + c] & mask)) * g;
                        for (int64_t t = 0; t < g; t++) acc += w[t] * xb[j * g + t];
                    }
                out[b * n_o + o0 + r] = acc * scales[o0 + r];
            }
        }
    }
}

/* One call for a few tokens (what a decode step needs), in one parallel region: each thread builds
 * the table rows of its share of the input groups and sums their entries into its partial outputs;
 * after one barrier, each thread adds the partials of its share of the outputs (in thread order),
 * scales them and adds the bias. Returns 0, or -2 when the scratch buffer cannot be allocated.
 * The scratch buffer (table and partials) belongs to the calling thread and only grows: a decode
 * step's table is 150-400 KB, above malloc's mmap threshold, and a fresh mapping per call (its pages
 * faulted in again each time) cost more than the lookups (1536x576 2x8: ~146 us a call against
 * ~60 us with the buffer kept). */
static _Thread_local float *scratch = NULL;
static _Thread_local size_t scratch_floats = 0;

int aqlm_lut_matvec(const float *x, const float *books_t, const uint8_t *codes_t, const float *scales,
                    const float *bias, float *out, int64_t n_b, int64_t n_g, int64_t g, int64_t n_c, int64_t n_k,
                    int64_t n_o, int mask, int threads) {
    if (threads < 1) threads = 1;
    size_t n_lut = (size_t)(n_b * n_g * n_c * n_k), need = n_lut + (size_t)(threads * n_b * n_o) + 1;
    if (need > scratch_floats) {
        free(scratch);
        scratch = malloc(sizeof(float) * need);
        scratch_floats = scratch ? need : 0;
        if (!scratch) return -2;
    }
    float *lut = scratch, *parts = scratch + n_lut;
    int64_t n_t = (n_o + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int nth = omp_get_num_threads(), me = omp_get_thread_num();
#else
        int nth = 1, me = 0;
#endif
        int64_t j_lo = n_g * me / nth, j_hi = n_g * (me + 1) / nth;
        build_lut_rows(x, books_t, lut, n_b, n_g, g, n_c, n_k, j_lo, j_hi);
        for (int64_t b = 0; b < n_b; b++)
            lut_partial(lut + b * n_g * n_c * n_k, codes_t, parts + (me * n_b + b) * n_o, n_g, n_c, n_k, n_o, mask,
                        j_lo, j_hi);
#pragma omp barrier
        int64_t lo, hi;
        thread_outputs(n_t, n_o, &lo, &hi);
        for (int64_t b = 0; b < n_b; b++)
            for (int64_t i = lo; i < hi; i++) {
                float acc = parts[b * n_o + i];
                for (int t = 1; t < nth; t++) acc += parts[(t * n_b + b) * n_o + i];
                acc *= scales[i];
                out[b * n_o + i] = bias ? acc + bias[i] : acc;
            }
    }
    return 0;
}

/* aqlm_gemv_direct, then the bias */
int aqlm_direct_matvec(const float *x, const float *books, const uint16_t *codes, const float *scales,
                       const float *bias, float *out, int64_t n_b, int64_t n_g, int64_t g, int64_t n_c, int64_t n_k,
                       int64_t n_o, int mask, int threads) {
    aqlm_gemv_direct(x, books, codes, scales, out, n_b, n_g, g, n_c, n_k, n_o, mask, threads);
    if (bias)
        for (int64_t b = 0; b < n_b; b++)
            for (int64_t o = 0; o < n_o; o++) out[b * n_o + o] += bias[o];
    return 0;
}

/* The dense weight w (n_o, G * g) = scales[o] * sum_c books[c, code[o, j, c] & mask] for many tokens
 * (prefill: one decoding per call, then one BLAS matmul). codes (n_o, G, C) in their storage width
 * (code_bytes 1 or 2, read as unsigned); books (C, K, g). */
void aqlm_dequantize(const void *codes, int code_bytes, const float *books, const float *scales, float *w,
                     int64_t n_o, int64_t n_g, int64_t g, int64_t n_c, int64_t n_k, int mask, int threads) {
    const uint8_t *c8 = (const uint8_t *)codes;
    const uint16_t *c16 = (const uint16_t *)codes;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_o; o++) {
        float s = scales[o];
        for (int64_t j = 0; j < n_g; j++) {
            float *dst = w + o * n_g * g + j * g;
            int64_t at = (o * n_g + j) * n_c;
#if defined(__AVX2__)
            if (g == 8) { /* one codeword is one vector */
                __m256 v = _mm256_setzero_ps();
                for (int64_t c = 0; c < n_c; c++) {
                    int code = (code_bytes == 1 ? c8[at + c] : c16[at + c]) & mask;
                    __m256 cw = _mm256_loadu_ps(books + (c * n_k + code) * 8);
                    v = c == 0 ? cw : _mm256_add_ps(v, cw);
                }
                _mm256_storeu_ps(dst, _mm256_mul_ps(v, _mm256_set1_ps(s)));
                continue;
            }
#endif
            for (int64_t c = 0; c < n_c; c++) {
                int code = (code_bytes == 1 ? c8[at + c] : c16[at + c]) & mask;
                const float *src = books + (c * n_k + code) * g;
                if (c == 0)
                    for (int64_t t = 0; t < g; t++) dst[t] = src[t];
                else
                    for (int64_t t = 0; t < g; t++) dst[t] += src[t];
            }
            for (int64_t t = 0; t < g; t++) dst[t] *= s;
        }
    }
}
