"""Correctness of flash_dmattn_varlen_func against the reference (SPEC.md sections 1, 2 and 4)."""
import pytest
import torch

import flash_dmattn
from conftest import (
    Batch,
    check_against_reference,
    cu_seqlens,
    device_dtype_params,
    make_batch,
    make_bias,
    make_mask,
    make_operand,
    run_and_check,
    run_flash,
)

H, H_K = 8, 2  # GQA unless a test says otherwise
D = 32
SEQLENS = [(5, 9), (12, 4), (1, 17), (6, 6)]

OPERAND_SPECS = [None] + [(layout, heads) for layout in ("key", "query") for heads in ("1", "H_k", "H")]


def spec_id(spec):
    return "none" if spec is None else f"{spec[0]}-{spec[1]}"


@pytest.mark.parametrize("bias_spec", OPERAND_SPECS, ids=spec_id)
@pytest.mark.parametrize("mask_spec", OPERAND_SPECS, ids=spec_id)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_mask_and_bias_layouts(device, dtype, mask_spec, bias_spec):
    """Every mask layout x bias layout x head variant, with GQA (H=8, H_k=2)."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    mask = make_operand("mask", batch, mask_spec)
    bias = make_operand("bias", batch, bias_spec)
    run_and_check(batch, attn_mask=mask, attn_bias=bias)


@pytest.mark.parametrize("num_heads_k", [1, 2, 4, 8], ids=lambda n: f"Hk{n}")
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_mqa_gqa_mha(device, dtype, num_heads_k):
    """H_k = 1 (MQA), 2 and 4 (GQA), 8 (MHA), with a per-KV-head mask and a per-query-head bias."""
    batch = make_batch(SEQLENS, H, num_heads_k, D, dtype, device)
    run_and_check(batch, attn_mask=make_mask(batch, "key", "H_k"), attn_bias=make_bias(batch, "query", "H"))


CAUSAL_SEQLENS = {
    "q<k": [(3, 10)],
    "q==k": [(10, 10)],
    "q>k": [(10, 3)],
    "mixed": [(3, 10), (10, 10), (10, 3), (1, 1), (1, 9), (9, 1)],
}


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", list(CAUSAL_SEQLENS), ids=list(CAUSAL_SEQLENS))
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_causal_bottom_right(device, dtype, case, with_mask):
    """Causal is aligned bottom-right: with Lq > Lk the first Lq - Lk queries see nothing."""
    batch = make_batch(CAUSAL_SEQLENS[case], H, H_K, D, dtype, device)
    mask = make_mask(batch, "key", "H") if with_mask else None
    run_and_check(batch, attn_mask=mask, attn_bias=make_bias(batch, "key", "H_k"), is_causal=True)


EMPTY_CASES = {
    "mixed": [(0, 5), (3, 0), (0, 0), (4, 6), (2, 3)],
    "all_q_empty": [(0, 4), (0, 7)],
    "all_k_empty": [(3, 0), (2, 0)],
    "all_empty": [(0, 0)],
    "trailing_empty": [(4, 6), (0, 0)],
}


@pytest.mark.parametrize("layout", ["key", "query"])
@pytest.mark.parametrize("case", list(EMPTY_CASES), ids=list(EMPTY_CASES))
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_empty_sequences(device, dtype, case, layout):
    """Lq = 0 and/or Lk = 0 inside a batch: queries without keys give out = 0, lse = -inf."""
    batch = make_batch(EMPTY_CASES[case], H, H_K, D, dtype, device)
    mask = make_mask(batch, layout, "H_k")
    bias = make_bias(batch, layout, "H")
    run_and_check(batch, attn_mask=mask, attn_bias=bias)
    run_and_check(batch, is_causal=True)


@pytest.mark.parametrize("layout", ["key", "query"])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_fully_masked_sequence(device, dtype, layout):
    """One sequence's mask is all False (every head): its rows are exactly 0 / -inf, the others are normal."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    mask = make_mask(batch, layout, "H")
    if layout == "key":
        k0, k1 = batch.cu_seqlens_k[1].item(), batch.cu_seqlens_k[2].item()
        mask[k0:k1] = False
    else:
        q0, q1 = batch.cu_seqlens_q[1].item(), batch.cu_seqlens_q[2].item()
        mask[q0:q1] = False
    # A few single fully masked (query, head) rows too.
    qmask = make_mask(batch, "query", "H", density=0.9)
    qmask[0, 3] = False
    qmask[-1, 0] = False
    out, lse = run_and_check(batch, attn_mask=mask, attn_bias=make_bias(batch, "key", "H"))
    q0, q1 = batch.cu_seqlens_q[1].item(), batch.cu_seqlens_q[2].item()
    assert torch.isneginf(lse[:, q0:q1]).all()
    assert (out[q0:q1] == 0).all()
    out, lse = run_and_check(batch, attn_mask=qmask)
    assert torch.isneginf(lse[3, 0]) and torch.isneginf(lse[0, -1])


