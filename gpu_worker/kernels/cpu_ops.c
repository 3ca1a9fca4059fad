/* Fused CPU kernels for the decode step's small ops (built and loaded by gpu_worker/kernels/cpu_build.py).
 *
 * Each kernel replaces several torch ops, each of which costs a dispatch and a
 * pass over memory: at batch 1 on a 2-core CPU those, not the matrix work, were
 * most of a step. Arithmetic is float32; a bf16 value is rounded where the
 * torch ops it replaces round (so bf16 results match them bit for bit, up to
 * summation order in reductions). Dtype codes: 0 float32, 1 bfloat16, 2 float8
 * e4m3fn (a KV cache's storage only). Every tensor is given by its pointer and,
 * where it may be a view, its row stride in elements.
 *
 * OpenMP: this library links libgomp.so.1 by soname, so in a process that has
 * imported torch it shares torch's OpenMP runtime and thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_common.h"

float tpq_fp8_table[256];  /* e4m3fn byte -> float32 */

static void init_fp8_table(void) {
    for (int b = 0; b < 256; b++) {
        int exponent = (b >> 3) & 15, mantissa = b & 7;
        float magnitude = exponent == 0 ? ldexpf((float)mantissa / 8.0f, -6)
                                        : ldexpf(1.0f + (float)mantissa / 8.0f, exponent - 7);
        if (exponent == 15 && mantissa == 7) magnitude = NAN;
        tpq_fp8_table[b] = (b & 128) ? -magnitude : magnitude;
    }
}

__attribute__((constructor)) static void init(void) { init_fp8_table(); }

/* Residual add + RMSNorm (Hugging Face's LlamaRMSNorm), float32 or bf16.
 *
 * With residual: residual <- x + residual (rounded to the dtype), then
 * out <- weight * norm(residual); without: out <- weight * norm(x). norm(v) =
 * v / sqrt(mean(v^2) + eps) in float32, rounded to the dtype before the weight
 * multiplies it. x, residual, out: [rows, dim] with row strides; weight: [dim].
 */
void tpq_rms_norm(int dtype, const void *x, int64_t x_stride, void *residual, const void *weight, void *out,
                  int64_t rows, int64_t dim, float eps, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows * dim >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        float sum = 0.0f;
        if (dtype == F32) {
            const float *xr = (const float *)x + r * x_stride;
            float *res = residual ? (float *)residual + r * dim : NULL, *o = (float *)out + r * dim;
            const float *w = weight, *src = xr;
            if (res) {
                #pragma omp simd
                for (int64_t i = 0; i < dim; i++) res[i] = xr[i] + res[i];
                src = res;
            }
            #pragma omp simd reduction(+:sum)
            for (int64_t i = 0; i < dim; i++) sum += src[i] * src[i];
            float inv = 1.0f / sqrtf(sum / (float)dim + eps);
            #pragma omp simd
            for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (src[i] * inv);
        } else {
            const uint16_t *xr = (const uint16_t *)x + r * x_stride, *w = weight;
            uint16_t *res = residual ? (uint16_t *)residual + r * dim : NULL, *o = (uint16_t *)out + r * dim;
            const uint16_t *src = xr;
            if (res) {
                #pragma omp simd
                for (int64_t i = 0; i < dim; i++) res[i] = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(res[i]));
                src = res;
            }
            #pragma omp simd reduction(+:sum)
            for (int64_t i = 0; i < dim; i++) { float v = bf16_to_f32(src[i]); sum += v * v; }
            float inv = 1.0f / sqrtf(sum / (float)dim + eps);
            #pragma omp simd
            for (int64_t i = 0; i < dim; i++)
                o[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(src[i]) * inv)));
        }
    }
}

/* out <- silu(gate) * up for gate_up [rows, 2 * width] (gate then up), out [rows, width].
 * bf16: silu's result is rounded before the product, as F.silu(gate) * up rounds it. */
