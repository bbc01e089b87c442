"""Paged KV cache (block_table): key and value are caches (num_pages, page_size, H_k, D), and key j of
sequence b lives at page block_table[b, j // page_size], slot j % page_size.

Every case builds a contiguous problem, scatters its K/V into caches with a shuffled page order among
spare pages, and checks that the paged op gives the contiguous op's result (bit for bit on CPU, where
the math is the same; within rounding on CUDA) and the float64 reference's. Slots and pages that no
sequence uses hold NaN, and block_table entries past a sequence's last page hold -1: reading either
would show.
"""
import math
from dataclasses import dataclass

import pytest
import torch

import flash_dmattn
from conftest import (
    DTYPE_NAMES,
    LSE_FLOOR,
    OUT_FLOOR,
    capture_cuda_graph,
    check_against_reference,
    device_dtype_params,
    device_params,
    make_batch,
    make_bias,
    make_mask,
    make_operand,
    requires_cuda,
    run_flash,
)

OP = torch.ops.flash_dmattn.mha_varlen_fwd
H, H_K, D = 4, 2, 32
PAGE_SIZES = [1, 7, 16, 64, 256]  # 7: not a power of two
REF_KEYS = ("attn_mask", "attn_bias", "scale", "is_causal", "softcap")
OPERAND_SPECS = [None] + [(layout, heads) for layout in ("key", "query") for heads in ("1", "H_k", "H")]

DECODE_SEQLENS = [(1, 300), (4, 1031), (8, 2048), (2, 1), (3, 0), (1, 777)]
PREFILL_SEQLENS = [(37, 37), (100, 130), (5, 260), (0, 9), (64, 64), (17, 0)]


def spec_id(spec):
    return "none" if spec is None else f"{spec[0]}-{spec[1]}"


# ----------------------------------------------------------------------------------------------
# Building paged caches
# ----------------------------------------------------------------------------------------------

@dataclass
class PagedKV:
    k_cache: torch.Tensor      # (num_pages, page_size, H_k, D)
    v_cache: torch.Tensor
    block_table: torch.Tensor  # (B, max_pages) int32


