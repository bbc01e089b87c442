"""What a user without flash_dmattn would run instead, and the reference the benchmark checks against.

* SDPA peer: torch.nn.functional.scaled_dot_product_attention on the padded batch
  q (B, H, max_Lq, D), k/v (B, H, Lk_pad, D) (K/V repeated to H heads, as repeat_interleave does),
  with a materialized float mask (B, Hm, max_Lq, Lk_pad) in the query dtype that folds in the key
  padding (-inf), the mask (-inf where False), the bias (added) and causality (-inf above the
  bottom-right aligned diagonal). Hm is H when the mask or bias differs between heads, 1 otherwise
  (a user would not copy a head-independent mask 32 times). Lk_pad is max_Lk rounded up to 16
  keys, so SDPA's memory-efficient kernel takes the mask as it is instead of padding a copy of it
  on every call. Queries sit at the top of their padded rows; padded query rows are ignored.
* Flex peer: flex_attention (compiled) on the packed sequences as one batch (1, H, total, D):
  a document mask from per-token sequence ids, causality from each token's position in its
  sequence (bottom-right aligned, so decode rows with total_q != total_k work), the key mask
  and the query-based mask via mask_mod (indexing the library's own mask tensors), the bias via
  score_mod, enable_gqa=True, and a block mask from create_block_mask (compiled, dynamic shapes).
* Reference: the SDPA construction above run by SDPA's math backend in float64 (CPU) or float32
  (CUDA), one sequence and a few heads at a time so that it fits in memory; rows that see no key
  are 0 (SPEC.md section 1).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from shapes import Case, Inputs

LK_ALIGN = 16


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _cu_list(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _operand_heads(num_operand_heads: int, heads, H: int, Hk: int):
    """Which of an operand's h' heads each query head in `heads` reads (SPEC.md section 2)."""
    if num_operand_heads == H:
        return list(heads)
    if num_operand_heads == Hk:
        return [h // (H // Hk) for h in heads]
    if num_operand_heads == 1:
        return [0] * len(heads)
    raise ValueError(f"operand with {num_operand_heads} heads; expected 1, {Hk} or {H}")


def sdpa_mask_heads(inp: Inputs) -> bool:
    """True when the materialized mask needs one copy per query head (mask or bias differs by head)."""
    return any(x is not None and x.shape[1] > 1 for x in (inp.mask, inp.bias))


# ----------------------------------------------------------------------------------------------
# SDPA on the padded batch
# ----------------------------------------------------------------------------------------------

@dataclass
class Padded:
    q: torch.Tensor         # (B', Hc, Lq, D)
    k: torch.Tensor         # (B', Hc, Lk_pad, D), K repeated to the query heads
    v: torch.Tensor         # (B', Hc, Lk_pad, D)
    mask: torch.Tensor      # (B', Hm, Lq, Lk_pad), float, -inf hides
    valid_q: torch.Tensor   # (B', Lq) bool: which padded query rows are real

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q, self.k, self.v, self.mask)) + self.q.nbytes  # + padded out


def sdpa_padded_bytes(case: Case, inp: Inputs, dtype: torch.dtype) -> dict:
    """Bytes the SDPA peer needs, predicted before anything is allocated."""
    B, H, D, e = case.batch, case.num_heads, case.head_dim, torch.tensor([], dtype=dtype).element_size()
    Lq, Lk = case.max_q, _round_up(case.max_k, LK_ALIGN)
    hm = H if sdpa_mask_heads(inp) else 1
    tensors = 2 * B * H * Lq * D * e + 2 * B * H * Lk * D * e      # q, out, k, v (padded, repeated)
    mask = B * hm * Lq * Lk * e
    transient = 2 * B * Lq * Lk                                      # bool causal / query-mask terms
    return {"tensors": tensors, "mask": mask, "total": tensors + mask, "peak": tensors + mask + transient}


def _pad_rows(x: torch.Tensor, lengths, b0: int, b1: int, L: int):
    """Packed rows of sequences [b0, b1) -> (b1 - b0, L, ...) zero padded, and the (B', L) valid mask."""
    cu = _cu_list(lengths)
    n = torch.tensor(lengths[b0:b1], device=x.device)
    valid = torch.arange(L, device=x.device)[None, :] < n[:, None]
    out = x.new_zeros((b1 - b0, L) + tuple(x.shape[1:]))
    out[valid] = x[cu[b0]:cu[b1]]
    return out, valid


def _heads_first(x: torch.Tensor, sel: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, L, h, ...) -> contiguous (B, h', L, ...), keeping heads `sel` (repeats allowed) or all."""
    x = x.transpose(1, 2)
    return x.contiguous() if sel is None else x.index_select(1, sel)


def build_padded(case: Case, inp: Inputs, dtype: torch.dtype, seqs=None, heads=None) -> Padded:
    """The padded SDPA problem for sequences seqs=(b0, b1) and query heads `heads` (default: all)."""
    H, Hk = case.num_heads, case.num_heads_k
    b0, b1 = seqs if seqs is not None else (0, case.batch)
    heads = list(heads) if heads is not None else list(range(H))
    all_heads = heads == list(range(H))
    dev = inp.q.device
    lq_list, lk_list = inp.seqlens_q, inp.seqlens_k
    Lq = max(lq_list[b0:b1], default=0)
    Lk = _round_up(max(lk_list[b0:b1], default=0), LK_ALIGN)
    Bp = b1 - b0

    def sel(hp):  # index tensor of operand heads, or None for "all heads, in order"
        idx = _operand_heads(hp, heads, H, Hk)
        return None if idx == list(range(hp)) else torch.tensor(idx, device=dev)

    # Q, K, V padded; K and V repeated from H_k to the query heads (repeat_interleave by gathering).
    q_pad, valid_q = _pad_rows(inp.q.to(dtype), lq_list, b0, b1, Lq)
    q = _heads_first(q_pad, None if all_heads else torch.tensor(heads, device=dev))
    k_pad, valid_k = _pad_rows(inp.k.to(dtype), lk_list, b0, b1, Lk)
    v_pad, _ = _pad_rows(inp.v.to(dtype), lk_list, b0, b1, Lk)
    kv_sel = torch.tensor(_operand_heads(Hk, heads, H, Hk), device=dev)
    k, v = _heads_first(k_pad, kv_sel), _heads_first(v_pad, kv_sel)
    del q_pad, k_pad, v_pad

    per_head = sdpa_mask_heads(inp)

    def operand(x, fill):
        """Mask/bias as a broadcastable (B', h'', 1 or Lq, Lk) tensor; h'' is 1 or len(heads)."""
        hp = x.shape[1]
        s = sel(hp) if (per_head and hp > 1) else None
        if x.dim() == 2:                                   # key-based (total_k, h')
            padded, _ = _pad_rows(x, lk_list, b0, b1, Lk)  # (B', Lk, h')
            padded = padded.transpose(1, 2)                # (B', h', Lk)
            if s is not None:
                padded = padded.index_select(1, s)
            elif not per_head or hp == 1:
                padded = padded[:, :1]
            return padded.unsqueeze(2)                     # (B', h'', 1, Lk)
        kq = min(x.shape[2], Lk)                           # query-based (total_q, h', Kq)
        padded, _ = _pad_rows(x[:, :, :kq], lq_list, b0, b1, Lq)   # (B', Lq, h', kq)
        if kq < Lk:
            padded = F.pad(padded, (0, Lk - kq), value=fill)
        padded = padded.transpose(1, 2)                    # (B', h', Lq, Lk)
        if s is not None:
            padded = padded.index_select(1, s)
        elif not per_head or hp == 1:
            padded = padded[:, :1]
        return padded

    # Key-side terms, (B', h'', 1, Lk): padding and a key-based mask hide, a key-based bias adds.
    col_keep = valid_k[:, None, None, :]
    col_add = None
    row_keep = None                                        # (B', 1 or h'', Lq, Lk) terms
    row_add = None
    if inp.mask is not None:
        m = operand(inp.mask != 0 if inp.mask.dtype != torch.bool else inp.mask, False)
        if inp.mask.dim() == 2:
            col_keep = col_keep & m
        else:
            row_keep = m
    if inp.bias is not None:
        bterm = operand(inp.bias.to(dtype), 0.0)
        if inp.bias.dim() == 2:
            col_add = bterm
        else:
            row_add = bterm
    if inp.causal:
        i = torch.arange(Lq, device=dev)[:, None]
        j = torch.arange(Lk, device=dev)[None, :]
        offset = torch.tensor([lk - lq for lq, lk in zip(lq_list[b0:b1], lk_list[b0:b1])], device=dev)
        causal = j[None] <= i[None] + offset[:, None, None]    # bottom-right aligned, (B', Lq, Lk)
        causal = causal[:, None]
        row_keep = causal if row_keep is None else (row_keep & causal)
        del causal

    neg_inf = float("-inf")
    col = torch.where(col_keep, col_add if col_add is not None else torch.zeros((), dtype=dtype, device=dev),
                      neg_inf).to(dtype)                   # (B', h'', 1, Lk)
    if row_add is not None:
        col = col + row_add
    hm = len(heads) if per_head else 1
    if row_keep is not None:
        mask = torch.where(row_keep, col, neg_inf)
    else:
        mask = col
    mask = mask.expand(Bp, hm, Lq, Lk).contiguous()        # materialized, as a user would hand it over
    return Padded(q, k, v, mask, valid_q)


def sdpa_run(p: Padded) -> torch.Tensor:
    """The timed call: SDPA with the materialized mask (backend chosen by PyTorch)."""
    return F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=p.mask)


def unpad(out: torch.Tensor, valid_q: torch.Tensor) -> torch.Tensor:
    """(B', Hc, Lq, D) padded output -> (total_q', Hc, D) packed."""
    return out.transpose(1, 2)[valid_q]


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def reference(case: Case, inp: Inputs, dtype: torch.dtype, budget_bytes: int) -> torch.Tensor:
    """(total_q, H, D) in `dtype`: SDPA's math backend on the padded problem, a sequence and a
    chunk of heads at a time (each chunk's mask, scores and probabilities within budget_bytes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, D = case.num_heads, case.head_dim
    out = torch.zeros(case.total_q, H, D, dtype=dtype, device=inp.q.device)
    cu_q = _cu_list(inp.seqlens_q)
    e = torch.tensor([], dtype=dtype).element_size()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for b in range(case.batch):
            lq, lk = inp.seqlens_q[b], inp.seqlens_k[b]
            if lq == 0 or lk == 0:
                continue                                   # no key: the row is 0
            per_head = 4 * lq * _round_up(lk, LK_ALIGN) * e
            hc = max(1, min(H, budget_bytes // max(per_head, 1)))
            for h0 in range(0, H, hc):
                heads = range(h0, min(H, h0 + hc))
                p = build_padded(case, inp, dtype, seqs=(b, b + 1), heads=heads)
                with sdpa_kernel([SDPBackend.MATH]):
                    o = F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=p.mask)
                out[cu_q[b]:cu_q[b + 1], h0:h0 + len(heads)] = unpad(o, p.valid_q)
                del p, o
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.nan_to_num(out, nan=0.0)                  # a row with no visible key: 0


# ----------------------------------------------------------------------------------------------
# FlexAttention on the packed batch
# ----------------------------------------------------------------------------------------------

def flex_importable() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        return True
    except Exception:
        return False


def _head_selector(num_operand_heads: int, H: int, Hk: int):
    """h (query head index, a tensor inside mask_mod/score_mod) -> the operand's head index."""
    if num_operand_heads == H:
        return lambda h: h
    if num_operand_heads == Hk:
        group = H // Hk
        return lambda h: h // group
    return lambda h: 0


class FlexPeer:
    """flex_attention over (1, H, total_q, D) x (1, H_k, total_k, D) with doc/causal/mask mods."""

    def __init__(self, case: Case, inp: Inputs, compile: bool = True):
        from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention

        dev = inp.q.device
        H, Hk = case.num_heads, case.num_heads_k
        lq = torch.tensor(inp.seqlens_q, device=dev)
        lk = torch.tensor(inp.seqlens_k, device=dev)
        docs = torch.arange(case.batch, device=dev, dtype=torch.int32)
        # Per-token bookkeeping (int32): sequence id, position in the sequence, last causal key.
        self.q_doc = torch.repeat_interleave(docs, lq)
        self.kv_doc = torch.repeat_interleave(docs, lk)
        cu_q = inp.cu_seqlens_q.long()
        cu_k = inp.cu_seqlens_k.long()
        q_pos = torch.arange(case.total_q, device=dev) - cu_q[self.q_doc.long()]
        self.kv_pos = (torch.arange(case.total_k, device=dev) - cu_k[self.kv_doc.long()]).to(torch.int32)
        self.q_last = (q_pos + (lk - lq)[self.q_doc.long()]).to(torch.int32)   # bottom-right aligned

        q_doc, kv_doc, kv_pos, q_last = self.q_doc, self.kv_doc, self.kv_pos, self.q_last

        def document(b, h, q_idx, kv_idx):
            return q_doc[q_idx] == kv_doc[kv_idx]

        def causal(b, h, q_idx, kv_idx):
            return kv_pos[kv_idx] <= q_last[q_idx]

        mods = [document] + ([causal] if case.causal else [])
        per_head = False
        if inp.mask is not None:
            mask, mh = inp.mask, _head_selector(inp.mask.shape[1], H, Hk)
            per_head = inp.mask.shape[1] > 1
            if mask.dim() == 2:
                def key_mask(b, h, q_idx, kv_idx):
                    return mask[kv_idx, mh(h)]
                mods.append(key_mask)
            else:
                def query_mask(b, h, q_idx, kv_idx):
                    return mask[q_idx, mh(h), kv_pos[kv_idx]]
                mods.append(query_mask)
        self.mask_mod = and_masks(*mods)

        self.score_mod = None
        if inp.bias is not None:
            bias, bh = inp.bias, _head_selector(inp.bias.shape[1], H, Hk)
            if bias.dim() == 2:
                def key_bias(score, b, h, q_idx, kv_idx):
                    return score + bias[kv_idx, bh(h)]
            else:
                def key_bias(score, b, h, q_idx, kv_idx):
                    return score + bias[q_idx, bh(h), kv_pos[kv_idx]]
            self.score_mod = key_bias

        self.block_mask_heads = H if per_head else None
        self.total_q, self.total_k = case.total_q, case.total_k
        self.device = dev
        # The timed call is compiled for its exact shapes (dynamic shapes made flex's kernels up to
        # 1.7x slower on the H100). create_block_mask, a one-off cost reported on its own, is compiled
        # with dynamic shapes: with static ones its compile took up to 45 s per prefill shape.
        self._create_block_mask = torch.compile(create_block_mask, dynamic=True) if compile else create_block_mask
        self._flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
        # (1, H, total_q, D) and (1, H_k, total_k, D): the packed batch as one long sequence.
        self.q = inp.q.transpose(0, 1).unsqueeze(0).contiguous()
        self.k = inp.k.transpose(0, 1).unsqueeze(0).contiguous()
        self.v = inp.v.transpose(0, 1).unsqueeze(0).contiguous()
        self.block_mask = None
        self.extra_bytes = sum(t.nbytes for t in (self.q_doc, self.kv_doc, self.kv_pos, self.q_last))
        self.extra_bytes += sum(t.nbytes for t in (inp.mask, inp.bias) if t is not None)

    def build_block_mask(self):
        self.block_mask = self._create_block_mask(
            self.mask_mod, 1, self.block_mask_heads, self.total_q, self.total_k, device=self.device)
        return self.block_mask

    @property
    def block_mask_bytes(self) -> int:
        bm = self.block_mask
        names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
        return sum(getattr(bm, n).nbytes for n in names if getattr(bm, n, None) is not None)

    def run(self) -> torch.Tensor:
        return self._flex(self.q, self.k, self.v, score_mod=self.score_mod, block_mask=self.block_mask,
                          enable_gqa=True)

    @staticmethod
    def unpack(out: torch.Tensor) -> torch.Tensor:
        """(1, H, total_q, D) -> (total_q, H, D)."""
        return out[0].transpose(0, 1)
