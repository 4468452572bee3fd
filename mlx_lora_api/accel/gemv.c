/* MLX's CPU backend multiplies float32 matrices with cblas_sgemm, a vector by a matrix too: one
 * token's decode step is a 1 x K row through every weight. OpenBLAS 0.3.21 (Debian 12) packs the
 * whole weight for such a product, then runs its gemm kernel on one row: 3-5x slower than its
 * sgemv, which streams the weight once (OpenBLAS forwards these to gemv itself only from 0.3.27,
 * and not on every CPU). A batch of concurrent chats decodes a few rows at a time, and there too
 * packing the weight costs more than the product (0.4 ms for 1 to 16 rows through SmolLM2's
 * 1536 x 576 MLP weight, on 2 Zen 4 cores).
 *
 * This library exports `cblas_sgemm` ahead of OpenBLAS (accel/blas.py loads it first): a product
 * with one row goes to the BLAS's sgemv; 2 to 8 rows through a weight stored as MLX's Linear
 * layers store it (x @ W.T), on a CPU with AVX2 and FMA, to `few_rows` below, which streams the
 * weight once and multiplies each of its rows with every input row while it is in L1; any other
 * product to the BLAS's sgemm. Row-major only, as MLX calls it. */
#include <stddef.h>
#include <string.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static long vector_products;
static long few_row_products;
static int have_avx2_fma = -1;

enum { FEW_ROWS = 8, LANES = 8, BLOCK = 4, COLUMNS = 3 };

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* Rows i0.. i0+ROWS-1 of c, columns j.. j+COLS-1: every weight value loaded once serves ROWS input
 * rows, every input value COLS weight rows (up to 4 x 3 = 12 accumulators, 3 weight vectors and an
 * input vector: the 16 AVX registers). ROWS and COLS are constants where it is inlined, so the
 * accumulators stay in registers. The next tile's weight rows are prefetched as this one streams
 * its own: with the arithmetic in between, the core's own prefetching fetches about half of what
 * the memory can give (8 rows of SmolLM2's output layer: 34 -> 78 GFLOP/s on 2 Zen 4 cores). */
__attribute__((target("avx2,fma"), always_inline)) static inline void tile(
    const int ROWS, const int COLS, int k, float alpha, const float *a, int lda, const float *w, int ldw,
    const float *next, float beta, float *c, int ldc) {
    int full = k - k % LANES;
    __m256 acc[BLOCK][COLUMNS];
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; i++)
#pragma GCC unroll 3
        for (int j = 0; j < COLS; j++) acc[i][j] = _mm256_setzero_ps();
    for (int p = 0; p < full; p += LANES) {
        if (next && !(p & 15)) {
#pragma GCC unroll 3
            for (int j = 0; j < COLUMNS; j++) _mm_prefetch((const char *)(next + (size_t)j * ldw + p), _MM_HINT_T0);
        }
        __m256 weights[COLUMNS];
#pragma GCC unroll 3
        for (int j = 0; j < COLS; j++) weights[j] = _mm256_loadu_ps(w + (size_t)j * ldw + p);
#pragma GCC unroll 4
        for (int i = 0; i < ROWS; i++) {
            __m256 in = _mm256_loadu_ps(a + (size_t)i * lda + p);
#pragma GCC unroll 3
            for (int j = 0; j < COLS; j++) acc[i][j] = _mm256_fmadd_ps(weights[j], in, acc[i][j]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; i++) {
        const float *in = a + (size_t)i * lda;
#pragma GCC unroll 3
        for (int j = 0; j < COLS; j++) {
            const float *row = w + (size_t)j * ldw;
            float sum = hsum(acc[i][j]);
            for (int p = full; p < k; p++) sum += row[p] * in[p];
            float *out = c + (size_t)i * ldc + j;
            *out = beta == 0.0f ? alpha * sum : alpha * sum + beta * *out;
        }
    }
}

#define TILE(R, C) tile(R, C, k, alpha, in, lda, w0, ldw, next, beta, c + (size_t)i0 * ldc + j, ldc)
#define ROWS_OF(R)                   \
    case R:                          \
        if (cols == 3) TILE(R, 3);   \
        else if (cols == 2) TILE(R, 2); \
        else TILE(R, 1);             \
        break;

/* c[i][j] = alpha * sum_k a[i][k] * w[j][k] + beta * c[i][j], for i < m (2..FEW_ROWS), j < n: groups of
 * three weight rows shared out between threads, each read once; the input rows stay in L1/L2. */
__attribute__((target("avx2,fma"))) static void few_rows(int m, int n, int k, float alpha, const float *a, int lda,
                                                          const float *w, int ldw, float beta, float *c, int ldc) {
    int groups = (n + COLUMNS - 1) / COLUMNS;
#pragma omp parallel for schedule(static)
    for (int g = 0; g < groups; g++) {
        int j = g * COLUMNS;
        int cols = n - j < COLUMNS ? n - j : COLUMNS;
        const float *w0 = w + (size_t)j * ldw;
        for (int i0 = 0; i0 < m; i0 += BLOCK) {
            const float *in = a + (size_t)i0 * lda;
            /* the next group's rows, while this group's first tile streams from memory */
            const float *next = i0 == 0 && j + 2 * COLUMNS <= n ? w0 + (size_t)COLUMNS * ldw : 0;
            switch (m - i0 < BLOCK ? m - i0 : BLOCK) {
                ROWS_OF(1)
                ROWS_OF(2)
                ROWS_OF(3)
                ROWS_OF(4)
            }
        }
    }
}
#endif

void mlx_lora_api_gemv_use(sgemm_fn sgemm, sgemv_fn sgemv) {
    blas_sgemm = sgemm;
    blas_sgemv = sgemv;
}

/* How many products went to sgemv, and to `few_rows` (the tests check that decoding does). */
long mlx_lora_api_gemv_count(void) { return __atomic_load_n(&vector_products, __ATOMIC_RELAXED); }
long mlx_lora_api_few_rows_count(void) { return __atomic_load_n(&few_row_products, __ATOMIC_RELAXED); }

/* Whether `few_rows` runs here (AVX2 and FMA); set to 0 by the tests to compare with sgemm. */
int mlx_lora_api_few_rows(int enable) {
#if defined(__x86_64__)
    if (enable >= 0) have_avx2_fma = enable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (have_avx2_fma < 0) have_avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    (void)enable;
    have_avx2_fma = 0;
#endif
    return have_avx2_fma;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
#if defined(__x86_64__)
    if (order == ROW_MAJOR && m > 1 && m <= FEW_ROWS && trans_a == NO_TRANS && trans_b == TRANS && n > 0 && k > 0 &&
        (have_avx2_fma >= 0 ? have_avx2_fma : mlx_lora_api_few_rows(-1))) {
        __atomic_add_fetch(&few_row_products, 1, __ATOMIC_RELAXED);
        few_rows(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
#endif
    if (order != ROW_MAJOR || m != 1 || n < 1 || k < 1) {
        blas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    __atomic_add_fetch(&vector_products, 1, __ATOMIC_RELAXED);
    /* c (1 x n) = alpha * a (1 x k) . op(b) (k x n) + beta * c: with op(b) = b, c = b^T a; with
     * op(b) = b^T (b stored n x k), c = b a. `a` is a row, or a column of a stored k x 1. */
    int inc_a = trans_a == NO_TRANS ? 1 : lda;
    if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)n); /* never read what was there */
    if (trans_b == NO_TRANS)
        blas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
    else
        blas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
}
