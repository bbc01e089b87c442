// divisor.h: n / d and n % d by a divisor fixed for a whole launch, in a multiply-high, an add and
// a shift instead of the ~20-instruction integer division (Granlund and Montgomery, "Division by
// invariant integers using multiplication", 1994). The forward maps a packed row R of a block to
// its query R / P and head R % P (launch_plan.h, packed GQA) in the Q copy, the row facts, the
// query-mask copies and the output, and blockIdx.x to its (split, head block, sequence, row
// block): at prefill-d's ~5 tiles per CTA the Q copy alone, eight divisions a thread, took 9% of
// the kernel's stall samples (docs/notes.md, version 33).
//
// For 1 <= d < 2^31 let l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1 (it fits 32 bits).
// Then for 0 <= n < 2^31:  n / d = (umulhi(n, m) + n) >> l,  where umulhi(n, m) = (n m) >> 32.
#pragma once

#include <stdint.h>

#include "../fdm_params.h"

namespace fdm {

struct Divisor {
    int d;         // the divisor, >= 1
    uint32_t mul;  // m
    int shift;     // l
};

inline Divisor make_divisor(int d) {
    Divisor x;
    x.d = d < 1 ? 1 : d;
    x.shift = 0;
    while ((int64_t{1} << x.shift) < x.d) ++x.shift;
    x.mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << x.shift) - x.d)) / x.d + 1);
    return x;
}

// n / x.d for 0 <= n < 2^31.
FDM_HOST_DEVICE int divide(const Divisor &x, int n) {
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(static_cast<uint32_t>(n), x.mul);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * x.mul) >> 32);
#endif
    return static_cast<int>((hi + static_cast<uint32_t>(n)) >> x.shift);
}

// n / x.d and n % x.d for 0 <= n < 2^31.
struct QuotRem {
    int quot, rem;
};
FDM_HOST_DEVICE QuotRem divmod(const Divisor &x, int n) {
    const int q = divide(x, n);
    return {q, n - q * x.d};
}

}  // namespace fdm