def pages_needed(length, page_size):
    return -(-length // page_size)


def make_paged(batch, page_size, spare_pages=3, extra_cols=1, fill=math.nan, unused_entry=-1):
    """Scatters batch.k / batch.v into paged caches. Sequence b's Lk keys fill ceil(Lk / page_size)
    pages, at physical pages drawn from a random permutation of all pages (spare ones included).
    Unused slots and spare pages hold `fill`; block_table has `extra_cols` columns more than the
    longest sequence needs, and entries past a sequence's pages hold `unused_entry`."""
    device = batch.k.device
    _, heads_k, head_dim = batch.k.shape
    lens_k = [lk for _, lk in batch.seqlens]
    counts = [pages_needed(lk, page_size) for lk in lens_k]
    num_pages = sum(counts) + spare_pages
    max_pages = max(counts, default=0) + extra_cols
    order = torch.randperm(num_pages).tolist()
    table = torch.full((len(lens_k), max_pages), unused_entry, dtype=torch.int32)
    k_cache = torch.full((num_pages, page_size, heads_k, head_dim), fill, dtype=batch.k.dtype, device=device)
    v_cache = k_cache.clone()
    k_rows = k_cache.view(num_pages * page_size, heads_k, head_dim)
    v_rows = v_cache.view(num_pages * page_size, heads_k, head_dim)
    starts = batch.cu_seqlens_k.tolist()
    taken = 0
    for b, lk in enumerate(lens_k):
        pages = torch.tensor(order[taken:taken + counts[b]], dtype=torch.long)
        taken += counts[b]
        table[b, :counts[b]] = pages.to(torch.int32)
        j = torch.arange(lk)
        rows = (pages[j // page_size] * page_size + j % page_size).to(device)
        k_rows[rows] = batch.k[starts[b]:starts[b] + lk]
        v_rows[rows] = batch.v[starts[b]:starts[b] + lk]
    return PagedKV(k_cache, v_cache, table.to(device))


def run_paged(batch, paged, **kwargs):
    """flash_dmattn_varlen_func on the paged caches of `batch`, returning (out, lse)."""
    kwargs.setdefault("max_seqlen_q", batch.max_seqlen_q)
    kwargs.setdefault("max_seqlen_k", batch.max_seqlen_k)
    return flash_dmattn.flash_dmattn_varlen_func(
        batch.q, paged.k_cache, paged.v_cache,
        cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_k=batch.cu_seqlens_k,
        block_table=paged.block_table, return_lse=True, **kwargs,
    )


def assert_same_as_contiguous(out_p, lse_p, out_c, lse_c):
    """Bit for bit on CPU (the kernel's math is the same); within rounding on CUDA (the kernels may
    take another tile path for a paged cache)."""
    assert not torch.isnan(out_p).any(), "paged out contains NaN (an unused slot or page was read)"
    if out_p.device.type == "cpu":
        assert torch.equal(out_p, out_c), f"paged out differs from contiguous by {(out_p - out_c).abs().max()}"
        assert torch.equal(lse_p, lse_c), "paged lse differs from contiguous"
        return
    tol = OUT_FLOOR[out_p.dtype]  # one rounding step of the dtype near |out| ~ 1
    torch.testing.assert_close(out_p, out_c, rtol=tol, atol=tol)
    torch.testing.assert_close(lse_p, lse_c, rtol=0, atol=LSE_FLOOR)


def check_paged(batch, page_sizes=(16,), variants=None, **kwargs):
    """Runs the contiguous op and checks it against the reference; then the paged op, on caches of
    every page size in `page_sizes` (or on the given PagedKV `variants`), must agree with it: bit for
    bit on CPU (so it matches the reference too), within rounding on CUDA (and the reference is
    checked again). Returns the last paged (out, lse)."""
    ref_kwargs = {k: v for k, v in kwargs.items() if k in REF_KEYS}
    out_c, lse_c = run_flash(batch, **kwargs)
    check_against_reference(batch, out_c, lse_c, **ref_kwargs)
    variants = variants or [make_paged(batch, page_size) for page_size in page_sizes]
    for paged in variants:
        try:
            out_p, lse_p = run_paged(batch, paged, **kwargs)
            assert_same_as_contiguous(out_p, lse_p, out_c, lse_c)
            if out_p.device.type != "cpu":
                check_against_reference(batch, out_p, lse_p, **ref_kwargs)
        except AssertionError as e:
            raise AssertionError(f"cache {tuple(paged.k_cache.shape)} strides {paged.k_cache.stride()}, "
                                 f"block_table {tuple(paged.block_table.shape)}: {e}") from e
    return out_p, lse_p


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32, torch.bfloat16]))
def test_page_sizes_decode(device, dtype):
    """Batch decode (1-8 queries, up to 2048 keys) with a key-based mask and bias, causal, every page size."""
    batch = make_batch(DECODE_SEQLENS, 8, H_K, 64, dtype, device)
    check_paged(batch, PAGE_SIZES, attn_mask=make_mask(batch, "key", "H_k", density=0.6),
                attn_bias=make_bias(batch, "key", "H"), is_causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float16, torch.bfloat16]))
def test_page_sizes_prefill(device, dtype):
    """Prefill shapes (Lq = Lk, Lq < Lk, empty) with a query-based mask and a key-based bias, causal."""
    batch = make_batch(PREFILL_SEQLENS, H, H_K, D, dtype, device)
    check_paged(batch, PAGE_SIZES, attn_mask=make_mask(batch, "query", "H"),
                attn_bias=make_bias(batch, "key", "1"), is_causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32]))
def test_no_mask_no_bias(device, dtype):
    batch = make_batch([(1, 300), (4, 129), (2, 1), (37, 37), (20, 0)], H, H_K, D, dtype, device)
    check_paged(batch, PAGE_SIZES)
    check_paged(batch, (1, 7, 64), is_causal=True, softcap=5.0, scale=0.3)


# Each mask spec and each bias spec alone, and mixed pairs (key-based with query-based, both key-based).
LAYOUT_PAIRS = ([(spec, None) for spec in OPERAND_SPECS[1:]] + [(None, spec) for spec in OPERAND_SPECS[1:]] +
                [(("key", "H_k"), ("query", "H")), (("query", "1"), ("key", "H")), (("key", "1"), ("key", "H_k")),
                 (("query", "H"), ("query", "H_k"))])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_spec,bias_spec", LAYOUT_PAIRS,
                         ids=[f"mask_{spec_id(m)}-bias_{spec_id(b)}" for m, b in LAYOUT_PAIRS])
