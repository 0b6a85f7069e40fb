/* Fused fp32 CPU kernels for a decode step: each replaces several torch calls.
 *
 * On a CPU a decode step of a small model spends about as long dispatching small torch ops as in
 * its matrix products (docs/benchmarks.md, issue 16): every call costs microseconds whatever its
 * size. These loops do the work of a layer's norms, RoPE, cache writes, attention and SwiGLU
 * activation in four calls. Single-threaded: the work between two products is a few microseconds,
 * less than waking a thread pool. Called through ctypes (kernels/cpu_native.py), which passes raw
 * pointers, element strides and sizes; every tensor is fp32 unless named otherwise.
 *
 * The arithmetic is the torch reference's (kernels/reference.py); only summation order differs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* BALCONY_PORTABLE: the plain loops only (tests build both). */
#if defined(__AVX512F__) && !defined(BALCONY_PORTABLE)
#define BALCONY_AVX512 1
#include <immintrin.h>
#endif

/* exp(x) for x in [-87.3, 88.3] (clamped outside), to about 2 ulp: Cephes' expf, written so the
 * compiler vectorizes the loops that call it (libm's expf stays scalar without -ffast-math, which
 * this file does not use: it would reorder every sum). Inputs here are softmax scores minus their
 * maximum and SiLU's negated gates. */
static inline float exp_poly(float x) {
    /* Two plain clamps and rounding by adding 1.5 * 2^23: floorf or a nested conditional here
     * keeps GCC from vectorizing the loops that call this. */
    x = x < -87.3365447505531f ? -87.3365447505531f : x;
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - k * 0.693359375f; /* x - k ln 2 in two steps (Cody-Waite), |r| <= ln 2 / 2 */
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3333452301E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23; /* 2^k as a float's exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* res_out = x + res (or x when res is NULL); out = res_out * rsqrt(mean(res_out^2) + eps) * w.
 * x, res, out, res_out: [rows, n] contiguous; w: [n]. */
void balcony_add_rms_norm(const float *x, const float *res, const float *w, float *out, float *res_out,
                          int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *sum = res_out + r * n, *o = out + r * n;
        if (res != NULL) {
            const float *rr = res + r * n;
            for (int64_t i = 0; i < n; i++) sum[i] = xr[i] + rr[i];
        } else if (sum != xr) {
            memcpy(sum, xr, (size_t)n * sizeof(float));
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += sum[i] * sum[i];
        float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; i++) o[i] = (sum[i] * inv) * w[i];
    }
}

/* LLaMA's rotate-half RoPE of one head: out[i] = x[i] cos[i] + x[i +- D/2] sin[i], with sin's first
 * half negated (sin_folded = [-s, s]), as kernels/cpu_decode.py's tables hold it. */
static void rope_head(const float *x, const float *cos, const float *sin, float *out, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + x[i + half] * sin[i];
    for (int64_t i = half; i < d; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* q, k, v: [T, H*, D] views with row stride `row_stride` (the fused qkv product's columns);
 * cos, sin: [T, D]. Writes rotated q to q_out [T, Hq, D], rotated k and plain v to the flat cache
 * pools [slots, Hk, D] at slots[t] (int64). */
void balcony_rope_cache(const float *q, const float *k, const float *v, int64_t row_stride,
                        const float *cos, const float *sin, const int64_t *slots,
                        float *q_out, float *k_flat, float *v_flat,
                        int64_t tokens, int64_t hq, int64_t hk, int64_t d) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * d, *s = sin + t * d;
        for (int64_t h = 0; h < hq; h++) rope_head(q + t * row_stride + h * d, c, s, q_out + (t * hq + h) * d, d);
        float *kd = k_flat + slots[t] * hk * d, *vd = v_flat + slots[t] * hk * d;
        for (int64_t h = 0; h < hk; h++) rope_head(k + t * row_stride + h * d, c, s, kd + h * d, d);
        memcpy(vd, v + t * row_stride, (size_t)(hk * d) * sizeof(float));
    }
}

/* scores[h * len + p] = scale * q_h . k_{p, h / group} for p < len: one row's attention scores,
 * the portable loop (any head size). */
static void row_scores(const float *qb, const float *k_cache, const int32_t *table, int64_t len,
                       int64_t hq, int64_t hk, int64_t d, int64_t block_size, float scale, float *scores) {
    int64_t group = hq / hk, kv_row = hk * d;
    for (int64_t p0 = 0; p0 < len; p0 += block_size) {
        const float *block = k_cache + (int64_t)table[p0 / block_size] * block_size * kv_row;
        int64_t count = len - p0 < block_size ? len - p0 : block_size;
        for (int64_t j = 0; j < count; j++) {
            for (int64_t g = 0; g < hk; g++) {
                const float *key = block + j * kv_row + g * d;
                for (int64_t h = g * group; h < (g + 1) * group; h++) {
                    const float *qh = qb + h * d;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < d; i++) dot += qh[i] * key[i];
                    scores[h * len + p0 + j] = dot * scale;
                }
            }
        }
    }
}

#if defined(BALCONY_AVX512)
/* Lane j of the result is the sum of the 16 lanes of v[j]: sixteen horizontal sums for about the
 * price of three, by adding while transposing (pairs of floats, then of 128-bit quarters). */
