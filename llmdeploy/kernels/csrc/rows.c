/* A dense fp32 linear for a few token rows that reads the weight once.
 *
 *   out[m, o] = bias[o] + sum_k x[m, k] * w[o, k]      (x: M x K, w: N x K, out: M x N, all row-major)
 *
 * BLAS handles one row with a matrix-vector product that streams the weight at memory speed, but
 * 2..16 rows (a tree of drafted tokens being verified) take a GEMM path that, on a CPU, can cost
 * several times one row (it packs the weight for a large product). Here blocks of OB outputs are
 * parallel (OpenMP); a block's weight rows stream from memory once, for the first RB token rows, and
 * the block's next token rows re-read them from L1/L2. Every output is one sum in a fixed order —
 * 8 FMA lanes over k in steps of 8, the lanes added pairwise, then the k % 8 tail — whatever M is
 * and whichever block it falls in, so a row's result does not depend on the other rows: a node of a
 * verified tree gets bit for bit the projections it gets when decoded alone.
 *
 * A decoder's weights do not fit in cache, so each block streams from DRAM. Without help the
 * hardware prefetcher and the FMAs take turns: one row runs at memory speed, but six rows cost
 * memory time plus arithmetic time. A software prefetch of the next block's rows into L2 overlaps
 * the two, so that up to RB rows cost about what one row costs (benchmarks/results/speed,
 * "Few token rows", cold weights). Beyond RB rows the arithmetic dominates; the AVX-512 build then
 * pairs outputs in 512-bit registers (block_rows512) for the same sums with half the FMAs.
 */
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ROWS_AVX2 1
#endif

#define OB 4 /* outputs per block */
/* token rows per pass over a block (OB * RB accumulators, RB inputs and one weight vector in
 * registers): AVX-512VL gives 32 vector registers, so 6 rows (31 registers); AVX2 has 16, so 3.
 * Each further pass re-reads the block from L1 and adds its loop and reductions, so fewer passes
 * make a 4-6 row tree cheaper; the rows' arithmetic itself is not free (benchmarks/results/speed,
 * "Few token rows", against one row). */
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define RB 6
#else
#define RB 3
#endif

/* which SIMD path this build compiled: 512 (AVX-512: two outputs per register), 256 (AVX2+FMA) or
 * 0 (portable C) */
int rows_simd(void) {
#if defined(ROWS_AVX2) && defined(__AVX512F__) && defined(__AVX512VL__)
    return 512;
#elif defined(ROWS_AVX2)
    return 256;
#else
    return 0;
#endif
}

/* the portable sum: the same order as the AVX2 one (8 lanes over k, lanes added pairwise, tail) */
static float dot_portable(const float *a, const float *b, int64_t K) {
    float lane[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; j++) lane[j] = __builtin_fmaf(a[k + j], b[k + j], lane[j]);
    float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
    for (; k < K; k++) s = __builtin_fmaf(a[k], b[k], s);
    return s;
}

#ifdef ROWS_AVX2
/* rows m0 .. m0 + nw - 1 of one full block of OB outputs, computed as nr >= nw rows (nr <= RB; a
 * constant where inlined): rows past nw repeat row m0 + nw - 1 and are not written. A pass of RB
 * rows compiles to a tighter loop than one of 3..5 (at 5 the compiler reloads the inputs from L1
 * at every FMA), so a 3..5-row rest is padded to RB: it costs what RB rows cost, less than 5 did. */