@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32], cuda=[torch.bfloat16]))
def test_mask_and_bias_layouts(device, dtype, mask_spec, bias_spec, causal):
    """Key-based operands stay indexed by the logical key (cu_seqlens_k[b] + j), never through the page
    table; query-based ones are unchanged. Every layout and head variant, causal and not."""
    batch = make_batch([(5, 9), (12, 40), (1, 17), (3, 70)], H, H_K, D, dtype, device)
    check_paged(batch, (7, 16), attn_mask=make_operand("mask", batch, mask_spec),
                attn_bias=make_operand("bias", batch, bias_spec), is_causal=causal)


@pytest.mark.parametrize("num_heads_k", [1, 2, 8], ids=lambda n: f"Hk{n}")
@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.bfloat16]))
def test_mqa_gqa_mha(device, dtype, num_heads_k):
    batch = make_batch([(1, 100), (7, 50), (33, 33)], 8, num_heads_k, D, dtype, device)
    check_paged(batch, (16,), attn_mask=make_mask(batch, "key", "H"), attn_bias=make_bias(batch, "query", "H_k"),
                is_causal=True)


EMPTY_CASES = {
    "mixed": [(0, 5), (3, 0), (0, 0), (4, 6), (2, 3)],
    "all_k_empty": [(3, 0), (2, 0)],
    "all_empty": [(0, 0)],
    "trailing_empty": [(4, 6), (0, 0)],
}


@pytest.mark.parametrize("layout", ["key", "query"])
@pytest.mark.parametrize("case", list(EMPTY_CASES), ids=list(EMPTY_CASES))
@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32], cuda=[torch.float16]))
def test_empty_sequences(device, dtype, case, layout):
    """Lq = 0 and/or Lk = 0: a sequence without keys uses no page (its row of block_table is all -1)."""
    batch = make_batch(EMPTY_CASES[case], H, H_K, D, dtype, device)
    check_paged(batch, (1, 16), attn_mask=make_mask(batch, layout, "H_k"), attn_bias=make_bias(batch, layout, "H"),
                is_causal=layout == "key")


