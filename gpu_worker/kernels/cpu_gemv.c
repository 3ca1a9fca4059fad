/* Matrix products for steps of few tokens: dense, int8 per channel, GGUF 4-bit blocks; see cpu_ops.c. */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_common.h"

/*
 * y [rows, n] = x [rows, k] @ W.T with W [n, k] dense or quantized; x and y float32 or bf16. Each weight is read
 * from memory once whatever the rows: 4 output features' weights are converted to float32 once per
 * MAX_GEMV_ROWS rows and multiplied into each, and stay in L1 for the next rows. Output features are
 * split over the threads. The vectors are AVX-512's or AVX2's, whichever -march=native gives (GCC 12
 * scalarises int8 conversions written as vector extensions), else plain floats.
 */
#define MAX_GEMV_ROWS 8

/* DOT(R) with R = rows (1..MAX_GEMV_ROWS) as a constant: each row count gets its own inlined loop, whose
 * accumulators stay in registers. */
#define WITH_CONSTANT_ROWS(rows, DOT) do {                                                               \
        switch (rows) {                                                                                  \
            case 1: DOT(1); break;                                                                       \
            case 2: DOT(2); break;                                                                       \
            case 3: DOT(3); break;                                                                       \
            case 4: DOT(4); break;                                                                       \
            case 5: DOT(5); break;                                                                       \
            case 6: DOT(6); break;                                                                       \
            case 7: DOT(7); break;                                                                       \
            default: DOT(8); break;                                                                      \
        }                                                                                                \
    } while (0)

/* Output features j..j+J of the dense product (weights in the activations' dtype), for R rows (see int8_dot). */
static inline __attribute__((always_inline)) void dense_dot(const int R, const int J, int dtype, const float *xf,
                                                            int64_t k, const void *w, float *sums) {
    vf acc[MAX_GEMV_ROWS * 4];
    for (int i = 0; i < R * J; i++) acc[i] = vzero();
    for (int64_t c = 0; c < k; c += VW) {
        vf wv[4];
        for (int f = 0; f < J; f++)
            wv[f] = dtype == F32 ? vload((const float *)w + f * k + c) : vload_bf16((const uint16_t *)w + f * k + c);
        for (int r = 0; r < R; r++) {
            vf xv = vload(xf + r * k + c);
            for (int f = 0; f < J; f++) acc[r * J + f] = vfma(wv[f], xv, acc[r * J + f]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int f = 0; f < J; f++) sums[r * 4 + f] = vsum(acc[r * J + f]);
}

/* Output features j..j+3 for all rows from float32 weights wf [4, k], MAX_GEMV_ROWS rows at a time. */
static void dense_rows(int dtype, const float *xf, int64_t rows, int64_t k, const float *wf, void *out, int64_t n,
                       int64_t j) {
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_GEMV_ROWS) {
        const int64_t chunk = rows - r0 < MAX_GEMV_ROWS ? rows - r0 : MAX_GEMV_ROWS;
        const float *xc = xf + r0 * k;
        float sums[MAX_GEMV_ROWS * 4];
        #define DOT(R) dense_dot(R, 4, F32, xc, k, wf, sums)
        WITH_CONSTANT_ROWS(chunk, DOT);
        #undef DOT
        for (int64_t r = 0; r < chunk; r++)
            for (int64_t f = 0; f < 4; f++) store_out(dtype, out, (r0 + r) * n + j + f, sums[r * 4 + f]);
    }
}

/* Dense weights w [n, k] in the activations' dtype (k a multiple of 16): y = x @ w.T */
void tpq_dense_gemv(int dtype, const void *x, int64_t rows, int64_t k, const void *w, void *out, int64_t n,
                    int num_threads) {
    const size_t size = dtype == F32 ? 4 : 2;
    float *xf = malloc(sizeof(float) * (size_t)(rows * k));
    activations_to_f32(dtype, x, rows, k, xf);
    const int64_t groups = (n + 3) / 4;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t j = g * 4, width = n - j < 4 ? n - j : 4;
        const char *wj = (const char *)w + j * k * size;
        for (int64_t r0 = 0; r0 < rows; r0 += MAX_GEMV_ROWS) {  /* the group's weights stay in L1 across chunks */
            const int64_t chunk = rows - r0 < MAX_GEMV_ROWS ? rows - r0 : MAX_GEMV_ROWS;
            const float *xc = xf + r0 * k;
            float sums[MAX_GEMV_ROWS * 4];
            if (width < 4) {  /* the last few features: plain loops */
                float wrow[k];
                for (int64_t f = 0; f < width; f++) {
                    load_row(dtype, wj + f * k * size, wrow, k);
                    for (int64_t r = 0; r < chunk; r++) {
                        float dot = 0.0f;
                        for (int64_t c = 0; c < k; c++) dot += wrow[c] * xc[r * k + c];
                        sums[r * 4 + f] = dot;
                    }
                }
            } else {
                #define DOT(R) dense_dot(R, 4, dtype, xc, k, wj, sums)
                WITH_CONSTANT_ROWS(chunk, DOT);
                #undef DOT
            }
            for (int64_t r = 0; r < chunk; r++)
                for (int64_t f = 0; f < width; f++) store_out(dtype, out, (r0 + r) * n + j + f, sums[r * 4 + f]);
        }
    }
    free(xf);
}

