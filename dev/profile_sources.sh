#!/usr/bin/env bash
# Source-level ncu profiles of the forward kernel on several benchmark cases, in one device call:
# builds the tree, then for each case profiles its second call (dev/profile_case.py checks the
# output against the reference first), exports the SASS-level source page as CSV, prints the
# dev/ncu_blocks.py summary (where the instructions and stall samples go, block by block), and
# packs the CSVs and the details pages into $OUT/profiles.tgz for a closer look off the GPU.
#
#   OUT=$OUT bash dev/profile_sources.sh                       # the default cases
#   CASES="decode-a prefill-c" MIN_SHARE=0.01 bash dev/profile_sources.sh
#   python3 dev/ncu_blocks.py p/sass-prefill-b.csv --show 5445   # later, here: one block's lines
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fdm_out}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${FDM_ARCH_LIST:-"9.0a"}
export CC=gcc CXX=g++ LDSHARED="g++ -shared"  # as dev/gpu_run.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/p"
FLASH_DMATTN_BUILD=cuda python3 setup.py build_ext --inplace >"$OUT/p/build.log" 2>&1 ||
    { tail -20 "$OUT/p/build.log"; echo "BUILD FAILED"; exit 1; }
for c in ${CASES:-decode-a decode-b prefill-b prefill-c prefill-d}; do
    rep="$OUT/p/rep-$c"
    ncu --section SourceCounters --section WarpStateStats --section LaunchStats --section Occupancy \
        -k regex:^fwd_kernel --launch-skip 1 --launch-count 1 -o "$rep" \
        python3 dev/profile_case.py "$c" --calls 2 >"$OUT/p/ncu-$c.log" 2>&1 || { tail -5 "$OUT/p/ncu-$c.log"; continue; }
    ncu -i "$rep.ncu-rep" --page source --print-source sass --csv >"$OUT/p/sass-$c.csv" 2>/dev/null
    ncu -i "$rep.ncu-rep" --page details >"$OUT/p/details-$c.txt" 2>/dev/null
    rm -f "$rep.ncu-rep"
    echo "== $c"
    python3 dev/ncu_blocks.py "$OUT/p/sass-$c.csv" --min-share "${MIN_SHARE:-0.02}" | head -30
done
(cd "$OUT" && tar czf profiles.tgz p && rm -rf p)
