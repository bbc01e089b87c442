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


def check_plan(problem, plan):
    b, h, hk, max_q, max_k, block_m, block_n, sms, mask_layout, mask_group_stride = problem
    heads_per_cta, num_m_blocks, num_splits, tiles_per_split, workspace = plan
    group = h // hk
    key_tiles = math.ceil(max_k / block_n)

    # Packed GQA: only whole groups, never when a key-based mask differs across the group's heads.
    assert heads_per_cta in (1, group)
    if mask_layout == MASK_KEY and mask_group_stride != 0:
        assert heads_per_cta == 1
    assert num_m_blocks == math.ceil(max_q * heads_per_cta / block_m)

    # Split-KV: every key tile in exactly one non-empty range.
    assert 1 <= num_splits <= 128 and tiles_per_split >= 1
    assert num_splits * tiles_per_split >= key_tiles
    assert (num_splits - 1) * tiles_per_split < max(key_tiles, 1)
    ctas = num_m_blocks * (h // heads_per_cta) * b
    if num_splits > 1:
        assert ctas < sms, "splits only when the grid cannot fill the GPU"
        assert tiles_per_split >= 4
        assert num_splits * ctas <= 2 * sms + ctas
        assert workspace == num_splits * (b * max_q) * h * (D + 1) * 4
    else:
        assert workspace == 0


def test_plan_invariants_on_random_problems(probe):
    rng = random.Random(20261123)
    problems = []
    for _ in range(400):
        hk = rng.choice([1, 2, 4, 8])
        h = hk * rng.choice([1, 2, 4, 8])
        block_n = rng.choice([32, 64])
        mask_layout = rng.choice([MASK_NONE, MASK_KEY, MASK_QUERY])
        problems.append((rng.randint(1, 80), h, hk, rng.choice([0, 1, 2, 5, 8, 17, 64, 300, 4096]),
                         rng.choice([0, 1, 63, 64, 65, 511, 512, 2000, 4096, 131072]), 64, block_n,
                         rng.choice([0, 1, 108, 132]), mask_layout, rng.choice([0, 1])))
    for problem, plan in zip(problems, probe(problems)):
        check_plan(problem, plan)


def test_plan_of_the_benchmark_shapes(probe):
    decode_c = (1, 32, 8, 1, 131072, 64, 64, 132, MASK_KEY, 0)       # 1 sequence, 128k keys
    decode_d = (64, 32, 8, 1, 4096, 64, 64, 132, MASK_KEY, 0)        # 64 sequences x 4k keys
    per_head_mask = (1, 32, 8, 1, 131072, 64, 64, 132, MASK_KEY, 1)  # key mask with h' = H
    prefill = (8, 32, 8, 8192, 8192, 64, 64, 132, MASK_NONE, 0)
    plans = dict(zip(["c", "d", "per_head", "prefill"], probe([decode_c, decode_d, per_head_mask, prefill])))
    assert plans["c"][0] == 4 and plans["c"][2] >= 16      # packed, split across the GPU
    assert plans["d"][0] == 4 and plans["d"][2] == 1       # packed, enough CTAs already
    assert plans["per_head"][0] == 1 and plans["per_head"][2] >= 4
    assert plans["prefill"][:3] == (1, 128, 1)             # neither packed nor split
