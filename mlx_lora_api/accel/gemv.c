/* MLX's CPU backend multiplies float32 matrices with cblas_sgemm, a vector by a matrix too: one
 * token's decode step is a 1 x K row through every weight. OpenBLAS 0.3.21 (Debian 12) packs the
 * whole weight for such a product, then runs its gemm kernel on one row: 3-5x slower than its
 * sgemv, which streams the weight once (OpenBLAS forwards these to gemv itself only from 0.3.27,
 * and not on every CPU). A batch of concurrent chats decodes a few rows at a time, and there too
 * packing the weight costs more than the product (0.4 ms for 1 to 16 rows through SmolLM2's
 * 1536 x 576 MLP weight, on 2 Zen 4 cores).
 *
 * This library exports `cblas_sgemm` ahead of OpenBLAS (accel/blas.py loads it first): 1 to 8 rows
 * through a weight stored as MLX's Linear layers store it (x @ W.T), on a CPU with AVX2 and FMA, go
 * to the few-rows kernels below, which stream the weight once and multiply each of its rows with
 * every input row while it is in L1 (all 8 rows at once with AVX-512VL, 4 at a time without); a small row by a matrix (attention's weights by its values) to
 * `one_row_by_rows`, on the calling thread; other one-row products to the BLAS's sgemv; any other
 * product to the BLAS's sgemm. Row-major only, as MLX calls it. Decoding then never wakes the BLAS's
 * threads, which spin for a while after each call: on 2 cores, beside the kernels' own threads and
 * the Python thread, one stream of SmolLM2 through the service fell to 4-42 tokens/s, erratic.
 *
 * Half-precision shadows. A model stored in float16 or bfloat16 (most are) computes in float32 on
 * the CPU, so every token reads twice the bytes the file holds. The decoding step registers, for
 * each of its float32 weights whose every value is exactly a float16 (or a bfloat16), a copy in
 * that type (`mlx_lora_api_shadow_add`); a product of 1 to 8 rows through such a weight then reads
 * the copy, widens each value to float32 in registers (F16C's vcvtph2ps, or a 16-bit shift) and
 * multiplies in float32 as before: the same values, half the memory traffic. Only the order of the
 * sums differs from the BLAS's.
 *
 * bfloat16 routes (training with cpu_bfloat16; accel/bf16/matmul.py). The gradient with respect to
 * a layer's input, through a frozen weight W of the blocks that train, is MLX's float32 product
 * d @ W (many rows, W not transposed), in the middle of MLX's backward pass, where Python cannot run
 * it. Such a weight is registered with W packed in bfloat16 and the bf16 kernel's entry point
 * (`mlx_lora_api_route_add`); that product then goes to the kernel, as PyTorch's autocast runs the
 * backward pass's matmuls in bfloat16. */
#include <omp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static long vector_products;
static long few_row_products;
static long shadow_products;
static int have_avx2_fma = -1;
static int have_f16c = -1;
static int have_avx512vl = -1;

enum { FEW_ROWS = 8, LANES = 8, BLOCK = 4, WIDE_BLOCK = 8, COLUMNS = 3 };
enum { THREADED = 1 << 16 };
enum { FLOAT32 = 0, FLOAT16 = 1, BFLOAT16 = 2 }; /* how a weight is stored: `kind` below */

/* A float32 weight (rows x cols, row-major, as a Linear layer holds it) and its exact copy in half
 * precision. Read under the lock for the whole product, so that removing one (the model unloaded)
 * waits for a product reading it to end before Python frees the copy. */
typedef struct {
    const float *weight;
    const uint16_t *half;
    long rows, cols;
    int kind;
} shadow_t;

enum { SHADOWS = 4096 };
static shadow_t shadows[SHADOWS];
static int shadow_count;
static pthread_rwlock_t shadow_lock = PTHREAD_RWLOCK_INITIALIZER;

int mlx_lora_api_few_rows(int enable);

/* accel/bf16/gemm.c's bf16_matmul: c (m x n) = round(a) (m x k float32) x packed b. */
typedef void (*bf16_matmul_fn)(const float *, int, int, int, int, uint16_t *, const uint16_t *, int, int, float *,
                               int);

