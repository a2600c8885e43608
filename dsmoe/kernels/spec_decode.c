/* A greedy speculative decoding step in one call (dsmoe/infer/speculative.py has the
 * algorithm and its Python form, which sampled decoding runs): for each row,
 * 1. chain K drafts: the first is given; each next one runs the MTP module at the next
 *    position on its own output hidden state and the draft before it;
 * 2. verify [pending, drafts] with one pass of the main model (dsmoe_step_decode);
 * 3. accept the leading drafts equal to the main model's argmax; the next token is the
 *    argmax after them (a correction, or a bonus token when every draft was accepted);
 * 4. catch the MTP module up over the confirmed positions with the main model's hidden
 *    states, which overwrites the chain's cache entries and drafts the next first token.
 * The caller advances both caches by accepted + 1 per row (they have equal lengths).
 * Why: around the kernels, the Python of a speculative step cost about as much as the
 * whole step of a small model (demo preset: ~0.5 of ~1.1 ms).
 * Argmax ties go to the lowest index, as torch.argmax.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static int64_t argmax_row(const float *x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; i++)
    if (x[i] > x[best]) best = i;
  return best;
}

/* Main model: as dsmoe_step_decode (blocks, embedding, rope tables, cache, final norm, head).
 * mtp, draft_head: the MTP module drafts run and the head they read; its cache rows at
 * mtp_latent / mtp_k_pe (one layer). lengths (B,): each row's cache length (both caches).
 * pending (B,): each row's last token, not yet in the cache. first (B,) and g (B, D): each
 * row's first draft and the MTP hidden state it came from; overwritten with the next
 * step's. n_accepted (B,); tokens (B, K + 1): the accepted drafts, then the next token.
 * Returns 0, -1 when out of memory, or a kernel's failure status. */
