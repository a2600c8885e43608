/* Few-row CPU kernels for inference: y = x W^T for 1 to 8 rows of x, with W in fp32 or in
 * int8 with one bf16 scale per row, and the routed experts of a few tokens.
 *
 * Why: at decode a step reads every active weight once, so it is bound by memory, and the
 * matrices are small (a few hundred KB). BLAS's single-row kernels stream such matrices at
 * 4-8 GB/s on the CPUs we measured; a plain loop of dot products that prefetches the weight
 * rows a few rows ahead reaches 13-18 GB/s (dsmoe/kernels/__init__.py has the figures).
 * Written with GCC/Clang vector extensions (16 floats), so the compiler emits AVX-512, AVX2
 * or NEON from the same source (-march=native); only the int8 -> float conversion has
 * explicit x86 paths, because the generic conversion compiles to scalar code.
 *
 * Numerics: fp32 accumulation in 16 lanes, then a lane sum: the same values as BLAS up to
 * summation order. int8: sum_k q[n,k] x[k] in fp32, then times the row's scale.
 * Not here: threads (the caller runs one thread at decode), many rows (use BLAS).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"


enum { MAX_ROWS = 8 };
/* Weight rows ahead to prefetch: far enough to cover memory latency at one row per
 * ~100 ns, near enough to stay in L1/L2 (measured best among 2, 4, 8 and 16). */
enum { PREFETCH_ROWS = 8 };

/* Rows [n0, n1) of y (M rows, M a compile-time constant after inlining) for one weight
 * type. One cache line is prefetched per 4 lines read (the hardware prefetcher follows
 * once a stream is started; prefetching every line measured slower), except with 6 or more
 * rows, where each line costs enough arithmetic to hide a prefetch per line (8 rows of an
 * 8192 x 384 weight: 7.2 -> 8.4 GB/s; 1 to 4 rows lose 10-30% that way). */
#define DEFINE_ROWS(NAME, WT, LOAD, ELEMS_PER_PREFETCH)                                        \
  static inline __attribute__((always_inline)) void NAME(                                      \
      const float *x, int64_t ldx, const int M, const WT *W, const uint16_t *scale,            \
      int64_t n0, int64_t n1, int64_t K, float *y, int64_t ldy) {                              \
    const int64_t K16 = K & ~(int64_t)15;                                                      \
    for (int64_t n = n0; n < n1; n++) {                                                        \
      const WT *w = W + n * K;                                                                 \
      const WT *ahead = w + PREFETCH_ROWS * K;                                                 \
      v16 acc[MAX_ROWS];                                                                       \
      for (int m = 0; m < M; m++) acc[m] = (v16){0};                                           \
      for (int64_t k = 0; k < K16; k += 16) {                                                  \
        if ((k & ((M >= 6 ? 16 : ELEMS_PER_PREFETCH) - 1)) == 0) __builtin_prefetch(ahead + k, 0, 0); \
        v16 wv = LOAD(w + k);                                                                  \
        for (int m = 0; m < M; m++) acc[m] += wv * load_f32(x + m * ldx + k);                  \
      }                                                                                        \
      float s = scale ? bf16_to_f32(scale[n]) : 1.0f;                                          \
      for (int m = 0; m < M; m++) {                                                            \
        float t = lane_sum(acc[m]);                                                            \
        for (int64_t k = K16; k < K; k++) t += (float)w[k] * x[m * ldx + k];                   \
        y[m * ldy + n] = t * s;                                                                \
      }                                                                                        \
    }                                                                                          \
  }
DEFINE_ROWS(rows_f32, float, load_f32, 64)
DEFINE_ROWS(rows_i8, int8_t, load_i8, 256)

#define BY_ROW_COUNT(CALL)                                                                     \
  switch (m) {                                                                                 \
    case 1: CALL(1); break;                                                                    \
    case 2: CALL(2); break;                                                                    \
    case 3: CALL(3); break;                                                                    \
    case 4: CALL(4); break;                                                                    \
    case 5: CALL(5); break;                                                                    \
    case 6: CALL(6); break;                                                                    \
    case 7: CALL(7); break;                                                                    \
    default: CALL(8);                                                                          \
  }

/* y (M, N) = x (M, K) W (N, K)^T, W's rows scaled by `scale` (int8). x and y rows may be
 * strided (ldx, ldy); W is contiguous. Rows of x go 8 at a time: W is read once per 8. */
void dsmoe_linear(const float *x, int64_t ldx, int64_t M, const void *w, const uint16_t *scale,
                  int kind, int64_t N, int64_t K, float *y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    int m = (int)(M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS);
    const float *xp = x + m0 * ldx;
    float *yp = y + m0 * ldy;
    if (kind == KIND_F32) {
#define CALL_F32(R) rows_f32(xp, ldx, R, (const float *)w, NULL, 0, N, K, yp, ldy)
      BY_ROW_COUNT(CALL_F32)
    } else {
#define CALL_I8(R) rows_i8(xp, ldx, R, (const int8_t *)w, scale, 0, N, K, yp, ldy)
      BY_ROW_COUNT(CALL_I8)
    }
  }
}

