#!/usr/bin/env bash
# Compiles every CUDA translation unit (launcher + instantiations) with nvcc for sm_80 and sm_90a,
# and the C core as strict C11, without torch: a kernel that does not compile never lands.
# Used by .ci/run; needs nvcc on PATH (or CUDA_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

gcc -std=c11 -O3 -Wall -Wextra -Werror -c csrc/cpu/fdm_cpu.c -o "$out/fdm_cpu.o"
echo "C core: strict C11 ok"

compile() {  # $1 = source
    "$NVCC" -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -Werror all-warnings \
        -DFDM_WITH_SM90A -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
        -c "$1" -o "$out/$(basename "$1").o"
}
export -f compile
export NVCC out
ls csrc/kernels/*.cu csrc/kernels/instantiations/*.cu |
    xargs -P "$(nproc)" -I{} bash -c 'compile {} && echo "nvcc sm_80+sm_90a ok: {}"'
echo "all CUDA translation units compiled"
