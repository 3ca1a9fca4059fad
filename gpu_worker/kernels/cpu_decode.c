/* A whole decode step's decoder layers in one call (gpu_worker/kernels/decode_program.py drives it).
 *
 * Once the model's weights stream through the caches, every torch op and every Python line of a step
 * runs cache-cold: on a 2-core CPU that, not the arithmetic, was most of a batch-1 step (about 10-80 us
 * per op, ~15 ops per layer). This runs the layers of a Llama-family model for a few (decode_program.MAX_SEQS)
 * decoding sequences with the kernels of cpu_ops.c and cpu_gemv.c, in the order and with the roundings
 * of the eager path (LlamaDecoderLayer): residual add + RMSNorm, fused QKV, RoPE, KV-cache write,
 * paged attention, o_proj, residual add + RMSNorm, gate/up, SiLU-and-multiply, down. One rank only
 * (no all-reduce); the KV cache in the model's dtype or e4m3 (written as torch's saturating cast rounds).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

enum { DENSE = 0, INT8 = 1, Q4 = 2 };

typedef struct {
    int64_t kind;           /* DENSE: weights in the activations' dtype; INT8; Q4 (GGUF 4-bit blocks) */
    int64_t n, k;           /* output and input features */
    const void *w;          /* DENSE [n, k]; INT8 [n, k] int8; Q4 packed [n, k / 2] */
    const float *scale;     /* INT8 [n]; Q4 d [n, k / 32] */
    const float *m;         /* Q4 m [n, k / 32] */
    const void *bias;       /* [n] in the activations' dtype, or NULL */
} tpq_linear;

typedef struct {
    const void *input_norm, *post_norm;  /* [hidden] RMSNorm weights */
    tpq_linear qkv, o, gate_up, down;
    void *k_cache, *v_cache;             /* [blocks, block_size, kv_heads, head_dim] */
} tpq_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps;
} tpq_shape;

void tpq_rms_norm(int dtype, const void *x, int64_t x_stride, void *residual, const void *weight, void *out,
                  int64_t rows, int64_t dim, float eps, int num_threads);
void tpq_silu_mul(int dtype, const void *gate_up, void *out, int64_t rows, int64_t width, int num_threads);
void tpq_rope(int dtype, void *x, int64_t x_stride, const void *cos, const void *sin, int64_t tokens, int64_t heads,
              int64_t dim, int num_threads);
void tpq_paged_decode_attention(int q_dtype, int kv_dtype, const void *q, int64_t q_stride, void *out,
                                const void *k_cache, const void *v_cache, const int64_t *block_tables,
                                int64_t table_stride, const int64_t *context_lens, int64_t seqs, int64_t heads,
                                int64_t kv_heads, int64_t dim, int64_t block_size, float scale, int num_threads);
void tpq_dense_gemv(int dtype, const void *x, int64_t rows, int64_t k, const void *w, void *out, int64_t n,
                    int num_threads);
void tpq_int8_gemv(int dtype, const void *x, int64_t rows, int64_t k, const int8_t *w, const float *scales,
                   void *out, int64_t n, int num_threads);
void tpq_q4_gemv(int dtype, const void *x, int64_t rows, int64_t k, const uint8_t *packed, const float *d,
                 const float *m, void *out, int64_t n, int num_threads);

static void linear(int dtype, const tpq_linear *l, const void *x, int64_t rows, void *out, int threads) {
    if (l->kind == INT8) tpq_int8_gemv(dtype, x, rows, l->k, l->w, l->scale, out, l->n, threads);
    else if (l->kind == Q4) tpq_q4_gemv(dtype, x, rows, l->k, l->w, l->scale, l->m, out, l->n, threads);
    else tpq_dense_gemv(dtype, x, rows, l->k, l->w, out, l->n, threads);
    if (!l->bias) return;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < l->n; j++) {
            if (dtype == F32) ((float *)out)[r * l->n + j] += ((const float *)l->bias)[j];
            else {
                uint16_t *o = (uint16_t *)out + r * l->n + j;
                *o = f32_to_bf16(bf16_to_f32(*o) + bf16_to_f32(((const uint16_t *)l->bias)[j]));
            }
        }
}