/* The routed experts of M tokens: y (M, D) = sum_k weights[t, k] * E_ids[t, k](x[t]) with
 * E_e(x) = w2[e] (silu(w1[e] x) * w3[e] x), expert e's weights at w1s[e], w3s[e], w2s[e]
 * ((F, D), (F, D), (D, F), fp32 or int8 with scales s1s[e], s3s[e] (F,), s2s[e] (D,)); only
 * the chosen experts' entries are read. Each chosen expert runs once over all the tokens
 * that chose it (its weights are read once per call), experts in order of first choice,
 * so the result does not depend on where the weights live (resident or paged from disk).
 * Returns 0, or -1 when out of memory or an id is out of range (y is then undefined). */
int dsmoe_experts_table(const float *x, int64_t M, int64_t D, const int64_t *ids, const float *weights,
                        int64_t top_k, const void *const *w1s, const void *const *w3s, const void *const *w2s,
                        const uint16_t *const *s1s, const uint16_t *const *s3s, const uint16_t *const *s2s,
                        int kind, int64_t E, int64_t F, float *y) {
  float *xs = malloc(sizeof(float) * (size_t)(M * D + 2 * M * F + M * D));
  int64_t *rows = malloc(sizeof(int64_t) * (size_t)(M * top_k));
  float *row_w = malloc(sizeof(float) * (size_t)(M * top_k));
  int64_t *order = malloc(sizeof(int64_t) * (size_t)(M * top_k));
  int status = 0;
  if (!xs || !rows || !row_w || !order) {
    status = -1;
    goto done;
  }
  float *g = xs + M * D, *u = g + M * F, *o = u + M * F;
  memset(y, 0, sizeof(float) * (size_t)(M * D));
  int64_t n_pairs = M * top_k, n_order = 0;
  for (int64_t p = 0; p < n_pairs; p++) {
    if (ids[p] < 0 || ids[p] >= E) {
      status = -1;
      goto done;
    }
    int seen = 0;
    for (int64_t q = 0; q < n_order && !seen; q++) seen = ids[order[q]] == ids[p];
    if (!seen) order[n_order++] = p;
  }
  for (int64_t q = 0; q < n_order; q++) {
    int64_t e = ids[order[q]], n = 0;
    for (int64_t p = order[q]; p < n_pairs; p++) {
      if (ids[p] != e) continue;
      rows[n] = p / top_k;
      row_w[n] = weights[p];
      memcpy(xs + n * D, x + rows[n] * D, sizeof(float) * (size_t)D);
      n++;
    }
    const int q8 = kind == KIND_INT8;
    dsmoe_linear(xs, D, n, w1s[e], q8 ? s1s[e] : NULL, kind, F, D, g, F);
    dsmoe_linear(xs, D, n, w3s[e], q8 ? s3s[e] : NULL, kind, F, D, u, F);
    for (int64_t i = 0; i < n * F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    dsmoe_linear(g, F, n, w2s[e], q8 ? s2s[e] : NULL, kind, D, F, o, D);
    for (int64_t i = 0; i < n; i++) {
      float *yt = y + rows[i] * D;
      const float *ot = o + i * D;
      for (int64_t d = 0; d < D; d++) yt[d] += row_w[i] * ot[d];
    }
  }
done:
  free(xs);
  free(rows);
  free(row_w);
  free(order);
  return status;
}

/* dsmoe_experts_table for experts stacked in three tensors: w1, w3 (E, F, D), w2 (E, D, F)
 * (scales s1, s3 (E, F), s2 (E, D) when int8). */
int dsmoe_experts(const float *x, int64_t M, int64_t D, const int64_t *ids, const float *weights,
                  int64_t top_k, const void *w1, const void *w3, const void *w2, const uint16_t *s1,
                  const uint16_t *s3, const uint16_t *s2, int kind, int64_t E, int64_t F, float *y) {
  const void **table = malloc(sizeof(void *) * (size_t)(6 * E));
  if (!table) return -1;
  const size_t item = kind == KIND_F32 ? sizeof(float) : 1;
  for (int64_t e = 0; e < E; e++) {
    table[e] = (const char *)w1 + (size_t)(e * F * D) * item;
    table[E + e] = (const char *)w3 + (size_t)(e * F * D) * item;
    table[2 * E + e] = (const char *)w2 + (size_t)(e * D * F) * item;
    table[3 * E + e] = s1 ? s1 + e * F : NULL;
    table[4 * E + e] = s3 ? s3 + e * F : NULL;
    table[5 * E + e] = s2 ? s2 + e * D : NULL;
  }
  int status = dsmoe_experts_table(x, M, D, ids, weights, top_k, table, table + E, table + 2 * E,
                                   (const uint16_t *const *)(table + 3 * E), (const uint16_t *const *)(table + 4 * E),
                                   (const uint16_t *const *)(table + 5 * E), kind, E, F, y);
  free(table);
  return status;
}
