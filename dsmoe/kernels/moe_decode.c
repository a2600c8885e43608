/* A DeepSeekMoE layer for a few tokens in one call (what `MoE.forward` computes;
 * dsmoe/model/moe.py has the math): the gate's affinities (sigmoid or softmax), the
 * per-expert selection bias, group-limited top-k (groups scored by their top-2 biased
 * affinities for V3's noaux_tc, by their best one otherwise), the combine weights from the
 * unbiased affinities (normalised, times route_scale), the chosen experts, the shared
 * expert. Also returns what `RoutingInfo` holds (ids, weights, affinities, load).
 * Ties between equal scores go to the lower expert index.
 * Not here: gradients (inference only), more than 64 groups.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

int dsmoe_experts(const float *x, int64_t M, int64_t D, const int64_t *ids, const float *weights,
                  int64_t top_k, const void *w1, const void *w3, const void *w2, const uint16_t *s1,
                  const uint16_t *s3, const uint16_t *s2, int kind, int64_t E, int64_t F, float *y);

/* The index of the largest of n values not yet taken (ties: the lowest index). */
static inline int64_t take_best(const float *v, unsigned char *taken, int64_t n) {
  int64_t best = -1;
  for (int64_t j = 0; j < n; j++)
    if (!taken[j] && (best < 0 || v[j] > v[best])) best = j;
  if (best >= 0) taken[best] = 1;
  return best;
}

/* x: (M, D) normalised inputs. gate: (E, D) fp32; bias: (E,) fp32.
 * Routed experts as for dsmoe_experts; shared: three weights (NULL when none).
 * y: (M, D); ids: (M, K) int64; weights: (M, K); scores: (M, E); load: (E,) int64.
 * Returns 0, or -1 when out of memory or the group settings are out of range. */
int dsmoe_moe(const float *x, int64_t M, int64_t D, const float *gate, const float *bias, int64_t E,
              int64_t top_k, int64_t n_groups, int64_t n_limited_groups, int64_t sigmoid_scores,
              int64_t group_top2, int64_t norm_topk, float route_scale, const void *w1, const void *w3,
              const void *w2, const uint16_t *s1, const uint16_t *s3, const uint16_t *s2, int64_t kind,
              int64_t F, const dsmoe_weight *shared1, const dsmoe_weight *shared3, const dsmoe_weight *shared2,
              float *y, int64_t *ids, float *weights, float *scores, int64_t *load) {
  if (n_groups < 1 || n_groups > 64 || E % n_groups || top_k > E) return -1;
  const int64_t per_group = E / n_groups, FS = shared1 ? shared1->rows : 0;
  float *choice = malloc(sizeof(float) * (size_t)(E + n_groups + 2 * M * FS + M * D));
  unsigned char *taken = malloc((size_t)(E + n_groups));
  if (!choice || !taken) {
    free(choice);
    free(taken);
    return -1;
  }
  float *group_score = choice + E, *g = group_score + n_groups, *u = g + M * FS, *ys = u + M * FS;

  dsmoe_linear(x, D, M, gate, NULL, KIND_F32, E, D, scores, E);
  memset(load, 0, sizeof(int64_t) * (size_t)E);
  for (int64_t t = 0; t < M; t++) {
    float *st = scores + t * E;
    if (sigmoid_scores) {
      for (int64_t e = 0; e < E; e++) st[e] = 1.0f / (1.0f + expf(-st[e]));
    } else {
      float top = -INFINITY, total = 0;
      for (int64_t e = 0; e < E; e++) top = st[e] > top ? st[e] : top;
      for (int64_t e = 0; e < E; e++) total += (st[e] = expf(st[e] - top));
      for (int64_t e = 0; e < E; e++) st[e] /= total;
    }
    for (int64_t e = 0; e < E; e++) choice[e] = st[e] + bias[e];
    if (n_groups > 1) {
      for (int64_t gi = 0; gi < n_groups; gi++) {
        const float *c = choice + gi * per_group;
        float best = -INFINITY, second = -INFINITY;
        for (int64_t j = 0; j < per_group; j++) {
          if (c[j] > best) {
            second = best;
            best = c[j];
          } else if (c[j] > second) {
            second = c[j];
          }
        }
        group_score[gi] = group_top2 ? best + second : best;
      }
      memset(taken, 0, (size_t)n_groups);
      for (int64_t k = 0; k < n_limited_groups; k++) take_best(group_score, taken, n_groups);
      for (int64_t gi = 0; gi < n_groups; gi++)
        if (!taken[gi])
          for (int64_t j = 0; j < per_group; j++) choice[gi * per_group + j] = -INFINITY;
    }
    memset(taken, 0, (size_t)E);
    float total = 0;
    for (int64_t k = 0; k < top_k; k++) {
      int64_t e = take_best(choice, taken, E);
      ids[t * top_k + k] = e;
      weights[t * top_k + k] = st[e];
      total += st[e];
      load[e]++;
    }
    for (int64_t k = 0; k < top_k; k++) {
      float w = weights[t * top_k + k];
      weights[t * top_k + k] = (norm_topk ? w / (total + 1e-20f) : w) * route_scale;
    }
  }
  int status = dsmoe_experts(x, M, D, ids, weights, top_k, w1, w3, w2, s1, s3, s2, (int)kind, E, F, y);
  if (status == 0 && shared1) {
    apply_weight(shared1, x, D, M, g, FS);
    apply_weight(shared3, x, D, M, u, FS);
    for (int64_t i = 0; i < M * FS; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    apply_weight(shared2, g, FS, M, ys, D);
    for (int64_t i = 0; i < M * D; i++) y[i] += ys[i];
  }
  free(choice);
  free(taken);
  return status;
}
