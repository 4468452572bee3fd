/* C = A x B with A float32 (M x K, row-major), B a frozen weight packed once in bfloat16, C
 * float32: AVX-512 BF16's VDPBF16PS (bfloat16 pairs, float32 accumulation), as oneDNN does for
 * PyTorch's bf16 autocast. Built by build.py when the project is set up (cc -O3 -mavx512f -mavx512vl -mavx512bf16 -fopenmp).
 *
 * Packed B: panels of 16 columns; in a panel, for each pair of rows k = 2p, 2p + 1, 16 lanes of
 * (B[2p][n], B[2p + 1][n]): 64 bytes, one register. K and N are padded with zeros to KP (even)
 * and NP (a multiple of 48). A is rounded to bfloat16 (to nearest even) into a scratch buffer of
 * MP x KP (MP: M padded to a multiple of 8), so a pair of A's values is one 32-bit broadcast.
 *
 * Blocking: 8 rows x 48 columns (24 accumulators), K in blocks of KC; threads split the
 * 48-column blocks. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "round.h"

#define MR 8
#define NR 48
#define KC 512

/* a: M x K float32 -> out: MP x KP bfloat16, zero-padded. Inside a parallel region. */
static void pack_a(const float *a, int m, int k, int mp, int kp, uint16_t *out) {
#pragma omp for schedule(static)
    for (int r = 0; r < mp; r++) {
        uint16_t *row = out + (size_t)r * kp;
        if (r >= m) {
            memset(row, 0, (size_t)kp * 2);
            continue;
        }
        const float *src = a + (size_t)r * k;
        int c = 0;
        for (; c + 16 <= k; c += 16) {
            __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + c));
            _mm256_storeu_si256((__m256i *)(row + c), (__m256i)h);
        }
        for (; c < k; c++) row[c] = round_bf16(src[c]);
        for (; c < kp; c++) row[c] = 0;
    }
}

/* c (M x N, row stride ldc) = a_packed (MP x KP) x b_packed (KP x NP). Inside a parallel region. */
static void gemm(const uint16_t *a, int m, int mp, int kp, const uint16_t *b, int n, int np, float *c, int ldc) {
    const int pairs = kp / 2;
    const int blocks = np / NR;
#pragma omp for schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        const int n0 = blk * NR;
        if (n0 >= n) continue;
        const uint16_t *panel0 = b + (size_t)(n0 / 16) * pairs * 32;
        for (int m0 = 0; m0 < mp; m0 += MR) {
            for (int p0 = 0; p0 < pairs; p0 += KC / 2) {
                const int p1 = p0 + KC / 2 < pairs ? p0 + KC / 2 : pairs;
                __m512 acc[MR][3];
                for (int r = 0; r < MR; r++)
                    for (int j = 0; j < 3; j++) acc[r][j] = _mm512_setzero_ps();
                const uint16_t *b0 = panel0 + (size_t)p0 * 32;
                const uint16_t *b1 = b0 + (size_t)pairs * 32;
                const uint16_t *b2 = b1 + (size_t)pairs * 32;
                const uint32_t *arow = (const uint32_t *)(a + (size_t)m0 * kp);
                for (int p = p0; p < p1; p++) {
                    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0);
                    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(b1);
                    const __m512bh v2 = (__m512bh)_mm512_loadu_si512(b2);
                    b0 += 32, b1 += 32, b2 += 32;
#pragma GCC unroll 8
                    for (int r = 0; r < MR; r++) {
                        const __m512bh x = (__m512bh)_mm512_set1_epi32((int)arow[(size_t)r * pairs + p]);
                        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, v0);
                        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, v1);
                        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, v2);
                    }
                }
                for (int r = 0; r < MR && m0 + r < m; r++) {
                    float *out = c + (size_t)(m0 + r) * ldc + n0;
                    for (int j = 0; j < 3; j++) {
                        const int left = n - n0 - 16 * j;
                        if (left <= 0) break;
                        const __mmask16 mask = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
                        __m512 sum = acc[r][j];
                        if (p0 > 0) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, out + 16 * j));
                        _mm512_mask_storeu_ps(out + 16 * j, mask, sum);
                    }
                }
            }
        }
    }
}

/* c (M x N) = round(a) (M x K float32) x b_packed; scratch holds MP x KP bfloat16. One parallel
 * region: the threads wake once a product (with OMP_WAIT_POLICY=PASSIVE each wake-up costs). */
void bf16_matmul(const float *a, int m, int k, int mp, int kp, uint16_t *scratch, const uint16_t *b, int n, int np,
                 float *c, int ldc) {
#pragma omp parallel
    {
        pack_a(a, m, k, mp, kp, scratch);
        /* the implicit barrier of pack_a's loop: every row is packed before any is read */
        gemm(scratch, m, mp, kp, b, n, np, c, ldc);
    }
}

/* out = B (K x N bfloat16 bits, element (k, n) at b[k * sk + n * sn]) packed as gemm reads it
 * (see the top): NP / 16 panels of KP / 2 row pairs of 16 lanes of 2, zero-padded. The same
 * bits give W.T (sk 1, sn = W's row length) and W (sk = its row length, sn 1). Panels are
 * split between the threads. */
void bf16_pack(const uint16_t *b, long sk, long sn, int k, int n, int kp, int np, uint16_t *out) {
    const int pairs = kp / 2;
#pragma omp parallel for schedule(static)
    for (int panel = 0; panel < np / 16; panel++) {
        uint16_t *dst = out + (size_t)panel * pairs * 32;
        for (int p = 0; p < pairs; p++, dst += 32) {
            for (int lane = 0; lane < 16; lane++) {
                const int col = panel * 16 + lane;
                for (int j = 0; j < 2; j++) {
                    const int row = 2 * p + j;
                    dst[lane * 2 + j] = row < k && col < n ? b[row * sk + col * sn] : 0;
                }
            }
        }
    }
}