@pytest.mark.parametrize("device", device_params())
def test_no_pages_at_all(device):
    """No sequence has a key: a cache of 0 pages and a block_table of 0 columns are valid."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    batch = make_batch([(3, 0), (2, 0)], H, H_K, D, dtype, device)
    paged = make_paged(batch, 16, spare_pages=0, extra_cols=0)
    assert paged.k_cache.shape[0] == 0 and paged.block_table.shape == (2, 0)
    out, lse = check_paged(batch, variants=[paged], attn_bias=make_bias(batch, "key", "H"))
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32], cuda=[torch.bfloat16]))
def test_max_seqlen_larger_than_true_max(device, dtype):
    """max_seqlen_k above every length (the table must cover it: max_pages * page_size >= max_seqlen_k)."""
    batch = make_batch([(2, 40), (5, 21)], H, H_K, D, dtype, device)
    paged = make_paged(batch, 16, extra_cols=3)  # 3 + 3 columns of 16: 96 >= 40 + 50
    check_paged(batch, variants=[paged], max_seqlen_q=9, max_seqlen_k=90,
                attn_mask=make_mask(batch, "query", "H", extra_cols=50), attn_bias=make_bias(batch, "key", "H_k"))


@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32], cuda=[torch.float16]))
def test_shared_prefix_pages(device, dtype):
    """Sequences that share their first pages (prefix caching): the cache holds fewer rows than the
    logical total_k, and a key-based mask still gives each sequence its own values on the shared keys."""
    page_size, prefix = 16, 64
    suffixes = [10, 0, 37]
    seqlens = [(3, prefix + n) for n in suffixes]
    batch = make_batch(seqlens, H, H_K, D, dtype, device)
    starts = batch.cu_seqlens_k.tolist()
    for b in (1, 2):  # every sequence starts with sequence 0's prefix
        batch.k[starts[b]:starts[b] + prefix] = batch.k[:prefix]
        batch.v[starts[b]:starts[b] + prefix] = batch.v[:prefix]
    prefix_pages = prefix // page_size
    suffix_pages = [pages_needed(n, page_size) for n in suffixes]
    num_pages = prefix_pages + sum(suffix_pages)
    order = torch.randperm(num_pages).tolist()
    table = torch.full((3, prefix_pages + max(suffix_pages)), -1, dtype=torch.int32)
    k_cache = torch.full((num_pages, page_size, H_K, D), math.nan, dtype=dtype, device=device)
    v_cache = k_cache.clone()
    taken = prefix_pages
    for b in range(3):
        pages = order[:prefix_pages] + order[taken:taken + suffix_pages[b]]
        taken += suffix_pages[b]
        table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for slot, page in enumerate(pages):
            k0 = starts[b] + slot * page_size
            n = min(page_size, starts[b + 1] - k0)
            k_cache[page, :n] = batch.k[k0:k0 + n]
            v_cache[page, :n] = batch.v[k0:k0 + n]
    paged = PagedKV(k_cache, v_cache, table.to(device))
    assert num_pages * page_size < batch.total_k
    check_paged(batch, variants=[paged], attn_mask=make_mask(batch, "key", "H"),
                attn_bias=make_bias(batch, "key", "H_k"), is_causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32], cuda=[torch.bfloat16]))
def test_cache_views_and_table_strides(device, dtype):
    """Caches that are views (a kv-packed (num_pages, page_size, 2, H_k, D) cache, a slice of padded
    heads, page_size 1 slices of wider pages) and a block_table that is a column slice of a wider one."""
    batch = make_batch([(2, 45), (6, 100), (1, 3)], H, H_K, D, dtype, device)
    variants = []
    for page_size in (1, 8):
        base = make_paged(batch, page_size)
        num_pages, max_pages = base.k_cache.shape[0], base.block_table.shape[1]
        kv = torch.empty(num_pages, page_size, 2, H_K, D, dtype=dtype, device=device)
        kv[:, :, 0], kv[:, :, 1] = base.k_cache, base.v_cache
        padded = torch.empty(num_pages, page_size, H_K + 3, D, dtype=dtype, device=device)
        padded[:, :, 1:H_K + 1] = base.k_cache
        wide_table = torch.full((3, max_pages + 5), 12345, dtype=torch.int32, device=device)
        wide_table[:, 2:2 + max_pages] = base.block_table
        variants.append(PagedKV(*kv.unbind(2), base.block_table))
        variants.append(PagedKV(padded[:, :, 1:H_K + 1], base.v_cache, wide_table[:, 2:2 + max_pages]))
        if page_size == 1:  # (num_pages, 1, H_k, D) slices of (num_pages, 3, H_k, D): stride(0) is the row
            wider = torch.empty(num_pages, 3, H_K, D, dtype=dtype, device=device)
            wider[:, 1:2] = base.k_cache
            variants.append(PagedKV(wider[:, 1:2], base.v_cache, base.block_table))
    check_paged(batch, variants=variants, attn_mask=make_mask(batch, "key", "H_k"),
                attn_bias=make_bias(batch, "query", "H"))


def test_unused_table_entries_and_slots_are_never_read():
    """Entries past a sequence's last page may hold anything (here out of range), and slots past its
    last key may hold anything (NaN, inf)."""
    batch = make_batch([(3, 17), (1, 5)], H, H_K, D, torch.float32, "cpu")
    garbage_table = make_paged(batch, 16, extra_cols=4, unused_entry=2**31 - 1)
    garbage_table.block_table[:, -1] = -(2**31)
    check_paged(batch, variants=[garbage_table, make_paged(batch, 16, fill=math.inf)],
                attn_mask=make_mask(batch, "key", "H"), is_causal=True)


# ----------------------------------------------------------------------------------------------
# torch.compile, opcheck, CUDA graphs
# ----------------------------------------------------------------------------------------------

def paged_step(q, k_cache, v_cache, key_scores, cu_seqlens_q, cu_seqlens_k, block_table,
               max_seqlen_q: int, max_seqlen_k: int):
    """A decode step: a key mask computed in the graph, the paged op, an op after it."""
    mask = key_scores > -0.5
    out, lse = flash_dmattn.flash_dmattn_varlen_func(
        q, k_cache, v_cache, attn_mask=mask, attn_bias=key_scores, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, is_causal=True,
        block_table=block_table, return_lse=True)
    return out * 2.0, lse


class RecordingBackend:
    """A torch.compile backend that keeps the captured FX graphs and runs them through aot_eager
    (functionalization and the fake implementation)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        self.graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)


