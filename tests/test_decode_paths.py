"""The decode paths of the CUDA forward, forced through the launch overrides that csrc/binding.cpp
reads on every call, and checked against the float64 reference:

- FLASH_DMATTN_NUM_SPLITS=n: split-KV with n key ranges per row block (merged by the combine kernel);
- FLASH_DMATTN_GATHER_KEYS=1/0: the gathered-key path for key-based masks on / off;
- FLASH_DMATTN_KEY_SPLIT=1/0: the warps split each key tile (blocks of <= 32 rows) / the rows;
- FLASH_DMATTN_WARPGROUPS=1/0: the Hopper warpgroup (wgmma) layout wherever it applies / never;
- FLASH_DMATTN_ROW_SCHEDULE=1/0: the grid without the row blocks past their sequence / the full grid;
- packed GQA (no override): taken when the mask/bias do not vary across a group's query heads
  (h' in {1, H_k} or query-based) and max_seqlen_q * G <= 128, i.e. the GQA/MQA decode cases here,
  and on Hopper for the warpgroup layout under a staged query-based mask that is the same for a
  group's heads (test_warpgroup_query_mask).

The CPU kernel ignores the variables, so the CPU cases check the CPU kernel on the same inputs (kept
small: the float64 reference is slow); the bigger shapes run on CUDA only. Also: CUDA graph replay of
a decode step with new contents and new sequence lengths, torch.compile, and agreement of the paths
with one another on the same inputs.
"""
import re

import pytest
import torch

import flash_dmattn
from conftest import (
    LSE_FLOOR,
    OUT_FLOOR,
    Batch,
    _fill_query_padding,
    capture_cuda_graph,
    check_against_reference,
    cu_seqlens,
    device_dtype_params,
    keep_to_mask,
    make_batch,
    make_bias,
    make_mask,
    make_operand,
    operand_shape,
    requires_cuda,
    run_and_check,
    run_flash,
)

NUM_SPLITS = "FLASH_DMATTN_NUM_SPLITS"
GATHER_KEYS = "FLASH_DMATTN_GATHER_KEYS"
KEY_SPLIT = "FLASH_DMATTN_KEY_SPLIT"
WARPGROUPS = "FLASH_DMATTN_WARPGROUPS"
ROW_SCHEDULE = "FLASH_DMATTN_ROW_SCHEDULE"

DEVICE_DTYPES = device_dtype_params(cpu=[torch.float32])
SPLITS = [1, 2, 7, 12, 64]  # the combine shares a pair's splits among 1, 2 or 4 warps (<= 8, <= 16, more)
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
GATHER = pytest.mark.parametrize("gather", [0, 1], ids=["tiles", "gather"])

# Very different lengths in one batch: one key, an empty query sequence, an empty key sequence,
# lengths on no tile boundary, sequences shorter than one split range next to 3001 keys, Lq > Lk.
MIXED_SEQLENS = [(1, 1), (3, 63), (1, 65), (0, 129), (4, 0), (8, 1000), (2, 3001), (65, 129), (129, 65),
                 (1, 64)]
# Decode: 1-8 queries per sequence, up to ~4k keys (CPU: up to 1500).
DECODE_SEQLENS = {
    "cpu": [(1, 1), (8, 1000), (1, 0), (0, 65), (3, 1500)],
    "cuda": [(1, 4096), (8, 3001), (3, 1), (1, 0), (0, 700), (5, 65), (2, 1000), (1, 63), (7, 129), (4, 2048)],
}
# Prefill-like: 3 sequences of 700-2500 queries and keys (CPU: a tenth).
PREFILL_SEQLENS = {
    "cpu": [(70, 250), (250, 180), (120, 120)],
    "cuda": [(700, 2500), (2500, 1800), (1200, 1200)],
}
SHAPES = {"decode": DECODE_SEQLENS, "prefill": PREFILL_SEQLENS}
SHAPE = pytest.mark.parametrize("shape", list(SHAPES))
HEADS = {"gqa": (32, 8), "mha": (8, 8), "mqa": (8, 1)}  # (H, H_k)
# Mask spec, bias spec ((layout, heads) or None). "key_shared" and "query" keep packed GQA possible,
# "key_per_head" (operands that differ per query head) rules it out.
OPERANDS = {
    "key_shared": (("key", "H_k"), ("key", "1")),
    "key_per_head": (("key", "H"), ("key", "H_k")),
    "query": (("query", "H"), ("query", "H_k")),
    "none": (None, None),
}


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    """Every test starts from the heuristics, whatever the calling environment sets."""
    use_paths(monkeypatch)


def use_paths(monkeypatch, splits=None, gather=None, key_split=None, warpgroups=None, row_schedule=None):
    """Sets FLASH_DMATTN_NUM_SPLITS / _GATHER_KEYS / _KEY_SPLIT / _WARPGROUPS / _ROW_SCHEDULE; None
    unsets (the heuristic)."""
    for name, value in ((NUM_SPLITS, splits), (GATHER_KEYS, gather), (KEY_SPLIT, key_split),
                        (WARPGROUPS, warpgroups), (ROW_SCHEDULE, row_schedule)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))


def seqlens_for(shape, device):
    return SHAPES[shape][device]


def per_device(cpu, cuda, ids):
    """`device, dtype, *values` params: the tuples of `cpu` on the CPU (which ignores the overrides,
    so it needs fewer), those of `cuda` on CUDA; ids(*values) names each."""
    params = []
    for param in DEVICE_DTYPES:
        device, dtype = param.values
        for values in cuda if device == "cuda" else cpu:
            params.append(pytest.param(device, dtype, *values, id=f"{param.id}-{ids(*values)}", marks=param.marks))
    return params


def make_operands(batch, name, density=0.6):
    mask_spec, bias_spec = OPERANDS[name]
    return dict(attn_mask=make_operand("mask", batch, mask_spec, density=density),
                attn_bias=make_operand("bias", batch, bias_spec))


def sequence_rows(batch, b):
    return batch.cu_seqlens_q[b].item(), batch.cu_seqlens_q[b + 1].item()