/* A float32 weight W (rows x cols, row-major) and W packed in bfloat16 for `fn` (K = rows padded to
 * kp, N = cols padded to np). Read under its lock for the whole product, as the shadows are. */
typedef struct {
    const float *weight;
    const uint16_t *packed;
    long rows, cols;
    int kp, np;
    bf16_matmul_fn fn;
} route_t;

enum { ROUTES = 1024 };
static route_t routes[ROUTES];
static int route_count;
static long routed_products;
static pthread_rwlock_t route_lock = PTHREAD_RWLOCK_INITIALIZER;

#if defined(__x86_64__)
#include <immintrin.h>

/* How many threads a product of m rows through an n x k weight takes: the calling thread alone below
 * 65,536 weight values (attention's products of one query by a few hundred keys), where waking
 * another costs more than it saves; one row, every core but one, left to the Python thread that
 * builds the next decoding step (on 2 cores the kernel's two threads, one of them MLX's stream
 * thread, the other spinning between products, and that Python thread were three busy threads on
 * two cores: the stream thread waited for a core 28% of the time, and one stream of SmolLM2 decoded
 * ~43 tokens/s against ~49 with its products on one thread); a batch of rows, every core (8 rows
 * were no faster on one). Which thread computes an output changes nothing in it. */
static int threads_for(int m, int n, int k) {
    if ((long)n * k < THREADED) return 1;
    const int most = omp_get_max_threads();
    return m == 1 && most > 1 ? most - 1 : most;
}
int mlx_lora_api_threads(int m, int n, int k) { return threads_for(m, n, k); } /* for the tests */

/* Eight weight values from `w` (of `kind`) at element `at`, as float32. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256 load8(const int kind, const void *w,
                                                                                   size_t at) {
    if (kind == FLOAT16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + at)));
    if (kind == BFLOAT16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + at))), 16));
    return _mm256_loadu_ps((const float *)w + at);
}

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline float load1(const int kind, const void *w,
                                                                                  size_t at) {
    if (kind == FLOAT16) return _cvtsh_ss(((const uint16_t *)w)[at]);
    if (kind == BFLOAT16) {
        uint32_t bits = (uint32_t)((const uint16_t *)w)[at] << 16;
        float value;
        memcpy(&value, &bits, sizeof value);
        return value;
    }
    return ((const float *)w)[at];
}

static inline size_t element_size(int kind) { return kind == FLOAT32 ? sizeof(float) : sizeof(uint16_t); }

__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* Rows i0.. i0+ROWS-1 of c, columns j.. j+COLS-1: every weight value loaded once serves ROWS input
 * rows, every input value COLS weight rows (up to 4 x 3 = 12 accumulators, 3 weight vectors and an
 * input vector: the 16 AVX registers; with AVX-512VL's 32, up to 8 x 3). ROWS and COLS are constants where it is inlined, so the
 * accumulators stay in registers. The weight rows two tiles on are prefetched as this one streams
 * its own: with the arithmetic in between, the core's own prefetching fetches about half of what
 * the memory can give (8 rows of SmolLM2's output layer: 34 -> 78 GFLOP/s on 2 Zen 4 cores). Into
 * L2, not L1 (hint T1): L1's few miss buffers held the streams back (all of SmolLM2's blocks'
 * weights, 8 rows: 28.5 -> 17.1 ms; one row from float16 copies: 12.8 -> 8.7 ms; Zen 4). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void tile(
    const int ROWS, const int COLS, const int kind, int k, float alpha, const float *a, int lda, const void *w,
    int ldw, const void *next, float beta, float *c, int ldc) {
    int full = k - k % LANES;
    const size_t size = element_size(kind);
    __m256 acc[WIDE_BLOCK][COLUMNS];
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; i++)
#pragma GCC unroll 3
        for (int j = 0; j < COLS; j++) acc[i][j] = _mm256_setzero_ps();
    for (int p = 0; p < full; p += LANES) {
        /* one prefetch a cache line of each next row: every 16 float32 values, or 32 halves */
        if (next && !(p & (size == 4 ? 15 : 31))) {
#pragma GCC unroll 3
            for (int j = 0; j < COLUMNS; j++)
                _mm_prefetch((const char *)next + ((size_t)j * ldw + p) * size, _MM_HINT_T1);
        }
        __m256 weights[COLUMNS];
