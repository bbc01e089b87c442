"""Decode time against the split-KV count and the gathered-key switch, to check the launch plan's
heuristic (launch_plan.h) against the best fixed choice. Each setting is validated against the
SDPA-math reference of the benchmark (peers.reference) before it is timed.

    python dev/sweep_splits.py [--cases decode-a,decode-b,decode-c,decode-d] [--splits auto,8,16]
        [--gather auto,0,1]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_varlen  # noqa: E402
import peers  # noqa: E402
import shapes  # noqa: E402

SPLITS = "auto,1,2,4,8,16,32,64,128"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="decode-a,decode-b,decode-c,decode-d")
    ap.add_argument("--splits", default=SPLITS, help="comma-separated split counts, 'auto' for the plan's")
    ap.add_argument("--gather", default="auto,0,1", help="comma-separated gathered-key switches")
    args = ap.parse_args()
    cases, splits_list, gathers = args.cases.split(","), args.splits.split(","), args.gather.split(",")
    timer = bench_varlen.Timer("cuda", quick=True)
    bandwidth = bench_varlen.measure_floors(timer)["bandwidth"]
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s; cells: ms (% of byte floor)")
    print("| case | gather | " + " | ".join(f"splits={s}" for s in splits_list) + " |")
    print("|---|---|" + "---|" * len(splits_list))
    for case in shapes.cuda_decode_cases():
        if case.name not in cases:
            continue
        inp = shapes.make_inputs(case, "cuda")
        ref = peers.reference(case, inp, case.dtype, budget_bytes=4 << 30)
        floor_ms = shapes.work_of(case, inp).bytes / bandwidth * 1e3
        for gather in gathers:
            cells = []
            for splits in splits_list:
                os.environ.pop("FLASH_DMATTN_NUM_SPLITS", None)
                os.environ.pop("FLASH_DMATTN_GATHER_KEYS", None)
                if splits != "auto":
                    os.environ["FLASH_DMATTN_NUM_SPLITS"] = splits
                if gather != "auto":
                    os.environ["FLASH_DMATTN_GATHER_KEYS"] = gather
                out = bench_varlen.run_ours(inp)
                err = bench_varlen._max_err(out, ref) if ref is not None else 0.0
                if not err <= 0.05:
                    cells.append(f"WRONG ({err:.3g})")
                    continue
                ms = timer.median_ms(lambda: bench_varlen.run_ours(inp))
                cells.append(f"{ms:.3f} ({100 * floor_ms / ms:.0f}%)")
            print(f"| {case.name} | {gather} | " + " | ".join(cells) + " |")
        os.environ.pop("FLASH_DMATTN_NUM_SPLITS", None)
        os.environ.pop("FLASH_DMATTN_GATHER_KEYS", None)


if __name__ == "__main__":
    main()
