#!/usr/bin/env bash
# One device call that times a ladder of kernel versions on one GPU, so that each change's gain is
# measured against its base on the same machine (docs/notes.md: predict, then measure).
#
# The working tree is the last version; AB_PATCHES lists the patches that lead to it, oldest
# first (each one relative to the version before it). The script reverses them all to get the
# base, builds and times it, then applies them one at a time, building and timing each version.
# Every case is checked against the float64 reference before it is timed (bench_varlen.py), and
# the tree is left as it was found. Correctness of the last version: dev/gpu_run.sh.
#
#   git diff main > .ab/1-staging.patch          # e.g., then edit, then
#   git diff > .ab/2-next.patch ...
#   AB_PATCHES=".ab/1-staging.patch .ab/2-next.patch" bash dev/gpu_ab.sh
#   AB_SUITES="prefill" AB_ONLY="prefill-(a|b)" AB_PATCHES=... bash dev/gpu_ab.sh
#   AB_DRY_RUN=1 AB_PATCHES=... bash dev/gpu_ab.sh   # here, before a device call: do the patches
#                                                    # reverse and re-apply cleanly?
#   AB_BENCH_ARGS=--no-check AB_PATCHES=... bash dev/gpu_ab.sh   # variants that compute a wrong
#                                                    # output on purpose (a stage left out, to time the rest)
#   AB_BENCH_TIMEOUT=120 ...                         # seconds per version and suite (default 240): a
#                                                    # version that hangs (a barrier that never completes)
#                                                    # loses its row, not the whole device call
#
# Prints, last, one row per case: the median ms of every version and each one's ratio to the base.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fdm_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${FDM_ARCH_LIST:-"9.0a"}
export CC=gcc CXX=g++ LDSHARED="g++ -shared"  # as dev/gpu_run.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
read -r -a patches <<<"${AB_PATCHES:?AB_PATCHES: the patches from the base to the working tree, oldest first}"

[ -n "${AB_DRY_RUN:-}" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

for ((i = ${#patches[@]} - 1; i >= 0; --i)); do
    patch -R -p1 --quiet <"${patches[i]}" || { echo "cannot reverse ${patches[i]}"; exit 1; }
done

status=0
run_version() {  # $1 = label
    if [ -n "${AB_DRY_RUN:-}" ]; then
        echo "version $1: $(git diff --stat 2>/dev/null | tail -1)"
        return
    fi
    rm -rf build flash_dmattn/_C*.so
    if ! FLASH_DMATTN_BUILD=cuda python3 setup.py build_ext --inplace >"$OUT/build-$1.log" 2>&1; then
        tail -30 "$OUT/build-$1.log"
        echo "BUILD FAILED: $1"
        status=1
        return
    fi
    for suite in ${AB_SUITES:-prefill decode}; do
        timeout "${AB_BENCH_TIMEOUT:-240}" \
            python3 benchmarks/bench_varlen.py --device cuda --suite "$suite" --quick --no-probe --peers "" \
            ${AB_ONLY:+--only "$AB_ONLY"} ${AB_BENCH_ARGS:-} --markdown "$OUT/bench-$1.md" >>"$OUT/bench-$1.log" 2>&1 ||
            { echo "benchmark $suite failed or timed out for $1 (bench-$1.log)"; tail -5 "$OUT/bench-$1.log"; status=1; }
    done
}

labels=(base)
run_version base
for ((i = 0; i < ${#patches[@]}; ++i)); do
    patch -p1 --quiet <"${patches[i]}" || { echo "cannot apply ${patches[i]}"; exit 1; }
    label=$(basename "${patches[i]}" .patch)
    labels+=("$label")
    run_version "$label"
done

python3 - "$OUT" "${labels[@]}" <<'EOF'
import re, sys
out, labels = sys.argv[1], sys.argv[2:]
ms = {}  # case -> label -> ms (the third cell of a bench_varlen.py markdown result row)
for label in labels:
    try:
        text = open(f"{out}/bench-{label}.md").read()
    except OSError:
        continue
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and re.fullmatch(r"(decode|prefill|paged)-[\w-]+", cells[0]):
            try:
                ms.setdefault(cells[0], {})[label] = float(cells[2])
            except ValueError:
                pass
print("\n==== A/B (median ms; x = base / version, > 1 is faster)")
print("| case | " + " | ".join(labels) + " |")
print("|" + " --- |" * (len(labels) + 1))
for case, row in ms.items():
    base = row.get("base")
    cells = []
    for label in labels:
        t = row.get(label)
        cells.append("-" if t is None else f"{t:.3f}" if label == "base" or not base else f"{t:.3f} ({base / t:.2f}x)")
    print(f"| {case} | " + " | ".join(cells) + " |")
EOF
exit $status
