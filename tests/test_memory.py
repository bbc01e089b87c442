"""The key-based layout is never expanded to a per-query copy (SPEC.md section 2): the op's extra memory
must not grow with total_q x max_seqlen_k."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import make_batch, make_bias, make_mask, requires_cuda

# Decode-like batch: a long KV sequence with one query, and many short sequences. A (total_q, H,
# max_seqlen_k) float32 copy of a mask or bias would be 256 * 32 * 16384 * 4 B = 512 MiB, while the
# real work (sum over sequences of Lq * Lk) stays small, so the test is fast.
SEQLENS = [(1, 16384)] + [(5, 64)] * 51  # total_q = 256, total_k = 19648, max_seqlen_k = 16384
H, H_K, D = 32, 8, 32
TOTAL_Q = sum(lq for lq, _ in SEQLENS)
MAX_SEQLEN_K = max(lk for _, lk in SEQLENS)
MATERIALIZED_BYTES = TOTAL_Q * H * MAX_SEQLEN_K * 4
assert MATERIALIZED_BYTES >= 512 * 2**20

# Runs in a fresh process, reading the peak resident memory (VmHWM) reset right before the call.
PROBE = textwrap.dedent(r"""
    import json, sys
    import torch
    import flash_dmattn

    def peak_rss():
        # VmHWM: the peak resident memory since the last reset_peak() (Linux), in KiB.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def reset_peak():
        # Writing 5 to clear_refs resets VmHWM to the current RSS, so memory the process touched
        # earlier (imports, warm-up, input setup) cannot hide what the call itself allocates.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    layout = sys.argv[1]
    seqlens = json.loads(sys.argv[2])
    H, H_K, D = json.loads(sys.argv[3])

    def cu(lengths):
        return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)

    def run(seqlens, mask, bias, q, k, v):
        return flash_dmattn.flash_dmattn_varlen_func(
            q, k, v, attn_mask=mask, attn_bias=bias,
            cu_seqlens_q=cu([a for a, _ in seqlens]), cu_seqlens_k=cu([b for _, b in seqlens]),
            max_seqlen_q=max(a for a, _ in seqlens), max_seqlen_k=max(b for _, b in seqlens))

    # Warm-up on a tiny shape: loads kernels, starts the thread pool, touches the allocator.
    tiny = [(2, 3), (1, 4)]
    q, k, v = torch.randn(3, H, D), torch.randn(7, H_K, D), torch.randn(7, H_K, D)
    run(tiny, torch.ones(7, H_K, dtype=torch.bool), torch.zeros(7, H), q, k, v)

    total_q, total_k = sum(a for a, _ in seqlens), sum(b for _, b in seqlens)
    max_k = max(b for _, b in seqlens)
    q, k, v = torch.randn(total_q, H, D), torch.randn(total_k, H_K, D), torch.randn(total_k, H_K, D)
    mask = torch.rand(total_k, H_K) < 0.5
    bias = torch.randn(total_k, H)
    reset_peak()
    before = peak_rss()
    if layout == "query":
        # The probe's sanity check: the test itself materializes the per-query layout inside the window.
        mask = torch.ones(total_q, H, max_k, dtype=torch.bool)
        bias = torch.zeros(total_q, H, max_k)
    out = run(seqlens, mask, bias, q, k, v)
    after = peak_rss()
    assert torch.isfinite(out).all()
    print(json.dumps({"growth": after - before}))
""")


def peak_rss_growth(layout):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, layout, json.dumps(SEQLENS), json.dumps([H, H_K, D])],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["growth"]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux only")


@linux_only
def test_cpu_key_based_layout_allocates_no_per_query_copy():
    growth = peak_rss_growth("key")
    assert growth < 0.10 * MATERIALIZED_BYTES, (
        f"peak RSS grew by {growth / 2**20:.0f} MiB during the call; a materialized per-query "
        f"copy is {MATERIALIZED_BYTES / 2**20:.0f} MiB")


@linux_only
def test_cpu_memory_probe_sees_a_materialized_layout():
    """Sanity check of the probe: the same measurement does see a (total_q, H, max_seqlen_k) tensor."""
    growth = peak_rss_growth("query")
    assert growth > 0.9 * MATERIALIZED_BYTES, f"the probe saw only {growth / 2**20:.0f} MiB"


@requires_cuda
def test_cuda_key_based_layout_allocates_no_per_query_copy():
    batch = make_batch(SEQLENS, H, H_K, D, torch.float16, "cuda")
    mask = make_mask(batch, "key", "H_k")
    bias = make_bias(batch, "key", "H")
    args = dict(attn_mask=mask, attn_bias=bias, cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_k=batch.cu_seqlens_k,
                max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.max_seqlen_k, return_lse=True)
    import flash_dmattn

    flash_dmattn.flash_dmattn_varlen_func(batch.q, batch.k, batch.v, **args)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out, lse = flash_dmattn.flash_dmattn_varlen_func(batch.q, batch.k, batch.v, **args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    outputs = out.numel() * out.element_size() + lse.numel() * lse.element_size()
    workspace = 16 * 2**20
    assert extra <= outputs + workspace, (
        f"the call allocated {extra / 2**20:.1f} MiB; outputs are {outputs / 2**20:.1f} MiB, "
        f"a materialized per-query copy would be {MATERIALIZED_BYTES / 2**20:.0f} MiB")