void tpq_silu_mul(int dtype, const void *gate_up, void *out, int64_t rows, int64_t width, int num_threads) {
    #pragma omp parallel num_threads(num_threads) if (rows * width >= PARALLEL_ELEMENTS)
    {
        float *gate = malloc(sizeof(float) * (size_t)(2 * width)), *silu = gate + width;  /* this row's */
        #pragma omp for
        for (int64_t r = 0; r < rows; r++) {
            const size_t size = dtype == F32 ? 4 : 2;
            const char *row = (const char *)gate_up + r * 2 * width * size;
            load_row(dtype, row, gate, width);
            for (int64_t i = 0; i < width; i++) silu[i] = -gate[i];
            exp_inplace(silu, width);
            for (int64_t i = 0; i < width; i++) silu[i] = gate[i] / (1.0f + silu[i]);
            float *up = gate;                                                 /* the gate is spent */
            load_row(dtype, row + width * size, up, width);
            if (dtype == F32) {
                float *o = (float *)out + r * width;
                for (int64_t i = 0; i < width; i++) o[i] = silu[i] * up[i];
            } else {
                uint16_t *o = (uint16_t *)out + r * width;
                for (int64_t i = 0; i < width; i++) o[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(silu[i])) * up[i]);
            }
        }
        free(gate);
    }
}

/* Rotary embedding ("rotate half") applied in place to the first `heads` heads of each token's row.
 *
 * x: [tokens, >= heads, dim] with token stride x_stride (a view of the fused QKV output: q's and k's heads);
 * cos, sin: [tokens, dim]. x <- x * cos + rotate_half(x) * sin, each product rounded in bf16 as torch does.
 */
void tpq_rope(int dtype, void *x, int64_t x_stride, const void *cos, const void *sin, int64_t tokens, int64_t heads,
              int64_t dim, int num_threads) {
    int64_t half = dim / 2;
    #pragma omp parallel for num_threads(num_threads) if (tokens * heads * dim >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < tokens; t++) {
        if (dtype == F32) {
            const float *c = (const float *)cos + t * dim, *s = (const float *)sin + t * dim;
            for (int64_t h = 0; h < heads; h++) {
                float *v = (float *)x + t * x_stride + h * dim;
                #pragma omp simd
                for (int64_t i = 0; i < half; i++) {
                    float lo = v[i], hi = v[i + half];
                    v[i] = lo * c[i] + (-hi) * s[i];
                    v[i + half] = hi * c[i + half] + lo * s[i + half];
                }
            }
        } else {
            const uint16_t *c = (const uint16_t *)cos + t * dim, *s = (const uint16_t *)sin + t * dim;
            for (int64_t h = 0; h < heads; h++) {
                uint16_t *v = (uint16_t *)x + t * x_stride + h * dim;
                #pragma omp simd
                for (int64_t i = 0; i < half; i++) {
                    float lo = bf16_to_f32(v[i]), hi = bf16_to_f32(v[i + half]);
                    float lo_c = bf16_to_f32(f32_to_bf16(lo * bf16_to_f32(c[i])));
                    float hi_s = bf16_to_f32(f32_to_bf16(-hi * bf16_to_f32(s[i])));
                    float hi_c = bf16_to_f32(f32_to_bf16(hi * bf16_to_f32(c[i + half])));
                    float lo_s = bf16_to_f32(f32_to_bf16(lo * bf16_to_f32(s[i + half])));
                    v[i] = f32_to_bf16(lo_c + hi_s);
                    v[i + half] = f32_to_bf16(hi_c + lo_s);
                }
            }
        }
    }
}

/* Decode attention over a paged KV cache, read where it lies (no gathered copy).
 *
 * One query token per sequence. q: [seqs, heads, dim] with token stride q_stride (q_dtype); out: [seqs, heads,
 * dim] contiguous (q_dtype). k_cache, v_cache: [blocks, block_size, kv_heads, dim] (kv_dtype). block_tables:
 * [seqs, table_stride]; context_lens: [seqs]. Query head h reads kv head h / (heads / kv_heads), as SDPA's
 * enable_gqa does. Scores, softmax and the weighted sum are float32; the output is rounded to q_dtype.
 * Work items are (sequence, kv head) pairs, spread over num_threads threads.
 */
