"""The benchmark problems: shapes, random inputs (fixed seeds) and what each problem costs at least.

A `Case` describes one packed varlen problem; `make_inputs` draws its tensors on a device, and
`work_of` counts what the roofline metrics of bench_varlen.py divide by:

* dense pairs:   (query, key) pairs the causal structure alone leaves visible, summed over query
                 heads. Issue 5's prefill TFLOP/s counts these (a mask that hides keys does not
                 lower the count, so a kernel that skips hidden keys shows a higher rate).
* visible pairs: pairs also visible through the mask, summed over query heads: the "useful" rate.
* bytes:         Q, K, V and mask/bias read once, O and LSE written once: the HBM byte floor.

The paged suite (issue 7) runs decode cases on paged K/V caches: `paged_cases` names them, and
`make_paged` copies a case's K and V into shuffled pages of a pool and builds the block table.

FLOPs are 4 * pairs * D (two matmuls, QK^T and PV, of 2 FLOPs per multiply-add).
"""
import random
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# Mask kinds: "none"; "key" = key-based (total_k, h') bool, keeping a random `keep` fraction
# (keep=1.0: all True); "query-block" = query-based (total_q, h', max_seqlen_k) bool, made of
# 64x64 tiles of which a random `keep` fraction is all True and the rest all False (the diagonal
# tiles always kept, so no row is empty). Bias kinds: "none"; "key" = key-based (total_k, h').
MASK_KINDS = ("none", "key", "query-block")
BIAS_KINDS = ("none", "key")
TILE = 64


@dataclass(frozen=True)
class Case:
    name: str
    suite: str                      # "decode" or "prefill": which headline metric the row is read by
    seqlens_q: Tuple[int, ...]
    seqlens_k: Tuple[int, ...]
    num_heads: int                  # H
    num_heads_k: int                # H_k
    head_dim: int                   # D
    dtype: torch.dtype
    causal: bool
    mask: str = "none"
    mask_keep: float = 1.0
    mask_heads: str = "H_k"         # h' of the mask: "1", "H_k" or "H"
    bias: str = "none"
    bias_heads: str = "H_k"
    seed: int = 0
    note: str = ""

    def heads_of(self, which: str) -> int:
        return {"1": 1, "H_k": self.num_heads_k, "H": self.num_heads}[which]

    @property
    def batch(self) -> int:
        return len(self.seqlens_q)

    @property
    def total_q(self) -> int:
        return sum(self.seqlens_q)

    @property
    def total_k(self) -> int:
        return sum(self.seqlens_k)

    @property
    def max_q(self) -> int:
        return max(self.seqlens_q, default=0)

    @property
    def max_k(self) -> int:
        return max(self.seqlens_k, default=0)

    def describe(self) -> str:
        """One line: B, lengths, heads, dtype, mask and bias."""
        def span(xs):
            return f"{min(xs)}" if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"
        parts = [f"B={self.batch} Lq={span(self.seqlens_q)} Lk={span(self.seqlens_k)}",
                 f"H={self.num_heads}/{self.num_heads_k} D={self.head_dim} {DTYPE_NAMES[self.dtype]}"]
        if self.causal:
            parts.append("causal")
        if self.mask == "key":
            parts.append(f"key mask ({self.mask_heads}) keep {self.mask_keep:.0%}")
        elif self.mask == "query-block":
            parts.append(f"query block mask ({self.mask_heads}) {TILE}x{TILE} tiles keep {self.mask_keep:.0%}")
        if self.bias == "key":
            parts.append(f"key bias ({self.bias_heads})")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)


@dataclass
class Inputs:
    """The tensors of one case on one device, in the library's packed layout."""
    q: torch.Tensor                 # (total_q, H, D)
    k: torch.Tensor                 # (total_k, H_k, D)
    v: torch.Tensor                 # (total_k, H_k, D)
    cu_seqlens_q: torch.Tensor      # (B + 1,) int32
    cu_seqlens_k: torch.Tensor      # (B + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int
    mask: Optional[torch.Tensor]    # None, (total_k, h') or (total_q, h', max_seqlen_k), bool
    bias: Optional[torch.Tensor]    # None or (total_k, h'), dtype of q
    causal: bool
    seqlens_q: List[int] = field(default_factory=list)
    seqlens_k: List[int] = field(default_factory=list)

    def nbytes(self, *names) -> int:
        return sum(getattr(self, n).nbytes for n in names if getattr(self, n) is not None)


# ----------------------------------------------------------------------------------------------
# The suites
# ----------------------------------------------------------------------------------------------

