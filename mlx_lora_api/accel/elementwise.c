/* Training's element-wise work with exp on every core (accel/kernels.py): the softmax over rows of
 * attention's probabilities and of the output layer's cross-entropy, and SwiGLU's sigmoid. numpy
 * took five or six single-threaded passes for each (mask, max, exp, sum, divide): at 4 x 512
 * tokens, most of a step's attention time in SmolLM2 (docs/benchmarks.md). Here a softmax row is
 * one read for its maximum and one for exp and sum, then one scaling; SwiGLU one pass; the work
 * split over OpenMP threads, and exp a polynomial the compiler vectorizes (AVX-512, AVX2 or SSE2:
 * the CPU picks the clone at load).
 *
 * exp: Cephes' expf (range reduction by ln 2 in two parts, a degree-5 polynomial) for the arguments
 * a softmax makes (x - max <= 0); below -87.3 (e^-87.3 = 1.2e-38) it is clamped, where the true
 * value is a denormal or 0 and counts for nothing in a sum. Sums are kept in double. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

static inline float exp_poly(float x) { /* x <= 0 */
    x = x < -87.3f ? -87.3f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rounded: 1.5 x 2^23 */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3333519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)n + 127) << 23};
    return y * scale.f;
}

/* One row: softmax over its first `seen` values, 0 after them; returns log(sum(exp(x))). */
CLONES static float softmax_row(float *row, long seen, long cols) {
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (long c = 0; c < seen; c++) top = row[c] > top ? row[c] : top;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (long c = 0; c < seen; c++) {
        const float e = exp_poly(row[c] - top);
        row[c] = e;
        sum += e;
    }
    const float inverse = (float)(1.0 / sum);
#pragma omp simd
    for (long c = 0; c < seen; c++) row[c] *= inverse;
    if (seen < cols) memset(row + seen, 0, (size_t)(cols - seen) * sizeof *row);
    return (float)log(sum) + top;
}

/* x: rows x cols, row-major. `length` 0: every row sees every column. `length` > 0: attention's
 * causal mask for queries of a `length`-token window ending at the last of the cols keys: row r is
 * query t = r % length, and sees keys 0 to t + cols - length. `lse`, where not NULL, gets each
 * row's log-sum-exp (the cross-entropy's), taken before the scaling. */
void mlx_lora_api_softmax(float *x, long rows, long cols, long length, float *lse) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        long seen = length > 0 ? r % length + cols - length + 1 : cols;
        seen = seen < 0 ? 0 : (seen > cols ? cols : seen);
        const float total = softmax_row(x + r * cols, seen, cols);
        if (lse) lse[r] = total;
    }
}

/* SwiGLU's silu(gate) * x, and sigmoid(gate) for its gradient, over n values. */
CLONES static void swiglu_run(const float *gate, const float *x, float *out, float *sigmoid, long n) {
#pragma omp simd
    for (long i = 0; i < n; i++) {
        const float g = gate[i];
        const float e = exp_poly(g < 0.0f ? g : -g); /* exp(-|g|) <= 1 */
        const float s = (g < 0.0f ? e : 1.0f) / (1.0f + e);
        sigmoid[i] = s;
        out[i] = g * s * x[i];
    }
}

/* gate and x: rows x cols with rows `gate_stride` and `x_stride` floats apart (the halves of a
 * stacked gate and up projection, say); out and sigmoid: rows x cols, contiguous. */
void mlx_lora_api_swiglu(const float *gate, long gate_stride, const float *x, long x_stride, float *out,
                         float *sigmoid, long rows, long cols) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++)
        swiglu_run(gate + r * gate_stride, x + r * x_stride, out + r * cols, sigmoid + r * cols, cols);
}