/* Run the layers for `seqs` decoding sequences (one new token each).
 *
 * hidden [seqs, hidden]: the token embeddings in, the final RMSNorm's output out. cos, sin [seqs, head_dim]
 * for each token's position; slots [seqs] its cache slot; block_tables [seqs, table_stride] and
 * context_lens [seqs] (this token included) what it attends to. matrix_work_only (benchmarks): run only
 * the matrix products and attention, to measure what a step costs beyond them.
 */
/* One token's keys or values [kv_heads * head_dim] (dtype) into a cache slot (kv_dtype: dtype or FP8). */
static void write_slot(int dtype, int kv_dtype, const char *row, char *slot, int64_t n) {
    if (kv_dtype != FP8) {
        memcpy(slot, row, (size_t)n * (dtype == F32 ? 4 : 2));
        return;
    }
    for (int64_t i = 0; i < n; i++)
        ((uint8_t *)slot)[i] = f32_to_fp8(dtype == F32 ? ((const float *)row)[i]
                                                       : bf16_to_f32(((const uint16_t *)row)[i]));
}

void tpq_decode_layers(int dtype, int kv_dtype, const tpq_shape *shape, const tpq_layer *layers, int64_t num_layers,
                       const void *final_norm, void *hidden, const void *cos, const void *sin, const int64_t *slots,
                       const int64_t *block_tables, int64_t table_stride, const int64_t *context_lens, int64_t seqs,
                       int threads, int matrix_work_only) {
    const int all = !matrix_work_only;
    const size_t size = dtype == F32 ? 4 : 2, kv_size = kv_dtype == FP8 ? 1 : size;
    const int64_t h = shape->hidden, d = shape->head_dim, heads = shape->heads, kv = shape->kv_heads;
    const int64_t qkv_width = (heads + 2 * kv) * d, inter = shape->intermediate;
    /* scratch, each [seqs, width] in dtype: residual | normed | qkv | attended | gate_up | activated */
    char *scratch = malloc(size * (size_t)(seqs * (3 * h + qkv_width + heads * d + 3 * inter)));
    char *residual = scratch, *normed = residual + size * seqs * h, *qkv = normed + size * seqs * h;
    char *attended = qkv + size * seqs * qkv_width, *gate_up = attended + size * seqs * heads * d;
    char *activated = gate_up + size * seqs * 2 * inter, *layer_out = hidden;
    memcpy(residual, hidden, size * (size_t)(seqs * h));
    for (int64_t i = 0; i < num_layers; i++) {
        const tpq_layer *layer = &layers[i];
        if (all)  /* layer 0 norms the embeddings (the residual's copy); later layers add the last output first */
            tpq_rms_norm(dtype, layer_out, h, i == 0 ? NULL : residual, layer->input_norm, normed, seqs, h,
                         shape->eps, threads);
        linear(dtype, &layer->qkv, normed, seqs, qkv, threads);
        if (all) tpq_rope(dtype, qkv, qkv_width, cos, sin, seqs, heads + kv, d, threads);
        for (int64_t s = 0; s < seqs && all; s++) {  /* this token's key and value into its cache slot */
            const char *k_row = qkv + size * (s * qkv_width + heads * d), *v_row = k_row + size * kv * d;
            write_slot(dtype, kv_dtype, k_row, (char *)layer->k_cache + kv_size * slots[s] * kv * d, kv * d);
            write_slot(dtype, kv_dtype, v_row, (char *)layer->v_cache + kv_size * slots[s] * kv * d, kv * d);
        }
        tpq_paged_decode_attention(dtype, kv_dtype, qkv, qkv_width, attended, layer->k_cache, layer->v_cache,
                                   block_tables, table_stride, context_lens, seqs, heads, kv, d, shape->block_size,
                                   1.0f / sqrtf((float)d), threads);
        linear(dtype, &layer->o, attended, seqs, layer_out, threads);
        if (all) tpq_rms_norm(dtype, layer_out, h, residual, layer->post_norm, normed, seqs, h, shape->eps, threads);
        linear(dtype, &layer->gate_up, normed, seqs, gate_up, threads);
        if (all) tpq_silu_mul(dtype, gate_up, activated, seqs, inter, threads);
        linear(dtype, &layer->down, activated, seqs, layer_out, threads);
    }
    if (all) tpq_rms_norm(dtype, layer_out, h, residual, final_norm, hidden, seqs, h, shape->eps, threads);
    free(scratch);
}
