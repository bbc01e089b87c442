"""The "flex" backend: PyTorch FlexAttention with the mask on mask_mod and softcap + bias on score_mod.

FlexAttention computes s = scale * q.k, then score_mod(s, b, h, i, j), and keeps a score where
mask_mod(b, h, i, j) is True; that is SPEC.md's order: softcap, + bias, then mask and causal
(bottom-right aligned) to -inf. Broadcast (size-1) dims of the mask/bias are read at index 0, so a
(B, h', 1, S_k) key-based operand is never expanded.

On CUDA, flex_attention and create_block_mask run compiled (torch.compile, compiled once per process);
elsewhere they run eagerly (an unfused implementation that materializes the scores: for small shapes).
"""

import functools
import warnings
from typing import Optional, Tuple, Union

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from ..varlen import default_scale
from .common import check_dense_inputs, head_divisor


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _index(x: torch.Tensor, b, h, i, j, num_heads: int):
    """Element (b, h, i, j) of a (B or 1, h', S_q or 1, S_k) operand; size-1 dims read index 0."""
    return x[b if x.shape[0] > 1 else 0,
             h // head_divisor(x, num_heads),
             i if x.shape[2] > 1 else 0,
             j]


def _make_mask_mod(attn_mask: Optional[torch.Tensor], is_causal: bool, seqlen_q: int, seqlen_k: int,
                   num_heads: int):
    """mask_mod keeping (b, h, i, j) where the mask is nonzero and, if causal, j <= i + S_k - S_q."""
    offset = seqlen_k - seqlen_q

    def mask_mod(b, h, i, j):
        keep = j <= i + offset if is_causal else j >= 0
        if attn_mask is not None:
            keep = keep & (_index(attn_mask, b, h, i, j, num_heads) != 0)
        return keep

    return mask_mod


def _make_score_mod(attn_bias: Optional[torch.Tensor], softcap: float, num_heads: int):
    """score_mod(s) = softcap * tanh(s / softcap) (if softcap > 0) + bias(b, h, i, j) (if a bias)."""

    def score_mod(score, b, h, i, j):
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        if attn_bias is not None:
            score = score + _index(attn_bias, b, h, i, j, num_heads)
        return score

    return score_mod


def flex_dmattn_func(
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
    """Dense attention on FlexAttention, with flash_dmattn_func's arguments and results.

    Args:
        query: (B, S_q, H, D); key, value: (B, S_k, H_k, D) with H % H_k == 0.
        attn_mask: None or (B or 1, h', S_q or 1, S_k), h' in {1, H_k, H}; nonzero keeps a score.
        attn_bias: the same shapes, in the query dtype or float32; added after softcap.
        scale: default 1 / sqrt(D). is_causal: bottom-right aligned. softcap: > 0 enables it.
        deterministic: accepted for API compatibility (the forward is deterministic).
        return_lse: also return lse (B, H, S_q) float32.

    Returns:
        out (B, S_q, H, D) (a transposed view of FlexAttention's (B, H, S_q, D) result), or (out, lse).
        Rows that see no key give out = 0 and lse = -inf.
    """
    check_dense_inputs(query, key, value, attn_mask, attn_bias)
    batch, seqlen_q, num_heads, head_dim = query.shape
    seqlen_k = key.shape[1]
    scale = default_scale(scale, head_dim)
    softcap = float(softcap or 0.0)
    compiled = query.is_cuda

    block_mask = None
    if attn_mask is not None or is_causal:
        mask_mod = _make_mask_mod(attn_mask, bool(is_causal), seqlen_q, seqlen_k, num_heads)
        block_mask = create_block_mask(mask_mod, batch, num_heads, seqlen_q, seqlen_k, device=query.device,
                                       _compile=compiled)
    score_mod = _make_score_mod(attn_bias, softcap, num_heads) if (softcap > 0 or attn_bias is not None) else None

    attention = _compiled_flex_attention() if compiled else flex_attention
    with warnings.catch_warnings():
        # Eager flex_attention warns that it is unfused; eager is the intended mode off CUDA.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, aux = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),  # (B, H, S, D)
                             score_mod=score_mod, block_mask=block_mask, scale=scale,
                             enable_gqa=num_heads != key.shape[2], return_aux=AuxRequest(lse=True))
    lse = aux.lse  # (B, H, S_q) float32
    # A row with no visible key must give exactly 0 (FlexAttention does; this keeps it a guarantee).
    out = out.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0).transpose(1, 2)  # (B, S_q, H, D)
    return (out, lse) if return_lse else out