def assert_rows_hidden(out, lse, rows, heads=slice(None)):
    """Rows that see no key: exactly out = 0 and lse = -inf (not merely close)."""
    assert torch.isneginf(lse[heads, rows]).all(), "rows that see no key must have lse = -inf"
    assert (out[rows, heads] == 0).all(), "rows that see no key must have out = 0"


def assert_empty_key_sequences_hidden(batch, out, lse):
    for b, (_, len_k) in enumerate(batch.seqlens):
        if len_k == 0:
            assert_rows_hidden(out, lse, slice(*sequence_rows(batch, b)))


def assert_paths_agree(a, b, what):
    """Two paths on the same inputs: the same hidden rows, lse within LSE_FLOOR, out within two
    rounding steps of its dtype relative, or one near |out| ~ 1 (OUT_FLOOR). The paths round the
    softmax weights to out's dtype relative to different running maxima, so rows with a few visible
    keys whose values cancel differ by up to ~0.4 OUT_FLOOR (simulated), far below a missed key."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    eps = torch.finfo(out_a.dtype).eps
    torch.testing.assert_close(out_b, out_a, rtol=2 * eps, atol=OUT_FLOOR[out_a.dtype],
                               msg=lambda m: f"out of {what}: {m}")
    assert torch.equal(torch.isneginf(lse_a), torch.isneginf(lse_b)), f"{what}: other rows see no key"
    torch.testing.assert_close(lse_b, lse_a, rtol=0, atol=LSE_FLOOR, msg=lambda m: f"lse of {what}: {m}")


# ----------------------------------------------------------------------------------------------
# 1. Split-KV
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("operands", list(OPERANDS))
@CAUSAL
@pytest.mark.parametrize("num_splits", SPLITS, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_split_kv_mixed_lengths(monkeypatch, device, dtype, num_splits, causal, operands):
    """Forced split counts (64: more ranges than the shorter sequences have key tiles) over sequences
    of very different lengths; the empty key sequence gives exactly 0 / -inf."""
    use_paths(monkeypatch, splits=num_splits)
    batch = make_batch(MIXED_SEQLENS, 8, 2, 64, dtype, device)
    out, lse = run_and_check(batch, is_causal=causal, **make_operands(batch, operands))
    assert_empty_key_sequences_hidden(batch, out, lse)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("device,dtype,head_dim,num_splits", per_device(
    cpu=[(64, 7), (128, 7)], cuda=[(d, n) for d in (64, 128, 80) for n in SPLITS], ids=lambda d, n: f"d{d}-splits{n}"))
def test_split_kv_decode(monkeypatch, device, dtype, head_dim, num_splits, heads):
    """Decode batches (1-8 queries, up to ~4k keys) with GQA (packed), MHA and MQA (packed), for every
    operand variant: key-based mask + bias, per-query-head ones (not packed), query-based, none."""
    use_paths(monkeypatch, splits=num_splits)
    num_heads, num_heads_k = HEADS[heads]
    for operands in OPERANDS:  # fresh inputs per check
        batch = make_batch(DECODE_SEQLENS[device], num_heads, num_heads_k, head_dim, dtype, device)
        out, lse = run_and_check(batch, is_causal=operands == "key_shared", **make_operands(batch, operands))
        assert_empty_key_sequences_hidden(batch, out, lse)


@requires_cuda
@pytest.mark.parametrize("num_splits", [7, 12, 64], ids=lambda n: f"splits{n}")
def test_split_combine_partial_ctas(monkeypatch, num_splits):
    """An odd number of (query, head) pairs (31 queries x 3 heads), so the combine's last CTA holds
    fewer pairs than warps, at split counts merged by 1, 2 and 4 warps per pair."""
    use_paths(monkeypatch, splits=num_splits)
    seqlens = [(1, 4096), (8, 3001), (3, 1), (1, 0), (0, 700), (5, 65), (2, 1000), (1, 63), (6, 129), (4, 2048)]
    batch = make_batch(seqlens, 3, 1, 64, torch.bfloat16, "cuda")
    assert batch.q.shape[0] * batch.q.shape[1] % 2 == 1
    out, lse = run_and_check(batch, is_causal=True, **make_operands(batch, "key_shared"))
    assert_empty_key_sequences_hidden(batch, out, lse)


# ----------------------------------------------------------------------------------------------
# 2. Gathered keys (key-based masks)
# ----------------------------------------------------------------------------------------------

@CAUSAL
@pytest.mark.parametrize("mask_heads", ["1", "H_k", "H"])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.25, 1.0], ids=lambda d: f"dens{int(d * 100)}")
@GATHER
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gathered_keys_densities_and_mask_heads(monkeypatch, device, dtype, gather, density, mask_heads, causal):
    """Key-based masks drawn per mask head at 0-100% density, with a key-based bias of the same head
    variant; density 0 hides every row, exactly."""
    use_paths(monkeypatch, gather=gather)
    batch = make_batch(DECODE_SEQLENS[device], 16, 4, 64, dtype, device)
    mask = make_mask(batch, "key", mask_heads, density=density)
    bias = make_bias(batch, "key", mask_heads)
    out, lse = run_and_check(batch, attn_mask=mask, attn_bias=bias, is_causal=causal)
    if density == 0.0:
        assert_rows_hidden(out, lse, slice(None))
    assert_empty_key_sequences_hidden(batch, out, lse)


@requires_cuda
@pytest.mark.parametrize("mask_heads", ["H_k", "H"])
@pytest.mark.parametrize("splits", [None, 7], ids=["splits_auto", "splits7"])
def test_gathered_keys_many_lists(monkeypatch, splits, mask_heads):
    """Many gathered lists at once: 20 query heads over 5 KV heads give 5 lists (h' = H_k) or 20
    (h' = H, no packed GQA); each head draws its own mask, so a list built from a neighbour's
    column shows."""
    use_paths(monkeypatch, splits=splits, gather=1)
    batch = make_batch(DECODE_SEQLENS["cuda"], 20, 5, 64, torch.bfloat16, "cuda")
    mask = make_mask(batch, "key", mask_heads, density=0.25)
    bias = make_bias(batch, "key", mask_heads)
    out, lse = run_and_check(batch, attn_mask=mask, attn_bias=bias, is_causal=True)
    assert_empty_key_sequences_hidden(batch, out, lse)


@SHAPE
@CAUSAL
@pytest.mark.parametrize("bias", ["key-1", "key-H_k", "key-H", "query-1", "query-H"])
@pytest.mark.parametrize("num_splits", [2, 7], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gathered_keys_with_splits_and_biases(monkeypatch, device, dtype, num_splits, bias, causal, shape):
    """The gathered path combined with forced split counts, under key-based biases of every head
    variant and query-based biases, for decode and prefill-like batches."""
    use_paths(monkeypatch, splits=num_splits, gather=1)
    batch = make_batch(seqlens_for(shape, device), 8, 2, 64, dtype, device)
    mask = make_mask(batch, "key", "H_k", density=0.25)
    run_and_check(batch, attn_mask=mask, attn_bias=make_bias(batch, *bias.split("-")), is_causal=causal)


# One sequence of 35 gathered chunks (2048 keys each at D = 64) beside one of 17 (ending on a chunk
# boundary), short ones and an empty one.
LONG_SEQLENS = [(1, 70001), (4, 2047), (2, 17 * 2048), (1, 5), (3, 0)]


@requires_cuda
@pytest.mark.parametrize("num_splits", [None, 2, 7, 64], ids=["splits_auto", "splits2", "splits7", "splits64"])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.25, 1.0], ids=lambda d: f"dens{int(d * 100)}")
def test_gathered_split_ranges_long_sequences(monkeypatch, density, num_splits):
    """Split-KV over the gathered keys of long sequences: a sparse mask leaves many split ranges
    with no visible key (their partials hold lse = -inf), and 64 splits cut chunks into pieces."""
    use_paths(monkeypatch, splits=num_splits, gather=1)
    batch = make_batch(LONG_SEQLENS, 8, 2, 64, torch.bfloat16, "cuda")
    mask = make_mask(batch, "key", "H_k", density=density)
    out, lse = run_and_check(batch, attn_mask=mask, attn_bias=make_bias(batch, "key", "H_k"))
    if density == 0.0:
        assert_rows_hidden(out, lse, slice(None))


@CAUSAL
@pytest.mark.parametrize("num_splits", [None, 2, 7], ids=["splits_auto", "splits2", "splits7"])
@GATHER
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gathered_keys_fully_masked_rows(monkeypatch, device, dtype, gather, num_splits, causal):
    """A KV head whose mask is all False, and a sequence whose mask is all False on every head, next to
    normal ones: those rows are exactly out = 0, lse = -inf (through return_lse=True)."""
    use_paths(monkeypatch, splits=num_splits, gather=gather)
    batch = make_batch(DECODE_SEQLENS[device], 8, 2, 128, dtype, device)
    mask = make_mask(batch, "key", "H_k", density=0.25)
    mask[:, 1] = False                         # KV head 1 = query heads 4..7
    k0, k1 = batch.cu_seqlens_k[1].item(), batch.cu_seqlens_k[2].item()
    mask[k0:k1] = False                        # sequence 1 (8 queries, 1000 or 3001 keys)
    mask[0, 0] = True                          # sequence 0's first key, for query heads 0..3
    out, lse = run_and_check(batch, attn_mask=mask, attn_bias=make_bias(batch, "key", "H"), is_causal=causal)
    assert_rows_hidden(out, lse, slice(None), heads=slice(4, 8))
    assert_rows_hidden(out, lse, slice(*sequence_rows(batch, 1)))
    assert torch.isfinite(lse[:4, 0]).all() and torch.isneginf(lse[4:, 0]).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float16, torch.float32],
                         ids=lambda t: str(t).replace("torch.", ""))
@GATHER
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gathered_keys_mask_dtypes(monkeypatch, device, dtype, gather, mask_dtype):
    """The compaction pass reads every mask dtype; non-bool masks keep on any nonzero value."""
    use_paths(monkeypatch, gather=gather)
    batch = make_batch(DECODE_SEQLENS[device], 16, 4, 64, dtype, device)
    mask = make_mask(batch, "key", "H_k", density=0.25, dtype=mask_dtype)
    run_and_check(batch, attn_mask=mask, attn_bias=make_bias(batch, "key", "1"), is_causal=True)


@SHAPE
@CAUSAL
@GATHER
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gathered_keys_only_last_keys_visible(monkeypatch, device, dtype, gather, causal, shape):
    """Only the last 1-3 keys of each sequence are visible (mostly in a partial tile); with causal
    prefill only the last queries see them and the earlier rows see nothing."""
    use_paths(monkeypatch, gather=gather)
    batch = make_batch(seqlens_for(shape, device), 8, 4, 64, dtype, device)
    keep = torch.zeros(batch.total_k, batch.num_heads_k, dtype=torch.bool, device=device)
    ends = batch.cu_seqlens_k[1:].tolist()
    for g in range(batch.num_heads_k):
        for end, (_, len_k) in zip(ends, batch.seqlens):
            keep[end - min(1 + g % 3, len_k):end, g] = True
    out, lse = run_and_check(batch, attn_mask=keep, attn_bias=make_bias(batch, "key", "H_k"), is_causal=causal)
    assert torch.isfinite(lse[0, batch.cu_seqlens_q[1].item() - 1])  # the last query of sequence 0
    if causal and shape == "prefill":
        len_q, len_k = batch.seqlens[0]
        assert_rows_hidden(out, lse, slice(0, len_q - 3))  # query i sees keys j <= i + Lk - Lq < Lk - 3


@requires_cuda
@pytest.mark.parametrize("num_splits", [1, 3, 8], ids=lambda n: f"splits{n}")
@GATHER
@CAUSAL
def test_key_split_visible_tile_runs(monkeypatch, gather, causal, num_splits):
    """The decode layout's K/V pipeline (the next visible tile's copy in flight while one is
    computed) over key ranges that hold 0, 1, 2, 3 and more visible 64-key tiles, in runs and
    scattered, so that it starts, refills and drains with every count of tiles left: a key-based
    mask keeps only the keys of chosen tiles (one key of some, all of others), different per KV head."""
    use_paths(monkeypatch, splits=num_splits, gather=gather, key_split=1)
    seqlens = [(1, 64 * 40 + 17), (4, 64 * 3), (8, 64 * 12 + 5), (2, 64), (3, 64 * 7 + 63), (1, 0), (5, 64 * 25)]
    batch = make_batch(seqlens, 16, 4, 128, torch.bfloat16, "cuda")
    keep = torch.zeros(batch.total_k, batch.num_heads_k, dtype=torch.bool, device="cuda")
    patterns = [[0], [1, 2], [0, 1, 2, 3, 9], [5, 7, 11, 12, 13, 30, 39, 40]]  # visible tiles per KV head
    starts = batch.cu_seqlens_k[:-1].tolist()
    for g, tiles in enumerate(patterns):
        for start, (_, len_k) in zip(starts, batch.seqlens):
            for t in tiles:
                lo, hi = 64 * t, min(64 * t + 64, len_k)
                if lo < hi:
                    keep[start + (lo if t % 2 else hi - 1):start + hi, g] = True  # odd tiles whole, even ones their last key
    out, lse = run_and_check(batch, attn_mask=keep, attn_bias=make_bias(batch, "key", "1"), is_causal=causal)
    assert_empty_key_sequences_hidden(batch, out, lse)


# ----------------------------------------------------------------------------------------------
# 3. CUDA graphs and torch.compile (CUDA only)
# ----------------------------------------------------------------------------------------------

CUDA_DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
GRAPH_MODES = {"split4": dict(splits=4), "gather": dict(gather=1), "gather_split4": dict(splits=4, gather=1)}
# The captured decode step: B sequences of at most MAX_Q queries / MAX_K keys, TOTAL_Q / TOTAL_K rows.
GRAPH_B, GRAPH_MAX_Q, GRAPH_MAX_K, GRAPH_TOTAL_Q, GRAPH_TOTAL_K = 8, 4, 2048, 20, 9000


def random_lengths(total, count, max_len):
    """`count` random lengths in [0, max_len] that sum to `total`; 0 and max_len are frequent."""
    assert 0 <= total <= count * max_len
    lengths = [total // count + (i < total % count) for i in range(count)]
    for _ in range(8 * count):
        i, j = torch.randint(0, count, (2,)).tolist()
        room = min(lengths[i], max_len - lengths[j])
        if i != j and room > 0:
            moved = room if torch.rand(()) < 0.25 else torch.randint(0, room + 1, ()).item()
            lengths[i] -= moved
            lengths[j] += moved
    return lengths


def new_decode_lengths(batch):
    """New per-sequence lengths within the captured bounds and totals, written into cu_seqlens in place."""
    len_q = random_lengths(GRAPH_TOTAL_Q, GRAPH_B, GRAPH_MAX_Q)
    len_k = random_lengths(GRAPH_TOTAL_K, GRAPH_B, GRAPH_MAX_K)
    batch.cu_seqlens_q.copy_(cu_seqlens(len_q, batch.q.device))
    batch.cu_seqlens_k.copy_(cu_seqlens(len_k, batch.q.device))
    batch.seqlens = list(zip(len_q, len_k))


def decode_buffers(dtype, bias_layout, device="cuda"):
    """The static buffers of a decode step (GQA 32/8, D = 128), filled by refill(): q/k/v/cu_seqlens
    as a Batch whose max_seqlen are the bounds (passed explicitly: no host sync), a key-based mask
    (total_k, H_k) and a bias, key-based (total_k, H) or query-based (total_q, H_k, MAX_K + 3)."""
    q = torch.empty(GRAPH_TOTAL_Q, 32, 128, dtype=dtype, device=device)
    k = torch.empty(GRAPH_TOTAL_K, 8, 128, dtype=dtype, device=device)
    cu = torch.zeros(GRAPH_B + 1, dtype=torch.int32, device=device)
    batch = Batch(q, k, torch.empty_like(k), cu, cu.clone(), GRAPH_MAX_Q, GRAPH_MAX_K, [])
    mask = torch.empty(GRAPH_TOTAL_K, 8, dtype=torch.bool, device=device)
    bias_shape = (GRAPH_TOTAL_K, 32) if bias_layout == "key" else (GRAPH_TOTAL_Q, 8, GRAPH_MAX_K + 3)
    return batch, mask, torch.empty(bias_shape, dtype=dtype, device=device)


def refill(batch, mask, bias, density):
    """Fresh contents and lengths for every static buffer of the decode step."""
    new_decode_lengths(batch)
    for t in (batch.q, batch.k, batch.v):
        t.copy_(torch.randn_like(t))
    mask.copy_(make_mask(batch, "key", "H_k", density=density))
    layout = "key" if bias.dim() == 2 else "query"
    bias.copy_(make_bias(batch, layout, "H" if layout == "key" else "H_k"))


@pytest.mark.parametrize("mode", list(GRAPH_MODES))
@CUDA_DTYPES
@requires_cuda
def test_cuda_graph_decode_replay(monkeypatch, dtype, mode):
    """Capture one decode step, then 3 rounds of new q/k/v/mask/bias and new sequence lengths (the
    cu_seqlens contents) in the same buffers: each replay gives the new inputs' result."""
    use_paths(monkeypatch, **GRAPH_MODES[mode])
    batch, mask, bias = decode_buffers(dtype, "query" if mode == "split4" else "key")
    kwargs = dict(attn_mask=mask, attn_bias=bias, is_causal=True)
    refill(batch, mask, bias, density=0.5)
    graph, (out, lse) = capture_cuda_graph(lambda: run_flash(batch, **kwargs))
    for density in (0.3, 0.02, 1.0):
        refill(batch, mask, bias, density)
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference(batch, out, lse, **kwargs)


def decode_step(q, k, v, mask, bias, cu_q, cu_k, max_q: int, max_k: int):
    return flash_dmattn.flash_dmattn_varlen_func(q, k, v, attn_mask=mask, attn_bias=bias, cu_seqlens_q=cu_q,
                                                 cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                                                 is_causal=True, return_lse=True)


@CUDA_DTYPES
@requires_cuda
def test_compile_fullgraph_gathered_keys(monkeypatch, dtype):
    """torch.compile(fullgraph=True) of a decode step on the gathered path: the reference's result,
    the eager result bit for bit, for two rounds of new contents and lengths."""
    use_paths(monkeypatch, gather=1)
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True)
    batch, mask, bias = decode_buffers(dtype, "key")
    for density in (0.25, 0.02):
        refill(batch, mask, bias, density)
        args = (batch.q, batch.k, batch.v, mask, bias, batch.cu_seqlens_q, batch.cu_seqlens_k,
                batch.max_seqlen_q, batch.max_seqlen_k)
        out, lse = compiled(*args)
        check_against_reference(batch, out, lse, attn_mask=mask, attn_bias=bias, is_causal=True)
        eager_out, eager_lse = decode_step(*args)
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)


