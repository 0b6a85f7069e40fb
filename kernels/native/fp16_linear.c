/* y = x @ W^T with fp16 weights and fp32 activations, for decode steps of a few rows on a CPU.
 *
 * A one-row decode step reads every weight once and does two flops per weight: it is bound by
 * memory bandwidth, so the layout of the weights decides its pace. FBGEMM's fp16 GEMM (torch's
 * `linear_dynamic_fp16`) is a general GEMM; for one row it reads the weights well below the
 * bandwidth the machine has (docs/benchmarks.md, "fp16 products in C"). Here the weights are stored
 * in blocks of 16 output rows, interleaved by input column: W_blocked[b, k, j] = W[16 b + j, k]
 * ([ceil(N / 16), K, 16], zero rows past N). A block's 16 outputs are one 512-bit accumulator per
 * input row; each input column adds one converted 32-byte load times a broadcast input: one
 * forward stream through memory per block and no horizontal sums.
 *
 * Threads: the blocks are split across an OpenMP team of the size torch uses, so the team is
 * torch's own (this library links the libgomp torch has loaded; kernels/cpu_native.py checks
 * that one OpenMP runtime serves the process). Without OpenMP or AVX-512 the loops run plain and
 * single-threaded; Python then keeps FBGEMM for the products (balcony_fp16_linear_fast says which).
 */
#include <stdint.h>
#if defined(__AVX512F__) && !defined(BALCONY_PORTABLE)
#define BALCONY_F16_AVX512 1
#include <immintrin.h>
#endif

#define BLOCK 16  /* output rows per block: one zmm of fp32 */
#define MAX_ROWS 4  /* input rows sharing one pass over a block (accumulators: 2 per row) */

/* 1 when the products below are vectorized and threaded: faster than FBGEMM where built. */
int balcony_fp16_linear_fast(void) {
#if defined(BALCONY_F16_AVX512) && defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

#if !defined(BALCONY_F16_AVX512)
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);  /* inf, nan */
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            int shift = 0;
            while (!(man & 0x400)) { man <<= 1; shift++; }
            bits = sign | ((uint32_t)(113 - shift) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    union { uint32_t u; float f; } v = {bits};
    return v.f;
}
#endif

#if defined(BALCONY_F16_AVX512)
/* One block's outputs for `rows` input rows (a constant at each call site, so the loops unroll):
 * x [rows, K] (row stride ldx), w [K, 16] fp16, y [rows, 16] (row stride ldy; `mask`: the columns
 * that exist). Two accumulators per row over even and odd columns hide the FMA latency. */
static inline __attribute__((always_inline)) void block_rows(
        const float *x, int64_t ldx, const uint16_t *w, int64_t k_len, float *y, int64_t ldy,
        __mmask16 mask, const int rows) {
    __m512 even[MAX_ROWS], odd[MAX_ROWS];
    for (int r = 0; r < rows; r++) even[r] = odd[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 1 < k_len; k += 2) {
        __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k * BLOCK)));
        __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + (k + 1) * BLOCK)));
        for (int r = 0; r < rows; r++) {
            even[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[r * ldx + k]), even[r]);
            odd[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[r * ldx + k + 1]), odd[r]);
        }
    }
    if (k < k_len) {
        __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k * BLOCK)));
        for (int r = 0; r < rows; r++) even[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[r * ldx + k]), even[r]);
    }
    for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(y + r * ldy, mask, _mm512_add_ps(even[r], odd[r]));
}
#endif

static void block_product(const float *x, const uint16_t *w_blocked, float *y, int64_t rows, int64_t n,
                          int64_t k_len, int64_t block) {
    const uint16_t *w = w_blocked + block * k_len * BLOCK;
    int64_t first = block * BLOCK, width = n - first < BLOCK ? n - first : BLOCK;
#if defined(BALCONY_F16_AVX512)
    __mmask16 mask = (__mmask16)((1u << width) - 1u);
    for (int64_t r = 0; r < rows; r += MAX_ROWS) {
        const float *xr = x + r * k_len;
        float *yr = y + r * n + first;
        switch (rows - r < MAX_ROWS ? rows - r : MAX_ROWS) {
            case 1: block_rows(xr, k_len, w, k_len, yr, n, mask, 1); break;
            case 2: block_rows(xr, k_len, w, k_len, yr, n, mask, 2); break;
            case 3: block_rows(xr, k_len, w, k_len, yr, n, mask, 3); break;
            default: block_rows(xr, k_len, w, k_len, yr, n, mask, 4); break;
        }
    }
#else
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < width; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < k_len; k++) acc += half_to_float(w[k * BLOCK + j]) * x[r * k_len + k];
            y[r * n + first + j] = acc;
        }
    }
#endif
}

/* y [rows, n] = x [rows, k_len] @ W^T, W given blocked ([ceil(n / 16), k_len, 16] fp16); x and y
 * contiguous fp32. `threads`: the team size (torch's intra-op thread count). */
void balcony_fp16_linear(const float *x, const uint16_t *w_blocked, float *y, int64_t rows, int64_t n,
                         int64_t k_len, int64_t threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t b = 0; b < blocks; b++) block_product(x, w_blocked, y, rows, n, k_len, b);
    (void)threads;
}