def _random_lengths(n, lo, hi, seed):
    rng = random.Random(seed)
    return tuple(rng.randint(lo, hi) for _ in range(n))


def cpu_cases(dtypes=(torch.float32, torch.bfloat16)) -> List[Case]:
    """Issue 2: a decode-like and a prefill-like shape, sized for a 2-core machine."""
    cases = []
    for dt in dtypes:
        tag = DTYPE_NAMES[dt]
        # 8 sequences, 1-4 new queries each over 1k-4k cached keys; the mask keeps ~50% of the keys.
        cases.append(Case(
            f"cpu-decode-{tag}", "decode",
            seqlens_q=_random_lengths(8, 1, 4, seed=1), seqlens_k=_random_lengths(8, 1024, 4096, seed=2),
            num_heads=8, num_heads_k=2, head_dim=64, dtype=dt, causal=True,
            mask="key", mask_keep=0.5, bias="key", seed=10))
        # 4 prompts of 128-512 tokens, causal, key-based mask (~50%) + bias.
        lens = _random_lengths(4, 128, 512, seed=3)
        cases.append(Case(
            f"cpu-prefill-{tag}", "prefill", seqlens_q=lens, seqlens_k=lens,
            num_heads=8, num_heads_k=2, head_dim=64, dtype=dt, causal=True,
            mask="key", mask_keep=0.5, bias="key", seed=11))
    # The seed document's example (../shared/seeds/000): 4 sequences, 1-2 queries, 256 keys each.
    cases.append(_seed_example("cpu-seed", torch.float32))
    return cases


def _seed_example(name, dtype) -> Case:
    return Case(
        name, "decode", seqlens_q=(1, 2, 1, 2), seqlens_k=(256, 256, 256, 256),
        num_heads=32, num_heads_k=8, head_dim=128, dtype=dtype, causal=False,
        mask="key", mask_keep=0.5, bias="key", seed=12, note="seed 000 example")


def cuda_decode_cases() -> List[Case]:
    """Issue 4: bf16, D=128, H=32, H_k=8, key-based mask (per KV head) + key-based bias (per KV head).

    Decode rows with several queries per sequence are causal (bottom-right aligned: the new
    queries are the last tokens of their sequence, as in speculative decoding); the seed
    example is not (as written in the seed).
    """
    common = dict(num_heads=32, num_heads_k=8, head_dim=128, dtype=torch.bfloat16, causal=True,
                  mask="key", bias="key")
    lq = _random_lengths(16, 1, 8, seed=4)            # 16 sequences, 1-8 queries each
    lk = _random_lengths(16, 2048, 16384, seed=5)     # 2k-16k cached keys each
    return [
        Case("decode-a", "decode", lq, lk, mask_keep=1.0, seed=20, note="mask all True", **common),
        Case("decode-b", "decode", lq, lk, mask_keep=0.25, seed=21, **common),
        Case("decode-c", "decode", (1,), (131072,), mask_keep=1.0, seed=22, note="mask all True", **common),
        Case("decode-d", "decode", (1,) * 64, (4096,) * 64, mask_keep=1.0, seed=23, note="mask all True",
             **common),
        _seed_example("decode-e", torch.bfloat16),
    ]


PREFILL_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 768, 3072)


def cuda_prefill_cases() -> List[Case]:
    """Issue 5: bf16, H=32, H_k=8, causal, 8 prompts of 256..8192 tokens packed (19968 tokens)."""
    L = PREFILL_LENGTHS
    common = dict(num_heads=32, num_heads_k=8, dtype=torch.bfloat16, causal=True)
    return [
        Case("prefill-a", "prefill", L, L, head_dim=128, seed=30, note="no mask, no bias", **common),
        Case("prefill-b", "prefill", L, L, head_dim=128, mask="key", mask_keep=1.0, bias="key", seed=31,
             note="mask all True", **common),
        Case("prefill-c", "prefill", L, L, head_dim=128, mask="key", mask_keep=0.5, bias="key", seed=32,
             **common),
        # (total_q, 1, max_seqlen_k) bool = 19968 x 8192 bytes = 164 MB; with the key bias of (b),
        # so that (d) against (b) shows what the tile skip saves.
        Case("prefill-d", "prefill", L, L, head_dim=128, mask="query-block", mask_keep=0.1, mask_heads="1",
             bias="key", seed=33, **common),
        Case("prefill-e64", "prefill", L, L, head_dim=64, seed=34, note="no mask, no bias", **common),
        Case("prefill-e256", "prefill", L, L, head_dim=256, seed=35, note="no mask, no bias", **common),
    ]


# Issue 7: page sizes of the paged suite, timed against the contiguous cache in one run.
PAGE_SIZES = (1, 16, 256)