@pytest.mark.parametrize("softcap", [2.0, 30.0])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_softcap(device, dtype, softcap):
    """softcap * tanh(s / softcap) applies to the scaled scores, before the bias is added."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    # A large scale makes |s| ~ 5, where tanh is far from linear for softcap=2.
    run_and_check(batch, scale=1.0, softcap=softcap)
    run_and_check(batch, scale=1.0, softcap=softcap, attn_bias=make_bias(batch, "key", "H_k", std=3.0),
                  attn_mask=make_mask(batch, "query", "1"), is_causal=True)


@pytest.mark.parametrize("scale", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_non_default_scale(device, dtype, scale):
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    run_and_check(batch, scale=scale, attn_bias=make_bias(batch, "key", "H"))


@pytest.mark.parametrize("scale", [-0.5, 0.0])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_non_positive_scale(device, dtype, scale):
    """Any finite scale is valid. Without bias and softcap the CUDA kernels leave a positive scale
    to the softmax's exponent (masking.cuh): a scale <= 0 must take the explicit path. On CUDA the
    decode blocks (<= 32 rows) run the key split, the prefill blocks at D = 32 and the query-based
    masks the row split, and the prefill blocks at D = 64 the warpgroup layout (on Hopper)."""
    decode = make_batch([(1, 300), (4, 1200), (0, 5), (2, 0)], 8, 2, D, dtype, device)
    prefill = make_batch([(150, 150), (70, 200), (1, 1)], 8, 2, D, dtype, device)
    prefill_64 = make_batch([(150, 150), (70, 200), (1, 1)], 8, 2, 64, dtype, device)
    for batch in (decode, prefill, prefill_64):
        run_and_check(batch, scale=scale, is_causal=True)
        run_and_check(batch, scale=scale, attn_mask=make_mask(batch, "key", "H_k"))
        run_and_check(batch, scale=scale, attn_mask=make_mask(batch, "query", "H"))
        run_and_check(batch, scale=scale, attn_bias=make_bias(batch, "key", "H"), is_causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_large_scores_are_stable(device, dtype):
    """Scores far outside exp's range (a bias of std 40) still give a finite, correct softmax."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    bias = make_bias(batch, "query", "H_k", dtype=torch.float32, std=40.0)
    run_and_check(batch, attn_bias=bias, attn_mask=make_mask(batch, "key", "1"))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_packed_qkv_views_mha(device, dtype):
    """q, k, v as views into one (total, 3, H, D) tensor (self-attention, H_k == H)."""
    seqlens = [(5, 5), (11, 11), (1, 1)]
    total = sum(n for n, _ in seqlens)
    qkv = torch.randn(total, 3, H, D, dtype=dtype, device=device)
    q, k, v = qkv.unbind(dim=1)
    assert not q.is_contiguous()
    cu = cu_seqlens([n for n, _ in seqlens], device)
    batch = Batch(q, k, v, cu, cu, 11, 11, seqlens)
    run_and_check(batch, attn_mask=make_mask(batch, "key", "H"), is_causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_packed_qkv_views_gqa(device, dtype):
    """q, k, v as head-slices of one (total, H + 2 H_k, D) tensor (GQA)."""
    seqlens = [(5, 5), (11, 11), (1, 1)]
    total = sum(n for n, _ in seqlens)
    qkv = torch.randn(total, H + 2 * H_K, D, dtype=dtype, device=device)
    q, k, v = qkv.split([H, H_K, H_K], dim=1)
    cu = cu_seqlens([n for n, _ in seqlens], device)
    batch = Batch(q, k, v, cu, cu, 11, 11, seqlens)
    run_and_check(batch, attn_bias=make_bias(batch, "query", "H"))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_strided_rows_and_heads(device, dtype):
    """Last dim contiguous but padded rows/heads: q[:, :, :D] of a wider tensor, k with heads transposed."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    q_wide = torch.randn(batch.total_q, H, D + 8, dtype=dtype, device=device)
    k_heads_first = torch.randn(H_K, batch.total_k, D, dtype=dtype, device=device)
    batch.q = q_wide[:, :, :D]
    batch.k = k_heads_first.transpose(0, 1)
    run_and_check(batch, attn_mask=make_mask(batch, "key", "H_k"))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_misaligned_inputs(device, dtype):
    """Valid but oddly aligned tensors: storage offset of one element, odd row/head strides."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)

    def misaligned(rows, heads, row_pad):
        flat = torch.randn(1 + rows * heads * (D + row_pad), dtype=dtype, device=device)[1:]
        return flat.view(rows, heads, D + row_pad)[:, :, :D]

    batch.q = misaligned(batch.total_q, H, 1)
    batch.k = misaligned(batch.total_k, H_K, 3)
    batch.v = misaligned(batch.total_k, H_K, 0)
    bias = torch.randn(1 + batch.total_k * H, dtype=dtype, device=device)[1:].view(batch.total_k, H)
    run_and_check(batch, attn_bias=bias, attn_mask=make_mask(batch, "query", "H_k"), is_causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_non_contiguous_mask_and_bias(device, dtype):
    """Mask/bias with unusual strides: a transposed key-based bias, a column-sliced query-based mask."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    bias_t = torch.randn(H, batch.total_k, dtype=dtype, device=device)
    bias = bias_t.T  # (total_k, H), stride (1, total_k)
    wide = make_mask(batch, "query", "H_k", extra_cols=20)
    mask = wide[:, :, 5:]  # Kq = max_seqlen_k + 15, rows not contiguous
    mask[:] = make_mask(batch, "query", "H_k", extra_cols=15)
    run_and_check(batch, attn_mask=mask, attn_bias=bias)
    qbias = make_bias(batch, "query", "H", extra_cols=4).transpose(0, 1).contiguous().transpose(0, 1)
    kmask = make_mask(batch, "key", "H").repeat(1, 2)[:, ::2]  # (total_k, H), head stride 2
    run_and_check(batch, attn_mask=kmask, attn_bias=qbias)


@pytest.mark.parametrize("layout", ["key", "query"])
@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float16, torch.bfloat16]))
def test_float32_bias_with_low_precision_query(device, dtype, layout):
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    bias = make_bias(batch, layout, "H_k", dtype=torch.float32)
    out, _ = run_and_check(batch, attn_bias=bias, attn_mask=make_mask(batch, "key", "1"))
    assert out.dtype == dtype


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_max_seqlen_larger_than_true_max(device, dtype):
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    max_q, max_k = batch.max_seqlen_q + 5, batch.max_seqlen_k + 37
    mask = make_mask(batch, "query", "H", extra_cols=37)  # Kq must cover the stated max_seqlen_k
    bias = make_bias(batch, "query", "1", extra_cols=40)
    run_and_check(batch, max_seqlen_q=max_q, max_seqlen_k=max_k, attn_mask=mask, attn_bias=bias)
    run_and_check(batch, max_seqlen_q=max_q, max_seqlen_k=max_k, attn_mask=make_mask(batch, "key", "H_k"),
                  is_causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_seed_example_decode_gqa(device, dtype):
    """The example of the feature request: batch decode, key-based bool mask and bias (total_k, H_k)."""
    seqlens = [(1, 256), (2, 256), (1, 256), (2, 256)]
    batch = make_batch(seqlens, 32, 8, 128, dtype, device)
    assert batch.cu_seqlens_q.tolist() == [0, 1, 3, 4, 6]
    assert batch.cu_seqlens_k.tolist() == [0, 256, 512, 768, 1024]
    mask = torch.randint(0, 2, (1024, 8), dtype=torch.bool, device=device)
    bias = torch.randn(1024, 8, dtype=dtype, device=device)
    out, lse = run_and_check(batch, attn_mask=mask, attn_bias=bias)
    assert out.shape == (6, 32, 128) and lse.shape == (32, 6)


ODD_LENGTHS = [1, 7, 33, 63, 65, 127, 129]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_lengths_off_tile_boundaries(device, dtype, causal):
    """Lengths that are multiples of no tile size, as Lq != Lk and Lq == Lk."""
    seqlens = list(zip(ODD_LENGTHS, reversed(ODD_LENGTHS))) + [(n, n) for n in (63, 65, 129)]
    batch = make_batch(seqlens, 4, 2, 64, dtype, device)
    run_and_check(batch, attn_mask=make_mask(batch, "key", "H_k"), attn_bias=make_bias(batch, "query", "1"),
                  is_causal=causal)


MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("zero_one", [True, False], ids=["01", "nonzero"])
@pytest.mark.parametrize("layout", ["key", "query"])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32, torch.bfloat16]))
def test_mask_dtypes(device, dtype, mask_dtype, layout, zero_one):
    """Masks of every accepted dtype; for non-bool dtypes any nonzero value keeps (also negative ones)."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    mask = make_mask(batch, layout, "H_k", dtype=mask_dtype, zero_one=zero_one)
    run_and_check(batch, attn_mask=mask)


@pytest.mark.parametrize("head_dim", [1, 5, 16, 40, 72, 100, 128, 256])
def test_cpu_any_head_dim(head_dim):
    batch = make_batch([(3, 7), (9, 2)], 4, 2, head_dim, torch.float32, "cpu")
    run_and_check(batch, attn_mask=make_mask(batch, "key", "H"), attn_bias=make_bias(batch, "key", "H"))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_return_lse_false_returns_only_out(device, dtype):
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    mask = make_mask(batch, "key", "H_k")
    out = flash_dmattn.flash_dmattn_varlen_func(
        batch.q, batch.k, batch.v, attn_mask=mask, cu_seqlens_q=batch.cu_seqlens_q,
        cu_seqlens_k=batch.cu_seqlens_k, max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.max_seqlen_k)
    assert isinstance(out, torch.Tensor)
    assert out.shape == batch.q.shape and out.dtype == dtype
    _, lse = run_flash(batch, attn_mask=mask)
    check_against_reference(batch, out, lse, attn_mask=mask)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_max_seqlen_omitted(device, dtype):
    """max_seqlen_q/k omitted: derived from cu_seqlens."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    mask = make_mask(batch, "query", "H")
    out, lse = flash_dmattn.flash_dmattn_varlen_func(
        batch.q, batch.k, batch.v, attn_mask=mask, cu_seqlens_q=batch.cu_seqlens_q,
        cu_seqlens_k=batch.cu_seqlens_k, is_causal=True, return_lse=True)
    check_against_reference(batch, out, lse, attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_positional_and_default_arguments(device, dtype):
    """scale/is_causal/softcap/deterministic left at None mean 1/sqrt(D), False, off."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    mask, bias = make_mask(batch, "key", "1"), make_bias(batch, "key", "1")
    out, lse = flash_dmattn.flash_dmattn_varlen_func(
        batch.q, batch.k, batch.v, mask, bias, batch.cu_seqlens_q, batch.cu_seqlens_k,
        batch.max_seqlen_q, batch.max_seqlen_k, None, None, None, None, None, True)
    check_against_reference(batch, out, lse, attn_mask=mask, attn_bias=bias)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_deterministic_flag(device, dtype):
    """deterministic=True is accepted, is correct, and two calls agree bit for bit."""
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    bias = make_bias(batch, "query", "H_k")
    out1, lse1 = run_and_check(batch, attn_bias=bias, deterministic=True)
    out2, lse2 = run_flash(batch, attn_bias=bias, deterministic=True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_inputs_are_not_modified(device, dtype):
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    mask, bias = make_mask(batch, "key", "H_k"), make_bias(batch, "query", "H")
    before = [t.clone() for t in (batch.q, batch.k, batch.v, mask, bias, batch.cu_seqlens_q, batch.cu_seqlens_k)]
    run_flash(batch, attn_mask=mask, attn_bias=bias, is_causal=True)
    after = (batch.q, batch.k, batch.v, mask, bias, batch.cu_seqlens_q, batch.cu_seqlens_k)
    for x, y in zip(before, after):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu=[torch.float32, torch.bfloat16]))
def test_longer_sequences_many_work_items(device, dtype):
    """Long enough that the work is split into many blocks/threads; every block must be right."""
    batch = make_batch([(257, 520), (300, 300), (2, 700)], 8, 2, 64, dtype, device)
    run_and_check(batch, attn_mask=make_mask(batch, "key", "H_k", density=0.5),
                  attn_bias=make_bias(batch, "query", "H"), is_causal=True)


def test_cpu_result_does_not_depend_on_thread_count():
    batch = make_batch([(70, 130), (33, 5), (129, 64)], 8, 2, 32, torch.float32, "cpu")
    bias = make_bias(batch, "key", "H")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, lse1 = run_flash(batch, attn_bias=bias, is_causal=True)
    finally:
        torch.set_num_threads(threads)
    out2, lse2 = run_and_check(batch, attn_bias=bias, is_causal=True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
