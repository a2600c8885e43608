/* What the kernel files share: the weight descriptor and the few-row matmul. */
#ifndef DSMOE_KERNELS_H
#define DSMOE_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { KIND_F32 = 0, KIND_INT8 = 1 };

static inline float bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* 16 floats: AVX-512 register, two AVX2 ones, four NEON ones (-march=native decides). */
typedef float v16 __attribute__((vector_size(64), aligned(4)));

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* A tree over halves (4 vector adds), not 15 dependent scalar ones. */
static inline float lane_sum(v16 v) {
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline v16 load_f32(const float *p) { return *(const v16 *)p; }

typedef int8_t v16b __attribute__((vector_size(16), aligned(1)));

/* 16 int8 as 16 floats; explicit on x86, where the generic conversion compiles to scalar code. */
static inline v16 load_i8(const int8_t *p) {
  v16 r;
#if defined(__AVX512F__)
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
  memcpy(&r, &f, 64);
#elif defined(__AVX2__)
  __m128i b = _mm_loadu_si128((const __m128i *)p);
  __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  memcpy(&r, &lo, 32);
  memcpy((char *)&r + 32, &hi, 32);
#else
  r = __builtin_convertvector(*(const v16b *)p, v16);
#endif
  return r;
}


/* One weight matrix (rows x cols, contiguous): fp32, or int8 with one bf16 scale per row. */
typedef struct {
  const void *data;
  const uint16_t *scale; /* NULL for fp32 */
  int64_t rows, cols;
  int64_t kind;
} dsmoe_weight;

void dsmoe_linear(const float *x, int64_t ldx, int64_t M, const void *w, const uint16_t *scale,
                  int kind, int64_t N, int64_t K, float *y, int64_t ldy);

static inline void apply_weight(const dsmoe_weight *w, const float *x, int64_t ldx, int64_t M, float *y,
                                int64_t ldy) {
  dsmoe_linear(x, ldx, M, w->data, w->scale, (int)w->kind, w->rows, w->cols, y, ldy);
}

/* x <- x / rms(x) * weight, as torch's F.rms_norm in fp32. */
static inline void rms_norm_row(float *x, const float *weight, int64_t n, float eps) {
  double ss = 0; /* double: the sum of n squares loses nothing, whatever n */
  for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
  float inv = 1.0f / sqrtf((float)(ss / n) + eps);
  for (int64_t i = 0; i < n; i++) x[i] = x[i] * inv * weight[i];
}
/* One Transformer block's weights and settings (filled by dsmoe/model/native_block.py). */
typedef struct dsmoe_block {
  /* norms */
  const float *attn_norm, *ffn_norm, *q_norm, *kv_norm;
  float eps, q_eps, kv_eps, softmax_scale;
  /* attention: wq_a.rows == 0 when queries are not compressed (wq_b is then wq) */
  dsmoe_weight wq_a, wq_b, wkv_a, wo, wkv_b;
  int64_t heads, nope_dim, rope_dim, v_dim, kv_rank;
  /* feed-forward: a dense SwiGLU (is_moe 0) or the MoE's shared expert (rows 0: none) */
  dsmoe_weight ffn1, ffn3, ffn2;
  int64_t is_moe;
  /* MoE */
  const float *gate, *bias;
  int64_t n_experts, top_k, n_groups, n_limited_groups, sigmoid_scores, group_top2, norm_topk;
  float route_scale;
  const void *w1, *w3, *w2;
  const uint16_t *s1, *s3, *s2;
  int64_t expert_kind, expert_dim;
} dsmoe_block;

/* A multi-token-prediction module (dsmoe/model/mtp.py) and the head its drafts are read
 * with (filled by dsmoe/model/native_mtp.py). */
typedef struct {
  const dsmoe_block *block;
  const float *enorm, *hnorm, *norm;
  float enorm_eps, hnorm_eps, norm_eps;
  dsmoe_weight eh_proj;
} dsmoe_mtp;

int dsmoe_block_decode(const dsmoe_block *b, float *h, int64_t M, int64_t T, const float *cos, const float *sin,
                       float *latent, float *k_pe, int64_t latent_row_stride, int64_t k_pe_row_stride,
                       const int64_t *positions, int64_t *ids, float *weights, float *scores, int64_t *load);
int dsmoe_stack_decode(const dsmoe_block *const *blocks, int64_t n, float *h, int64_t M, int64_t T,
                       const float *cos, const float *sin, float *latent, float *k_pe,
                       int64_t latent_layer_stride, int64_t k_pe_layer_stride, int64_t latent_row_stride,
                       int64_t k_pe_row_stride, const int64_t *positions, int64_t *ids, float *weights,
                       float *scores, int64_t *load);
int dsmoe_step_decode(const dsmoe_block *const *blocks, int64_t n, const dsmoe_weight *embed,
                      const int64_t *tokens, int64_t M, int64_t T, const float *cos_table,
                      const float *sin_table, int64_t half_rope, float *latent, float *k_pe,
                      int64_t latent_layer_stride, int64_t k_pe_layer_stride, int64_t latent_row_stride,
                      int64_t k_pe_row_stride, const int64_t *positions, int64_t *ids, float *weights,
                      float *scores, int64_t *load, const float *norm, float eps, const dsmoe_weight *head,
                      float *h, float *logits);
int dsmoe_mtp_decode(const dsmoe_mtp *mtp, const dsmoe_weight *embed, const int64_t *tokens, const float *h_prev,
                     int64_t M, int64_t T, const float *cos_table, const float *sin_table, int64_t half_rope,
                     float *latent, float *k_pe, int64_t latent_row_stride, int64_t k_pe_row_stride,
                     const int64_t *positions, int64_t *ids, float *weights, float *scores, int64_t *load,
                     const dsmoe_weight *head, const int64_t *head_rows, int64_t n_head, float *h,
                     float *logits);

/* Rows of an embedding table (fp32, or int8 with bf16 row scales) for M token ids, row i
 * at out + i * ldo. Returns 0, or -2 for an id outside the table. */
static inline int gather_rows(const dsmoe_weight *table, const int64_t *ids, int64_t M, float *out, int64_t ldo) {
  const int64_t D = table->cols;
  for (int64_t i = 0; i < M; i++) {
    if (ids[i] < 0 || ids[i] >= table->rows) return -2;
    float *o = out + i * ldo;
    if (table->kind == KIND_F32) {
      memcpy(o, (const float *)table->data + ids[i] * D, sizeof(float) * (size_t)D);
    } else {
      const int8_t *q = (const int8_t *)table->data + ids[i] * D;
      const float s = bf16_to_f32(table->scale[ids[i]]);
      for (int64_t d = 0; d < D; d++) o[d] = (float)q[d] * s;
    }
  }
  return 0;
}

/* The rope rows (half_rope cos and sin values) of M positions, gathered from the tables. */
static inline void gather_rope(const float *cos_table, const float *sin_table, int64_t half_rope,
                               const int64_t *positions, int64_t M, float *cos, float *sin) {
  for (int64_t i = 0; i < M; i++) {
    memcpy(cos + i * half_rope, cos_table + positions[i] * half_rope, sizeof(float) * (size_t)half_rope);
    memcpy(sin + i * half_rope, sin_table + positions[i] * half_rope, sizeof(float) * (size_t)half_rope);
  }
}
#endif
