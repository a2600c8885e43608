/* One Transformer block for a few new tokens, in one call: h += MLA(attn_norm(h)), then
 * h += FFN(ffn_norm(h)) with the FFN a dense SwiGLU or a MoE layer (dsmoe/model/block.py).
 * The parts are mla_decode.c and moe_decode.c; this file only adds the norms and the
 * residuals, reading the block's description (`dsmoe_block` in kernels.h, filled once per
 * weight version by dsmoe/model/native_block.py); also the whole stack in one call.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

int dsmoe_mla_decode(const float *x, int64_t M, int64_t T, const dsmoe_weight *wq_a, const float *q_norm,
                     const dsmoe_weight *wq_b, const dsmoe_weight *wkv_a, const float *kv_norm,
                     const dsmoe_weight *wkv_b, const dsmoe_weight *wo, int64_t H, int64_t Dn, int64_t R,
                     int64_t Dv, int64_t C, float q_eps, float kv_eps, float softmax_scale, const float *cos,
                     const float *sin, float *latent, float *k_pe, int64_t latent_row_stride,
                     int64_t k_pe_row_stride, const int64_t *positions, float *out);
int dsmoe_moe(const float *x, int64_t M, int64_t D, const float *gate, const float *bias, int64_t E,
              int64_t top_k, int64_t n_groups, int64_t n_limited_groups, int64_t sigmoid_scores,
              int64_t group_top2, int64_t norm_topk, float route_scale, const void *w1, const void *w3,
              const void *w2, const uint16_t *s1, const uint16_t *s3, const uint16_t *s2, int64_t kind,
              int64_t F, const dsmoe_weight *shared1, const dsmoe_weight *shared3, const dsmoe_weight *shared2,
              float *y, int64_t *ids, float *weights, float *scores, int64_t *load);

static void swiglu(const dsmoe_weight *w1, const dsmoe_weight *w3, const dsmoe_weight *w2, const float *x,
                   int64_t M, float *g, float *u, float *y) {
  const int64_t D = w1->cols, F = w1->rows;
  apply_weight(w1, x, D, M, g, F);
  apply_weight(w3, x, D, M, u, F);
  for (int64_t i = 0; i < M * F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
  apply_weight(w2, g, F, M, y, D);
}

/* h: (M, D), updated in place. The routing outputs are written for a MoE block only. */
int dsmoe_block_decode(const dsmoe_block *b, float *h, int64_t M, int64_t T, const float *cos, const float *sin,
                       float *latent, float *k_pe, int64_t latent_row_stride, int64_t k_pe_row_stride,
                       const int64_t *positions, int64_t *ids, float *weights, float *scores, int64_t *load) {
  const int64_t D = b->wkv_a.cols, F = b->is_moe ? 0 : b->ffn1.rows;
  float *x = malloc(sizeof(float) * (size_t)(2 * M * D + 2 * M * F));
  if (!x) return -1;
  float *y = x + M * D, *g = y + M * D, *u = g + M * F;
  memcpy(x, h, sizeof(float) * (size_t)(M * D));
  for (int64_t i = 0; i < M; i++) rms_norm_row(x + i * D, b->attn_norm, D, b->eps);
  int status = dsmoe_mla_decode(x, M, T, b->wq_a.rows ? &b->wq_a : NULL, b->q_norm, &b->wq_b, &b->wkv_a,
                                b->kv_norm, &b->wkv_b, &b->wo, b->heads, b->nope_dim, b->rope_dim, b->v_dim,
                                b->kv_rank, b->q_eps, b->kv_eps, b->softmax_scale, cos, sin, latent, k_pe,
                                latent_row_stride, k_pe_row_stride, positions, y);
  if (status == 0) {
    for (int64_t i = 0; i < M * D; i++) h[i] += y[i];
    memcpy(x, h, sizeof(float) * (size_t)(M * D));
    for (int64_t i = 0; i < M; i++) rms_norm_row(x + i * D, b->ffn_norm, D, b->eps);
    if (b->is_moe) {
      const int has_shared = b->ffn1.rows > 0;
      status = dsmoe_moe(x, M, D, b->gate, b->bias, b->n_experts, b->top_k, b->n_groups, b->n_limited_groups,
                         b->sigmoid_scores, b->group_top2, b->norm_topk, b->route_scale, b->w1, b->w3, b->w2,
                         b->s1, b->s3, b->s2, b->expert_kind, b->expert_dim, has_shared ? &b->ffn1 : NULL,
                         has_shared ? &b->ffn3 : NULL, has_shared ? &b->ffn2 : NULL, y, ids, weights, scores,
                         load);
    } else {
      swiglu(&b->ffn1, &b->ffn3, &b->ffn2, x, M, g, u, y);
    }
    if (status == 0)
      for (int64_t i = 0; i < M * D; i++) h[i] += y[i];
  }
  free(x);
  return status;
}

/* Blocks [0, n) in order over the same new tokens (a decode step's whole stack): block i's
 * cache rows at latent + i * latent_layer_stride (likewise k_pe). The routing of the MoE
 * blocks goes to consecutive slices of ids, weights, scores and load, in block order.
 * Returns 0, or the failing block's status. */
int dsmoe_stack_decode(const dsmoe_block *const *blocks, int64_t n, float *h, int64_t M, int64_t T,
                       const float *cos, const float *sin, float *latent, float *k_pe,
                       int64_t latent_layer_stride, int64_t k_pe_layer_stride, int64_t latent_row_stride,
                       int64_t k_pe_row_stride, const int64_t *positions, int64_t *ids, float *weights,
                       float *scores, int64_t *load) {
  for (int64_t i = 0; i < n; i++) {
    const dsmoe_block *b = blocks[i];
    int status = dsmoe_block_decode(b, h, M, T, cos, sin, latent + i * latent_layer_stride,
                                    k_pe + i * k_pe_layer_stride, latent_row_stride, k_pe_row_stride, positions,
                                    ids, weights, scores, load);
    if (status != 0) return status;
    if (b->is_moe) {
      ids += M * b->top_k;
      weights += M * b->top_k;
      scores += M * b->n_experts;
      load += b->n_experts;
    }
  }
  return 0;
}