@pytest.mark.parametrize("device", device_params())
def test_compile_fullgraph_with_page_table(device):
    """torch.compile(fullgraph=True) keeps the paged op as one node (aot_eager on CPU, inductor on
    CUDA), also after the table and lengths change shape."""
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    torch._dynamo.reset()
    backend = RecordingBackend() if device == "cpu" else "inductor"
    compiled = torch.compile(paged_step, backend=backend, fullgraph=True)
    for seqlens, page_size in (([(1, 70), (3, 200), (2, 0)], 16), ([(4, 33), (1, 9)], 7)):
        batch = make_batch(seqlens, H, H_K, 64, dtype, device)
        paged = make_paged(batch, page_size)
        key_scores = make_bias(batch, "key", "H_k")
        args = (batch.q, paged.k_cache, paged.v_cache, key_scores, batch.cu_seqlens_q, batch.cu_seqlens_k,
                paged.block_table, batch.max_seqlen_q, batch.max_seqlen_k)
        out_c, lse_c = compiled(*args)
        out_e, lse_e = paged_step(*args)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse_c, lse_e, rtol=0, atol=0)
        check_against_reference(batch, out_e / 2.0, lse_e, attn_mask=key_scores > -0.5, attn_bias=key_scores,
                                is_causal=True)
    if device == "cpu":
        assert backend.graphs, "nothing was compiled"
        for gm in backend.graphs:
            nodes = [n for n in gm.graph.nodes if n.op == "call_function" and "flash_dmattn" in str(n.target)]
            assert len(nodes) == 1, gm.code


@pytest.mark.parametrize("layout", ["key", "query"])
@pytest.mark.parametrize("device", device_params())
def test_opcheck_with_page_table(device, layout):
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    batch = make_batch([(3, 40), (0, 4), (5, 5), (2, 0)], 4, 2, 32, dtype, device)
    paged = make_paged(batch, 8, fill=0.0)
    torch.library.opcheck(OP, (
        batch.q, paged.k_cache, paged.v_cache, make_mask(batch, layout, "H"), make_bias(batch, layout, "H_k"),
        batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k, 0.2, True, 0.0,
        paged.block_table))


