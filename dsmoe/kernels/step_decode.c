/* A whole decode step in one call: the new tokens' embeddings, every block
 * (dsmoe_stack_decode), the final norm and the output head, for a few new tokens per row
 * over the latent cache (what Transformer.hidden then Transformer.logits compute). Also
 * returns the last block's output (speculation's MTP block reads it).
 * Why: between the stack call and the head, Python spent ~0.5 ms a token on an embedding
 * lookup, the rope rows, the final norm and their checks, a fifth of a `small` step.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* tokens, positions: (M,) with M = B x T (row b's tokens at b * T ...). embed: (V, D) fp32
 * or int8 with bf16 row scales; cos_table/sin_table: (max positions, R / 2). h: (M, D)
 * written (the last block's output, before the norm); logits: (M, V). */
int dsmoe_step_decode(const dsmoe_block *const *blocks, int64_t n, const dsmoe_weight *embed,
                      const int64_t *tokens, int64_t M, int64_t T, const float *cos_table,
                      const float *sin_table, int64_t half_rope, float *latent, float *k_pe,
                      int64_t latent_layer_stride, int64_t k_pe_layer_stride, int64_t latent_row_stride,
                      int64_t k_pe_row_stride, const int64_t *positions, int64_t *ids, float *weights,
                      float *scores, int64_t *load, const float *norm, float eps, const dsmoe_weight *head,
                      float *h, float *logits) {
  const int64_t D = embed->cols;
  float *rot = malloc(sizeof(float) * (size_t)(2 * M * half_rope + M * D));
  if (!rot) return -1;
  float *cos = rot, *sin = rot + M * half_rope, *x = sin + M * half_rope;
  if (gather_rows(embed, tokens, M, h, D) != 0) {
    free(rot);
    return -2;
  }
  gather_rope(cos_table, sin_table, half_rope, positions, M, cos, sin);
  int status = dsmoe_stack_decode(blocks, n, h, M, T, cos, sin, latent, k_pe, latent_layer_stride,
                                  k_pe_layer_stride, latent_row_stride, k_pe_row_stride, positions, ids, weights,
                                  scores, load);
  if (status == 0) {
    memcpy(x, h, sizeof(float) * (size_t)(M * D));
    for (int64_t i = 0; i < M; i++) rms_norm_row(x + i * D, norm, D, eps);
    apply_weight(head, x, D, M, logits, head->rows);
  }
  free(rot);
  return status;
}
