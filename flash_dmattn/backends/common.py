"""Argument checks shared by the Python backends ("flex", "triton") of the dense (B, S, H, D) API.

The C/CUDA backends validate in their C++ binding; these checks give the same messages for the
backends that are written in Python, before any kernel runs.
"""

from typing import Optional

import torch


def check_dense_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor]) -> None:
    """query (B, S_q, H, D); key, value (B, S_k, H_k, D); mask/bias (B or 1, h', S_q or 1, S_k)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; query is {query.dtype} on {query.device}")
    batch, seqlen_q, num_heads, head_dim = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape")
    if key.shape[0] != batch:
        raise ValueError(f"key/value batch {key.shape[0]} != query batch {batch}")
    if key.shape[3] != head_dim:
        raise ValueError(f"key/value head_dim {key.shape[3]} != query head_dim {head_dim}")
    num_heads_k = key.shape[2]
    if num_heads_k == 0 or num_heads % num_heads_k != 0:
        raise ValueError(f"query heads {num_heads} must be a multiple of key/value heads {num_heads_k}")
    seqlen_k = key.shape[1]
    for name, x in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if x is None:
            continue
        accepted = (f"({batch} or 1, {num_heads} or {num_heads_k} or 1, {seqlen_q} or 1, {seqlen_k})")
        ok = (x.dim() == 4 and x.shape[0] in (batch, 1) and x.shape[1] in (num_heads, num_heads_k, 1)
              and x.shape[2] in (seqlen_q, 1) and x.shape[3] == seqlen_k)
        if not ok:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; accepted: {accepted}")
        if x.device != query.device:
            raise ValueError(f"{name} is on {x.device}; query is on {query.device}")
    if attn_bias is not None and attn_bias.dtype not in (query.dtype, torch.float32):
        raise ValueError(f"attn_bias is {attn_bias.dtype}; accepted: {query.dtype} (the query's) or float32")


def head_divisor(x: torch.Tensor, num_heads: int) -> int:
    """Query head h reads head h // head_divisor of a mask/bias with h' = x.shape[1] heads.

    h' == H -> 1 (head h); h' == H_k -> H / H_k (h's KV head); h' == 1 -> H (head 0).
    """
    return num_heads // x.shape[1]
