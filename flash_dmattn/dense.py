"""Dense (batch, seqlen, heads, head_dim) entry points and the packed-qkv / packed-kv variants.

A dense batch runs on the varlen kernels as a batch of equal lengths (torch.ops.flash_dmattn.mha_fwd).
Masks and biases are (B or 1, h', S_q or 1, S_k) with h' in {1, H_k, H}: every size-1 dim broadcasts
by stride 0, so (B, h', 1, S_k) is the dense form of the key-based layout and is never copied.
Packed inputs are split into views, never copies.
"""

from typing import Optional, Tuple, Union

import torch

from .varlen import default_scale, flash_dmattn_varlen_func


def flash_dmattn_func(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    is_causal: Optional[bool] = None,
    softcap: Optional[float] = None,
    deterministic: Optional[bool] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over a dense batch.

    Args:
        query: (B, S_q, H, D); key, value: (B, S_k, H_k, D) with H % H_k == 0.
        attn_mask: None or (B or 1, h', S_q or 1, S_k), h' in {1, H_k, H}; bool/uint8/int8/float,
            nonzero keeps a score. attn_bias: the same shapes, in the query dtype or float32.
        scale: default 1 / sqrt(D). is_causal: bottom-right aligned. softcap: > 0 enables it.
        deterministic: accepted for API compatibility; the forward is always deterministic.
        return_lse: also return lse (B, H, S_q) float32.

    Returns:
        out (B, S_q, H, D), or (out, lse) when return_lse is True.
    """
    out, lse = torch.ops.flash_dmattn.mha_fwd(query, key, value, attn_mask, attn_bias,
                                              default_scale(scale, query.shape[-1]),
                                              bool(is_causal), float(softcap or 0.0))
    return (out, lse) if return_lse else out


def flash_dmattn_qkvpacked_func(qkv: torch.Tensor, attn_mask=None, attn_bias=None, scale=None, is_causal=None,
                                softcap=None, deterministic=None, return_lse=False):
    """qkv: (B, S, 3, H, D), split into views. Other arguments as flash_dmattn_func."""
    return flash_dmattn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], attn_mask, attn_bias, scale, is_causal,
                             softcap, deterministic, return_lse)


def flash_dmattn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, attn_mask=None, attn_bias=None, scale=None,
                               is_causal=None, softcap=None, deterministic=None, return_lse=False):
    """q: (B, S_q, H, D); kv: (B, S_k, 2, H_k, D), split into views. Other arguments as flash_dmattn_func."""
    return flash_dmattn_func(q, kv[:, :, 0], kv[:, :, 1], attn_mask, attn_bias, scale, is_causal, softcap,
                             deterministic, return_lse)


def flash_dmattn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: Optional[int] = None,
                                       attn_mask=None, attn_bias=None, scale=None, is_causal=None, softcap=None,
                                       deterministic=None, return_lse=False):
    """qkv: (total, 3, H, D) packed over sequences given by cu_seqlens, split into views."""
    return flash_dmattn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], attn_mask, attn_bias, cu_seqlens, cu_seqlens,
                                    max_seqlen, max_seqlen, scale, is_causal, softcap, deterministic,
                                    return_lse=return_lse)


def flash_dmattn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                      cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                                      max_seqlen_k: Optional[int] = None, attn_mask=None, attn_bias=None, scale=None,
                                      is_causal=None, softcap=None, deterministic=None, return_lse=False):
    """q: (total_q, H, D); kv: (total_k, 2, H_k, D), split into views."""
    return flash_dmattn_varlen_func(q, kv[:, 0], kv[:, 1], attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, scale, is_causal, softcap, deterministic,
                                    return_lse=return_lse)