static inline __m512 sum_each16(const __m512 v[16]) {
    __m512 pair[8], quad[4];
    for (int k = 0; k < 8; k++)  /* per quarter: [a0+a2, b0+b2, a1+a3, b1+b3] of v[2k], v[2k+1] */
        pair[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++)  /* per quarter: the quarter's sums of v[4k .. 4k+3] */
        quad[k] = _mm512_add_ps(_mm512_shuffle_ps(pair[2 * k], pair[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_ps(pair[2 * k], pair[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* then the four quarters: halves of quarters 0+1 and 2+3, and the halves of those */
    __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88),
                               _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
    __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88),
                               _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}

/* row_scores for head size 64 with AVX-512: sixteen positions at a time, each dot product four
 * fused multiply-adds, the sixteen sums reduced together. */
static void row_scores_d64(const float *qb, const float *k_cache, const int32_t *table, int64_t len,
                           int64_t hq, int64_t hk, int64_t block_size, float scale, float *scores) {
    int64_t group = hq / hk, kv_row = hk * 64;
    const __m512 scaled = _mm512_set1_ps(scale);
    for (int64_t p0 = 0; p0 < len; p0 += 16) {
        int64_t count = len - p0 < 16 ? len - p0 : 16;
        const float *keys[16];
        for (int64_t j = 0; j < 16; j++) {
            int64_t p = p0 + (j < count ? j : 0); /* past the end: any valid key, its sum is not stored */
            keys[j] = k_cache + ((int64_t)table[p / block_size] * block_size + p % block_size) * kv_row;
        }
        __mmask16 keep = (__mmask16)((1u << count) - 1u);
        for (int64_t g = 0; g < hk; g++) {
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const float *qh = qb + h * 64;
                __m512 q0 = _mm512_loadu_ps(qh), q1 = _mm512_loadu_ps(qh + 16);
                __m512 q2 = _mm512_loadu_ps(qh + 32), q3 = _mm512_loadu_ps(qh + 48);
                __m512 acc[16];
                for (int j = 0; j < 16; j++) {
                    const float *k = keys[j] + g * 64;
                    __m512 a = _mm512_mul_ps(q0, _mm512_loadu_ps(k));
                    a = _mm512_fmadd_ps(q1, _mm512_loadu_ps(k + 16), a);
                    a = _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32), a);
                    acc[j] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(k + 48), a);
                }
                _mm512_mask_storeu_ps(scores + h * len + p0, keep, _mm512_mul_ps(sum_each16(acc), scaled));
            }
        }
    }
}
#endif

/* One query token per row against its paged context. q: [B, Hq, D]; k_cache, v_cache: [blocks,
 * block_size, Hk, D]; tables: int32 [B, *] with row stride `table_stride`; context_lens: int32 [B]
 * (keys 0..len-1 of row b); out: [B, Hq, D]. Query head h reads kv head h / (Hq / Hk). Softmax in
 * fp32 after subtracting the row's maximum, as SDPA does. Returns 0, or -1 when out of memory. */
int balcony_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                             const int32_t *tables, int64_t table_stride, const int32_t *context_lens,
                             float *out, int64_t rows, int64_t hq, int64_t hk, int64_t d,
                             int64_t block_size, float scale) {
    int64_t longest = 0;
    for (int64_t b = 0; b < rows; b++) longest = context_lens[b] > longest ? context_lens[b] : longest;
    float *scores = malloc((size_t)(hq * (longest > 0 ? longest : 1)) * sizeof(float)); /* [Hq, S] */
    if (scores == NULL) return -1;
    int64_t group = hq / hk, kv_row = hk * d;
    for (int64_t b = 0; b < rows; b++) {
        int64_t len = context_lens[b];
        const int32_t *table = tables + b * table_stride;
        const float *qb = q + b * hq * d;
        float *ob = out + b * hq * d;
#if defined(BALCONY_AVX512)
        if (d == 64)
            row_scores_d64(qb, k_cache, table, len, hq, hk, block_size, scale, scores);
        else
#endif
            row_scores(qb, k_cache, table, len, hq, hk, d, block_size, scale, scores);
        for (int64_t h = 0; h < hq; h++) {
            float *sh = scores + h * len, top = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : top)
            for (int64_t p = 0; p < len; p++) top = sh[p] > top ? sh[p] : top;
#pragma omp simd reduction(+ : total)
            for (int64_t p = 0; p < len; p++) {
                sh[p] = exp_poly(sh[p] - top);
                total += sh[p];
            }
            float inv = total > 0.0f ? 1.0f / total : 0.0f;
#pragma omp simd
            for (int64_t p = 0; p < len; p++) sh[p] *= inv;
        }
        memset(ob, 0, (size_t)(hq * d) * sizeof(float));
        for (int64_t p0 = 0; p0 < len; p0 += block_size) {
            const float *block = v_cache + (int64_t)table[p0 / block_size] * block_size * kv_row;
            int64_t count = len - p0 < block_size ? len - p0 : block_size;
            for (int64_t j = 0; j < count; j++) {
                for (int64_t h = 0; h < hq; h++) {
                    const float *vh = block + j * kv_row + (h / group) * d;
                    float weight = scores[h * len + p0 + j], *oh = ob + h * d;
#pragma omp simd
                    for (int64_t i = 0; i < d; i++) oh[i] += weight * vh[i];
                }
            }
        }
    }
    free(scores);
    return 0;
}

/* SwiGLU's activation of the fused gate_up product: out[t, i] = silu(g[t, i]) * u[t, i], where
 * gate_up is [T, 2I] = [g | u] contiguous and out is [T, I]. */
void balcony_silu_mul(const float *gate_up, float *out, int64_t tokens, int64_t inter) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *g = gate_up + t * 2 * inter, *u = g + inter;
        float *o = out + t * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) o[i] = g[i] * u[i] / (1.0f + exp_poly(-g[i]));
    }
}