# ----------------------------------------------------------------------------------------------
# 4. The paths agree with one another
# ----------------------------------------------------------------------------------------------

# (gather, splits); None = heuristic. The first is checked against the reference, the rest against it.
PATH_VARIANTS = [(0, 1), (0, 2), (0, 7), (0, 64), (1, 1), (1, 2), (1, 7), (1, 64), (None, None)]


@CAUSAL
@pytest.mark.parametrize("mask_heads", ["H_k", "H"])
@SHAPE
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_paths_agree(monkeypatch, device, dtype, shape, mask_heads, causal):
    """Same inputs through the tile and gathered paths at several split counts: the same result up to
    a rounding step (not necessarily bit-identical)."""
    batch = make_batch(seqlens_for(shape, device), 16, 4, 64, dtype, device)
    kwargs = dict(attn_mask=make_mask(batch, "key", mask_heads, density=0.1, dtype=torch.uint8),
                  attn_bias=make_bias(batch, "key", "1"), is_causal=causal)
    use_paths(monkeypatch, gather=0, splits=1)
    first = run_and_check(batch, **kwargs)
    for gather, splits in PATH_VARIANTS[1:]:
        use_paths(monkeypatch, gather=gather, splits=splits)
        assert_paths_agree(first, run_flash(batch, **kwargs), f"gather={gather}, splits={splits}")


