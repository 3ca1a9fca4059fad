/* What the fused CPU kernels share: dtype codes, bf16 and fp8 conversions, row loads, and the vectors
 * (AVX-512 or AVX2, whichever -march=native gives, else plain floats). See cpu_ops.c. */
#ifndef TPQ_CPU_COMMON_H
#define TPQ_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, FP8 = 2 };

/* Below this many elements an elementwise kernel runs on the calling thread: waking the pool costs more. */
#define PARALLEL_ELEMENTS 32768

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } x = { .u = (uint32_t)v << 16 };
    return x.f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    union { float f; uint32_t u; } x = { .f = f };
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40u);  /* NaN stays NaN */
    return (uint16_t)((x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16);
}

extern float tpq_fp8_table[256];  /* e4m3fn byte -> float32, filled when the library loads */

/* e4m3fn bytes to float32 through float16: the byte's 7 low bits, shifted to a half's exponent and mantissa,
 * are the same value scaled by 2^-8 (subnormals included; 0x7f, NaN in e4m3fn, reads 480: caches written
 * by saturating casts never hold it). */
#if defined(__AVX512F__)
static inline void fp8_to_f32_vec(const uint8_t *src, float *dst) {  /* 16 values */
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)src));
    __m256i half = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7),
                                   _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.0f)));
}
#define FP8_VEC 16
#elif defined(__AVX2__) && defined(__F16C__)
static inline void fp8_to_f32_vec(const uint8_t *src, float *dst) {  /* 8 values */
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)src));
    __m128i half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7),
                                _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
    _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.0f)));
}
#define FP8_VEC 8
#else
#define FP8_VEC 0
#endif

/* float32 to e4m3fn as a saturating cast rounds it: |v| clamped to 448, then round to nearest even (c10's
 * fp8e4m3fn_from_fp32_value). */
static inline uint8_t f32_to_fp8(float v) {
    union { float f; uint32_t u; } x = { .f = v };
    const uint32_t sign = x.u & 0x80000000u;
    x.u ^= sign;
    if (!(x.f <= 448.0f)) x.f = 448.0f;  /* NaN stays out of the cache too */
    uint8_t result;
    if (x.u < (121u << 23)) {  /* below 2^-6, e4m3's smallest normal: round through a denormal-sized add */
        union { uint32_t u; float f; } denorm = { .u = 141u << 23 };
        union { float f; uint32_t u; } sum = { .f = x.f + denorm.f };
        result = (uint8_t)(sum.u - denorm.u);
    } else {
        uint32_t mant_odd = (x.u >> 20) & 1u;
        x.u += ((uint32_t)(7 - 127) << 23) + 0x7ffffu + mant_odd;
        result = (uint8_t)(x.u >> 20);
    }
    return result | (uint8_t)(sign >> 24);
}

/* n elements of a dtype-coded row into float32 */
static inline void load_row(int dtype, const void *src, float *dst, int64_t n) {
    if (dtype == F32) {
        const float *s = src;
        for (int64_t i = 0; i < n; i++) dst[i] = s[i];
    } else if (dtype == BF16) {
        const uint16_t *s = src;
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        const uint8_t *s = src;
        int64_t i = 0;
#if FP8_VEC
        for (; i + FP8_VEC <= n; i += FP8_VEC) fp8_to_f32_vec(s + i, dst + i);
#endif
        for (; i < n; i++) dst[i] = tpq_fp8_table[s[i]];
    }
}


#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vset(float s) { return _mm512_set1_ps(s); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vscale(vf a, float s) { return _mm512_mul_ps(a, _mm512_set1_ps(s)); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf vexp(vf x) {  /* see exp_inplace */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    __m512i scale = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), scale));
}
static inline void vload_nibbles(const uint8_t *p, vf *lo, vf *hi) {  /* VW bytes' low and high nibbles */
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vset(float s) { return _mm256_set1_ps(s); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vscale(vf a, float s) { return _mm256_mul_ps(a, _mm256_set1_ps(s)); }
static inline float vsum(vf a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
static inline vf vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf vexp(vf x) {  /* see exp_inplace */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale));
}
static inline void vload_nibbles(const uint8_t *p, vf *lo, vf *hi) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#else
#define VW 1
typedef float vf;
static inline vf vzero(void) { return 0.0f; }
static inline vf vload(const float *p) { return *p; }
static inline void vstore(float *p, vf a) { *p = a; }
static inline vf vset(float s) { return s; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vscale(vf a, float s) { return a * s; }
static inline float vsum(vf a) { return a; }
static inline vf vload_i8(const int8_t *p) { return (float)*p; }
static inline vf vexp(vf x) { return expf(x); }
static inline vf vload_bf16(const uint16_t *p) { return bf16_to_f32(*p); }
static inline void vload_nibbles(const uint8_t *p, vf *lo, vf *hi) { *lo = (float)(*p & 15); *hi = (float)(*p >> 4); }
#endif

/* x[i] <- e^x[i]. The vector paths are Cephes' expf (x = n ln 2 + r, a degree-6 polynomial in r, 2^n added to
 * the exponent; about 1 ulp over the clamped range [-87.3, 88.7]): libm's expf is a call GCC does not vectorise. */
static inline void exp_inplace(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) vstore(x + i, vexp(vload(x + i)));
    for (; i < n; i++) x[i] = expf(x[i]);
}

static inline void store_out(int dtype, void *out, int64_t i, float v) {
    if (dtype == F32) ((float *)out)[i] = v;
    else ((uint16_t *)out)[i] = f32_to_bf16(v);
}

/* x [rows, k] (dtype) into float32 [rows, k] at xf */
static inline void activations_to_f32(int dtype, const void *x, int64_t rows, int64_t k, float *xf) {
    for (int64_t r = 0; r < rows; r++) load_row(dtype, (const char *)x + r * k * (dtype == F32 ? 4 : 2), xf + r * k, k);
}

#endif
