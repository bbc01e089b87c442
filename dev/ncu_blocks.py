"""Summarizes an ncu source-level profile by basic block: where a kernel's instructions and stall
samples go, without reading thousands of SASS lines.

    ncu --section SourceCounters --section WarpStateStats -k regex:^fwd_kernel --launch-count 1 \
        -o rep python dev/profile_case.py decode-b --calls 1
    ncu -i rep.ncu-rep --page source --print-source sass --csv > src.csv
    python dev/ncu_blocks.py src.csv [--min-share 0.004] [--show 4475]

(NCU_SOURCE_CASES="decode-a prefill-b" bash dev/gpu_run.sh runs these steps for several cases in one
device call.)

A "block" here is a run of consecutive SASS lines executed the same number of times (a basic
block, or several in a row). For each block that holds at least --min-share of the executed
instructions or of the stall samples it prints: first line, executions (per warp: divide by the
kernel's warps), length, its share of instructions and samples, its commonest opcodes and its
top stall reasons. --show N prints the lines of the block that holds line N.
"""
import argparse
import collections
import csv
import re


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def opcode(source):
    source = re.sub(r"^@!?U?P\w+\s+", "", source.strip())  # predicate guard
    return source.split(" ")[0].split(".")[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--min-share", type=float, default=0.004)
    ap.add_argument("--show", type=int, default=None, help="print the block holding this line")
    args = ap.parse_args()

    rows = list(csv.reader(open(args.csv)))
    header_at = next(i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r)
    header, lines = rows[header_at], rows[header_at + 1:]
    col = {name: i for i, name in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    executed = [number(r[col["Instructions Executed"]]) for r in lines]
    samples = [number(r[col["Warp Stall Sampling (All Samples)"]]) for r in lines]

    blocks = []  # [first line, executions, length]
    for i, count in enumerate(executed):
        if blocks and blocks[-1][1] == count and blocks[-1][0] + blocks[-1][2] == i:
            blocks[-1][2] += 1
        else:
            blocks.append([i, count, 1])

    if args.show is not None:
        first, _, length = next(b for b in blocks if b[0] <= args.show < b[0] + b[2])
        for i in range(first, first + length):
            print(f"{i:6d} {executed[i]:9.0f} {samples[i]:6.0f}  {lines[i][col['Source']].strip()}")
        return

    total_instr, total_samples = sum(executed), sum(samples) or 1.0
    print(f"{total_instr:.0f} warp instructions executed, {total_samples:.0f} stall samples")
    for s in stalls:
        share = sum(number(r[col[s]]) for r in lines) / total_samples
        if share >= 0.01:
            print(f"  {s[6:]:18s} {100 * share:5.1f}%")
    print(f"{'line':>6} {'execs':>7} {'len':>4} {'instr%':>6} {'samp%':>6}  opcodes / stalls")
    for first, count, length in blocks:
        instr = count * length
        samp = sum(samples[first:first + length])
        if instr < args.min_share * total_instr and samp < args.min_share * total_samples:
            continue
        ops = collections.Counter(opcode(lines[i][col["Source"]]) for i in range(first, first + length))
        why = collections.Counter()
        for s in stalls:
            why[s[6:]] = sum(number(lines[i][col[s]]) for i in range(first, first + length))
        print(f"{first:6d} {count:7.0f} {length:4d} {100 * instr / total_instr:6.1f} {100 * samp / total_samples:6.1f}  "
              + " ".join(f"{k}:{v}" for k, v in ops.most_common(6)) + "  / "
              + " ".join(f"{k}:{v:.0f}" for k, v in why.most_common(2) if v > 0))


if __name__ == "__main__":
    main()
