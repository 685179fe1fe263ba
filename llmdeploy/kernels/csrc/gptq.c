/* GPTQ's column walk inside one lazy block, the part of the algorithm that is a loop over columns
 * (IST-DASLab's gptq.py, inner loop of fasterquant). For columns j in [a, b) of the block W1
 * (rows x nb, row-major), with U1 the block of the upper Cholesky factor of the inverse Hessian:
 *
 *     q        = (clamp(round(w_j / s) + z, 0, qmax) - z) * s      (the row's grid of column j)
 *     err      = (w_j - q) / U1[j, j]
 *     w_k     -= err * U1[j, k]          for k > j in the block
 *
 * Each row only reads and writes its own row, so rows are independent: the loop runs row-outer
 * (one 4*nb-byte row stays in L1 while every column of the segment is processed) and in parallel
 * over rows. Every float operation is the one the torch reference does, in the same order (no
 * contraction into FMA: -std=c11 turns it off in GCC), so the results are bitwise equal to it;
 * nearbyintf rounds half to even like torch.round.
 */
#include <math.h>
#include <stdint.h>

void gptq_columns(float *W1, float *Q1, float *E1, const float *U1, int64_t rows, int64_t nb,
                  int64_t a, int64_t b, const float *scale, const float *zero, int64_t n_groups,
                  const int64_t *group_of, float qmax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *w = W1 + r * nb;
        float *qrow = Q1 + r * nb;
        float *erow = E1 + r * nb;
        const float *s_row = scale + r * n_groups;
        const float *z_row = zero + r * n_groups;
        for (int64_t j = a; j < b; j++) {
            const float s = s_row[group_of[j - a]], z = z_row[group_of[j - a]];
            float c = nearbyintf(w[j] / s) + z;
            c = c < 0.0f ? 0.0f : (c > qmax ? qmax : c);
            const float q = (c - z) * s;
            const float e = (w[j] - q) / U1[j * nb + j];
            qrow[j] = q;
            erow[j] = e;
            const float *u = U1 + j * nb;
            for (int64_t k = j + 1; k < nb; k++) {
                const float p = e * u[k];
                w[k] -= p;
            }
        }
    }
}
