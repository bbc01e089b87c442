"""Where a decode call's time goes beyond its byte floor (docs/notes.md, version 35), in four parts,
every timed shape first checked against the benchmark's reference:

1. --families c,d: the decode-c and decode-d shapes of the benchmark (benchmarks/shapes.py) at
   several key lengths, and per variant a least-squares line time = fixed + bytes / rate (the
   fixed microseconds per call, the rate as a fraction of the copy bandwidth):
       bench      as benchmarked: key-based mask (all True) and bias, causal
       graph      the same replayed from a CUDA graph of one call (no host work in the timed span)
       nogather   FLASH_DMATTN_GATHER_KEYS=0 (no compaction pass; the tiles test the mask)
       plain      no mask, no bias
   and the kernels of one "bench" call of each family's longest shape (torch.profiler: CUDA time
   per call; a programmatically launched kernel's time includes its wait for the one before).
2. --kernels: the same for benchmark shapes as they are (default decode-a, decode-b).
3. --timeline: the GPU timeline of a call after an L2 flush: when each kernel starts and ends, in
   us from the end of the flush kernel (the profiling loop syncs after each call, so the first
   kernel also waits for the host).
4. --orders: decode-a and decode-b with their sequences sorted by key length, longest and
   shortest first (the grid runs sequences in batch order); --rows: decode-a's sequences and keys
   with every sequence at one query count, 1 to 8 (blocks of 4-32 rows at about the same bytes).

    python dev/decode_scaling.py [--families c,d] [--variants bench,graph,nogather,plain]
        [--kernels decode-a,decode-b] [--timeline decode-c] [--orders decode-a] [--rows 1,4,8]
"""
import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_varlen  # noqa: E402
import peers  # noqa: E402
import shapes  # noqa: E402
from launch_overhead import captured  # noqa: E402

# family -> (benchmark case, key lengths): decode-c is 1 sequence x 1 query, decode-d 64 x 1.
FAMILIES = {
    "c": ("decode-c", (16384, 32768, 65536, 131072, 262144)),
    "d": ("decode-d", (1024, 2048, 4096, 8192)),
}
VARIANTS = {
    "bench": ({}, {}),
    "graph": ({}, {}),
    "nogather": ({"FLASH_DMATTN_GATHER_KEYS": "0"}, {}),
    "plain": ({}, {"mask": "none", "bias": "none", "note": ""}),
}


def fit(points):
    """Least squares of ms = fixed + bytes / rate over (bytes, ms) points: (fixed us, rate B/s)."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx  # ms per byte
    return (my - slope * mx) * 1e3, 1e3 / slope


def timed(case, env, timer, graph=False):
    for name, value in env.items():
        os.environ[name] = value
    try:
        inp = shapes.make_inputs(case, "cuda")
        ref = peers.reference(case, inp, torch.float32, 4 << 30)
        err = bench_varlen._max_err(bench_varlen.run_ours(inp), ref)
        tol = bench_varlen.RTOL[case.dtype] * ref.abs().max().item() + bench_varlen.ATOL[case.dtype]
        if not err <= tol:
            raise SystemExit(f"{case.name} Lk={case.max_k}: max err {err:.3g} > {tol:.3g}")
        call = lambda: bench_varlen.run_ours(inp)  # noqa: E731
        ms = timer.median_ms(captured(call).replay if graph else call)
        nbytes = shapes.work_of(case, inp).bytes
        return nbytes, ms, inp
    finally:
        for name in env:
            os.environ.pop(name, None)


def kernel_times(inp, calls=20):
    """Mean CUDA microseconds per call of each kernel of one call."""
    from torch.profiler import ProfilerActivity, profile
    bench_varlen.run_ours(inp)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            bench_varlen.run_ours(inp)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = evt.device_time_total / calls
        if us > 0:
            rows.append((us, evt.count / calls, evt.key))
    return sorted(rows, reverse=True)


def timeline(inp, calls=5):
    """Per kernel of a call issued right after an L2 flush (each call synchronized): mean start and
    end in us from the end of the flush kernel, and the name."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    bench_varlen.run_ours(inp)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            bench_varlen.run_ours(inp)
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = json.load(trace)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    rows, t0 = {}, None
    for e in kernels:
        if "fdm::" not in e["name"]:
            t0 = e["ts"] + e["dur"]  # the flush (and anything else not ours) ends here
            continue
        r = rows.setdefault(e["name"], [0.0, 0.0, 0])
        r[0] += e["ts"] - t0
        r[1] += e["ts"] + e["dur"] - t0
        r[2] += 1
    return sorted(((a / n, b / n, name) for name, (a, b, n) in rows.items()), key=lambda r: r[0])