static inline __attribute__((always_inline)) void block_rows(const float *x, const float *w, const float *bias,
                                                             float *out, int64_t m0, int nr, int nw, int64_t K,
                                                             int64_t N, int64_t o0) {
    const float *xp[RB];
    for (int r = 0; r < nr; r++) xp[r] = x + (m0 + (r < nw ? r : nw - 1)) * K;
    int64_t kv = K & ~(int64_t)7;
    __m256 acc[OB][RB];
    for (int o = 0; o < OB; o++)
        for (int r = 0; r < nr; r++) acc[o][r] = _mm256_setzero_ps();
    /* the next block's weight rows (this thread's next block under the static schedule), fetched
     * into L2 while this one computes; the last block prefetches itself */
    const float *next = w + (o0 + 2 * OB <= N ? o0 + OB : o0) * K;
    for (int64_t k = 0; k < kv; k += 8) {
        __m256 xv[RB];
        for (int r = 0; r < nr; r++) xv[r] = _mm256_loadu_ps(xp[r] + k);
        for (int o = 0; o < OB; o++) {
            _mm_prefetch((const char *)(next + o * K + k), _MM_HINT_T1);
            __m256 wv = _mm256_loadu_ps(w + (o0 + o) * K + k);
            for (int r = 0; r < nr; r++) acc[o][r] = _mm256_fmadd_ps(wv, xv[r], acc[o][r]);
        }
    }
    for (int r = 0; r < nw; r++)
        for (int o = 0; o < OB; o++) {
            /* lanes added as the portable path does: ((0+4) + (2+6)) + ((1+5) + (3+7)) */
            __m128 lo = _mm256_castps256_ps128(acc[o][r]), hi = _mm256_extractf128_ps(acc[o][r], 1);
            __m128 s4 = _mm_add_ps(lo, hi);
            __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            float s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
            const float *xr = x + (m0 + r) * K, *wr = w + (o0 + o) * K;
            for (int64_t k = kv; k < K; k++) s = __builtin_fmaf(xr[k], wr[k], s);
            out[(m0 + r) * N + o0 + o] = s + (bias ? bias[o0 + o] : 0.0f);
        }
}
#endif

#if defined(ROWS_AVX2) && defined(__AVX512F__) && defined(__AVX512VL__)
#define ROWS_AVX512 1
/* The 8 lanes of one output's 256-bit accumulator added as the portable path does. */
static inline __attribute__((always_inline)) float reduce8(__m256 a) {
    __m128 lo = _mm256_castps256_ps128(a), hi = _mm256_extractf128_ps(a, 1);
    __m128 s4 = _mm_add_ps(lo, hi);
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

/* AVX-512: the same sums with half the FMA instructions. A 512-bit register holds the 8-lane
 * accumulators of two outputs side by side (outputs o and o + 1: their weights' 8 floats at k in
 * the low and high half, the token row's 8 floats at k broadcast to both halves), so every output
 * is still summed over k in 8 lanes, in the same order, and reduced as above: bit for bit the
 * numbers of the 256-bit and portable paths. A block is OB512 = 8 outputs (4 register pairs) x RB
 * token rows: 24 accumulators, RB inputs and one weight register. With half the FMAs, a pass of 6
 * rows is closer to a pass of 1, and a tree of 7 or more nodes (two or more passes) costs less. */
#define OB512 8
static inline __attribute__((always_inline)) void block_rows512(const float *x, const float *w, const float *bias,
                                                                float *out, int64_t m0, int nr, int nw, int64_t K,
                                                                int64_t N, int64_t o0) {
    const float *xp[RB];
    for (int r = 0; r < nr; r++) xp[r] = x + (m0 + (r < nw ? r : nw - 1)) * K;
    const float *wp[OB512];
    for (int o = 0; o < OB512; o++) wp[o] = w + (o0 + o) * K;
    int64_t kv = K & ~(int64_t)7;
    __m512 acc[OB512 / 2][RB];
    for (int p = 0; p < OB512 / 2; p++)
        for (int r = 0; r < nr; r++) acc[p][r] = _mm512_setzero_ps();
    /* the next block's weight rows into L2 (one prefetch per 64-byte line), as in block_rows */
    const float *next = w + (o0 + 2 * OB512 <= N ? o0 + OB512 : o0) * K;
    for (int64_t k = 0; k < kv; k += 8) {
        __m512 xv[RB];
        for (int r = 0; r < nr; r++)
            xv[r] = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(xp[r] + k))));
        for (int p = 0; p < OB512 / 2; p++) {
            if (!(k & 15)) {
                _mm_prefetch((const char *)(next + (2 * p) * K + k), _MM_HINT_T1);
                _mm_prefetch((const char *)(next + (2 * p + 1) * K + k), _MM_HINT_T1);
            }
            __m512 wv = _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(wp[2 * p] + k))),
                _mm256_castps_pd(_mm256_loadu_ps(wp[2 * p + 1] + k)), 1));
            for (int r = 0; r < nr; r++) acc[p][r] = _mm512_fmadd_ps(wv, xv[r], acc[p][r]);
        }
    }
    for (int r = 0; r < nw; r++)
        for (int p = 0; p < OB512 / 2; p++) {
            const float *xr = x + (m0 + r) * K;
            for (int h = 0; h < 2; h++) {
                int o = 2 * p + h;
                __m256 a = h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[p][r]), 1))
                             : _mm512_castps512_ps256(acc[p][r]);
                float s = reduce8(a);
                for (int64_t k = kv; k < K; k++) s = __builtin_fmaf(xr[k], wp[o][k], s);
                out[(m0 + r) * N + o0 + o] = s + (bias ? bias[o0 + o] : 0.0f);
            }
        }
}
#endif

