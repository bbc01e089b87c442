"""The definition of what flash_dmattn computes (SPEC.md sections 1 and 2), written plainly.

Slow on purpose: one sequence and one query head at a time, plain indexing, no stride tricks.
The tests compare the library against this function computed in float64 ("the truth") and in
the test's own dtype ("what PyTorch itself gets wrong in that dtype").
"""
import math

import torch


def _operand_head(num_operand_heads, h, hk, num_heads, num_heads_k):
    """Which head of a mask/bias with h' heads query head h (of KV head hk) reads."""
    if num_operand_heads == num_heads:
        return h
    if num_operand_heads == num_heads_k:
        return hk
    if num_operand_heads == 1:
        return 0
    raise ValueError(f"mask/bias has {num_operand_heads} heads; expected 1, {num_heads_k} or {num_heads}")


def _operand_block(x, q0, q1, k0, k1, head):
    """The (Lq, Lk) block of a mask/bias for one sequence and one head (key-based: (1, Lk))."""
    if x.dim() == 2:  # key-based (total_k, h'): one value per packed key, same for every query
        return x[k0:k1, head].unsqueeze(0)
    if x.dim() == 3:  # query-based (total_q, h', Kq): column j is the key's index in its sequence
        return x[q0:q1, head, : k1 - k0]
    raise ValueError(f"mask/bias must be 2-D or 3-D, got {x.dim()}-D")


def attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, attn_mask=None, attn_bias=None,
                        scale=None, is_causal=False, softcap=0.0, dtype=torch.float64):
    """Varlen attention forward. Returns (out (total_q, H, D), lse (H, total_q)), both in `dtype`.

    A row that sees no key gets out = 0 and lse = -inf.
    """
    total_q, num_heads, head_dim = q.shape
    num_heads_k = k.shape[1]
    group = num_heads // num_heads_k
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    softcap = softcap or 0.0
    device = q.device

    out = torch.zeros(total_q, num_heads, v.shape[2], dtype=dtype, device=device)
    lse = torch.full((num_heads, total_q), -math.inf, dtype=dtype, device=device)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        len_q, len_k = q1 - q0, k1 - k0
        i = torch.arange(len_q, device=device).unsqueeze(1)
        j = torch.arange(len_k, device=device).unsqueeze(0)
        for h in range(num_heads):
            hk = h // group
            s = scale * (q[q0:q1, h].to(dtype) @ k[k0:k1, hk].to(dtype).T)  # (Lq, Lk)
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            if attn_bias is not None:
                head = _operand_head(attn_bias.shape[1], h, hk, num_heads, num_heads_k)
                s = s + _operand_block(attn_bias, q0, q1, k0, k1, head).to(dtype)
            keep = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
            if attn_mask is not None:
                head = _operand_head(attn_mask.shape[1], h, hk, num_heads, num_heads_k)
                keep = keep & (_operand_block(attn_mask, q0, q1, k0, k1, head) != 0)
            if is_causal:
                keep = keep & (j <= i + len_k - len_q)  # bottom-right aligned
            s = s.masked_fill(~keep, -math.inf)

            sees_something = keep.any(dim=1, keepdim=True)
            p = torch.softmax(s, dim=1)
            p = torch.where(sees_something, p, 0.0)  # softmax of an all -inf row is NaN: use 0
            out[q0:q1, h] = p @ v[k0:k1, hk].to(dtype)
            lse[h, q0:q1] = torch.logsumexp(s, dim=1)  # -inf where nothing is visible
    return out, lse
