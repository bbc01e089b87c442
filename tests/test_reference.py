"""The reference is the definition; check it once against PyTorch's SDPA, independently written."""
import math

import torch
import torch.nn.functional as F

from conftest import make_batch, make_bias, make_mask
from reference import attention_reference


def sdpa_one_sequence(q, k, v, keep, bias, scale):
    """SDPA on one sequence: q (Lq, H, D), k/v (Lk, H, D), keep/bias (H, Lq, Lk), all float64."""
    float_mask = bias.masked_fill(~keep, -math.inf)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=float_mask, scale=scale)
    return out.transpose(0, 1)


def test_reference_matches_sdpa_with_gqa_mask_bias_causal():
    seqlens = [(5, 9), (7, 7), (3, 12)]
    batch = make_batch(seqlens, num_heads=6, num_heads_k=2, head_dim=16, dtype=torch.float64, device="cpu")
    mask = make_mask(batch, "key", "H_k", density=0.8)
    bias = make_bias(batch, "query", "H")
    # Keep the first key of every sequence and head visible so that no SDPA row is all -inf (NaN).
    for b in range(len(seqlens)):
        mask[batch.cu_seqlens_k[b].item()] = True
    out, lse = attention_reference(batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k,
                                   attn_mask=mask, attn_bias=bias, scale=0.3, is_causal=True)
    group = 3
    for b, (lq, lk) in enumerate(seqlens):
        q0, k0 = batch.cu_seqlens_q[b].item(), batch.cu_seqlens_k[b].item()
        q, k, v = batch.q[q0:q0 + lq], batch.k[k0:k0 + lk], batch.v[k0:k0 + lk]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        keep = mask[k0:k0 + lk].repeat_interleave(group, dim=1).T[:, None, :].expand(6, lq, lk)
        causal = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        keep = keep & causal
        seq_bias = bias[q0:q0 + lq, :, :lk].transpose(0, 1)
        expected = sdpa_one_sequence(q, k, v, keep, seq_bias, 0.3)
        torch.testing.assert_close(out[q0:q0 + lq], expected)
        scores = 0.3 * torch.einsum("ihd,jhd->hij", q, k) + seq_bias
        expected_lse = torch.logsumexp(scores.masked_fill(~keep, -math.inf), dim=-1)
        torch.testing.assert_close(lse[:, q0:q0 + lq], expected_lse)


def test_reference_hidden_rows_are_zero_and_minus_inf():
    batch = make_batch([(3, 4), (2, 0)], num_heads=2, num_heads_k=1, head_dim=8,
                       dtype=torch.float64, device="cpu")
    mask = torch.ones(batch.total_q, 2, batch.max_seqlen_k, dtype=torch.bool)
    mask[1, 0] = False  # query 1, head 0 sees nothing
    out, lse = attention_reference(batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k,
                                   attn_mask=mask)
    assert not torch.isnan(out).any()
    assert torch.isneginf(lse).tolist() == [[False, True, False, True, True], [False, False, False, True, True]]
    assert (out[1, 0] == 0).all() and (out[3:] == 0).all()


def test_reference_key_layout_equals_its_query_expansion():
    """Key-based (total_k, h') and its per-query expansion (total_q, h', max_seqlen_k) define the same thing."""
    seqlens = [(2, 5), (3, 3)]
    batch = make_batch(seqlens, num_heads=4, num_heads_k=2, head_dim=8, dtype=torch.float64, device="cpu")
    mask = make_mask(batch, "key", "1")
    bias = make_bias(batch, "key", "H")
    qmask = torch.zeros(batch.total_q, 1, batch.max_seqlen_k, dtype=torch.bool)
    qbias = torch.zeros(batch.total_q, 4, batch.max_seqlen_k, dtype=torch.float64)
    for b, (lq, lk) in enumerate(seqlens):
        q0, k0 = batch.cu_seqlens_q[b].item(), batch.cu_seqlens_k[b].item()
        for i in range(lq):
            qmask[q0 + i, :, :lk] = mask[k0:k0 + lk].T
            qbias[q0 + i, :, :lk] = bias[k0:k0 + lk].T
    args = (batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k)
    a = attention_reference(*args, attn_mask=mask, attn_bias=bias)
    b = attention_reference(*args, attn_mask=qmask, attn_bias=qbias)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
