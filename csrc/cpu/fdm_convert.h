/*
 * fdm_convert.h: float16 / bfloat16 <-> float32 by bit manipulation (no _Float16, no F16C),
 * for the CPU kernel. Every function is branch-free straight-line integer and float arithmetic,
 * so GCC vectorizes loops that call them.
 *
 * Plain C11, also valid C++17. Bits move between float and uint32_t through memcpy (the one
 * type-punning idiom both languages define); compilers turn it into a register move.
 *
 * Rounding float32 -> float16 / bfloat16 is IEEE round-to-nearest-even, including overflow to
 * infinity, gradual underflow to subnormals, signed zeros, and NaN (which stays a quiet NaN).
 * This relies on IEEE float32 arithmetic: build without -ffast-math / flush-to-zero.
 */
#ifndef FDM_CONVERT_H
#define FDM_CONVERT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float fdm_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t fdm_f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/*
 * float16 (1 sign, 5 exponent, 10 mantissa bits) -> float32, exact.
 * Normal numbers, inf and NaN: move exponent and mantissa into the float32 fields (an exponent
 * bias of 15 becomes 127 + 112, undone by the multiply by 2^-112; exponent 31 lands on 255, so
 * inf and NaN survive). Subnormals (exponent 0): place the mantissa m under the exponent of 0.5,
 * giving 0.5 + m * 2^-24 exactly, and subtract 0.5.
 */
static inline float fdm_f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w; /* exponent and mantissa, sign shifted out */
    const float normal =
        fdm_f32_from_bits((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    const float subnormal = fdm_f32_from_bits((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    /* Select by an all-ones / all-zeros mask, not ?:, so the compiler keeps it branch-free. */
    const uint32_t is_subnormal = (uint32_t)0 - (uint32_t)(two_w < (UINT32_C(1) << 27));
    const uint32_t magnitude = (fdm_f32_to_bits(subnormal) & is_subnormal)
                             | (fdm_f32_to_bits(normal) & ~is_subnormal);
    return fdm_f32_from_bits(sign | magnitude);
}

/*
 * float32 -> float16, round to nearest even.
 * base = 4|f|, or inf when |f| is far past float16's range (|f| * 2^112 overflows first).
 * Adding a power of two placed 13 binades above base's leading bit (at least at float16's
 * smallest normal exponent, so subnormal results are handled too) leaves exactly float16's
 * 10 mantissa bits of base in the float32 sum, so the hardware adder does the rounding, ties to
 * even. The sum's exponent and top mantissa bits then are float16's fields; a carry out of the
 * mantissa correctly bumps the exponent, up to inf (0x7C00). NaN maps to the quiet NaN 0x7E00.
 */
static inline uint16_t fdm_f32_to_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = fdm_f32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t f_exp = shl1_w & UINT32_C(0xFF000000);
    const uint32_t bias = f_exp > UINT32_C(0x71000000) ? f_exp : UINT32_C(0x71000000);
    base = fdm_f32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = fdm_f32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
    const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
    const uint32_t nonsign = exp_bits + mantissa_bits;
    const uint32_t is_nan = (uint32_t)0 - (uint32_t)(shl1_w > UINT32_C(0xFF000000));
    return (uint16_t)((sign >> 16) | (UINT32_C(0x7E00) & is_nan) | (nonsign & ~is_nan));
}

/* bfloat16 is the top half of a float32: widening is a shift, exact. */
static inline float fdm_bf16_to_f32(uint16_t h) {
    return fdm_f32_from_bits((uint32_t)h << 16);
}

/*
 * float32 -> bfloat16, round to nearest even: add 0x7FFF plus the lowest kept bit, so a tie
 * rounds up only when that makes the kept half even; the carry may run into the exponent, which
 * is the correct rounding (up to inf on overflow). NaN is kept quiet (top mantissa bit set).
 */
static inline uint16_t fdm_f32_to_bf16(float f) {
    const uint32_t u = fdm_f32_to_bits(f);
    const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | UINT32_C(0x0040);
    return (uint16_t)((u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000) ? quiet_nan : rounded);
}

#endif /* FDM_CONVERT_H */
