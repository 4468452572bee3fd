/* float32 to bfloat16, rounded to nearest even, as VCVTNEPS2BF16 and MLX round; a NaN stays a
 * (quiet) NaN, where adding the rounding bias would carry it into infinity or flip its sign.
 * A header of its own so that a test can compile it without AVX-512. */
#ifndef MLX_LORA_API_ROUND_H
#define MLX_LORA_API_ROUND_H

#include <stdint.h>
#include <string.h>

static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x0040); /* NaN stays a (quiet) NaN */
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#endif