/* Output features j..j+J of the int8 product for R rows (R, J constants where inlined: the R x J accumulators
 * stay in registers, and J independent chains hide the multiply-add latency). */
static inline __attribute__((always_inline)) void int8_dot(const int R, const int J, const float *xf, int64_t k,
                                                           const int8_t *w, const float *scales, float *sums) {
    vf acc[MAX_GEMV_ROWS * 4];
    for (int i = 0; i < R * J; i++) acc[i] = vzero();
    for (int64_t c = 0; c < k; c += VW) {
        vf wv[4];
        for (int f = 0; f < J; f++) wv[f] = vload_i8(w + f * k + c);
        for (int r = 0; r < R; r++) {
            vf xv = vload(xf + r * k + c);
            for (int f = 0; f < J; f++) acc[r * J + f] = vfma(wv[f], xv, acc[r * J + f]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int f = 0; f < J; f++) sums[r * 4 + f] = vsum(acc[r * J + f]) * scales[f];
}

/* Per-output-channel int8: w [n, k] int8 (k a multiple of 16), scales [n] float32; y = x @ (w * scales).T */
void tpq_int8_gemv(int dtype, const void *x, int64_t rows, int64_t k, const int8_t *w, const float *scales,
                   void *out, int64_t n, int num_threads) {
    float *xf = malloc(sizeof(float) * (size_t)(rows * k));
    activations_to_f32(dtype, x, rows, k, xf);
    const int64_t groups = (n + 3) / 4;  /* 4 output features at a time; the last group may be short */
    #pragma omp parallel num_threads(num_threads)
    {
        float *wf = rows > MAX_GEMV_ROWS ? malloc(sizeof(float) * (size_t)(4 * k)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t j = g * 4, width = n - j < 4 ? n - j : 4;
            const int8_t *wj = w + j * k;
            if (wf && width == 4) {  /* many rows: convert the group's weights once, then dense products per chunk */
                for (int64_t f = 0; f < 4; f++)
                    for (int64_t c = 0; c < k; c++) wf[f * k + c] = (float)wj[f * k + c] * scales[j + f];
                dense_rows(dtype, xf, rows, k, wf, out, n, j);
                continue;
            }
            for (int64_t r0 = 0; r0 < rows; r0 += MAX_GEMV_ROWS) {  /* the group's weights stay in L1 across chunks */
                const int64_t chunk = rows - r0 < MAX_GEMV_ROWS ? rows - r0 : MAX_GEMV_ROWS;
                const float *xc = xf + r0 * k;
                float sums[MAX_GEMV_ROWS * 4];
                if (width < 4) {  /* the last few features: plain loops */
                    for (int64_t f = 0; f < width; f++)
                        for (int64_t r = 0; r < chunk; r++) {
                            float dot = 0.0f;
                            for (int64_t c = 0; c < k; c++) dot += (float)wj[f * k + c] * xc[r * k + c];
                            sums[r * 4 + f] = dot * scales[j + f];
                        }
                } else {
                    #define DOT(R) int8_dot(R, 4, xc, k, wj, scales + j, sums)
                    WITH_CONSTANT_ROWS(chunk, DOT);
                    #undef DOT
                }
                for (int64_t r = 0; r < chunk; r++)
                    for (int64_t f = 0; f < width; f++) store_out(dtype, out, (r0 + r) * n + j + f, sums[r * 4 + f]);
            }
        }
        free(wf);
    }
    free(xf);
}

/* Output features j..j+J of the 4-bit product for R rows (see int8_dot). */
static inline __attribute__((always_inline)) void q4_dot(const int R, const int J, const float *xf,
                                                         const float *xsum, int64_t k, const uint8_t *q,
                                                         const float *d, const float *m, float *sums) {
    const int64_t blocks = k / 32;
    vf acc[MAX_GEMV_ROWS * 4];
    float macc[MAX_GEMV_ROWS * 4] = {0};
    for (int i = 0; i < R * J; i++) acc[i] = vzero();
    for (int64_t b = 0; b < blocks; b++) {
        for (int h = 0; h < 16; h += VW) {  /* bytes h..h+VW: weights h.. (low nibbles) and 16+h.. (high) */
            vf lo[4], hi[4];
            for (int f = 0; f < J; f++) {
                vload_nibbles(q + f * (k / 2) + b * 16 + h, &lo[f], &hi[f]);
                lo[f] = vscale(lo[f], d[f * blocks + b]);
                hi[f] = vscale(hi[f], d[f * blocks + b]);
            }
            for (int r = 0; r < R; r++) {
                const float *xb = xf + r * k + b * 32;
                vf x0 = vload(xb + h), x1 = vload(xb + 16 + h);
                for (int f = 0; f < J; f++) acc[r * J + f] = vfma(hi[f], x1, vfma(lo[f], x0, acc[r * J + f]));
            }
        }
        for (int r = 0; r < R; r++)
            for (int f = 0; f < J; f++) macc[r * J + f] += m[f * blocks + b] * xsum[r * blocks + b];
    }
    for (int r = 0; r < R; r++)
        for (int f = 0; f < J; f++) sums[r * 4 + f] = vsum(acc[r * J + f]) + macc[r * J + f];
}

/* One 4-bit row [k] as float32 weights d * q + m into wf [k]. */
static inline void q4_dequantize_row(const uint8_t *q, const float *d, const float *m, int64_t k, float *wf) {
    for (int64_t b = 0; b < k / 32; b++)
        for (int h = 0; h < 16; h += VW) {
            vf lo, hi;
            vload_nibbles(q + b * 16 + h, &lo, &hi);
            vstore(wf + b * 32 + h, vfma(lo, vset(d[b]), vset(m[b])));
            vstore(wf + b * 32 + 16 + h, vfma(hi, vset(d[b]), vset(m[b])));
        }
}

/* GGUF Q4_0/Q4_1 blocks of 32 weights: w = d * q + m, q in 0..15 (Q4_0: m = -8 d).
 * packed [n, k / 2]: per block 16 bytes, byte i holding q[i] (low nibble) and q[i + 16] (high nibble), as in
 * the GGUF file; d, m [n, k / 32] float32. */
void tpq_q4_gemv(int dtype, const void *x, int64_t rows, int64_t k, const uint8_t *packed, const float *d,
                 const float *m, void *out, int64_t n, int num_threads) {
    const int64_t blocks = k / 32;
    float *xf = malloc(sizeof(float) * (size_t)(rows * k + rows * blocks));
    float *xsum = xf + rows * k;  /* [rows, blocks]: each block's sum of x, for the m term */
    activations_to_f32(dtype, x, rows, k, xf);
    for (int64_t i = 0; i < rows * blocks; i++) {
        float s = 0.0f;
        for (int e = 0; e < 32; e++) s += xf[i * 32 + e];
        xsum[i] = s;
    }
    const int64_t groups = (n + 3) / 4;  /* 4 output features at a time; the last group may be short */
    #pragma omp parallel num_threads(num_threads)
    {
        float *wf = rows > MAX_GEMV_ROWS ? malloc(sizeof(float) * (size_t)(4 * k)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t j = g * 4, width = n - j < 4 ? n - j : 4;
            const uint8_t *qj = packed + j * (k / 2);
            const float *dj = d + j * blocks, *mj = m + j * blocks;
            if (wf && width == 4) {  /* many rows: convert the group's weights once, then dense products per chunk */
                for (int64_t f = 0; f < 4; f++)
                    q4_dequantize_row(qj + f * (k / 2), dj + f * blocks, mj + f * blocks, k, wf + f * k);
                dense_rows(dtype, xf, rows, k, wf, out, n, j);
                continue;
            }
            for (int64_t r0 = 0; r0 < rows; r0 += MAX_GEMV_ROWS) {  /* the group's weights stay in L1 across chunks */
                const int64_t chunk = rows - r0 < MAX_GEMV_ROWS ? rows - r0 : MAX_GEMV_ROWS;
                const float *xc = xf + r0 * k;
                float sums[MAX_GEMV_ROWS * 4];
                if (width < 4) {  /* the last few features: plain loops */
                    for (int64_t f = 0; f < width; f++)
                        for (int64_t r = 0; r < chunk; r++) {
                            float dot = 0.0f;
                            for (int64_t c = 0; c < k; c++) {
                                uint8_t byte = qj[f * (k / 2) + (c / 32) * 16 + c % 16];
                                float q = (float)(c % 32 < 16 ? byte & 15 : byte >> 4);
                                dot += (dj[f * blocks + c / 32] * q + mj[f * blocks + c / 32]) * xc[r * k + c];
                            }
                            sums[r * 4 + f] = dot;
                        }
                } else {
                    #define DOT(R) q4_dot(R, 4, xc, xsum + r0 * blocks, k, qj, dj, mj, sums)
                    WITH_CONSTANT_ROWS(chunk, DOT);
                    #undef DOT
                }
                for (int64_t r = 0; r < chunk; r++)
                    for (int64_t f = 0; f < width; f++) store_out(dtype, out, (r0 + r) * n + j + f, sums[r * 4 + f]);
            }
        }
        free(wf);
    }
    free(xf);
}

/* The Q4 weight's rows [row_start, row_start + row_count) as dtype values w = d * q + m, into out [row_count, k]
 * (for a dense matmul when a step has too many tokens for tpq_q4_gemv). */
void tpq_q4_dequantize(int dtype, const uint8_t *packed, const float *d, const float *m, int64_t k,
                       int64_t row_start, int64_t row_count, void *out, int num_threads) {
    const int64_t blocks = k / 32;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < row_count; i++) {
        int64_t j = row_start + i;
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *q = packed + j * (k / 2) + b * 16;
            float db = d[j * blocks + b], mb = m[j * blocks + b];
            for (int e = 0; e < 16; e++) {
                store_out(dtype, out, i * k + b * 32 + e, db * (float)(q[e] & 15) + mb);
                store_out(dtype, out, i * k + b * 32 + e + 16, db * (float)(q[e] >> 4) + mb);
            }
        }
    }
}