#pragma GCC unroll 3
        for (int j = 0; j < COLS; j++) weights[j] = load8(kind, w, (size_t)j * ldw + p);
#pragma GCC unroll 8
        for (int i = 0; i < ROWS; i++) {
            __m256 in = _mm256_loadu_ps(a + (size_t)i * lda + p);
#pragma GCC unroll 3
            for (int j = 0; j < COLS; j++) acc[i][j] = _mm256_fmadd_ps(weights[j], in, acc[i][j]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; i++) {
        const float *in = a + (size_t)i * lda;
#pragma GCC unroll 3
        for (int j = 0; j < COLS; j++) {
            float sum = hsum(acc[i][j]);
            for (int p = full; p < k; p++) sum = __builtin_fmaf(load1(kind, w, (size_t)j * ldw + p), in[p], sum);
            float *out = c + (size_t)i * ldc + j;
            *out = beta == 0.0f ? alpha * sum : alpha * sum + beta * *out;
        }
    }
}

#define TILE(R, C) tile(R, C, kind, k, alpha, in, lda, w0, ldw, next, beta, c + (size_t)i0 * ldc + j, ldc)
#define ROWS_OF(R)                   \
    case R:                          \
        if (cols == 3) TILE(R, 3);   \
        else if (cols == 2) TILE(R, 2); \
        else TILE(R, 1);             \
        break;

/* c[i][j] = alpha * sum_k a[i][k] * w[j][k] + beta * c[i][j], for i < m (1..FEW_ROWS), j < n, `w` stored
 * as KIND: groups of three weight rows shared out between threads, each read once; the input rows stay
 * in L1/L2, in tiles of RB rows (4 with AVX2's 16 registers; 8 with AVX-512VL's 32, so that a batch of 8
 * widens each half-precision value once, not twice, and its products run while the weight streams in).
 * Every output sums the same products in the same order whatever the tile: the results are the same. */
#define CASES_4 ROWS_OF(1) ROWS_OF(2) ROWS_OF(3) ROWS_OF(4)
#define CASES_8 CASES_4 ROWS_OF(5) ROWS_OF(6) ROWS_OF(7) ROWS_OF(8)
#define FEW_ROWS_OF(NAME, KIND, TARGET, RB)                                                                       \
    __attribute__((target(TARGET))) static void NAME(int m, int n, int k, float alpha, const float *a, int lda,   \
                                                     const void *w, int ldw, float beta, float *c, int ldc) {     \
        int groups = (n + COLUMNS - 1) / COLUMNS;                                                                 \
        int threads = threads_for(m, n, k);                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1)")                        \
        for (int g = 0; g < groups; g++) {                                                                        \
            const int kind = KIND; /* a constant where the tiles are inlined */                                  \
            const size_t size = element_size(kind);                                                               \
            int j = g * COLUMNS;                                                                                  \
            int cols = n - j < COLUMNS ? n - j : COLUMNS;                                                         \
            const char *w0 = (const char *)w + (size_t)j * ldw * size;                                            \
            for (int i0 = 0; i0 < m; i0 += RB) {                                                                  \
                const float *in = a + (size_t)i0 * lda;                                                           \
                /* the group after next's rows, while this group's first tile streams from memory */              \
                const char *next = i0 == 0 && j + 3 * COLUMNS <= n ? w0 + (size_t)2 * COLUMNS * ldw * size : 0;      \
                switch (m - i0 < RB ? m - i0 : RB) { CASES_##RB }                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }

#define AVX2 "avx2,fma,f16c"
#define AVX512 "avx512f,avx512vl,avx2,fma,f16c"
FEW_ROWS_OF(few_rows_4, FLOAT32, AVX2, 4)
FEW_ROWS_OF(few_rows_float16_4, FLOAT16, AVX2, 4)
FEW_ROWS_OF(few_rows_bfloat16_4, BFLOAT16, AVX2, 4)
FEW_ROWS_OF(few_rows_8, FLOAT32, AVX512, 8)
FEW_ROWS_OF(few_rows_float16_8, FLOAT16, AVX512, 8)
FEW_ROWS_OF(few_rows_bfloat16_8, BFLOAT16, AVX512, 8)

int mlx_lora_api_wide_tiles(int enable);

typedef void (*few_rows_fn)(int, int, int, float, const float *, int, const void *, int, float, float *, int);

/* The few-rows kernel for weights stored as `kind`, in this CPU's widest tiles. */
static few_rows_fn few_rows_for(int kind) {
    const int wide = have_avx512vl >= 0 ? have_avx512vl : mlx_lora_api_wide_tiles(-1);
    if (kind == FLOAT16) return wide ? few_rows_float16_8 : few_rows_float16_4;
    if (kind == BFLOAT16) return wide ? few_rows_bfloat16_8 : few_rows_bfloat16_4;
    return wide ? few_rows_8 : few_rows_4;
}

/* c (1 x n) = alpha * a (1 x k) . b (k x n, row-major) + beta * c on the calling thread: attention's
 * weights by its values, one query at a time (k keys, n = a head's width). Each of b's rows is added
 * in turn, scaled by its weight, so that every output sums over the keys in order. Small enough that
 * OpenBLAS's threads, which its sgemv wakes for it, would then spin where the few-rows kernel's
 * threads need the cores. */
__attribute__((target("avx2,fma"))) static void one_row_by_rows(int n, int k, float alpha, const float *a, int inc_a,
                                                                const float *b, int ldb, float beta, float *c) {
    enum { WIDE = 64 };
    for (int j0 = 0; j0 < n; j0 += WIDE) {
        int width = n - j0 < WIDE ? n - j0 : WIDE;
        float sum[WIDE] = {0};
        for (int p = 0; p < k; p++) {
            const float weight = a[(size_t)p * inc_a];
            const float *row = b + (size_t)p * ldb + j0;
            for (int j = 0; j < width; j++) sum[j] = __builtin_fmaf(weight, row[j], sum[j]);
        }
        for (int j = 0; j < width; j++)
            c[j0 + j] = beta == 0.0f ? alpha * sum[j] : alpha * sum[j] + beta * c[j0 + j];
    }
}

/* The shadow of the weight `b` points into (a registered float32 weight, read as x @ W.T with its
 * own row length), with the half copy's pointer at the same element; takes the read lock, which the
 * caller releases after the product. NULL (and no lock held) where there is none. */
__attribute__((target("avx2,fma,f16c"))) static const shadow_t *shadow_of(const float *b, int ldb, int n, int k, const uint16_t **half) {
    pthread_rwlock_rdlock(&shadow_lock);
    int count = __atomic_load_n(&shadow_count, __ATOMIC_ACQUIRE);
    for (int i = 0; i < count; i++) {
        const shadow_t *s = &shadows[i];
        if (!s->weight || b < s->weight || b >= s->weight + s->rows * s->cols || ldb != s->cols) continue;
        size_t at = (size_t)(b - s->weight);
        if ((long)(at % s->cols) + k > s->cols || (long)(at / s->cols) + n > s->rows) continue;
        /* the copy is of these values: a spot check against a weight freed and its memory reused */
        if (load1(s->kind, s->half, at) != b[0] || load1(s->kind, s->half, at + (size_t)k - 1) != b[k - 1]) continue;
        *half = s->half + at;
        return s;
    }
    pthread_rwlock_unlock(&shadow_lock);
    return 0;
}
#endif

/* Whether the few-rows kernels take 8 rows a tile here (AVX-512VL); set to 0 by the tests, to compare. */
int mlx_lora_api_wide_tiles(int enable) {
#if defined(__x86_64__)
    if (enable >= 0 || have_avx512vl < 0)
        have_avx512vl = enable != 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
#else
    (void)enable;
    have_avx512vl = 0;
#endif
    return have_avx512vl;
}