void linear_rows(const float *x, const float *w, const float *bias, float *out, int64_t M, int64_t K, int64_t N,
                 int threads) {
#ifdef ROWS_AVX512
    /* up to RB rows (one pass) the 256-bit blocks of OB outputs are as fast or faster (measured:
     * the pairing costs a shuffle per two weight vectors); beyond, halving the FMAs pays */
    if (N >= OB512 && M > RB) {
        int64_t n_b = N / OB512;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t ob = 0; ob < n_b; ob++) {
            int64_t o0 = ob * OB512, m0 = 0;
            for (; m0 + RB <= M; m0 += RB) block_rows512(x, w, bias, out, m0, RB, RB, K, N, o0);
            switch (M - m0) {
            case 1: block_rows512(x, w, bias, out, m0, 1, 1, K, N, o0); break;
            case 2: block_rows512(x, w, bias, out, m0, 2, 2, K, N, o0); break;
            case 3: block_rows512(x, w, bias, out, m0, RB, 3, K, N, o0); break;
            case 4: block_rows512(x, w, bias, out, m0, RB, 4, K, N, o0); break;
            case 5: block_rows512(x, w, bias, out, m0, RB, 5, K, N, o0); break;
            default: break;
            }
        }
        for (int64_t m = 0; m < M; m++) /* the last N % 8 outputs */
            for (int64_t o = n_b * OB512; o < N; o++)
                out[m * N + o] = dot_portable(x + m * K, w + o * K, K) + (bias ? bias[o] : 0.0f);
        return;
    }
#endif
    int64_t n_ob = (N + OB - 1) / OB;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n_ob; ob++) {
        int64_t o0 = ob * OB, no = N - o0 < OB ? N - o0 : OB;
#ifdef ROWS_AVX2
        if (no == OB) {
            int64_t m0 = 0;
            for (; m0 + RB <= M; m0 += RB) block_rows(x, w, bias, out, m0, RB, RB, K, N, o0);
            switch (M - m0) { /* the rest, with a constant row count so the loops unroll */
            case 1: block_rows(x, w, bias, out, m0, 1, 1, K, N, o0); break;
            case 2: block_rows(x, w, bias, out, m0, 2, 2, K, N, o0); break;
#if RB > 3
            case 3: block_rows(x, w, bias, out, m0, RB, 3, K, N, o0); break;
            case 4: block_rows(x, w, bias, out, m0, RB, 4, K, N, o0); break;
            case 5: block_rows(x, w, bias, out, m0, RB, 5, K, N, o0); break;
#endif
            default: break;
            }
            continue;
        }
#endif
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = o0; o < o0 + no; o++)
                out[m * N + o] = dot_portable(x + m * K, w + o * K, K) + (bias ? bias[o] : 0.0f);
    }
}
