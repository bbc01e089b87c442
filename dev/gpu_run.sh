#!/usr/bin/env bash
# One call on a GPU machine (the device tool's H100): clean build with all cores, the test suite
# on CUDA and CPU, compute-sanitizer memcheck on a small set of calls, the benchmark, and a short
# summary table last. Logs go to $OUT (default /tmp/fdm_out).
#
#   bash dev/gpu_run.sh            # everything
#   SKIP_BENCH=1 bash dev/gpu_run.sh
#   PYTEST_ARGS="-k cuda tests" SKIP_SANITIZER=1 FDM_ARCH_LIST=9.0a bash dev/gpu_run.sh
#   BENCH_SUITES="decode prefill" BENCH_ARGS="--quick --no-probe" bash dev/gpu_run.sh
#   NCU_CASES="decode-a decode-c" SKIP_BENCH=1 PYTEST_ARGS=--co bash dev/gpu_run.sh
#   NCU_SECTIONS="--section WarpStateStats --section SchedulerStats --section SourceCounters" \
#       NCU_CASES=decode-a SKIP_BENCH=1 PYTEST_ARGS=--co bash dev/gpu_run.sh   # stall reasons, top stall lines
#   NCU_SOURCE_CASES="decode-a prefill-b" SKIP_BENCH=1 SKIP_SANITIZER=1 PYTEST_ARGS=--co FDM_ARCH_LIST=9.0a \
#       bash dev/gpu_run.sh   # where each case's instructions and stalls go, block by block (ncu_blocks.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fdm_out}
mkdir -p "$OUT"
# The device image presets TORCH_CUDA_ARCH_LIST (9.0a) and a g++ wrapper (/opt/gcc) whose inline
# iostream code crashed against the loaded libstdc++ (a segfault in every error message): set both.
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${FDM_ARCH_LIST:-"8.0;9.0a"}
export CC=gcc CXX=g++ LDSHARED="g++ -shared"
summary=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"

# 1. Clean build (timed).
rm -rf build flash_dmattn/_C*.so
t0=$(date +%s)
if FLASH_DMATTN_BUILD=cuda python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    summary+=("build      ok in $(( $(date +%s) - t0 )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)")
else
    tail -40 "$OUT/build.log"
    echo "BUILD FAILED"
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. Tests (CUDA and CPU cases).
# PYTEST_ARGS is parsed like a shell line, so a -k expression can be quoted:
# PYTEST_ARGS='-q -k "cuda and warp_layouts" tests'
eval "python3 -m pytest -p no:cacheprovider ${PYTEST_ARGS:-tests}" >"$OUT/pytest.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
summary+=("pytest     $(grep -E '[0-9]+ (passed|failed)' "$OUT/pytest.log" | tail -1) (exit $rc)")

# 3. compute-sanitizer memcheck on a small set of calls (every layout, causal, edges).
if [ -z "${SKIP_SANITIZER:-}" ]; then
    compute-sanitizer --tool memcheck --error-exitcode 7 python3 dev/sanitize_cases.py >"$OUT/sanitizer.log" 2>&1
    src=$?
    summary+=("sanitizer  $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1) (exit $src)")
fi

# 4. Benchmark: each suite of BENCH_SUITES (default "all") with BENCH_ARGS, tables appended to bench.md.
if [ -z "${SKIP_BENCH:-}" ]; then
    for suite in ${BENCH_SUITES:-all}; do
        python3 benchmarks/bench_varlen.py --device cuda --suite "$suite" ${BENCH_ARGS:-} --markdown "$OUT/bench.md" \
            >>"$OUT/bench.log" 2>&1
        summary+=("benchmark  $suite: exit $? (table in bench.md)")
    done
    grep -E '^(\||\*\*)' "$OUT/bench.md" 2>/dev/null || tail -30 "$OUT/bench.log"
fi

# 5. Nsight Compute, at the clocks the GPU runs (--clock-control none), of every kernel of one
#    checked call per case of NCU_CASES (dev/profile_case.py; the reference's kernels are not ours,
#    so the name filter skips them).
if [ -n "${NCU_CASES:-}" ]; then
    for case in $NCU_CASES; do
        echo "### $case" >>"$OUT/ncu.txt"
        # shellcheck disable=SC2086  # NCU_SECTIONS is a list of words
        ncu --clock-control none ${NCU_SECTIONS:---section SpeedOfLight --section Occupancy --section LaunchStats} \
            -k 'regex:^(fwd_kernel|gather_keys_kernel|combine_kernel|tile_visibility_kernel)' --launch-count 3 \
            python3 dev/profile_case.py "$case" --calls 1 >>"$OUT/ncu.txt" 2>&1
        summary+=("ncu        $case: exit $?")
    done
    grep -E '^### |^  [^ ].*\(fdm_params|Duration|DRAM Throughput|Registers Per Thread|Achieved Occupancy|^ +Grid Size|Stall|Issued|Eligible' \
        "$OUT/ncu.txt" | cut -c1-110
fi

# 6. Source-level profiles of the forward, per case of NCU_SOURCE_CASES: the second call of the
#    case, its SASS source page as CSV summed by dev/ncu_blocks.py (where the instructions and the
#    stall samples go, block by block), the CSVs and details pages packed into $OUT/profiles.tgz
#    (`python3 dev/ncu_blocks.py p/sass-CASE.csv --show LINE` reads one block's lines later).
if [ -n "${NCU_SOURCE_CASES:-}" ]; then
    mkdir -p "$OUT/p"
    for case in $NCU_SOURCE_CASES; do
        ncu --section SourceCounters --section WarpStateStats --section LaunchStats --section Occupancy \
            -k regex:^fwd_kernel --launch-skip 1 --launch-count 1 -o "$OUT/p/rep-$case" \
            python3 dev/profile_case.py "$case" --calls 2 >"$OUT/p/ncu-$case.log" 2>&1
        summary+=("ncu source $case: exit $?")
        ncu -i "$OUT/p/rep-$case.ncu-rep" --page source --print-source sass --csv >"$OUT/p/sass-$case.csv" 2>/dev/null
        ncu -i "$OUT/p/rep-$case.ncu-rep" --page details >"$OUT/p/details-$case.txt" 2>/dev/null
        rm -f "$OUT/p/rep-$case.ncu-rep"
        echo "== $case"
        python3 dev/ncu_blocks.py "$OUT/p/sass-$case.csv" --min-share "${NCU_MIN_SHARE:-0.02}" | head -30
    done
    (cd "$OUT" && tar czf profiles.tgz p && rm -rf p)
fi

echo
echo "==== summary ($(head -1 "$OUT/gpu.txt"))"
printf '%s\n' "${summary[@]}"