void tpq_paged_decode_attention(int q_dtype, int kv_dtype, const void *q, int64_t q_stride, void *out,
                                const void *k_cache, const void *v_cache, const int64_t *block_tables,
                                int64_t table_stride, const int64_t *context_lens, int64_t seqs, int64_t heads,
                                int64_t kv_heads, int64_t dim, int64_t block_size, float scale, int num_threads) {
    const int64_t group = heads / kv_heads, items = seqs * kv_heads;
    const int64_t row_elems = kv_heads * dim;  /* one cache slot: [kv_heads, dim] */
    const size_t q_size = q_dtype == F32 ? 4 : 2, kv_size = kv_dtype == F32 ? 4 : kv_dtype == BF16 ? 2 : 1;
    int64_t total_context = 0;
    for (int64_t s = 0; s < seqs; s++) total_context += context_lens[s];
    int threads = (items > 1 && total_context * heads * dim >= PARALLEL_ELEMENTS) ? num_threads : 1;

    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < items; item++) {
        const int64_t s = item / kv_heads, g = item % kv_heads, ctx = context_lens[s];
        const int64_t *table = block_tables + s * table_stride;
        /* scores [group, ctx] | q heads [group, dim] | weighted sums [group, dim] | one cache row [dim] */
        float *scores = malloc(sizeof(float) * (size_t)(group * ctx + (2 * group + 1) * dim));
        float *qf = scores + group * ctx, *acc = qf + group * dim, *kv_row = acc + group * dim;
        for (int64_t j = 0; j < group; j++)
            load_row(q_dtype, (const char *)q + (s * q_stride + (g * group + j) * dim) * q_size, qf + j * dim, dim);
        float max_score[group > 0 ? group : 1];
        for (int64_t j = 0; j < group; j++) max_score[j] = -INFINITY;
        for (int64_t t = 0; t < ctx; t++) {
            int64_t slot = table[t / block_size] * block_size + t % block_size;
            load_row(kv_dtype, (const char *)k_cache + (slot * row_elems + g * dim) * kv_size, kv_row, dim);
            for (int64_t j = 0; j < group; j++) {
                const float *qj = qf + j * dim;
                float dot = 0.0f;
                #pragma omp simd reduction(+:dot)
                for (int64_t i = 0; i < dim; i++) dot += qj[i] * kv_row[i];
                dot *= scale;
                scores[j * ctx + t] = dot;
                if (dot > max_score[j]) max_score[j] = dot;
            }
        }
        float denominator[group > 0 ? group : 1];
        for (int64_t j = 0; j < group; j++) {
            float sum = 0.0f, *sj = scores + j * ctx;
            for (int64_t t = 0; t < ctx; t++) sj[t] -= max_score[j];
            exp_inplace(sj, ctx);
            for (int64_t t = 0; t < ctx; t++) sum += sj[t];
            denominator[j] = sum;
            for (int64_t i = 0; i < dim; i++) acc[j * dim + i] = 0.0f;
        }
        for (int64_t t = 0; t < ctx; t++) {
            int64_t slot = table[t / block_size] * block_size + t % block_size;
            load_row(kv_dtype, (const char *)v_cache + (slot * row_elems + g * dim) * kv_size, kv_row, dim);
            for (int64_t j = 0; j < group; j++) {
                float p = scores[j * ctx + t], *aj = acc + j * dim;
                #pragma omp simd
                for (int64_t i = 0; i < dim; i++) aj[i] += p * kv_row[i];
            }
        }
        for (int64_t j = 0; j < group; j++) {
            int64_t h = g * group + j;
            float inv = denominator[j] > 0.0f ? 1.0f / denominator[j] : 0.0f;  /* an empty context gives 0 */
            if (q_dtype == F32) {
                float *o = (float *)out + (s * heads + h) * dim;
                for (int64_t i = 0; i < dim; i++) o[i] = acc[j * dim + i] * inv;
            } else {
                uint16_t *o = (uint16_t *)out + (s * heads + h) * dim;
                for (int64_t i = 0; i < dim; i++) o[i] = f32_to_bf16(acc[j * dim + i] * inv);
            }
        }
        free(scores);
    }
}

