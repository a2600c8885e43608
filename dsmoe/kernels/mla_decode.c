/* Multi-head Latent Attention for a few new tokens over the latent cache, in one call
 * (what `MLA.forward` with `impl="absorb"` computes; dsmoe/model/mla.py has the math).
 *
 * Per new token: the query and latent projections, q_norm and kv_norm, the rotary parts
 * rotated (interleaved pairs), the latent and k_pe written into the cache at the token's
 * position, then per head the query folded into latent space through wkv_b's key half,
 * scores over every cached position up to the token's own, softmax, the weighted latent
 * sum, wkv_b's value half, and finally wo over all heads.
 * Why one call: done op by op from Python this is ~40 tensor operations per layer, each
 * costing more than its arithmetic on a CPU; here it is bound by reading the weights.
 * Not here: many tokens (prefill runs the expanded form, BLAS-bound), fp16/bf16 caches.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* out (n) = sum_r a[r] * rows[r] (rows r of length n, `stride` apart), accumulated in
 * registers 64 floats at a time (not read-modify-write through memory per row); rows of
 * fp32, or of int8 with the row scales folded into `a` by the caller. */
#define DEFINE_WEIGHTED_ROWS(NAME, WT, LOAD)                                                  \
  static void NAME(const float *a, int64_t n_rows, const WT *rows, int64_t stride, int64_t n,  \
                   float *out) {                                                              \
    int64_t c = 0;                                                                            \
    for (; c + 64 <= n; c += 64) {                                                            \
      v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                             \
      for (int64_t r = 0; r < n_rows; r++) {                                                  \
        const WT *row = rows + r * stride + c;                                                \
        const v16 w = (v16){0} + a[r];                                                        \
        s0 += w * LOAD(row);                                                                  \
        s1 += w * LOAD(row + 16);                                                             \
        s2 += w * LOAD(row + 32);                                                             \
        s3 += w * LOAD(row + 48);                                                             \
      }                                                                                       \
      memcpy(out + c, &s0, 64);                                                               \
      memcpy(out + c + 16, &s1, 64);                                                          \
      memcpy(out + c + 32, &s2, 64);                                                          \
      memcpy(out + c + 48, &s3, 64);                                                          \
    }                                                                                         \
    for (; c < n; c++) {                                                                      \
      float t = 0;                                                                            \
      for (int64_t r = 0; r < n_rows; r++) t += a[r] * (float)rows[r * stride + c];           \
      out[c] = t;                                                                             \
    }                                                                                         \
  }
DEFINE_WEIGHTED_ROWS(weighted_rows, float, load_f32)
DEFINE_WEIGHTED_ROWS(weighted_rows_i8, int8_t, load_i8)

/* q_lat . lat + q_pe . kpe in one set of lanes (one lane sum, not two). */
static inline float score(const float *q_lat, const float *lat, int64_t C, const float *q_pe, const float *kp,
                          int64_t R) {
  v16 acc = {0};
  int64_t i = 0, j = 0;
  for (; i + 16 <= C; i += 16) acc += load_f32(q_lat + i) * load_f32(lat + i);
  for (; j + 16 <= R; j += 16) acc += load_f32(q_pe + j) * load_f32(kp + j);
  float s = lane_sum(acc);
  for (; i < C; i++) s += q_lat[i] * lat[i];
  for (; j < R; j++) s += q_pe[j] * kp[j];
  return s;
}

static inline void rope_pairs(float *x, const float *cos, const float *sin, int64_t n_pairs) {
  for (int64_t i = 0; i < n_pairs; i++) {
    float e = x[2 * i], o = x[2 * i + 1];
    x[2 * i] = e * cos[i] - o * sin[i];
    x[2 * i + 1] = e * sin[i] + o * cos[i];
  }
}

/* x: (M, D) normalised inputs, M = B * T, token i of row b = i / T at positions[i].
 * wq_a may be NULL (no query compression: wq_b is then wq over x).
 * latent: row b's cache at latent + b * latent_row_stride, position p at + p * C (fp32);
 * likewise k_pe with R. cos/sin: (M, R / 2), each token's rotation. out: (M, D).
 * Returns 0, or -1 when out of memory. */
