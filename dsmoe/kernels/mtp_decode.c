/* A multi-token-prediction module's decode step in one call (dsmoe/model/mtp.py): for a
 * few new positions, the next tokens' embeddings (enorm) and the previous hidden states
 * (hnorm) side by side, eh_proj, one Transformer block over the module's own latent cache
 * (dsmoe_block_decode), then its norm and an output head (the model's, or a cheaper copy
 * for drafting) at the rows asked for (a draft needs one position per request).
 * Speculative decoding runs it once per draft (spec_decode.c).
 * Why: op by op the module cost ~1.2 ms a `small` draft on a CPU, four times its block.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* tokens, positions: (M,), M = B x T; h_prev: (M, D). h: (M, D) written (the module's
 * output before its norm); logits: (n_head, head rows), the head at rows head_rows[0..n_head)
 * (at most M, each < M), written when head is not NULL.
 * Returns 0, -2 for a token outside the embedding, -3 for a head row outside [0, M), or the
 * block's failure status. */
int dsmoe_mtp_decode(const dsmoe_mtp *mtp, const dsmoe_weight *embed, const int64_t *tokens, const float *h_prev,
                     int64_t M, int64_t T, const float *cos_table, const float *sin_table, int64_t half_rope,
                     float *latent, float *k_pe, int64_t latent_row_stride, int64_t k_pe_row_stride,
                     const int64_t *positions, int64_t *ids, float *weights, float *scores, int64_t *load,
                     const dsmoe_weight *head, const int64_t *head_rows, int64_t n_head, float *h,
                     float *logits) {
  const int64_t D = embed->cols;
  float *buf = malloc(sizeof(float) * (size_t)(2 * M * half_rope + 2 * M * D));
  if (!buf) return -1;
  float *cos = buf, *sin = cos + M * half_rope, *eh = sin + M * half_rope;
  int status = gather_rows(embed, tokens, M, eh, 2 * D);
  if (status == 0) {
    gather_rope(cos_table, sin_table, half_rope, positions, M, cos, sin);
    for (int64_t i = 0; i < M; i++) {
      rms_norm_row(eh + i * 2 * D, mtp->enorm, D, mtp->enorm_eps);
      memcpy(eh + i * 2 * D + D, h_prev + i * D, sizeof(float) * (size_t)D);
      rms_norm_row(eh + i * 2 * D + D, mtp->hnorm, D, mtp->hnorm_eps);
    }
    apply_weight(&mtp->eh_proj, eh, 2 * D, M, h, D);
    status = dsmoe_block_decode(mtp->block, h, M, T, cos, sin, latent, k_pe, latent_row_stride, k_pe_row_stride,
                                positions, ids, weights, scores, load);
  }
  if (status == 0 && head != NULL) {
    float *x = eh; /* M x 2D floats: room for the normed rows */
    for (int64_t i = 0; i < n_head; i++) {
      if (head_rows[i] < 0 || head_rows[i] >= M) {
        status = -3;
        break;
      }
      memcpy(x + i * D, h + head_rows[i] * D, sizeof(float) * (size_t)D);
      rms_norm_row(x + i * D, mtp->norm, D, mtp->norm_eps);
    }
    if (status == 0) apply_weight(head, x, D, n_head, logits, head->rows);
  }
  free(buf);
  return status;
}
