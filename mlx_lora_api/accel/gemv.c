/* MLX's CPU backend multiplies float32 matrices with cblas_sgemm, a vector by a matrix too: one
 * token's decode step is a 1 x K row through every weight. OpenBLAS 0.3.21 (Debian 12) packs the
 * whole weight for such a product, then runs its gemm kernel on one row: 3-5x slower than its
 * sgemv, which streams the weight once (OpenBLAS forwards these to gemv itself only from 0.3.27,
 * and not on every CPU). This library exports `cblas_sgemm` ahead of OpenBLAS (accel/blas.py
 * loads it first): a product with one row goes to the BLAS's sgemv, any other to its sgemm.
 * Row-major only, as MLX calls it; anything else passes through unchanged. */
#include <stddef.h>
#include <string.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static long vector_products;

void mlx_lora_api_gemv_use(sgemm_fn sgemm, sgemv_fn sgemv) {
    blas_sgemm = sgemm;
    blas_sgemv = sgemv;
}

/* How many products went to sgemv (the tests check that decoding does). */
long mlx_lora_api_gemv_count(void) { return __atomic_load_n(&vector_products, __ATOMIC_RELAXED); }

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
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
