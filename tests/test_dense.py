"""The dense (B, S, H, D) functions and the packed-qkv / packed-kv variants (issue 6, item 1):
every broadcast form of the (B or 1, h', S_q or 1, S_k) mask and bias, against the float64
reference of the equivalent varlen batch, and views instead of copies."""

import math

import pytest
import torch

import flash_dmattn
from conftest import assert_close_to_reference, dense_to_query_based, device_dtype_params
from reference import attention_reference

H, H_K, D = 8, 2, 32


def check_dense(q, k, v, mask=None, bias=None, is_causal=False, softcap=0.0, scale=None):
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    out, lse = flash_dmattn.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=is_causal,
                                              softcap=softcap, scale=scale, return_lse=True)
    assert out.shape == q.shape and lse.shape == (batch, q.shape[2], seqlen_q)
    # The same problem as a packed varlen batch with materialized query-based operands.
    rows = lambda t: t.reshape(batch * t.shape[1], t.shape[2], t.shape[3])  # noqa: E731
    cu_q = torch.arange(batch + 1, dtype=torch.int32) * seqlen_q
    cu_k = torch.arange(batch + 1, dtype=torch.int32) * seqlen_k
    vmask = None if mask is None else dense_to_query_based(mask, batch, seqlen_q, seqlen_k)
    vbias = None if bias is None else dense_to_query_based(bias, batch, seqlen_q, seqlen_k)
    args = dict(attn_mask=vmask, attn_bias=vbias, scale=scale, is_causal=is_causal, softcap=softcap)
    ref_out, ref_lse = attention_reference(rows(q), rows(k), rows(v), cu_q, cu_k, **args)
    low_out, low_lse = attention_reference(rows(q), rows(k), rows(v), cu_q, cu_k, dtype=q.dtype, **args)
    flat_lse = lse.permute(1, 0, 2).reshape(q.shape[2], batch * seqlen_q)  # (H, B * S_q)
    assert_close_to_reference(rows(out), flat_lse, ref_out, ref_lse, low_out, low_lse.float())