# ----------------------------------------------------------------------------------------------
# 5. The warps' layouts (csrc/kernels/tile_math.cuh)
# ----------------------------------------------------------------------------------------------

# (key_split, warpgroups) of each layout of the CTA's threads.
LAYOUTS = {"rows": (0, 0), "keys": (1, 0), "warpgroups": (0, 1)}


# Chunk kinds of the gathered path (csrc/kernels/key_tiles.cuh): a chunk of gather_chunk(kBlockN)
# keys (launch_plan.h: 4096 for the warpgroup tiles of 128 keys at D = 128, 2048 for the 64-key
# tiles) whose keys are all visible is read as its contiguous range, any other through its list of
# visible keys.
# Beside them an empty key sequence and an empty query sequence.
CHUNK_SEQLENS = {"cpu": [(20, 300), (3, 150), (4, 0)],
                 "cuda": [(700, 9000), (300, 3000), (1, 4097), (8, 2100), (129, 1025), (4, 0), (0, 2048), (40, 8193)]}


@CAUSAL
@pytest.mark.parametrize("layout", list(LAYOUTS))
@GATHER
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gathered_chunk_kinds(monkeypatch, device, dtype, gather, layout, causal):
    """Every kind of chunk next to the others in one sequence: all keys visible (a range), half of
    them, all but one (a list one key short of the range), none; per KV head a different order. With
    a key-based bias, through each layout (decode and prefill rows), gathered or tile by tile."""
    key_split, warpgroups = LAYOUTS[layout]
    use_paths(monkeypatch, gather=gather, key_split=key_split, warpgroups=warpgroups)
    # The CPU kernel has no chunks: the same pattern, smaller.
    chunk = (4096 if layout == "warpgroups" else 2048) if device == "cuda" else 64
    batch = make_batch(CHUNK_SEQLENS[device], 8, 2, 128, dtype, device)
    keep = torch.rand(batch.total_k, batch.num_heads_k, device=device) < 0.5
    for b, (_, len_k) in enumerate(batch.seqlens):
        k0 = batch.cu_seqlens_k[b].item()
        for c, start in enumerate(range(0, len_k, chunk)):
            keys = slice(k0 + start, k0 + min(start + chunk, len_k))
            for g in range(batch.num_heads_k):
                kind = (c + b + g) % 4
                if kind == 0:
                    keep[keys, g] = True
                elif kind == 2:
                    keep[keys, g] = True
                    keep[k0 + start + (7 * c) % (keys.stop - keys.start), g] = False
                elif kind == 3:
                    keep[keys, g] = False
    out, lse = run_and_check(batch, attn_mask=keep, attn_bias=make_bias(batch, "key", "H_k"), is_causal=causal)
    assert_empty_key_sequences_hidden(batch, out, lse)