int dsmoe_spec_greedy(const dsmoe_block *const *blocks, int64_t n_blocks, const dsmoe_weight *embed,
                      const float *cos_table, const float *sin_table, int64_t half_rope, float *latent,
                      float *k_pe, int64_t latent_layer_stride, int64_t k_pe_layer_stride,
                      int64_t latent_row_stride, int64_t k_pe_row_stride, const float *norm, float eps,
                      const dsmoe_weight *head, const dsmoe_mtp *mtp, const dsmoe_weight *draft_head,
                      float *mtp_latent, float *mtp_k_pe, int64_t mtp_latent_row_stride,
                      int64_t mtp_k_pe_row_stride, int64_t B, int64_t K, const int64_t *lengths,
                      const int64_t *pending, int64_t *first, float *g, int64_t *n_accepted, int64_t *tokens) {
  const int64_t D = embed->cols, V = head->rows, DV = draft_head->rows, M = B * (K + 1);
  /* routing outputs nobody reads here, sized for the largest MoE block and every block */
  int64_t top_k = 1, n_experts = 1;
  for (int64_t i = 0; i <= n_blocks; i++) {
    const dsmoe_block *b = i < n_blocks ? blocks[i] : mtp->block;
    if (b->is_moe && b->top_k > top_k) top_k = b->top_k;
    if (b->is_moe && b->n_experts > n_experts) n_experts = b->n_experts;
  }
  const int64_t n_route = (n_blocks + 1) * M;
  int64_t *ids = malloc(sizeof(int64_t) * (size_t)(n_route * top_k + (n_blocks + 1) * n_experts));
  float *route_w = malloc(sizeof(float) * (size_t)(n_route * (top_k + n_experts)));
  int64_t *ints = malloc(sizeof(int64_t) * (size_t)(B * K + 3 * M + B));
  float *floats = malloc(sizeof(float) * (size_t)(4 * M * D + M * V + B * DV));
  int status = -1;
  if (!ids || !route_w || !ints || !floats) goto done;
  int64_t *load = ids + n_route * top_k;
  float *scores = route_w + n_route * top_k;
  int64_t *drafts = ints, *pos = drafts + B * K, *tok = pos + M, *rows = tok + M, *n_acc = rows + M;
  float *h = floats, *gh = h + M * D, *h_prev = gh + M * D, *g_next = h_prev + M * D, *logits = g_next + M * D,
        *draft_logits = logits + M * V;
  status = 0;

  /* 1. the chain: position lengths + j - 1 reads the draft before and the hidden state of
   * the position before, and drafts the next one */
  memcpy(gh, g, sizeof(float) * (size_t)(B * D));
  for (int64_t b = 0; b < B; b++) {
    drafts[b * K] = first[b];
    rows[b] = b;
  }
  for (int64_t j = 1; j < K && status == 0; j++) {
    for (int64_t b = 0; b < B; b++) {
      pos[b] = lengths[b] + j - 1;
      tok[b] = drafts[b * K + j - 1];
    }
    status = dsmoe_mtp_decode(mtp, embed, tok, gh, B, 1, cos_table, sin_table, half_rope, mtp_latent, mtp_k_pe,
                              mtp_latent_row_stride, mtp_k_pe_row_stride, pos, ids, route_w, scores, load,
                              draft_head, rows, B, g_next, draft_logits);
    for (int64_t b = 0; b < B && status == 0; b++) drafts[b * K + j] = argmax_row(draft_logits + b * DV, DV);
    memcpy(gh, g_next, sizeof(float) * (size_t)(B * D));
  }
  if (status != 0) goto done;

  /* 2. verify [pending, drafts] at positions lengths .. lengths + K */
  for (int64_t b = 0; b < B; b++)
    for (int64_t i = 0; i <= K; i++) {
      tok[b * (K + 1) + i] = i == 0 ? pending[b] : drafts[b * K + i - 1];
      pos[b * (K + 1) + i] = lengths[b] + i;
    }
  status = dsmoe_step_decode(blocks, n_blocks, embed, tok, M, K + 1, cos_table, sin_table, half_rope, latent, k_pe,
                             latent_layer_stride, k_pe_layer_stride, latent_row_stride, k_pe_row_stride, pos, ids,
                             route_w, scores, load, norm, eps, head, h, logits);
  if (status != 0) goto done;

  /* 3. accept the leading drafts the main model agrees with */
  int64_t T = 1;
  for (int64_t b = 0; b < B; b++) {
    int64_t n = 0, target = argmax_row(logits + (b * (K + 1)) * V, V);
    while (n < K && drafts[b * K + n] == target) {
      tokens[b * (K + 1) + n] = target;
      n++;
      target = argmax_row(logits + (b * (K + 1) + n) * V, V);
    }
    tokens[b * (K + 1) + n] = target;
    n_acc[b] = n_accepted[b] = n;
    if (n + 1 > T) T = n + 1;
  }

  /* 4. the MTP module over the confirmed positions lengths .. lengths + accepted (rows that
   * accepted fewer run padding positions after theirs, which the next step overwrites) */
  for (int64_t b = 0; b < B; b++) {
    for (int64_t i = 0; i < T; i++) {
      const int64_t r = b * T + i;
      tok[r] = tokens[b * (K + 1) + (i < n_acc[b] ? i : n_acc[b])]; /* t_{n+i+1} */
      pos[r] = lengths[b] + i;
      memcpy(h_prev + r * D, h + (b * (K + 1) + i) * D, sizeof(float) * (size_t)D);
    }
    rows[b] = b * T + n_acc[b];
  }
  status = dsmoe_mtp_decode(mtp, embed, tok, h_prev, B * T, T, cos_table, sin_table, half_rope, mtp_latent,
                            mtp_k_pe, mtp_latent_row_stride, mtp_k_pe_row_stride, pos, ids, route_w, scores, load,
                            draft_head, rows, B, g_next, draft_logits);
  if (status != 0) goto done;
  for (int64_t b = 0; b < B; b++) {
    first[b] = argmax_row(draft_logits + b * DV, DV);
    memcpy(g + b * D, g_next + rows[b] * D, sizeof(float) * (size_t)D);
  }
done:
  free(ids);
  free(route_w);
  free(ints);
  free(floats);
  return status;
}
