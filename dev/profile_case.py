"""Runs one benchmark case a few times with nothing else on the GPU, for a profiler to attach to
(ncu -k regex:fwd_kernel --launch-skip 2 --launch-count 1 python dev/profile_case.py decode-a).
The output is checked against the benchmark's reference first, so a profile is never of a wrong kernel.

    python dev/profile_case.py CASE [--calls N]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_varlen  # noqa: E402
import peers  # noqa: E402
import shapes  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    cases = {c.name: c for c in shapes.cuda_decode_cases() + shapes.cuda_prefill_cases()}
    case = cases[args.case]
    inp = shapes.make_inputs(case, "cuda")
    ref = peers.reference(case, inp, case.dtype, budget_bytes=4 << 30)
    out = bench_varlen.run_ours(inp)
    out = out[0] if isinstance(out, tuple) else out
    if ref is not None:
        err = (out.float() - ref.float()).abs().max().item()
        print(f"{case.name}: max |ours - reference| = {err:.3g}")
        assert err == err and err < 0.05, "wrong output: not profiling it"
    for _ in range(args.calls):
        bench_varlen.run_ours(inp)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