/* The route of a product a (m x k, rows of k) @ b (k x n, rows of ldb) through a registered weight
 * itself (not a view into it); takes the read lock, which the caller releases after the product.
 * NULL (and no lock held) where there is none. */
static const route_t *route_of(const float *b, int ldb, int n, int k) {
    pthread_rwlock_rdlock(&route_lock);
    int count = __atomic_load_n(&route_count, __ATOMIC_ACQUIRE);
    for (int i = 0; i < count; i++) {
        const route_t *r = &routes[i];
        if (r->weight == b && r->rows == k && r->cols == n && ldb == n) return r;
    }
    pthread_rwlock_unlock(&route_lock);
    return 0;
}

/* Send products d @ W through `weight` (rows x cols float32, row-major) to `fn` with `packed`, W
 * packed for it; returns 1, or 0 where the table is full. The caller keeps both alive until
 * `mlx_lora_api_route_remove`. */
int mlx_lora_api_route_add(const float *weight, long rows, long cols, const uint16_t *packed, int kp, int np,
                           bf16_matmul_fn fn) {
    int added = 0;
    pthread_rwlock_wrlock(&route_lock);
    for (int i = 0; i < ROUTES && !added; i++) {
        if (routes[i].weight) continue;
        routes[i] = (route_t){weight, packed, rows, cols, kp, np, fn};
        if (i >= route_count) __atomic_store_n(&route_count, i + 1, __ATOMIC_RELEASE);
        added = 1;
    }
    pthread_rwlock_unlock(&route_lock);
    return added;
}

/* Forget the route of `weight`; returns once no product takes it. */
void mlx_lora_api_route_remove(const float *weight) {
    pthread_rwlock_wrlock(&route_lock);
    for (int i = 0; i < route_count; i++)
        if (routes[i].weight == weight) routes[i].weight = 0;
    pthread_rwlock_unlock(&route_lock);
}

long mlx_lora_api_routed_count(void) { return __atomic_load_n(&routed_products, __ATOMIC_RELAXED); }

int mlx_lora_api_routes_held(void) {
    int held = 0;
    pthread_rwlock_rdlock(&route_lock);
    for (int i = 0; i < route_count; i++) held += routes[i].weight != 0;
    pthread_rwlock_unlock(&route_lock);
    return held;
}

void mlx_lora_api_gemv_use(sgemm_fn sgemm, sgemv_fn sgemv) {
    blas_sgemm = sgemm;
    blas_sgemv = sgemv;
}

/* How many one-row products the shim took (to sgemv or its own kernels), and how many products went to
 * the few-rows kernels (the tests check that decoding does). */
long mlx_lora_api_gemv_count(void) { return __atomic_load_n(&vector_products, __ATOMIC_RELAXED); }
long mlx_lora_api_few_rows_count(void) { return __atomic_load_n(&few_row_products, __ATOMIC_RELAXED); }
long mlx_lora_api_shadow_count(void) { return __atomic_load_n(&shadow_products, __ATOMIC_RELAXED); }

/* How many weights have a registered copy now (the tests check that an unloaded model leaves none). */
int mlx_lora_api_shadows_held(void) {
    int held = 0;
    pthread_rwlock_rdlock(&shadow_lock);
    for (int i = 0; i < shadow_count; i++) held += shadows[i].weight != 0;
    pthread_rwlock_unlock(&shadow_lock);
    return held;
}

/* Register `half`, an exact copy of the float32 weight at `weight` (rows x cols, row-major) stored as
 * `kind`; returns 1, or 0 where this CPU cannot read it (no AVX2, FMA and F16C) or the table is full.
 * The caller keeps both alive until `mlx_lora_api_shadow_remove`. */
