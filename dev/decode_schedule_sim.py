"""A model of how a decode call's forward CTAs share the GPU, to predict what another split of the
key ranges would gain before it is built (docs/notes.md version 36). CPU only.

The model: the grid's CTAs are dispatched in grid order to `slots` resident places (SMs x CTAs
per SM) as places free up. Each CTA spends `ramp` us before its first tile, its tiles, and
`drain` us after the last; a CTA without a tile leaves after `empty` us. Tiles share the memory
bandwidth: with n CTAs in their tile loops a tile takes max(tile_min, tile_ref * n / n_ref) us.
The defaults are decode-a's, measured on an H200 by dev/cta_timeline.py (version 36: ramp 4.8,
drain 1.6, tile 2.07 us with ~225 CTAs streaming, 1.8 us with few); the model then gives the
forward's measured span (~250 us) for the launch plan's ranges.

Row blocks: one per (sequence, KV head) (decode: the G query heads of a KV head times the
sequence's 1-8 queries fit one block); a block's tiles are the gathered tiles of its keys (chunks
of 2048 keys, each cut into 64-key tiles; an all-True mask). Splits of a row block:
  plan    the launch plan's: ranges of --tiles-per-split virtual tiles (32 a chunk), --splits
          ranges a row block (the empty ones included: they are CTAs too), as in fwd_kernel.cuh
  even    ceil(tiles / T) ranges of equal size, for T in --even
  guided  ranges of about (work left from this row block on) / slots tiles, between --min-tiles
          and the plan's range, at most --max-splits a row block: the row blocks dispatched
          last get the shortest ranges

    python dev/decode_schedule_sim.py [--case decode-a] [--ramp 4.8 --drain 1.6]
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import shapes  # noqa: E402

CHUNK, TILE = 2048, 64  # gather_chunk(64) and the key split's tile (launch_plan.h, tiles.cuh)
SUBTILES = CHUNK // TILE


def real_tiles(len_k, first, stop):
    """Gathered tiles with keys among virtual tiles [first, stop) of a sequence of len_k keys."""
    count = 0
    for n in range(first, stop):
        chunk, sub = divmod(n, SUBTILES)
        count += sub * TILE < min(CHUNK, len_k - chunk * CHUNK)
    return count


def simulate(ctas, args):
    """Forward span (us) of CTAs with these tile counts, dispatched in this order."""
    t, dt = 0.0, 0.05
    queue = list(reversed(ctas))
    places = [None] * args.slots  # [phase, time or tiles left, tiles]
    while queue or any(places):
        for i, place in enumerate(places):
            if place is None and queue:
                tiles = queue.pop()
                places[i] = ["ramp", args.ramp, tiles] if tiles else ["drain", args.empty, 0]
        streaming = sum(1 for place in places if place and place[0] == "loop")
        tile_us = max(args.tile_min, args.tile_ref * streaming / args.n_ref)
        for i, place in enumerate(places):
            if place is None:
                continue
            if place[0] == "loop":
                place[1] -= dt / tile_us
                if place[1] <= 0:
                    places[i] = ["drain", args.drain, 0]
                continue
            place[1] -= dt
            if place[1] <= 0:
                places[i] = ["loop", place[2], 0] if place[0] == "ramp" else None
        t += dt
    return t


def plan_ctas(lens, args):
    out = []
    for len_k in lens:
        virtual = math.ceil(len_k / CHUNK) * SUBTILES
        for s in range(args.splits):  # the key split's CTA order: the KV heads of a range side by side
            first = s * args.tiles_per_split
            out += [real_tiles(len_k, first, min(virtual, first + args.tiles_per_split))] * args.kv_heads
    return out


def even_ctas(lens, args, size):
    out = []
    for len_k in lens:
        tiles = real_tiles(len_k, 0, math.ceil(len_k / CHUNK) * SUBTILES)
        for _ in range(args.kv_heads):
            k = math.ceil(tiles / size)
            out += [tiles * (s + 1) // k - tiles * s // k for s in range(k)]
    return out


def guided_ctas(lens, args, min_tiles, max_splits):
    tiles = [real_tiles(n, 0, math.ceil(n / CHUNK) * SUBTILES) for n in lens]
    left = sum(tiles) * args.kv_heads
    out = []
    for n in tiles:
        for _ in range(args.kv_heads):
            size = max(min_tiles, min(args.tiles_per_split, math.ceil(left / args.slots)))
            k = min(max_splits, math.ceil(n / size))
            out += [n * (s + 1) // k - n * s // k for s in range(k)]
            left -= n
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="decode-a")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--slots", type=int, default=264, help="SMs x resident CTAs per SM")
    ap.add_argument("--splits", type=int, default=9, help="the plan's ranges per row block (plan_probe)")
    ap.add_argument("--tiles-per-split", type=int, default=29, help="the plan's virtual tiles per range")
    ap.add_argument("--ramp", type=float, default=4.8)
    ap.add_argument("--drain", type=float, default=1.6)
    ap.add_argument("--empty", type=float, default=1.0)
    ap.add_argument("--tile-ref", type=float, default=2.07)
    ap.add_argument("--n-ref", type=float, default=225)
    ap.add_argument("--tile-min", type=float, default=1.8)
    ap.add_argument("--even", default="16,20,29")
    ap.add_argument("--guided", default="4:16,8:16,12:16,8:32", help="min_tiles:max_splits pairs")
    args = ap.parse_args()
    case = next(c for c in shapes.cuda_decode_cases() if c.name == args.case)
    lens = case.seqlens_k
    base_ctas = plan_ctas(lens, args)
    base = simulate(base_ctas, args)
    print(f"{args.case}: {len(lens)} sequences x {args.kv_heads} KV heads, {args.slots} slots, "
          f"ramp {args.ramp} us, drain {args.drain} us")
    print(f"  {'plan':30s} {len(base_ctas):5d} CTAs ({sum(1 for x in base_ctas if x)} with tiles)  {base:6.1f} us")
    variants = [(f"even, {t} tiles", even_ctas(lens, args, int(t))) for t in args.even.split(",") if t]
    for pair in (p for p in args.guided.split(",") if p):
        lo, hi = (int(x) for x in pair.split(":"))
        variants.append((f"guided, >= {lo}, <= {hi} ranges", guided_ctas(lens, args, lo, hi)))
    for name, ctas in variants:
        span = simulate(ctas, args)
        print(f"  {name:30s} {len(ctas):5d} CTAs  {span:6.1f} us  ({base / span:.2f}x)")


if __name__ == "__main__":
    main()