int dsmoe_mla_decode(const float *x, int64_t M, int64_t T, const dsmoe_weight *wq_a, const float *q_norm,
                     const dsmoe_weight *wq_b, const dsmoe_weight *wkv_a, const float *kv_norm,
                     const dsmoe_weight *wkv_b, const dsmoe_weight *wo, int64_t H, int64_t Dn, int64_t R,
                     int64_t Dv, int64_t C, float q_eps, float kv_eps, float softmax_scale, const float *cos,
                     const float *sin, float *latent, float *k_pe, int64_t latent_row_stride,
                     int64_t k_pe_row_stride, const int64_t *positions, float *out) {
  const int64_t D = wkv_a->cols, Dq = Dn + R, QL = wq_a ? wq_a->rows : 0;
  int64_t max_pos = 0;
  for (int64_t i = 0; i < M; i++) max_pos = positions[i] > max_pos ? positions[i] : max_pos;
  float *cq = malloc(sizeof(float) * (size_t)(M * QL + M * H * Dq + M * (C + R) + M * H * Dv + C + Dn + max_pos + 1));
  if (!cq) return -1;
  float *q = cq + M * QL, *kv = q + M * H * Dq, *ov = kv + M * (C + R), *q_lat = ov + M * H * Dv;
  float *coef = q_lat + C, *p = coef + Dn;
  (void)D;

  if (wq_a) {
    apply_weight(wq_a, x, wq_a->cols, M, cq, QL);
    for (int64_t i = 0; i < M; i++) rms_norm_row(cq + i * QL, q_norm, QL, q_eps);
    apply_weight(wq_b, cq, QL, M, q, H * Dq);
  } else {
    apply_weight(wq_b, x, wq_b->cols, M, q, H * Dq);
  }
  apply_weight(wkv_a, x, wkv_a->cols, M, kv, C + R);

  /* Every new token into the cache first: a token sees the row's earlier new tokens. */
  for (int64_t i = 0; i < M; i++) {
    int64_t b = i / T, pos = positions[i];
    float *row = kv + i * (C + R);
    rms_norm_row(row, kv_norm, C, kv_eps);
    rope_pairs(row + C, cos + i * (R / 2), sin + i * (R / 2), R / 2);
    memcpy(latent + b * latent_row_stride + pos * C, row, sizeof(float) * (size_t)C);
    memcpy(k_pe + b * k_pe_row_stride + pos * R, row + C, sizeof(float) * (size_t)R);
  }

  for (int64_t i = 0; i < M; i++) {
    int64_t b = i / T, pos = positions[i];
    const float *lat = latent + b * latent_row_stride, *kp = k_pe + b * k_pe_row_stride;
    for (int64_t h = 0; h < H; h++) {
      float *qh = q + i * H * Dq + h * Dq;
      rope_pairs(qh + Dn, cos + i * (R / 2), sin + i * (R / 2), R / 2);
      const int64_t k_row = h * (Dn + Dv), v_row = k_row + Dn; /* head h's rows of wkv_b */
      if (wkv_b->kind == KIND_F32) { /* the query in latent space: the key half (Dn, C) */
        weighted_rows(qh, Dn, (const float *)wkv_b->data + k_row * C, C, C, q_lat);
      } else { /* int8 rows: each coefficient times its row's scale */
        for (int64_t d = 0; d < Dn; d++) coef[d] = qh[d] * bf16_to_f32(wkv_b->scale[k_row + d]);
        weighted_rows_i8(coef, Dn, (const int8_t *)wkv_b->data + k_row * C, C, C, q_lat);
      }
      float top = -INFINITY;
      for (int64_t s = 0; s <= pos; s++) {
        p[s] = softmax_scale * score(q_lat, lat + s * C, C, qh + Dn, kp + s * R, R);
        top = p[s] > top ? p[s] : top;
      }
      float total = 0;
      for (int64_t s = 0; s <= pos; s++) total += (p[s] = expf(p[s] - top));
      for (int64_t s = 0; s <= pos; s++) p[s] /= total;
      weighted_rows(p, pos + 1, lat, C, C, q_lat); /* now the output in latent space */
      const size_t item = wkv_b->kind == KIND_F32 ? sizeof(float) : 1; /* the value half (Dv, C) */
      dsmoe_linear(q_lat, C, 1, (const char *)wkv_b->data + (size_t)(v_row * C) * item,
                   wkv_b->scale ? wkv_b->scale + v_row : NULL, (int)wkv_b->kind, Dv, C, ov + i * H * Dv + h * Dv, Dv);
    }
  }
  apply_weight(wo, ov, H * Dv, M, out, wo->rows);
  free(cq);
  return 0;
}
