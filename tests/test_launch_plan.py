"""The CUDA launch plan (csrc/kernels/launch_plan.h: packed GQA and split-KV) is host code, so it is
tested here on any machine: a small C++ probe prints the plan for many problem sizes and the test
checks that every key tile lands in exactly one split, that packing respects the mask/bias head
layout, and that the workspace size matches the kernel's layout."""

import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
D = 128  # the probe's head dim
MIN_GATHER_KEYS = 2048  # kGatherMinKeys


def gather_chunk(block_n):
    """Keys per compaction chunk (launch_plan.h, gather_chunk)."""
    return 32 * block_n if block_n >= 64 else 1024


MASK_NONE, MASK_KEY, MASK_QUERY = -1, 0, 1


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("plan") / "plan_probe"
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", str(HERE / "native" / "plan_probe.cpp"),
                    "-o", str(exe)], check=True)

    def run(problems):
        lines = "\n".join(" ".join(str(x) for x in prob) for prob in problems) + "\n"
        out = subprocess.run([str(exe)], input=lines, capture_output=True, text=True, check=True).stdout
        return [tuple(int(x) for x in line.split()) for line in out.splitlines()]

    return run


def align16(n):
    return (n + 15) // 16 * 16


def check_plan(problem, plan):
    (b, h, hk, max_q, max_k, total_k, total_q, block_m, block_n, sms, ctas_per_sm, mask_layout, mask_group_stride,
     force_splits, force_gather) = problem
    (heads_per_cta, num_m_blocks, num_splits, tiles_per_split, gather, workspace, key_split, rows_first, warpgroups,
     row_schedule, grid_row_blocks) = plan
    group = h // hk

    # The Hopper warpgroup layout: exactly the blocks the row split would take; under a query-based
    # mask only when the mask is the same for the heads of a group (G >= 2), which it then packs.
    query_mask_packs = mask_layout == MASK_QUERY and mask_group_stride == 0 and group >= 2
    assert warpgroups == int((mask_layout != MASK_QUERY or query_mask_packs) and not key_split)

    # Packed GQA: only whole groups, never when a key-based mask differs across the group's heads;
    # always for the warpgroup layout under a query-based mask, else only for short blocks.
    assert heads_per_cta in (1, group)
    if mask_layout == MASK_KEY and mask_group_stride != 0:
        assert heads_per_cta == 1
    if warpgroups and mask_layout == MASK_QUERY:
        assert heads_per_cta == group
    elif heads_per_cta > 1:
        assert max_q * group <= 2 * block_m
    assert num_m_blocks == math.ceil(max_q * heads_per_cta / block_m)
    # The key-split layout exactly for blocks of at most 32 rows (decode).
    assert key_split == (max_q * heads_per_cta <= 32)

    # Gathered keys: only for key-based masks; forced either way, else from 2048 keys on.
    if mask_layout != MASK_KEY or max_k == 0:
        assert gather == 0
    elif force_gather >= 0:
        assert gather == force_gather
    else:
        assert gather == (max_k >= MIN_GATHER_KEYS)
    chunk = gather_chunk(block_n)
    key_tiles = math.ceil(max_k / chunk) * (chunk // block_n) if gather else math.ceil(max_k / block_n)

    # Split-KV: every key tile in exactly one non-empty range.
    assert 1 <= num_splits <= 128 and tiles_per_split >= 1
    assert num_splits * tiles_per_split >= key_tiles
    assert (num_splits - 1) * tiles_per_split < max(key_tiles, 1)
    # Row schedule: the grid holds the row blocks the batch can have (each sequence wastes less than
    # one), when that leaves out at least a quarter of the B x num_m_blocks, for up to 256 sequences.
    full = num_m_blocks * b
    bound = math.ceil(total_q * heads_per_cta / block_m) + b
    assert row_schedule == int(b <= 256 and full > 0 and 4 * bound <= 3 * full)
    assert grid_row_blocks == (min(full, bound) if row_schedule else full)
    ctas = grid_row_blocks * (h // heads_per_cta)
    if force_splits > 0:
        assert num_splits <= min(force_splits, 128)
        assert num_splits >= min(force_splits, key_tiles, 128) // 2
    elif num_splits > 1:
        assert ctas < sms * ctas_per_sm, "splits only when the grid is less than one wave of CTAs"
        tiny = ctas * key_tiles <= sms * ctas_per_sm       # one key tile per CTA, still one wave
        assert tiles_per_split == 1 if tiny else tiles_per_split >= 4

    # Workspace: partial outputs and lse with split-KV, then the gathered lists and counts, then a
    # query-based mask's tile bits, visible and full (each one 32-bit word per 32 key tiles of each
    # row block and mask head).
    expect = 0
    if num_splits > 1:
        rows = num_splits * total_q * h
        expect += align16(rows * D * 4) + align16(rows * 4)
    mask_heads = hk * (group if mask_group_stride else 1)
    if gather:
        expect += align16(mask_heads * total_k * 4) + align16(mask_heads * b * math.ceil(max_k / chunk) * 4)
    if mask_layout == MASK_QUERY and max_k > 0:
        words = math.ceil(math.ceil(max_k / block_n) / 32)
        expect += 2 * align16(mask_heads * b * num_m_blocks * words * 4)
    if row_schedule:
        expect += grid_row_blocks * (h // heads_per_cta) * 16
    assert workspace == expect

    # CTA order: row blocks first with a query-based mask or when the batch's K/V fits a 50 MB L2.
    kv_bytes = (total_k if total_k > 0 else b * max_k) * hk * D * 2 * 2
    assert rows_first == int((mask_layout == MASK_QUERY and max_k > 0) or kv_bytes <= 50 << 20)


def test_plan_invariants_on_random_problems(probe):
    rng = random.Random(20261123)
    problems = []
    for _ in range(600):
        hk = rng.choice([1, 2, 4, 8])
        h = hk * rng.choice([1, 2, 4, 8])
        b = rng.randint(1, 80)
        max_k = rng.choice([0, 1, 63, 64, 65, 511, 512, 2000, 4096, 131072])
        total_k = max_k * rng.randint(1, b) if max_k else 0
        max_q = rng.choice([0, 1, 2, 5, 8, 17, 64, 300, 4096])
        total_q = rng.choice([max_q * b, max_q * rng.randint(1, b), max_q + rng.randint(0, b)])
        problems.append((b, h, hk, max_q, max_k, total_k, total_q, rng.choice([64, 128]),
                         rng.choice([32, 64, 128]), rng.choice([0, 1, 108, 132]), rng.choice([1, 2, 4]),
                         rng.choice([MASK_NONE, MASK_KEY, MASK_QUERY]), rng.choice([0, 1]),
                         rng.choice([0, 0, 1, 2, 7, 64, 500]), rng.choice([-1, -1, 0, 1])))
    plans = probe(problems)
    for problem, plan in zip(problems, plans):
        check_plan(problem, plan)
    assert 50 < sum(plan[9] for plan in plans) < 550, "both grids (with and without a row schedule) are covered"


def test_plan_of_the_benchmark_shapes(probe):
    def problem(b, max_q, max_k, total_k, mask=MASK_KEY, group_stride=0, force_splits=0, force_gather=-1, total_q=None):
        total_q = b * max_q if total_q is None else total_q
        return (b, 32, 8, max_q, max_k, total_k, total_q, 64, 64, 132, 2, mask, group_stride, force_splits,
                force_gather)

    shapes = {
        "a": problem(16, 8, 15835, 147000),                  # decode (a): 16 sequences of 2k-16k keys
        "c": problem(1, 1, 131072, 131072),                  # 1 sequence, 128k keys
        "d": problem(64, 1, 4096, 64 * 4096),                # 64 sequences x 4k keys
        "e": problem(4, 2, 256, 1024),                       # the seed example
        "per_head": problem(1, 1, 131072, 131072, group_stride=1),   # key mask with h' = H
        "prefill": problem(8, 8192, 8192, 19968, mask=MASK_NONE, total_q=19968),
        "forced": problem(1, 1, 4096, 4096, force_splits=7, force_gather=0),
        "prefill_qmask": problem(8, 8192, 8192, 19968, mask=MASK_QUERY, total_q=19968),  # prefill (d)
        "prefill_qmask_per_head": problem(8, 8192, 8192, 19968, mask=MASK_QUERY, group_stride=1, total_q=19968),
    }
    plans = dict(zip(shapes, probe(list(shapes.values()))))
    assert plans["a"][0] == 4 and plans["a"][2] >= 8 and plans["a"][4] == 1   # packed, split, gathered
    assert plans["c"][0] == 4 and plans["c"][2] >= 32                        # split across the GPU
    assert plans["d"][0] == 4 and plans["d"][2] == 1                         # about two waves: no split
    assert plans["e"][4] == 0 and plans["e"][2:4] == (4, 1)                  # tiny: one tile per CTA
    assert plans["per_head"][0] == 1 and plans["per_head"][2] >= 4
    assert plans["prefill"][:3] == (1, 128, 1)                               # neither packed nor split
    assert plans["prefill"][9:] == (1, 320)  # 320 of the 8 x 128 row blocks: 19968 / 64 + 8
    assert plans["prefill"][7] == 0          # 82 MB of K/V, beyond L2: sequences and heads first
    assert plans["e"][7] == 1                # a few KB: row blocks first
    assert plans["forced"][2] == 7 and plans["forced"][4] == 0
    # A block-sparse query mask, one for all heads: the warpgroup layout with the group packed; per
    # query head (h' = H): the row split, unpacked.
    assert plans["prefill_qmask"][0] == 4 and plans["prefill_qmask"][8] == 1
    assert plans["prefill_qmask_per_head"][0] == 1 and plans["prefill_qmask_per_head"][8] == 0


def test_divisor(tmp_path):
    """divisor.h's multiply-and-shift division (packed row R -> query R / P, head R % P) against
    Python's divmod: every divisor up to 300 (head groups) and larger ones, n from 0 to 2^31 - 1."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "divisor_probe"
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", str(HERE / "native" / "divisor_probe.cpp"),
                    "-o", str(exe)], check=True)
    rng = random.Random()
    divisors = list(range(1, 301)) + [rng.randrange(301, 2**31) for _ in range(200)] + [2**30, 2**31 - 1]
    pairs = []
    for d in divisors:
        edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2**31 - 1, 2**31 - 2, (2**31 - 1) // d * d, (2**31 - 1) // d * d - 1]
        pairs += [(d, n) for n in edges if 0 <= n < 2**31]
        pairs += [(d, rng.randrange(0, 2**31)) for _ in range(40)]
        pairs += [(d, rng.randrange(0, 4096)) for _ in range(40)]
    out = subprocess.run([str(exe)], input="".join(f"{d} {n}\n" for d, n in pairs), capture_output=True, text=True,
                         check=True).stdout.split("\n")
    wrong = [(d, n, line) for (d, n), line in zip(pairs, out) if tuple(map(int, line.split())) != divmod(n, d)]
    assert len(out) >= len(pairs) and not wrong, wrong[:5]
