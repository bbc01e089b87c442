"""The public varlen entry point: argument defaults over the registered op.

Layout detection (2-D mask/bias = key-based, 3-D = query-based), head broadcasting (h' in
{1, H_k, H} becomes stride-0 strides) and all validation live in one place, the C++ binding,
so the op behaves the same whether it is called from here, from torch.ops or a compiled graph.
"""

import math
from typing import Optional, Tuple, Union

import torch


def cuda_kernels_available() -> bool:
    """True when this build of flash_dmattn carries the CUDA kernels (and a GPU is visible)."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("flash_dmattn::mha_varlen_fwd", "CUDA")
    return has_kernel and torch.cuda.is_available()


def default_scale(scale: Optional[float], head_dim: int) -> float:
    """The score scale: 1 / sqrt(D) unless given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _max_seqlen(cu_seqlens: torch.Tensor) -> int:
    # Reads cu_seqlens: a host synchronization when it lives on a GPU.
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def flash_dmattn_varlen_func(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    scale: Optional[float] = None,
    is_causal: Optional[bool] = None,
    softcap: Optional[float] = None,
    deterministic: Optional[bool] = None,
    block_table: Optional[torch.Tensor] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention forward over a packed batch of variable-length sequences.

    Args:
        query: (total_q, H, D); key, value: (total_k, H_k, D) with H % H_k == 0, or with
            block_table the paged caches (num_pages, page_size, H_k, D).
        attn_mask: None, key-based (total_k, h') or query-based (total_q, h', Kq >= max_seqlen_k),
            h' in {1, H_k, H}; bool/uint8/int8/float: nonzero keeps a score. Never copied.
        attn_bias: None or the same layouts as attn_mask, in the query dtype or float32.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 cumulative lengths.
        max_seqlen_q, max_seqlen_k: upper bounds of the lengths; derived from cu_seqlens when
            omitted, which synchronizes the host with the GPU (pass them under CUDA graphs).
        scale: score scale, default 1 / sqrt(D). is_causal: bottom-right aligned causal mask.
        softcap: > 0 applies softcap * tanh(s / softcap) before the bias; None or 0 is off.
        deterministic: accepted for API compatibility; the forward is always deterministic.
        block_table: None, or (B, max_pages) int32 for a paged KV cache: key j of sequence b is
            key[block_table[b, j // page_size], j % page_size] (any page_size >= 1). The lengths
            still come from cu_seqlens_k (cu_seqlens_k[-1] counts logical keys), key-based
            mask/bias keep one row per logical key, and max_pages * page_size >= max_seqlen_k.
            Page indices are checked on CPU, and on CUDA only with FLASH_DMATTN_DEBUG=1.
        return_lse: also return lse (H, total_q) float32, natural log.

    Returns:
        out (total_q, H, D) in the query dtype, or (out, lse) when return_lse is True.
    """
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("flash_dmattn: cu_seqlens_q and cu_seqlens_k are required (int32, shape (batch + 1,))")
    if max_seqlen_q is None:
        max_seqlen_q = _max_seqlen(cu_seqlens_q)
    if max_seqlen_k is None:
        max_seqlen_k = _max_seqlen(cu_seqlens_k)
    out, lse = torch.ops.flash_dmattn.mha_varlen_fwd(
        query, key, value, attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k,
        int(max_seqlen_q), int(max_seqlen_k), default_scale(scale, query.shape[-1]), bool(is_causal), float(softcap or 0.0), block_table)
    return (out, lse) if return_lse else out