def on_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("device,dtype,head_dim", per_device(
    cpu=[(64,)], cuda=[(d,) for d in (32, 64, 80, 96, 128, 192, 256)], ids=lambda d: f"d{d}"))
def test_warp_layouts(monkeypatch, device, dtype, head_dim, heads, layout):
    """Decode batches through the three layouts of the CTA's threads: the key split (every warp
    takes 16-key slices of each key tile with its own softmax, merged after the last tile: four
    warps per row tile for blocks of <= 16 rows, two for 17-32 rows (GQA, 5-8 queries), and above
    D = 128 each warp half of O's columns, so D = 192 and 256 with 17-32 rows merge nothing), the
    row split, and the
    warpgroup layout (on Hopper, for D = 64, 128 and 256 and no query-based mask; elsewhere the
    override falls back to the row split). Each operand variant once, causal or not, at the
    heuristic's split count or at 7 splits (fresh inputs per check)."""
    num_heads, num_heads_k = HEADS[heads]
    key_split, warpgroups = LAYOUTS[layout]
    for i, operands in enumerate(OPERANDS):
        use_paths(monkeypatch, key_split=key_split, warpgroups=warpgroups, splits=None if i < 2 else 7)
        batch = make_batch(DECODE_SEQLENS[device], num_heads, num_heads_k, head_dim, dtype, device)
        out, lse = run_and_check(batch, is_causal=i % 2 == 1, **make_operands(batch, operands))
        assert_empty_key_sequences_hidden(batch, out, lse)