def make_qkv(batch, seqlen_q, seqlen_k, dtype, device, heads_k=H_K):
    q = torch.randn(batch, seqlen_q, H, D, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, heads_k, D, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, heads_k, D, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("mask_shape", [None, "B,h,1,Sk", "1,1,1,Sk", "B,Hk,Sq,Sk", "1,H,Sq,Sk", "B,1,Sq,Sk"])
@pytest.mark.parametrize("bias_shape", [None, "B,Hk,1,Sk", "1,H,Sq,Sk", "B,1,1,Sk"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dense_broadcast_forms(device, dtype, mask_shape, bias_shape, is_causal):
    batch, seqlen_q, seqlen_k = 3, 37, 70
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, dtype, device)
    sizes = {"B": batch, "1": 1, "h": H, "H": H, "Hk": H_K, "Sq": seqlen_q, "Sk": seqlen_k}

    def shape(spec):
        return tuple(sizes[s] for s in spec.split(","))

    mask = None if mask_shape is None else torch.rand(shape(mask_shape), device=device) < 0.7
    bias = None if bias_shape is None else torch.randn(shape(bias_shape), device=device, dtype=dtype)
    check_dense(q, k, v, mask, bias, is_causal=is_causal)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_dense_decode_mqa_softcap_scale_and_expanded_views(device, dtype):
    """Lq < Lk (decoding), MQA, softcap, a custom scale, and masks that are expand()ed views."""
    batch, seqlen_q, seqlen_k = 4, 3, 129
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, dtype, device, heads_k=1)
    keys_kept = torch.rand(batch, 1, 1, seqlen_k, device=device) < 0.5
    mask = keys_kept.expand(batch, H, seqlen_q, seqlen_k)           # stride 0 over heads and queries
    bias = torch.randn(1, 1, 1, seqlen_k, device=device).expand(batch, 1, seqlen_q, seqlen_k)
    check_dense(q, k, v, mask, bias, is_causal=True, softcap=5.0, scale=0.3)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_dense_fully_masked_batch_row_gives_zero(device, dtype):
    batch, seqlen_q, seqlen_k = 2, 5, 9
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, dtype, device)
    mask = torch.ones(batch, 1, 1, seqlen_k, dtype=torch.bool, device=device)
    mask[1] = False
    out, lse = flash_dmattn.flash_dmattn_func(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    check_dense(q, k, v, mask)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_packed_variants_equal_the_unpacked_call(device, dtype):
    batch, seqlen = 2, 33
    qkv = torch.randn(batch, seqlen, 3, H, D, dtype=dtype, device=device)
    mask = torch.rand(batch, H, 1, seqlen, device=device) < 0.8
    expect = flash_dmattn.flash_dmattn_func(qkv[:, :, 0].contiguous(), qkv[:, :, 1].contiguous(),
                                            qkv[:, :, 2].contiguous(), attn_mask=mask, is_causal=True)
    assert torch.equal(flash_dmattn.flash_dmattn_qkvpacked_func(qkv, attn_mask=mask, is_causal=True), expect)
    check_dense(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, is_causal=True)

    q = torch.randn(batch, 7, H, D, dtype=dtype, device=device)
    kv = torch.randn(batch, seqlen, 2, H_K, D, dtype=dtype, device=device)
    got = flash_dmattn.flash_dmattn_kvpacked_func(q, kv, is_causal=True)
    assert torch.equal(got, flash_dmattn.flash_dmattn_func(q, kv[:, :, 0].contiguous(), kv[:, :, 1].contiguous(),
                                                           is_causal=True))

    lens = [5, 0, 17]
    cu = torch.tensor([0, 5, 5, 22], dtype=torch.int32, device=device)
    qkv_v = torch.randn(sum(lens), 3, H, D, dtype=dtype, device=device)
    got = flash_dmattn.flash_dmattn_varlen_qkvpacked_func(qkv_v, cu, max(lens), is_causal=True)
    expect = flash_dmattn.flash_dmattn_varlen_func(qkv_v[:, 0].contiguous(), qkv_v[:, 1].contiguous(),
                                                   qkv_v[:, 2].contiguous(), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                   max_seqlen_q=max(lens), max_seqlen_k=max(lens), is_causal=True)
    assert torch.equal(got, expect)
    kv_v = torch.randn(sum(lens), 2, H_K, D, dtype=dtype, device=device)
    got = flash_dmattn.flash_dmattn_varlen_kvpacked_func(qkv_v[:, 0], kv_v, cu, cu, max(lens), max(lens))
    expect = flash_dmattn.flash_dmattn_varlen_func(qkv_v[:, 0], kv_v[:, 0].contiguous(), kv_v[:, 1].contiguous(),
                                                   cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                                                   max_seqlen_k=max(lens))
    assert torch.equal(got, expect)


@pytest.mark.parametrize("shape,match", [
    ((3, H, 37), "attn_mask"),           # 3-D
    ((2, H, 1, 70), "attn_mask"),        # batch 2, neither 3 nor 1
    ((3, 3, 1, 70), "attn_mask"),        # 3 heads
    ((3, H, 5, 70), "attn_mask"),        # S_q 5, neither 37 nor 1
    ((3, H, 1, 69), "attn_mask"),        # S_k 69
])
def test_dense_mask_shape_errors_name_the_argument(shape, match):
    q, k, v = make_qkv(3, 37, 70, torch.float32, "cpu")
    with pytest.raises((ValueError, RuntimeError), match=match):
        flash_dmattn.flash_dmattn_func(q, k, v, attn_mask=torch.ones(shape, dtype=torch.bool))


def test_dense_input_rank_and_batch_errors():
    q, k, v = make_qkv(3, 37, 70, torch.float32, "cpu")
    with pytest.raises((ValueError, RuntimeError), match="query"):
        flash_dmattn.flash_dmattn_func(q[0], k, v)
    with pytest.raises((ValueError, RuntimeError), match="batch"):
        flash_dmattn.flash_dmattn_func(q, k[:2], v[:2])


def test_dense_opcheck_and_compile():
    q, k, v = make_qkv(2, 9, 12, torch.float32, "cpu")
    mask = torch.rand(2, H_K, 1, 12) < 0.8
    bias = torch.randn(1, H, 9, 12)
    torch.library.opcheck(torch.ops.flash_dmattn.mha_fwd, (q, k, v, mask, bias, 1 / math.sqrt(D), True, 0.0))
    compiled = torch.compile(lambda *a: flash_dmattn.flash_dmattn_func(*a, is_causal=True), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(q, k, v, mask, bias), flash_dmattn.flash_dmattn_func(q, k, v, mask, bias,
                                                                                     is_causal=True))


def test_dense_key_form_and_packed_qkv_allocate_no_copies():
    """(B, H_k, 1, S_k) masks and packed qkv are read through strides: the op allocates only its
    outputs (and lse) beside the inputs, measured with the profiler's memory events."""
    batch, seqlen = 2, 64
    qkv = torch.randn(batch, seqlen, 3, H, D)
    mask = torch.rand(batch, 1, 1, seqlen) < 0.8
    bias = torch.randn(batch, H, 1, seqlen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        flash_dmattn.flash_dmattn_qkvpacked_func(qkv, attn_mask=mask, attn_bias=bias)
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    outputs = batch * seqlen * H * D * 4 + batch * H * seqlen * 4
    cu_seqlens = 2 * (batch + 1) * 4 * 4  # two small int32 aranges (and their temporaries)
    copy_of_q = batch * seqlen * H * D * 4
    assert allocated <= outputs + cu_seqlens + 4096, f"allocated {allocated} B, outputs are {outputs} B"
    assert allocated < outputs + copy_of_q  # a single copy of q, k or v would show up here