def test_fake_tensor_shapes_with_page_table():
    """The fake implementation handles 4-D caches: out (total_q, H, D) and lse (H, total_q) follow q."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = make_batch([(3, 40), (2, 9)], H, H_K, D, torch.bfloat16, "cpu")
    paged = make_paged(batch, 16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in (batch.q, paged.k_cache, paged.v_cache, batch.cu_seqlens_q,
                                              batch.cu_seqlens_k, paged.block_table)]
        out, lse = OP(fake[0], fake[1], fake[2], None, None, fake[3], fake[4], batch.max_seqlen_q,
                      batch.max_seqlen_k, 0.2, False, 0.0, fake[5])
    assert out.shape == (batch.total_q, H, D) and out.dtype == torch.bfloat16
    assert lse.shape == (H, batch.total_q) and lse.dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: DTYPE_NAMES[t])
def test_cuda_graph_replay_with_page_table(dtype):
    """Capture the paged op once; then move the sequences to other pages (new block_table contents,
    new cache contents, in place) and replay: the new inputs' result."""
    batch = make_batch([(1, 200), (4, 1000), (2, 33), (8, 513)], H, H_K, 128, dtype, "cuda")
    paged = make_paged(batch, 16, spare_pages=9)
    mask, bias = make_mask(batch, "key", "H_k"), make_bias(batch, "key", "H")
    kwargs = dict(attn_mask=mask, attn_bias=bias, is_causal=True)

    # max_seqlen given: no host synchronization inside the capture.
    graph, (out, lse) = capture_cuda_graph(lambda: run_paged(batch, paged, **kwargs))

    for _ in range(2):
        for t in (batch.q, batch.k, batch.v, bias):
            t.copy_(torch.randn_like(t))
        mask.copy_(torch.rand(mask.shape, device="cuda") < 0.6)
        moved = make_paged(batch, 16, spare_pages=9)
        assert not torch.equal(moved.block_table, paged.block_table)
        for dst, src in ((paged.k_cache, moved.k_cache), (paged.v_cache, moved.v_cache),
                         (paged.block_table, moved.block_table)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_as_contiguous(out, lse, *run_flash(batch, **kwargs))
        check_against_reference(batch, out, lse, **kwargs)


@requires_cuda
@pytest.mark.parametrize("gather", ["0", "1"])
@pytest.mark.parametrize("num_splits", ["0", "3"])
@pytest.mark.parametrize("page_size", [1, 7, 64])
def test_cuda_launch_paths_with_page_table(monkeypatch, page_size, num_splits, gather):
    """The forced split-KV and gathered-key paths (docs/api.md, "Environment") read pages too."""
    monkeypatch.setenv("FLASH_DMATTN_NUM_SPLITS", num_splits)
    monkeypatch.setenv("FLASH_DMATTN_GATHER_KEYS", gather)
    batch = make_batch([(1, 1500), (4, 300), (2, 0), (16, 16)], 32, 8, 128, torch.bfloat16, "cuda")
    check_paged(batch, (page_size,), attn_mask=make_mask(batch, "key", "H_k", density=0.3),
                attn_bias=make_bias(batch, "key", "H_k"), is_causal=True)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

SEQLENS = [(3, 5), (4, 6)]  # total_q = 7, total_k = 11, max_seqlen_k = 6
PAGE = 4


def paged_args(device="cpu", dtype=torch.float32):
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    paged = make_paged(batch, PAGE, fill=0.0)  # 7 pages (2 + 2 used, 3 spare); max_pages = 3
    return dict(query=batch.q, key=paged.k_cache, value=paged.v_cache, block_table=paged.block_table,
                cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_k=batch.cu_seqlens_k,
                max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.max_seqlen_k)


def call(args, **overrides):
    return flash_dmattn.flash_dmattn_varlen_func(**{**args, **overrides})


def assert_refused(args, match, **overrides):
    with pytest.raises(ValueError, match=match):
        call(args, **overrides)


def test_valid_paged_args_are_accepted():
    args = paged_args()
    call(args, attn_mask=torch.ones(11, H_K, dtype=torch.bool), attn_bias=torch.zeros(7, H, 6))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.float32, torch.uint8])
def test_block_table_dtype(dtype):
    args = paged_args()
    assert_refused(args, "block_table.*int32", block_table=args["block_table"].to(dtype))


@pytest.mark.parametrize("shape", [(2,), (2, 3, 1), (1, 3), (3, 3)], ids=["1d", "3d", "rows1", "rows3"])
def test_block_table_shape(shape):
    args = paged_args()
    assert_refused(args, "block_table", block_table=torch.zeros(shape, dtype=torch.int32))


def test_block_table_last_dim_not_contiguous():
    args = paged_args()
    bad = args["block_table"].t().contiguous().t()
    assert bad.stride(1) != 1
    assert_refused(args, "block_table", block_table=bad)


@requires_cuda
def test_block_table_device():
    args = paged_args("cuda", torch.float16)
    assert_refused(args, "block_table", block_table=args["block_table"].cpu())


@pytest.mark.parametrize("name", ["key", "value"])
def test_cache_not_4d(name):
    """With block_table, key and value are caches (num_pages, page_size, H_k, D)."""
    args = paged_args()
    assert_refused(args, rf"\b{name}\b.*4-D", **{name: args[name].flatten(0, 1)})


def test_cache_shapes_differ():
    args = paged_args()
    assert_refused(args, r"\bvalue\b", value=args["value"][:-1])
    assert_refused(args, r"\bvalue\b", value=torch.zeros(7, PAGE + 1, H_K, D))