# Query heads per KV head for the key split's block sizes: G = 1, 2, 4, 8.
KEY_SPLIT_GROUPS = {"g1": (8, 8), "g2": (16, 8), "g4": (32, 8), "g8": (8, 1)}


@pytest.mark.parametrize("operands", list(OPERANDS))
@CAUSAL
@pytest.mark.parametrize("heads", list(KEY_SPLIT_GROUPS))
@pytest.mark.parametrize("device,dtype,head_dim", per_device(cpu=[], cuda=[(d,) for d in (64, 96, 128)],
                                                             ids=lambda d: f"d{d}"))
def test_key_split_block_sizes(monkeypatch, device, dtype, head_dim, heads, causal, operands):
    """Key-split blocks of every size class in one launch: with packed GQA a block holds queries x G
    rows, and the query counts put blocks of 8, 9-16 and 16 rows (one 16-row tile, four warps on
    it) beside blocks of 17-32 rows (two row tiles, two warps each); with key_per_head operands
    (no packing) the blocks hold 1-17 rows. Key lengths on no tile boundary, one inside
    the first 16-key slice, an empty one; the heuristic's split count (non-causal) or 3 forced
    splits (causal: partials merged by the combine)."""
    num_heads, num_heads_k = KEY_SPLIT_GROUPS[heads]
    group = num_heads // num_heads_k
    eight, sixteen = max(1, 8 // group), 16 // group  # queries that make blocks of 8 and 16 rows
    seqlens = [(1, 777), (eight, 3001), (eight + 1, 130), (2, 70), (1, 5), (eight + 1, 0), (sixteen, 200),
               (sixteen + 1, 1000), (3, 1)]
    use_paths(monkeypatch, key_split=1, splits=3 if causal else None)
    batch = make_batch(seqlens, num_heads, num_heads_k, head_dim, dtype, device)
    out, lse = run_and_check(batch, is_causal=causal, **make_operands(batch, operands))
    assert_empty_key_sequences_hidden(batch, out, lse)


# Prefill-shaped operands of the warpgroup layout: key-based mask and bias staged per tile, a
# query-based bias read per element, and none.
PREFILL_OPERANDS = {
    "key_shared": (("key", "H_k"), ("key", "1")),
    "key_per_head": (("key", "H"), ("key", "H_k")),
    "query_bias": (("key", "1"), ("query", "H_k")),
    "none": (None, None),
}
# Prefill lengths on no tile boundary: a long sequence, Lq > Lk (causal rows that see no key), an
# empty key sequence, an empty query sequence, one key, and a 64-row tail (one warpgroup's rows).
WARPGROUP_SEQLENS = [(700, 1337), (1100, 300), (130, 0), (0, 77), (1, 1), (64, 200), (193, 193)]


@pytest.mark.parametrize("operands", list(PREFILL_OPERANDS))
@CAUSAL
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("device,dtype,head_dim", per_device(
    cpu=[(64,)], cuda=[(d,) for d in (64, 128, 256, 40)], ids=lambda d: f"d{d}"))
def test_warpgroup_layout_prefill(monkeypatch, device, dtype, head_dim, heads, causal, operands):
    """Prefill batches through the warpgroup layout (D = 40 runs in the D = 64 tile with zero-filled
    columns) and through the row split, each against the float64 reference, at the heuristic's
    split count and gather choice, then forced to 3 splits over gathered keys. On Hopper the two
    layouts must also differ somewhere by rounding (128-key tiles against 64), which shows the
    warpgroup kernel, not the row split, produced the first result."""
    num_heads, num_heads_k = HEADS[heads]
    mask_spec, bias_spec = PREFILL_OPERANDS[operands]
    seqlens = WARPGROUP_SEQLENS if device == "cuda" else [(70, 133), (110, 30), (13, 0), (0, 7), (64, 20)]
    for splits, gather in ((None, None), (3, 1)):
        batch = make_batch(seqlens, num_heads, num_heads_k, head_dim, dtype, device)
        kwargs = dict(attn_mask=make_operand("mask", batch, mask_spec, density=0.5),
                      attn_bias=make_operand("bias", batch, bias_spec), is_causal=causal)
        use_paths(monkeypatch, warpgroups=1, splits=splits, gather=gather)
        out, lse = run_and_check(batch, **kwargs)
        assert_empty_key_sequences_hidden(batch, out, lse)
        use_paths(monkeypatch, warpgroups=0, splits=splits, gather=gather)
        rows_out, rows_lse = run_and_check(batch, **kwargs)
        if device == "cuda" and on_hopper():
            assert not torch.equal(out, rows_out), "FLASH_DMATTN_WARPGROUPS=1 did not change the kernel"


# ----------------------------------------------------------------------------------------------
# 6. Query-based masks: the up-front tile test (csrc/kernels/tile_visibility.cu)
# ----------------------------------------------------------------------------------------------

def block_sparse_query_mask(batch, heads, density, dtype, extra_cols, rows=48, cols=80):
    """(total_q, h', max_seqlen_k + extra_cols): per sequence, blocks of rows x cols (query, key) pairs,
    each all kept with probability `density`, else all hidden; blocks not aligned to the kernel's
    64-key tiles, so a tile is often partly visible. Columns past a sequence's keys are True."""
    keep = torch.zeros(operand_shape(batch, "query", heads, extra_cols), dtype=torch.bool, device=batch.q.device)
    for b, (lq, lk) in enumerate(batch.seqlens):
        if lq == 0 or lk == 0:
            continue
        q0 = batch.cu_seqlens_q[b].item()
        blocks = torch.rand(keep.shape[1], -(-lq // rows), -(-lk // cols), device=keep.device) < density
        full = blocks.repeat_interleave(rows, dim=1).repeat_interleave(cols, dim=2)[:, :lq, :lk]
        keep[q0:q0 + lq, :, :lk] = full.permute(1, 0, 2)
    return keep_to_mask(_fill_query_padding(keep, batch, True), dtype)


@CAUSAL
@pytest.mark.parametrize("rows", ["aligned", "misaligned"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float16], ids=["bool", "uint8", "fp16"])
@SHAPE
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_query_mask_tile_skip(device, dtype, shape, mask_dtype, rows, causal):
    """Block-sparse query-based masks (10% of 48 x 80 blocks kept; per KV head and per query head):
    the tiles skipped by the up-front test hold no visible pair, or the output would differ from
    the reference (which also holds rows whose blocks are all hidden to out = 0, lse = -inf).
    "aligned" pads the mask rows to a multiple of 16 bytes, so the tile test reads a byte mask 16
    keys at a time; "misaligned" adds 3 more columns, so it reads key by key."""
    for heads in ("H_k", "H"):
        batch = make_batch(seqlens_for(shape, device), 8, 2, 64, dtype, device)
        extra_cols = -batch.max_seqlen_k % 16 + (3 if rows == "misaligned" else 0)
        mask = block_sparse_query_mask(batch, heads, 0.1, mask_dtype, extra_cols)
        run_and_check(batch, attn_mask=mask, is_causal=causal)


@CAUSAL
@pytest.mark.parametrize("heads", ["1", "H_k", "H"])
@SHAPE
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_query_mask_full_tiles(device, dtype, shape, heads, causal):
    """Block masks on the kernel's 64-key tiles (16 queries = one 64-row block under packed GQA),
    60% of the blocks kept, then one hidden pair in every ~2000: the tile test marks the kept tiles
    without a hole full, and the kernel neither copies nor tests their mask; a tile with a hole
    marked full would keep its hidden pair, and the output would differ from the reference."""
    batch = make_batch(seqlens_for(shape, device), 8, 2, 64, dtype, device)
    keep = block_sparse_query_mask(batch, heads, 0.6, torch.bool, -batch.max_seqlen_k % 16, rows=16, cols=64)
    holes = torch.rand(keep.shape, device=keep.device) < 1 / 2000
    run_and_check(batch, attn_mask=keep & ~holes, attn_bias=make_operand("bias", batch, ("key", "H_k")),
                  is_causal=causal)


# fwd_kernel<T, D, FwdLayout::kWarpgroups, true> in a profiler event name, demangled or mangled.
WARPGROUP_QMASK_KERNEL = re.compile(r"fwd_kernel<.*(kWarpgroups|FwdLayout\)2), true>|fwd_kernel.*FwdLayoutE2ELb1E")

# The warpgroup layout under a staged query-based mask (launch_plan.h, warpgroups_take_query_mask):
# the G heads of a KV group packed into 128-row blocks of 128 / G queries, 64-key tiles. Lengths on
# no 16-, 32- or 64-query boundary: blocks whose second warpgroup holds no rows, Lq > Lk, an empty
# key sequence, an empty query sequence, one key.
WARPGROUP_QMASK_SEQLENS = {
    "cpu": [(70, 133), (110, 30), (13, 0), (0, 7), (33, 20)],
    "cuda": [(700, 1337), (1100, 300), (130, 0), (0, 77), (1, 1), (33, 200), (193, 193), (17, 65)],
}


@CAUSAL
@pytest.mark.parametrize("mask_heads", ["1", "H_k", "H"])
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("device,dtype,head_dim", per_device(
    cpu=[(64,)], cuda=[(d,) for d in (64, 128, 256, 40)], ids=lambda d: f"d{d}"))
def test_warpgroup_query_mask(monkeypatch, device, dtype, head_dim, heads, mask_heads, causal):
    """Block-sparse query-based masks (staged: rows padded to 16 bytes) with a key-based bias, two
    kinds per call: blocks on the kernel's 16-query x 64-key tiles with rare hidden pairs (full,
    partly kept and hidden tiles) and 48 x 80 blocks (tiles partly visible), each at the
    heuristic's split count and at 3 splits, against the float64 reference. On Hopper the
    profiler shows which kernel ran: with a mask the same for a group's heads (h' = 1 or H_k) the
    warpgroup layout with a staged mask, never with h' = H. (Its results can equal the row split's
    bit for bit: both sum 64-key tiles in the same order.)"""
    num_heads, num_heads_k = HEADS[heads]
    seqlens = WARPGROUP_QMASK_SEQLENS[device]
    for kind, (rows, cols, density) in {"tiles": (16, 64, 0.4), "blocks": (48, 80, 0.15)}.items():
        for splits in (None, 3):
            batch = make_batch(seqlens, num_heads, num_heads_k, head_dim, dtype, device)
            mask = block_sparse_query_mask(batch, mask_heads, density, torch.bool, -batch.max_seqlen_k % 16,
                                           rows=rows, cols=cols)
            mask &= torch.rand(mask.shape, device=device) >= 1 / 2000
            kwargs = dict(attn_mask=mask, attn_bias=make_operand("bias", batch, ("key", "H_k")), is_causal=causal)
            use_paths(monkeypatch, splits=splits)
            out, lse = run_and_check(batch, **kwargs)
            assert_empty_key_sequences_hidden(batch, out, lse)
            if device == "cuda" and on_hopper():
                names = kernels_launched(lambda: run_flash(batch, **kwargs))
                ran = any(WARPGROUP_QMASK_KERNEL.search(n) for n in names)
                assert ran == (mask_heads != "H"), f"{kind}, h' = {mask_heads}: kernels {names}"


# fwd_kernel<T, D, FwdLayout::kKeys, true> in a profiler event name, demangled or mangled.
KEY_SPLIT_QMASK_KERNEL = re.compile(r"fwd_kernel<.*(kKeys|FwdLayout\)1), true>|fwd_kernel.*FwdLayoutE1ELb1E")


@CAUSAL
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256], ids=lambda d: f"d{d}")
@CUDA_DTYPES
@requires_cuda
def test_key_split_staged_query_mask(monkeypatch, dtype, head_dim, causal):
    """Decode blocks (the key split's 32-row blocks, GQA 4 x 1-8 queries) under a staged
    query-based mask that differs per head, at every tile head dim: each stage holds the tile's
    (32, kBlockN) block of the mask beside its K/V (at D = 192 and 256 a 32 x 32 block, fewer
    16-byte chunks than threads), with two or three stages (tiles.cuh, KeySplitTile), swizzled or
    padded rows. 48 x 80 blocks (tiles partly visible) with one hidden pair in ~500, a key-based
    bias, the heuristic's split count and 7 splits, against the float64 reference; the profiler
    shows the staged key-split kernel ran."""
    for splits in (None, 7):
        use_paths(monkeypatch, splits=splits)
        batch = make_batch(DECODE_SEQLENS["cuda"], 32, 8, head_dim, dtype, "cuda")
        mask = block_sparse_query_mask(batch, "H", 0.5, torch.bool, -batch.max_seqlen_k % 16)
        mask &= torch.rand(mask.shape, device="cuda") >= 1 / 500
        kwargs = dict(attn_mask=mask, attn_bias=make_operand("bias", batch, ("key", "H_k")), is_causal=causal)
        out, lse = run_and_check(batch, **kwargs)
        assert_empty_key_sequences_hidden(batch, out, lse)
        names = kernels_launched(lambda: run_flash(batch, **kwargs))
        assert any(KEY_SPLIT_QMASK_KERNEL.search(n) for n in names), f"d{head_dim}, splits {splits}: {names}"


# ----------------------------------------------------------------------------------------------
# 7. The row schedule (csrc/kernels/row_schedule.cu): a grid without the row blocks past their
#    sequence, for batches whose sequences are mostly shorter than max_seqlen_q
# ----------------------------------------------------------------------------------------------

# Both CTA orders of the schedule (launch_plan.h, use_rows_first): K/V within L2 (row blocks
# first), and 60k keys x 8 KV heads x D = 128 (245 MB, beyond any L2: sequences first). Each with
# empty query and key sequences, one-row sequences, Lq > Lk and lengths on no tile boundary.
ROW_SCHEDULE_SEQLENS = {
    "rows_first": [(1000, 1000), (1, 1), (0, 50), (130, 0), (65, 200), (300, 333), (129, 64)],
    "sequences_first": [(700, 30000), (5, 30000), (1, 10), (0, 5), (129, 64), (64, 0)],
}
ROW_SCHEDULE_CASES = [(order, operands) for order in ROW_SCHEDULE_SEQLENS for operands in OPERANDS
                      if not (order == "sequences_first" and operands == "query")]  # (a 2 GB mask)


def kernels_launched(fn):
    """Names of the profiler's events of fn() on the GPU: the CUDA kernels it launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize("order,operands", ROW_SCHEDULE_CASES, ids=[f"{o}-{p}" for o, p in ROW_SCHEDULE_CASES])
@CAUSAL
@CUDA_DTYPES
@requires_cuda
def test_row_schedule(monkeypatch, dtype, causal, order, operands):
    """Prefill batches with the row schedule forced on and off (GQA, D = 128): both against the
    float64 reference, and the profiler shows the schedule pass ran exactly when it was on."""
    batch = make_batch(ROW_SCHEDULE_SEQLENS[order], 32, 8, 128, dtype, "cuda")
    kwargs = dict(is_causal=causal, **make_operands(batch, operands, density=0.5))
    for schedule in (1, 0):
        use_paths(monkeypatch, row_schedule=schedule)
        out, lse = run_and_check(batch, **kwargs)
        assert_empty_key_sequences_hidden(batch, out, lse)
        names = kernels_launched(lambda: run_flash(batch, **kwargs))
        assert any("row_schedule_kernel" in n for n in names) == bool(schedule), names


# The key split's own CTA order (fwd_kernel.cuh: the head blocks of one key range side by side)
# applies when the batch's K/V is beyond the L2 (sequences first) and there is no row schedule:
# 124k keys x 8 KV heads x D = 128 (508 MB) in sequences of 1-8 queries (32 packed rows at most,
# one row block each), with empty, short and long ones and lengths on no tile or chunk boundary.
KEY_SPLIT_ORDER_SEQLENS = [(1, 40000), (8, 30001), (3, 9000), (0, 5000), (5, 129), (2, 0), (7, 20000), (4, 20199)]


@CAUSAL
@pytest.mark.parametrize("num_splits", [None, 3], ids=["splits_auto", "splits3"])
@pytest.mark.parametrize("operands", ["none", "key-tiles", "key-gather"])
@requires_cuda
def test_key_split_sequences_first_order(monkeypatch, operands, num_splits, causal):
    """Decode blocks of a batch whose K/V does not fit the L2, with split-KV over every KV head,
    against the reference: every (sequence, key range, head block) CTA finds its own work."""
    use_paths(monkeypatch, splits=num_splits, gather=1 if operands == "key-gather" else 0, row_schedule=0)
    batch = make_batch(KEY_SPLIT_ORDER_SEQLENS, 32, 8, 128, torch.bfloat16, "cuda")
    kwargs = {}
    if operands != "none":
        kwargs = dict(attn_mask=make_mask(batch, "key", "H_k", density=0.5), attn_bias=make_bias(batch, "key", "H_k"))
    run_and_check(batch, is_causal=causal, **kwargs)


@CUDA_DTYPES
@requires_cuda
def test_row_schedule_cuda_graph_replay(monkeypatch, dtype):
    """The schedule is computed on the device from cu_seqlens: a captured prefill call replayed with
    other sequence lengths (the same totals and maxima) gives the new batch's result."""
    use_paths(monkeypatch, row_schedule=1)
    rounds = [[(500, 520), (3, 3), (0, 40), (97, 37)],
              [(97, 37), (500, 520), (3, 3), (0, 40)],
              [(1, 300), (0, 0), (499, 300), (100, 0)]]
    batch = make_batch(rounds[0], 8, 2, 64, dtype, "cuda")
    kwargs = dict(attn_mask=make_mask(batch, "key", "H_k"), attn_bias=make_bias(batch, "key", "1"), is_causal=True)
    graph, (out, lse) = capture_cuda_graph(lambda: run_flash(batch, **kwargs))
    for seqlens in rounds[1:]:
        batch.cu_seqlens_q.copy_(cu_seqlens([lq for lq, _ in seqlens], "cuda"))
        batch.cu_seqlens_k.copy_(cu_seqlens([lk for _, lk in seqlens], "cuda"))
        batch.seqlens[:] = seqlens
        for x in (batch.q, batch.k, batch.v, kwargs["attn_bias"]):
            x.copy_(torch.randn_like(x, dtype=torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference(batch, out, lse, **kwargs)
