"""Steady-state prefill rate of each CUDA layout on one long sequence, beside PyTorch's own
flash-attention SDPA on the same problem: no varlen tail, no mask, so the number is the kernel's
per-tile rate (the benchmark's prefill cases add varlen and mask effects on top).

Each (head dim, causal) problem is checked against SDPA's output before it is timed, with fresh
inputs; the layout is picked through FLASH_DMATTN_WARPGROUPS (0: the row split, 1: warpgroups).

    python dev/dense_prefill_rate.py [--seqlen 16384] [--heads 32 8]
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flash_dmattn


def flops(seqlen, heads, head_dim, causal):
    pairs = seqlen * (seqlen + 1) / 2 if causal else seqlen * seqlen
    return 4 * pairs * heads * head_dim


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, nargs=2, default=(32, 8), metavar=("H", "H_K"))
    args = ap.parse_args()
    h, hk = args.heads
    L = args.seqlen
    dev = "cuda"
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    print(f"{torch.cuda.get_device_name()}: one sequence of {L}, H={h}/{hk}, bf16; TFLOP/s (median of do_bench)")
    print("| D | causal | rows | warpgroups | sdpa flash | max err vs sdpa |")
    print("|---|---|---|---|---|---|")
    for head_dim in (64, 128, 256):
        for causal in (False, True):
            q = torch.randn(L, h, head_dim, device=dev, dtype=torch.bfloat16)
            k = torch.randn(L, hk, head_dim, device=dev, dtype=torch.bfloat16)
            v = torch.randn(L, hk, head_dim, device=dev, dtype=torch.bfloat16)
            # SDPA's flash backend (FlashAttention 2), on K/V heads repeated for the GQA groups.
            qs, ks, vs = (x.repeat_interleave(h // x.shape[1], dim=1).transpose(0, 1).unsqueeze(0) for x in (q, k, v))

            def sdpa():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)

            ref = sdpa()[0].transpose(0, 1).float()
            rates, err = {}, 0.0
            for name, flag in (("rows", "0"), ("warpgroups", "1")):
                os.environ["FLASH_DMATTN_WARPGROUPS"] = flag
                ours = lambda: flash_dmattn.flash_dmattn_varlen_func(  # noqa: E731
                    q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L, max_seqlen_k=L, is_causal=causal)
                out = ours()
                out = out[0] if isinstance(out, tuple) else out
                e = (out.float() - ref).abs().max().item()
                assert e == e and e < 0.05, f"D={head_dim} causal={causal} {name}: max err {e}"
                err = max(err, e)
                rates[name] = flops(L, h, head_dim, causal) / do_bench(ours, return_mode="median") / 1e9
            rates["sdpa"] = flops(L, h, head_dim, causal) / do_bench(sdpa, return_mode="median") / 1e9
            print(f"| {head_dim} | {causal} | {rates['rows']:.0f} | {rates['warpgroups']:.0f} | {rates['sdpa']:.0f} "
                  f"| {err:.3g} |")
    os.environ.pop("FLASH_DMATTN_WARPGROUPS", None)


if __name__ == "__main__":
    main()
