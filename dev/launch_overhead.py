"""Where the time of a tiny call goes: host launch cost versus GPU time, ours beside SDPA.

For a launch-bound problem (the seed example, decode-e) the benchmark's event time is the host's
time to issue the call plus the GPU's time to run it. This script separates the two:
  host   wall time per call of 2000 back-to-back calls with no synchronization (the GPU keeps up,
         so this is the issue rate of the host);
  gpu    time per call of a CUDA graph replaying 50 calls (no host work at all);
  event  the benchmark's measure (CUDA events around one call after an L2 flush).

    python dev/launch_overhead.py [--case decode-e]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_varlen  # noqa: E402
import peers  # noqa: E402
import shapes  # noqa: E402


def host_us(fn, n=2000):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def captured(fn, n=1):
    """A CUDA graph of n back-to-back calls of fn (captured after 3 warm-up calls on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    return graph


def graph_us(fn, n=50):
    graph = captured(fn, n)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="decode-e")
    args = ap.parse_args()
    case = next(c for c in shapes.cuda_decode_cases() + shapes.cuda_prefill_cases() if c.name == args.case)
    inp = shapes.make_inputs(case, "cuda")
    padded = peers.build_padded(case, inp, case.dtype)
    timer = bench_varlen.Timer("cuda", quick=True)
    contenders = {
        "ours": lambda: bench_varlen.run_ours(inp),
        "ours (torch.ops)": lambda: torch.ops.flash_dmattn.mha_varlen_fwd(
            inp.q, inp.k, inp.v, inp.mask, inp.bias, inp.cu_seqlens_q, inp.cu_seqlens_k,
            inp.max_seqlen_q, inp.max_seqlen_k, case.head_dim ** -0.5, case.causal, 0.0, None),
        "sdpa (materialized mask)": lambda: peers.sdpa_run(padded),
    }
    print(f"{case.name}: {case.describe()}  ({torch.cuda.get_device_name()})")
    print(f"{'contender':28s} {'event us':>9s} {'host us':>8s} {'gpu us':>8s}")
    for name, fn in contenders.items():
        event = timer.median_ms(fn) * 1e3
        print(f"{name:28s} {event:9.1f} {host_us(fn):8.1f} {graph_us(fn):8.1f}")


if __name__ == "__main__":
    main()
