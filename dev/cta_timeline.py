"""When each CTA of one decode call runs, from the kernels' own clocks: where the time between the
byte floor and the measured call goes (the ramp before a CTA's first tile, the tiles, the drain
after its last, the CTAs' tail, the passes before and after the forward).

Needs a build with the instrumentation patch dev/cta_times.patch applied (thread 0 of each CTA
appends its SM and %globaltimer stamps to a buffer whose address this script passes in
FDM_CTA_TIMES_PTR; the patch is never landed on the kernels):

    patch -p1 < dev/cta_times.patch && FLASH_DMATTN_BUILD=cuda python setup.py build_ext --inplace
    python dev/cta_timeline.py [--cases decode-a,decode-c]
    patch -R -p1 < dev/cta_times.patch

Per case, one call right after an L2 flush (times in us from the first CTA's start):
  passes   the compaction's and the combine's CTAs: first start, last end
  forward  first start, the p50/p90 of the CTA starts, the last end
  ramp     per CTA, start -> its first K/V tile in shared memory (of it: start -> the wait for the
           pass before it returned)
  tile     per CTA, (first tile -> loop end) / (tiles - 1)
  drain    per CTA, loop end -> CTA end (finalize, merge across warps, the stores)
  busy     the share of the forward's slot-time (SMs x CTAs per SM x span) spent in the tile loop
and a profile over 10 equal slices of the forward's span: CTAs in their tile loop, on average.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_varlen  # noqa: E402
import shapes  # noqa: E402


RECORDS = 1 << 16  # kCtaRecords of the patch
KINDS = {1: "forward", 2: "compaction", 3: "combine"}
# Fields of a record after its kind (pdl.cuh of the patch, cta_record); the passes leave the
# forward's own fields 0.
BLK, SM, T_START, T_WAIT, T_FIRST, T_LOOP, T_END, TILES, ROWS, SPLIT = range(10)


def recorded(fn, buf):
    """Runs fn; returns {kind: [record fields]} of what the patched kernels appended to buf."""
    buf.zero_()
    fn()
    torch.cuda.synchronize()
    host = buf.cpu()
    count = min(int(host[0]), RECORDS)
    records = {kind: [] for kind in KINDS.values()}
    for r in host[16:16 + 12 * count].view(count, 12).tolist():
        records[KINDS[r[0]]].append(r[1:11])
    return records


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def analyse(records, ctas_per_sm):
    fwd = records["forward"]
    if not fwd:
        print("  no records (is dev/cta_times.patch applied?)")
        return
    t0 = min(r[T_START] for rs in records.values() for r in rs)
    us = lambda t: (t - t0) / 1e3  # noqa: E731
    for kind in ("compaction", "combine"):
        rs = records[kind]
        if rs:
            starts = [us(r[T_START]) for r in rs]
            took = [(r[T_END] - r[T_START]) / 1e3 for r in rs]
            print(f"  {kind:10s} {len(rs):5d} CTAs  start {min(starts):7.1f} (p50 {quantile(starts, .5):.1f}, "
                  f"p90 {quantile(starts, .9):.1f})  end {us(max(r[T_END] for r in rs)):7.1f}  per CTA p50 "
                  f"{quantile(took, .5):.2f} us, p90 {quantile(took, .9):.2f}")
    starts = [us(r[T_START]) for r in fwd]
    ends = [us(r[T_END]) for r in fwd]
    working = [r for r in fwd if r[TILES] > 0]
    ramp = [(r[T_FIRST] - r[T_START]) / 1e3 for r in working]
    wait = [(r[T_WAIT] - r[T_START]) / 1e3 for r in working]
    tile = [(r[T_LOOP] - r[T_FIRST]) / 1e3 / (r[TILES] - 1) for r in working if r[TILES] > 1]
    drain = [(r[T_END] - r[T_LOOP]) / 1e3 for r in working]
    sms = len({r[SM] for r in fwd})
    span_a, span_b = min(starts), max(ends)
    loop_time = sum((r[T_LOOP] - r[T_FIRST]) / 1e3 for r in working)
    print(f"  forward    {len(fwd):5d} CTAs ({len(fwd) - len(working)} without a tile) on {sms} SMs  "
          f"start {span_a:7.1f} (p50 {quantile(starts, .5):.1f}, p90 {quantile(starts, .9):.1f})  "
          f"end {span_b:7.1f} (first {min(ends):.1f}, p50 {quantile(ends, .5):.1f})")
    q3 = lambda xs, f: "/".join(f"{quantile(xs, q):{f}}" for q in (.1, .5, .9))  # noqa: E731
    print(f"  per CTA (p10/p50/p90 us): ramp {q3(ramp, '.2f')} (wait {quantile(wait, .5):.2f})  "
          f"tile {q3(tile, '.3f')}  drain {q3(drain, '.2f')}  tiles {quantile([r[TILES] for r in working], .5)}")
    busy = loop_time / (sms * ctas_per_sm * (span_b - span_a))
    print(f"  busy       {busy:.0%} of {sms} SMs x {ctas_per_sm} CTAs over the forward's {span_b - span_a:.1f} us")
    bins = 10
    width = (span_b - span_a) / bins
    profile = []
    for i in range(bins):
        a, b = span_a + i * width, span_a + (i + 1) * width
        inside = sum(max(0.0, min(b, us(r[T_LOOP])) - max(a, us(r[T_FIRST]))) for r in working)
        profile.append(inside / width)
    print("  in loop    " + " ".join(f"{x:5.0f}" for x in profile) + f"   (CTAs, {width:.1f} us slices)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="decode-a,decode-b,decode-c,decode-d")
    ap.add_argument("--ctas-per-sm", type=int, default=2, help="the key-split layout's resident CTAs per SM")
    args = ap.parse_args()
    by_name = {c.name: c for c in shapes.cuda_decode_cases()}
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    buf = torch.zeros(16 + 12 * RECORDS, dtype=torch.int64, device="cuda")
    os.environ["FDM_CTA_TIMES_PTR"] = str(buf.data_ptr())
    for name in args.cases.split(","):
        case = by_name[name]
        inp = shapes.make_inputs(case, "cuda")
        for _ in range(3):
            bench_varlen.run_ours(inp)
        flush.zero_()
        records = recorded(lambda: bench_varlen.run_ours(inp), buf)
        print(f"{name}:")
        analyse(records, args.ctas_per_sm)


if __name__ == "__main__":
    main()