def _paged(case: Case) -> Case:
    import dataclasses
    note = (case.note + ", " if case.note else "") + "paged K/V caches"
    return dataclasses.replace(case, name=case.name + "-paged", suite="paged", note=note)


def cuda_paged_cases() -> List[Case]:
    """Issue 7: the decode shapes decode-a .. decode-d of issue 4 on paged K/V caches."""
    return [_paged(c) for c in cuda_decode_cases() if c.name in ("decode-a", "decode-b", "decode-c", "decode-d")]


def cpu_paged_cases() -> List[Case]:
    """The float32 decode-like CPU shapes (cpu-decode-fp32 and the seed example) on paged K/V caches."""
    return [_paged(c) for c in cpu_cases((torch.float32,)) if c.suite == "decode"]


def shrink(case: Case, factor: int) -> Case:
    """A tiny copy of a case with the same structure (for --smoke runs of the GPU suites on a CPU)."""
    import dataclasses
    hk = min(case.num_heads_k, 2)
    h = hk * min(case.num_heads // case.num_heads_k, 2)
    return dataclasses.replace(
        case, name=case.name + "-smoke",
        seqlens_q=tuple(max(1, x // factor) if case.suite == "prefill" else x for x in case.seqlens_q),
        seqlens_k=tuple(max(1, x // factor) for x in case.seqlens_k),
        num_heads=h, num_heads_k=hk, head_dim=min(case.head_dim, 64))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def cu_seqlens(lengths, device) -> torch.Tensor:
    """[3, 0, 5] -> tensor([0, 3, 3, 8], int32)."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def make_inputs(case: Case, device) -> Inputs:
    """Draw the case's tensors on `device` (a generator seeded with case.seed: reproducible)."""
    gen = torch.Generator(device=device).manual_seed(case.seed)
    H, Hk, D, dt = case.num_heads, case.num_heads_k, case.head_dim, case.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    q = randn(case.total_q, H, D)
    k = randn(case.total_k, Hk, D)
    v = randn(case.total_k, Hk, D)

    mask = None
    if case.mask == "key":
        hm = case.heads_of(case.mask_heads)
        if case.mask_keep >= 1.0:
            mask = torch.ones(case.total_k, hm, dtype=torch.bool, device=device)
        else:
            mask = torch.rand(case.total_k, hm, generator=gen, device=device) < case.mask_keep
    elif case.mask == "query-block":
        mask = _query_block_mask(case, gen, device)

    bias = None
    if case.bias == "key":
        bias = randn(case.total_k, case.heads_of(case.bias_heads))

    return Inputs(q, k, v, cu_seqlens(case.seqlens_q, device), cu_seqlens(case.seqlens_k, device),
                  case.max_q, case.max_k, mask, bias, case.causal,
                  list(case.seqlens_q), list(case.seqlens_k))


def _query_block_mask(case: Case, gen, device) -> torch.Tensor:
    """(total_q, h', max_seqlen_k) bool: per sequence, 64x64 tiles (in local coordinates) all True with
    probability case.mask_keep, else all False; the tiles on the causal diagonal are always kept."""
    hm = case.heads_of(case.mask_heads)
    mask = torch.zeros(case.total_q, hm, case.max_k, dtype=torch.bool, device=device)
    q0 = 0
    for lq, lk in zip(case.seqlens_q, case.seqlens_k):
        if lq == 0 or lk == 0:
            q0 += lq
            continue
        nqt, nkt = -(-lq // TILE), -(-lk // TILE)
        tiles = torch.rand(hm, nqt, nkt, generator=gen, device=device) < case.mask_keep
        # The tile holding the last causally visible key of each query tile's first row stays on.
        ti = torch.arange(nqt, device=device)
        diag = ((ti * TILE + lk - lq).clamp(min=0) // TILE).clamp(max=max(nkt - 1, 0))
        tiles[:, ti, diag] = True
        full = tiles.repeat_interleave(TILE, dim=1).repeat_interleave(TILE, dim=2)[:, :lq, :lk]
        mask[q0:q0 + lq, :, :lk] = full.permute(1, 0, 2)
        q0 += lq
    return mask


@dataclass
class PagedCache:
    """K and V of one case in paged caches (num_pages, page_size, H_k, D) sharing one block table."""
    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor       # (B, max_pages) int32; entries past a sequence's last page are -1
    page_size: int
    used_pages: int                 # pages the sequences use; the rest of the pool is spare

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.block_table.nbytes

    def describe(self) -> str:
        return (f"pool {self.num_pages} pages of {self.page_size} ({self.used_pages} used), "
                f"block table {tuple(self.block_table.shape)}, {self.nbytes / 1e6:.3g} MB")


def make_paged(inp: Inputs, page_size: int, seed: int) -> PagedCache:
    """Copy inp.k and inp.v into paged caches, as a serving engine holds them.

    The pool has 1/8 spare pages; its pages are shuffled (torch.randperm) and each sequence takes
    the next ceil(Lk / page_size) of them, so consecutive pages of a sequence lie anywhere in the
    pool. Spare pages and the slots past each sequence's last key hold NaN: the op must not read
    them (docs/api.md, "Paged KV cache"), and a read of one shows as a NaN in the output.
    """
    device = inp.k.device
    lens = list(inp.seqlens_k)
    pages = [-(-n // page_size) for n in lens]
    used = sum(pages)
    num_pages = used + used // 8 + 1
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    table = torch.full((len(lens), max(pages, default=1) or 1), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[start:start + n]
        start += n
    table = table.to(device)

    # Logical key j of sequence b -> physical row block_table[b, j // page_size] * page_size + j % page_size.
    total_k = inp.k.shape[0]
    seq = torch.repeat_interleave(torch.arange(len(lens), device=device),
                                  torch.tensor(lens, device=device), output_size=total_k)
    j = torch.arange(total_k, device=device) - inp.cu_seqlens_k[:-1].to(torch.int64)[seq]
    rows = table.to(torch.int64)[seq, j // page_size] * page_size + j % page_size
    del seq, j

    def cache(x):
        c = torch.full((num_pages, page_size) + tuple(x.shape[1:]), float("nan"), dtype=x.dtype, device=device)
        c.view(num_pages * page_size, *x.shape[1:]).index_copy_(0, rows, x)
        return c

    return PagedCache(cache(inp.k), cache(inp.v), table, page_size, used)


# ----------------------------------------------------------------------------------------------
# What a problem costs at least
# ----------------------------------------------------------------------------------------------

@dataclass
class Work:
    dense_pairs: int      # causal-visible (query, key) pairs, summed over query heads
    visible_pairs: int    # pairs also visible through the mask, summed over query heads
    bytes: int            # Q, K, V, mask, bias read once + O, LSE written once

    def flops(self, head_dim: int, useful: bool) -> float:
        return 4.0 * (self.visible_pairs if useful else self.dense_pairs) * head_dim


def _causal_limits(inp: Inputs, device):
    """Per query row: (first packed key of its sequence, number of keys visible by causality alone)."""
    firsts, counts = [], []
    ck = inp.cu_seqlens_k.tolist()
    for b, (lq, lk) in enumerate(zip(inp.seqlens_q, inp.seqlens_k)):
        i = torch.arange(lq, device=device, dtype=torch.int64)
        n = (i + lk - lq + 1).clamp(0, lk) if inp.causal else torch.full_like(i, lk)
        firsts.append(torch.full_like(i, ck[b]))
        counts.append(n)
    if not counts:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return z, z
    return torch.cat(firsts), torch.cat(counts)


def work_of(case: Case, inp: Inputs) -> Work:
    """Count pairs and bytes (exactly, on the inputs' device)."""
    device = inp.q.device
    H = case.num_heads
    first, n_causal = _causal_limits(inp, device)
    dense = int(n_causal.sum().item()) * H

    if inp.mask is None:
        visible = dense
    elif inp.mask.dim() == 2:
        # Key-based: prefix sums over the packed keys, per mask head.
        hm = inp.mask.shape[1]
        pre = torch.zeros(inp.mask.shape[0] + 1, hm, dtype=torch.int64, device=device)
        pre[1:] = inp.mask.to(torch.int64).cumsum(0)
        per_row = pre[first + n_causal] - pre[first]             # (total_q, h')
        visible = int(per_row.sum().item()) * (H // hm)
    else:
        # Query-based: column j of row q is visible if j < its causal count and the mask keeps it.
        hm, kq = inp.mask.shape[1], inp.mask.shape[2]
        cols = torch.arange(kq, device=device)
        visible = 0
        for r0 in range(0, inp.mask.shape[0], 4096):               # chunks: no (total_q x Kq) int temporaries
            m = inp.mask[r0:r0 + 4096] & (cols < n_causal[r0:r0 + 4096, None])[:, None, :]
            visible += int(m.sum().item())
        visible *= H // hm

    out_bytes = inp.q.numel() * inp.q.element_size()
    lse_bytes = H * case.total_q * 4
    nbytes = inp.nbytes("q", "k", "v", "mask", "bias") + out_bytes + lse_bytes
    return Work(dense, visible, nbytes)
