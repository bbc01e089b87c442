"""Batch decoding with a key-based dynamic mask and bias (the seed example), checked against a
float64 reference. Runs on CUDA when the kernels and a GPU are there, on the CPU otherwise.

    python examples/varlen_demo.py
"""

import torch

from flash_dmattn import cuda_kernels_available, flash_dmattn_varlen_func


def reference(q, k, v, cu_q, cu_k, mask, bias, num_groups):
    """Per sequence: s = scale q k^T + bias, hidden keys -> -inf, softmax, in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        qb = q[qs:qe].double().transpose(0, 1)                                      # (H, Lq, D)
        kb = k[ks:ke].double().repeat_interleave(num_groups, 1).transpose(0, 1)     # (H, Lk, D)
        vb = v[ks:ke].double().repeat_interleave(num_groups, 1).transpose(0, 1)     # (H, Lk, D)
        add = bias[ks:ke].double().repeat_interleave(num_groups, 1).t()[:, None, :]  # (H, 1, Lk)
        keep = mask[ks:ke].repeat_interleave(num_groups, 1).t()[:, None, :]         # (H, 1, Lk)
        s = qb @ kb.transpose(1, 2) / qb.shape[-1] ** 0.5 + add
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
        out[qs:qe] = (p @ vb).transpose(0, 1)
    return out


def main():
    device = "cuda" if cuda_kernels_available() else "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    num_heads, num_heads_k, head_dim = 32, 8, 128
    # 4 sequences with 1-2 new queries each and 256 cached keys each.
    cu_seqlens_q = torch.tensor([0, 1, 3, 4, 6], dtype=torch.int32, device=device)        # total_q = 6
    cu_seqlens_k = torch.tensor([0, 256, 512, 768, 1024], dtype=torch.int32, device=device)  # total_k = 1024
    q = torch.randn(6, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(1024, num_heads_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(1024, num_heads_k, head_dim, dtype=dtype, device=device)
    # Key-based layout (total_k, H_k): one value per cached key and KV head, shared by all queries.
    attn_mask = torch.rand(1024, num_heads_k, device=device) < 0.5
    attn_bias = torch.randn(1024, num_heads_k, dtype=dtype, device=device)

    out = flash_dmattn_varlen_func(
        q, k, v, attn_mask=attn_mask, attn_bias=attn_bias,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=2, max_seqlen_k=256)

    ref = reference(q.cpu(), k.cpu(), v.cpu(), cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), attn_mask.cpu(),
                    attn_bias.cpu(), num_heads // num_heads_k)
    err = (out.cpu().double() - ref).abs().max().item()
    print(f"device={device} dtype={dtype} out={tuple(out.shape)} max|out - float64 reference| = {err:.3e}")
    print("ok" if err < 2e-2 else "MISMATCH")
    raise SystemExit(0 if err < 2e-2 else 1)


if __name__ == "__main__":
    main()