int mlx_lora_api_shadow_add(const float *weight, const uint16_t *half, long rows, long cols, int kind) {
    if (kind != FLOAT16 && kind != BFLOAT16) return 0;
#if defined(__x86_64__)
    if (have_f16c < 0) have_f16c = __builtin_cpu_supports("f16c");
    if (!have_f16c || !mlx_lora_api_few_rows(-1)) return 0;
    int added = 0;
    pthread_rwlock_wrlock(&shadow_lock);
    for (int i = 0; i < SHADOWS && !added; i++) {
        if (shadows[i].weight) continue;
        shadows[i] = (shadow_t){weight, half, rows, cols, kind};
        if (i >= shadow_count) __atomic_store_n(&shadow_count, i + 1, __ATOMIC_RELEASE);
        added = 1;
    }
    pthread_rwlock_unlock(&shadow_lock);
    return added;
#else
    (void)weight, (void)half, (void)rows, (void)cols;
    return 0;
#endif
}

/* Forget the shadow of `weight`; returns once no product reads it. */
void mlx_lora_api_shadow_remove(const float *weight) {
    pthread_rwlock_wrlock(&shadow_lock);
    for (int i = 0; i < shadow_count; i++)
        if (shadows[i].weight == weight) shadows[i].weight = 0;
    pthread_rwlock_unlock(&shadow_lock);
}

/* Whether the few-rows kernels run here (AVX2 and FMA); set to 0 by the tests to compare with sgemm. */
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
    if (order == ROW_MAJOR && m == 1 && n > 0 && k > 0) __atomic_add_fetch(&vector_products, 1, __ATOMIC_RELAXED);
    if (order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == NO_TRANS && m > FEW_ROWS && n > 0 && k > 0 &&
        lda == k && alpha == 1.0f && beta == 0.0f && __atomic_load_n(&route_count, __ATOMIC_RELAXED)) {
        const route_t *route = route_of(b, ldb, n, k);
        if (route) {
            const int mp = (m + 7) / 8 * 8;
            uint16_t *scratch = malloc((size_t)mp * route->kp * sizeof(uint16_t));
            if (scratch) {
                __atomic_add_fetch(&routed_products, 1, __ATOMIC_RELAXED);
                route->fn(a, m, k, mp, route->kp, scratch, route->packed, n, route->np, c, ldc);
                free(scratch);
                pthread_rwlock_unlock(&route_lock);
                return;
            }
            pthread_rwlock_unlock(&route_lock);
        }
    }
#if defined(__x86_64__)
    if (order == ROW_MAJOR && m >= 1 && m <= FEW_ROWS && trans_a == NO_TRANS && trans_b == TRANS && n > 0 && k > 0 &&
        (have_avx2_fma >= 0 ? have_avx2_fma : mlx_lora_api_few_rows(-1))) {
        const uint16_t *half;
        const shadow_t *shadow = __atomic_load_n(&shadow_count, __ATOMIC_RELAXED) ? shadow_of(b, ldb, n, k, &half) : 0;
        if (shadow) {
            __atomic_add_fetch(&shadow_products, 1, __ATOMIC_RELAXED);
            few_rows_for(shadow->kind)(m, n, k, alpha, a, lda, half, ldb, beta, c, ldc);
            pthread_rwlock_unlock(&shadow_lock);
            return;
        }
        /* one row too: with its prefetching, faster than OpenBLAS's sgemv (docs/benchmarks.md) */
        __atomic_add_fetch(&few_row_products, 1, __ATOMIC_RELAXED);
        few_rows_for(FLOAT32)(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    if (order == ROW_MAJOR && m == 1 && trans_b == NO_TRANS && n > 0 && k > 0 && (long)n * k < THREADED &&
        (have_avx2_fma >= 0 ? have_avx2_fma : mlx_lora_api_few_rows(-1))) {
        one_row_by_rows(n, k, alpha, a, trans_a == NO_TRANS ? 1 : lda, b, ldb, beta, c);
        return;
    }
#endif
    if (order != ROW_MAJOR || m != 1 || n < 1 || k < 1) {
        blas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    /* c (1 x n) = alpha * a (1 x k) . op(b) (k x n) + beta * c: with op(b) = b, c = b^T a; with
     * op(b) = b^T (b stored n x k), c = b a. `a` is a row, or a column of a stored k x 1. */
    int inc_a = trans_a == NO_TRANS ? 1 : lda;
    if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)n); /* never read what was there */
    if (trans_b == NO_TRANS)
        blas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
    else
        blas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
}
