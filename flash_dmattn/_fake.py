"""The fake (meta) implementation of mha_varlen_fwd: output shapes only, so that
torch.compile(fullgraph=True) traces the op as one node and opcheck passes."""

import torch


@torch.library.register_fake("flash_dmattn::mha_varlen_fwd")
def _mha_varlen_fwd_fake(q, k, v, attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, scale, is_causal, softcap, block_table):
    # Outputs follow q alone: k and v may be (total_k, H_k, D) or, with block_table, paged caches
    # (num_pages, page_size, H_k, D).
    total_q, num_heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (total_q, H, D)
    lse = q.new_empty((num_heads, total_q), dtype=torch.float32)       # (H, total_q)
    return out, lse


@torch.library.register_fake("flash_dmattn::mha_fwd")
def _mha_fwd_fake(q, k, v, attn_mask, attn_bias, scale, is_causal, softcap):
    batch, seqlen_q, num_heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)                      # (B, S_q, H, D)
    lse = q.new_empty((num_heads, batch, seqlen_q), dtype=torch.float32).permute(1, 0, 2)  # (B, H, S_q) view
    return out, lse
