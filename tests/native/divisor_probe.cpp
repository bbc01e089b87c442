// Prints n / d and n % d by fdm::Divisor (csrc/kernels/divisor.h, host path) for "d n" pairs read
// from stdin, one "q r" line each. Used by test_launch_plan.py (test_divisor).
#include <cstdio>

#include "../../csrc/kernels/divisor.h"

int main() {
    long long d, n;
    while (std::scanf("%lld %lld", &d, &n) == 2) {
        const fdm::Divisor x = fdm::make_divisor(static_cast<int>(d));
        const fdm::QuotRem qr = fdm::divmod(x, static_cast<int>(n));
        std::printf("%d %d\n", qr.quot, qr.rem);
    }
    return 0;
}