def print_kernels(title, inp):
    print(f"  kernels of one call, {title} (us, launches per call):")
    for us, count, name in kernel_times(inp)[:6]:
        print(f"    {us:8.1f}  x{count:.0f}  {name[:90]}")


def names(arg):
    """The comma-separated entries of an option ('' for none)."""
    return [x for x in arg.split(",") if x]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="c,d")
    ap.add_argument("--variants", default="bench,graph,nogather,plain")
    ap.add_argument("--kernels", default="decode-a,decode-b")
    ap.add_argument("--rows", default="1,2,4,5,8", help="query counts of decode-a's sequences ('' for none)")
    ap.add_argument("--orders", default="decode-a,decode-b", help="shapes to time reordered ('' for none)")
    ap.add_argument("--timeline", default="", help="shapes whose GPU timeline to print, e.g. decode-c")
    args = ap.parse_args()
    timer = bench_varlen.Timer("cuda", quick=True)
    bandwidth = bench_varlen.measure_floors(timer)["bandwidth"]

    def of_floor(nbytes, ms):  # the byte floor's time as a share of ms
        return f"{nbytes / bandwidth * 1e3 / ms:.0%}"

    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    by_name = {c.name: c for c in shapes.cuda_decode_cases()}
    summary = []
    for family in names(args.families):
        case_name, lengths = FAMILIES[family]
        base = by_name[case_name]
        for variant in names(args.variants):
            env, fields = VARIANTS[variant]
            points, longest = [], None
            for lk in lengths:
                case = dataclasses.replace(base, seqlens_k=(lk,) * base.batch, **fields)
                nbytes, ms, inp = timed(case, env, timer, graph=variant == "graph")
                points.append((nbytes, ms))
                print(f"  {case_name} {variant:8s} Lk={lk:6d}: {ms:.4f} ms, {nbytes / 1e6:8.1f} MB, "
                      f"{of_floor(nbytes, ms)} of the byte floor")
                longest = inp
            fixed_us, rate = fit(points)
            summary.append((case_name, variant, fixed_us, rate / bandwidth, points[-1]))
            if variant == "bench":
                print_kernels(f"{case_name} Lk={lengths[-1]}", longest)
    for case_name in names(args.kernels):
        _, ms, inp = timed(by_name[case_name], {}, timer)
        print_kernels(f"{case_name}, {ms:.4f} ms a call", inp)
    for case_name in names(args.timeline):
        _, ms, inp = timed(by_name[case_name], {}, timer)
        print(f"  timeline of {case_name} ({ms:.4f} ms a call), us from the end of the L2 flush:")
        for start, end, name in timeline(inp):
            print(f"    {start:8.1f} -> {end:8.1f}  {name[:80]}")
    for case_name in names(args.orders):
        case = by_name[case_name]
        pairs = list(zip(case.seqlens_q, case.seqlens_k))
        orders = (("as is", pairs), ("longest first", sorted(pairs, key=lambda x: -x[1])),
                  ("shortest first", sorted(pairs, key=lambda x: x[1])))
        for order, seqs in orders:
            variant = dataclasses.replace(case, seqlens_q=tuple(q for q, _ in seqs),
                                          seqlens_k=tuple(k for _, k in seqs))
            nbytes, ms, _ = timed(variant, {}, timer)
            print(f"  {case_name}, sequences {order}: {ms:.4f} ms, {of_floor(nbytes, ms)} of the byte floor")
    base = by_name["decode-a"]
    for lq in [int(x) for x in names(args.rows)]:
        case = dataclasses.replace(base, seqlens_q=(lq,) * base.batch)
        nbytes, ms, _ = timed(case, {}, timer)
        print(f"  decode-a keys, {lq} queries per sequence ({4 * lq} rows a block): {ms:.4f} ms, "
              f"{of_floor(nbytes, ms)} of the byte floor")
    print("\n| shape family | variant | fixed us | stream rate (% of copy) | longest: ms (% of floor) |")
    print("|---|---|---|---|---|")
    for case_name, variant, fixed_us, rel_rate, (nbytes, ms) in summary:
        print(f"| {case_name} | {variant} | {fixed_us:.1f} | {rel_rate:.0%} | "
              f"{ms:.3f} ({of_floor(nbytes, ms)}) |")


if __name__ == "__main__":
    main()