def test_cache_heads_and_head_dim():
    args = paged_args()
    assert_refused(args, r"\b(key|query)\b", key=torch.zeros(7, PAGE, 3, D), value=torch.zeros(7, PAGE, 3, D))
    assert_refused(args, r"\bkey\b", key=torch.zeros(7, PAGE, H_K, D + 8), value=torch.zeros(7, PAGE, H_K, D + 8))
    assert_refused(args, r"\bkey\b", key=args["key"].half(), value=args["value"].half())


def test_page_size_zero():
    args = paged_args()
    empty = torch.zeros(7, 0, H_K, D)
    assert_refused(args, "page_size", key=empty, value=empty)


@pytest.mark.parametrize("name", ["key", "value"])
@pytest.mark.parametrize("layout", ["padded_pages", "heads_first"])
def test_cache_pages_do_not_flatten(name, layout):
    """(num_pages, page_size) must flatten into rows without a copy: stride(0) == page_size * stride(1)."""
    args = paged_args()
    if layout == "padded_pages":
        bad = torch.zeros(7, PAGE + 1, H_K, D)[:, :PAGE]
    else:
        bad = torch.zeros(7, H_K, PAGE, D).transpose(1, 2)
    assert bad.shape == args[name].shape
    assert_refused(args, rf"\b{name}\b.*stride", **{name: bad})


def test_table_shorter_than_max_seqlen_k():
    args = paged_args()
    assert_refused(args, "max_pages.*max_seqlen_k", block_table=args["block_table"][:, :1])  # 1 * 4 < 6
    assert_refused(args, "max_pages.*max_seqlen_k", max_seqlen_k=13)  # 3 * 4 < 13


@pytest.mark.parametrize("value", [-1, 7, 2**31 - 1])
def test_page_index_out_of_range_cpu(value):
    """On CPU the pages a sequence uses are checked: sequence 1 has 6 keys, in 2 pages of 4."""
    args = paged_args()
    table = args["block_table"].clone()
    table[1, 1] = value
    assert_refused(args, r"block_table\[1, 1\]", block_table=table)
    table[1, 1], table[1, 2] = 0, value  # column 2 is past sequence 1's pages: never read
    call(args, block_table=table)


@requires_cuda
def test_page_index_out_of_range_cuda_debug_mode(monkeypatch):
    """On CUDA, page indices are the caller's responsibility (no host sync), checked with
    FLASH_DMATTN_DEBUG=1."""
    monkeypatch.setenv("FLASH_DMATTN_DEBUG", "1")
    args = paged_args("cuda", torch.float16)
    table = args["block_table"].clone()
    table[0, 1] = 7
    assert_refused(args, r"block_table\[0, 1\]", block_table=table)
    table[0, 1], table[0, 2] = args["block_table"][0, 1], 7
    call(args, block_table=table)


@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
def test_key_based_operand_rows_are_logical_keys(name):
    """A key-based mask/bias has cu_seqlens_k[-1] rows (logical keys), not one per cache row."""
    args = paged_args()
    rows = args["key"].shape[0] * PAGE  # 28 cache rows, 11 logical keys
    operand = torch.ones(rows, H_K, dtype=torch.bool) if name == "attn_mask" else torch.zeros(rows, H_K)
    assert_refused(args, f"{name}.*logical", **{name: operand})


@requires_cuda
def test_key_based_operands_disagree_cuda():
    """Without reading cu_seqlens_k (CUDA, no debug mode), key-based mask and bias must agree on total_k."""
    args = paged_args("cuda", torch.float16)
    assert_refused(args, "attn_bias", attn_mask=torch.ones(11, H_K, dtype=torch.bool, device="cuda"),
                   attn_bias=torch.zeros(12, H_K, dtype=torch.float16, device="cuda"))


@pytest.mark.parametrize("name,bad", [("cu_seqlens_k", [0, 6, 5]), ("cu_seqlens_k", [1, 5, 11]),
                                      ("max_seqlen_k", [0, 2, 9])])
def test_cu_seqlens_k_still_checked_cpu(name, bad):
    """cu_seqlens_k is checked as without paging (start 0, non-decreasing, lengths <= max_seqlen_k),
    except that it ends at the logical key count, not at the cache rows."""
    args = paged_args()
    assert_refused(args, name, cu_seqlens_k=torch.tensor(bad, dtype=torch.int32))
