"""The "triton" backend: a Triton kernel of the dense attention forward.

One program computes a BLOCK_M tile of queries of one (batch, head) with an online softmax over
BLOCK_N tiles of keys. The mask and bias are read through element strides where a broadcast (size-1)
dim has stride 0, and query head h reads mask/bias head h // head_div (h' in {1, H_k, H}), so nothing
is expanded. Semantics are SPEC.md's: s = scale * q.k, softcap, + bias, mask and causal (bottom-right
aligned) to -inf; a row that sees no key gives out = 0 and lse = -inf.

This module imports triton; flash_dmattn imports it only when the triton backend is first called.
It runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

import os
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from ..varlen import default_scale
from .common import check_dense_inputs, head_divisor


@triton.jit
def _dense_fwd_kernel(
    Q, K, V, Out, Lse, Mask, Bias,
    stride_qb, stride_qs, stride_qh,          # query (B, S_q, H, D), last dim contiguous
    stride_kb, stride_ks, stride_kh,          # key (B, S_k, H_k, D)
    stride_vb, stride_vs, stride_vh,          # value (B, S_k, H_k, D)
    stride_ob, stride_os, stride_oh,          # out (B, S_q, H, D)
    stride_mb, stride_mh, stride_mi, stride_mj,  # mask (B|1, h', S_q|1, S_k): 0 on broadcast dims
    stride_bb, stride_bh, stride_bi, stride_bj,  # bias, likewise
    num_heads, group, mask_head_div, bias_head_div,
    seqlen_q, seqlen_k, head_dim,
    scale, softcap,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    hk = h // group

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this tile
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < head_dim

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + (h // mask_head_div) * stride_mh
    bias_base = Bias + b * stride_bb + (h // bias_head_div) * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of exp(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Causal: key j is visible to query i iff j <= i + S_k - S_q, so keys past the tile's last
    # query's diagonal are never loaded.
    end_n = seqlen_k
    if IS_CAUSAL:
        end_n = tl.minimum(seqlen_k, (start_m + 1) * BLOCK_M + seqlen_k - seqlen_q)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        kv_ok = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (BLOCK_M, BLOCK_N)
        if HAS_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * stride_bi + cols[None, :] * stride_bj,
                           mask=tile_ok, other=0.0)
            s += bias.to(tl.float32)
        keep = tile_ok
        if HAS_MASK:
            m = tl.load(mask_base + offs_m[:, None] * stride_mi + cols[None, :] * stride_mj, mask=tile_ok, other=0)
            keep = keep & (m != 0)
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + seqlen_k - seqlen_q)
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: exp(-inf) = 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that see no key: acc = 0 -> out = 0
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh * seqlen_q + offs_m, lse, mask=row_ok)


def _operand_strides(x: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
    """Element strides of a (B|1, h', S_q|1, S_k) mask/bias, 0 on its size-1 (broadcast) dims."""
    if x is None:
        return (0, 0, 0, 0)
    return tuple(0 if size == 1 else stride for size, stride in zip(x.shape, x.stride()))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_dmattn_func(
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
    """Dense attention on the Triton kernel, with flash_dmattn_func's arguments and results.

    Args:
        query: (B, S_q, H, D); key, value: (B, S_k, H_k, D) with H % H_k == 0; CUDA tensors
            (CPU tensors only under TRITON_INTERPRET=1); float16, bfloat16 or float32.
        attn_mask: None or (B or 1, h', S_q or 1, S_k), h' in {1, H_k, H}; nonzero keeps a score.
        attn_bias: the same shapes, in the query dtype or float32.
        scale: default 1 / sqrt(D). is_causal: bottom-right aligned. softcap: > 0 enables it.
        deterministic: accepted for API compatibility (the forward is deterministic).
        return_lse: also return lse (B, H, S_q) float32.

    Returns:
        out (B, S_q, H, D) in the query's dtype, or (out, lse).
    """
    check_dense_inputs(query, key, value, attn_mask, attn_bias)
    if query.device.type != "cuda" and not _interpreting():
        raise ValueError(f"triton_dmattn_func needs CUDA tensors, got {query.device} "
                         "(CPU tensors run only under Triton's interpreter, TRITON_INTERPRET=1)")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton_dmattn_func: query dtype {query.dtype}; accepted: float16, bfloat16, float32")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape[-1] > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = attn_mask.view(torch.uint8)  # same bytes; Triton loads bool pointers as int1 only on GPU

    batch, seqlen_q, num_heads, head_dim = query.shape
    seqlen_k, num_heads_k = key.shape[1], key.shape[2]
    out = torch.empty_like(query, memory_format=torch.contiguous_format)  # (B, S_q, H, D)
    lse = torch.empty(batch, num_heads, seqlen_q, dtype=torch.float32, device=query.device)
    if out.numel() == 0 or lse.numel() == 0:
        lse.fill_(float("-inf"))
        return (out.zero_(), lse) if return_lse else out.zero_()

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n = (64, 64) if block_d <= 128 else (64, 32)
    grid = (triton.cdiv(seqlen_q, block_m), batch * num_heads)
    softcap = float(softcap or 0.0)
    _dense_fwd_kernel[grid](
        query, key, value, out, lse,
        query if attn_mask is None else attn_mask,   # unused pointer when there is no mask
        query if attn_bias is None else attn_bias,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
        *_operand_strides(attn_mask), *_operand_strides(attn_bias),
        num_heads, num_heads // num_heads_k,
        1 if attn_mask is None else head_divisor(attn_mask, num_heads),
        1 if attn_bias is None else head_divisor(attn_bias, num_heads),
        seqlen_q, seqlen_k, head_dim,
        default_scale(scale, head_dim), softcap,
        HAS_MASK=attn_mask is not None, HAS_BIAS=attn_bias is not None, IS_CAUSAL=bool(is_causal),
        HAS_SOFTCAP=softcap > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return (out, lse) if return_lse else out
