"""The backends of flash_dmattn_func_auto (issue 6, item 2): every backend that can run here against
the same float64 reference on the same cases, the selection order, and the errors of unavailable ones.

"triton" needs a CUDA GPU; without one, when triton is installed, its kernel runs here under Triton's
interpreter (TRITON_INTERPRET=1, set below before the kernel module is first imported) at tiny sizes.
The interpreter computes tl.dot wrongly for bfloat16 inputs, so there it is tested in fp32 and fp16.
"""

import importlib.util
import os

import pytest
import torch

import flash_dmattn
from conftest import assert_close_to_reference, dense_to_query_based
from flash_dmattn.backends import registry
from flash_dmattn.backends import (CUDA_AVAILABLE, FLEX_AVAILABLE, TRITON_AVAILABLE, flash_dmattn_func_auto,
                                   get_available_backends, triton_dmattn_func)
from reference import attention_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETED = HAS_TRITON and not torch.cuda.is_available()
if TRITON_INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, D = 4, 16


def backend_dtype_params():
    """(backend, dtype) for every backend that runs here, plus the interpreted Triton kernel."""
    # On CPU, fp32 and bf16 (fp16 of the CPU kernels is covered by test_dense.py); keeps the file fast.
    dtypes = [torch.float32, torch.bfloat16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]
    params = []
    for name in get_available_backends():
        for dtype in dtypes:
            # The device leads the id, so `-k cuda` (dev/gpu_run.sh) selects every backend on a GPU.
            params.append(pytest.param(name, dtype, id=f"{DEVICE}-{name}-{str(dtype)[6:]}"))
    if TRITON_INTERPRETED:
        for dtype in (torch.float32, torch.float16):
            params.append(pytest.param("triton", dtype, id=f"triton-interpreted-{str(dtype)[6:]}"))
    return params


def backend_func(name):
    return triton_dmattn_func if (name == "triton" and TRITON_INTERPRETED) else flash_dmattn_func_auto(name)


# name: (B, S_q, S_k, H_k, mask shape, mask dtype, bias shape, bias dtype, is_causal, softcap)
# Shapes use B, Hk, H, Sq, Sk, 1; a mask with "fully_masked" hides every key of batch row 1.
CASES = {
    "plain": (2, 13, 13, 2, None, None, None, None, False, 0.0),
    "key_mask_and_bias": (2, 9, 21, 2, "B,Hk,1,Sk", torch.bool, "1,H,1,Sk", None, False, 0.0),
    "query_mask_bias_causal_decode": (2, 5, 21, 2, "B,1,Sq,Sk", torch.uint8, "B,H,Sq,Sk", torch.float32, True, 0.0),
    "causal_square_mqa_softcap": (2, 17, 17, 1, "1,H,1,Sk", torch.float32, "1,1,Sq,Sk", None, True, 3.0),
    "causal_more_queries_than_keys": (2, 12, 7, 2, None, None, "B,Hk,1,Sk", None, True, 0.0),
    "fully_masked_batch_row": (2, 6, 11, 4, "fully_masked", torch.bool, "1,1,1,Sk", None, False, 0.0),
}


def make_case(case, dtype):
    batch, seqlen_q, seqlen_k, heads_k, mask_spec, mask_dtype, bias_spec, bias_dtype, causal, softcap = CASES[case]
    sizes = {"B": batch, "1": 1, "H": H, "Hk": heads_k, "Sq": seqlen_q, "Sk": seqlen_k}

    def shape(spec):
        return tuple(sizes[s] for s in spec.split(","))

    q = torch.randn(batch, seqlen_q, H, D, dtype=dtype, device=DEVICE)
    k = torch.randn(batch, seqlen_k, heads_k, D, dtype=dtype, device=DEVICE)
    v = torch.randn(batch, seqlen_k, heads_k, D, dtype=dtype, device=DEVICE)
    mask = None
    if mask_spec == "fully_masked":
        mask = torch.rand(batch, 1, seqlen_q, seqlen_k, device=DEVICE) < 0.7
        mask[1] = False
    elif mask_spec is not None:
        mask = (torch.rand(shape(mask_spec), device=DEVICE) < 0.7).to(mask_dtype)
    bias = None
    if bias_spec is not None:
        bias = torch.randn(shape(bias_spec), device=DEVICE, dtype=bias_dtype or dtype)
    return q, k, v, mask, bias, causal, softcap


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_backend_matches_reference(backend, dtype, case):
    q, k, v, mask, bias, causal, softcap = make_case(case, dtype)
    out, lse = backend_func(backend)(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal, softcap=softcap,
                                     return_lse=True)
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, H, seqlen_q) and lse.dtype == torch.float32

    # The same problem as a packed varlen batch with materialized query-based operands.
    rows = lambda t: t.reshape(batch * t.shape[1], t.shape[2], t.shape[3])  # noqa: E731
    cu_q = torch.arange(batch + 1, dtype=torch.int32) * seqlen_q
    cu_k = torch.arange(batch + 1, dtype=torch.int32) * seqlen_k
    args = dict(attn_mask=None if mask is None else dense_to_query_based(mask, batch, seqlen_q, seqlen_k),
                attn_bias=None if bias is None else dense_to_query_based(bias, batch, seqlen_q, seqlen_k),
                is_causal=causal, softcap=softcap)
    ref_out, ref_lse = attention_reference(rows(q), rows(k), rows(v), cu_q, cu_k, **args)
    low_out, low_lse = attention_reference(rows(q), rows(k), rows(v), cu_q, cu_k, dtype=dtype, **args)
    flat_lse = lse.permute(1, 0, 2).reshape(H, batch * seqlen_q)  # (H, B * S_q)
    assert_close_to_reference(rows(out), flat_lse, ref_out, ref_lse, low_out, low_lse.float())


def test_available_backends_and_flags_agree():
    available = get_available_backends()
    assert available[-1] == "cpu"
    assert available == [name for name in ("cuda", "triton", "flex", "cpu") if name in available]
    assert ("cuda" in available) == CUDA_AVAILABLE == flash_dmattn.cuda_kernels_available()
    assert ("triton" in available) == TRITON_AVAILABLE == (HAS_TRITON and torch.cuda.is_available())
    assert ("flex" in available) == FLEX_AVAILABLE


def test_auto_returns_the_top_available_backend():
    top = get_available_backends()[0]
    assert flash_dmattn_func_auto() is flash_dmattn_func_auto(top)
    q, k, v, mask, bias, causal, softcap = make_case("key_mask_and_bias", torch.float32 if DEVICE == "cpu"
                                                     else torch.float16)
    expect = flash_dmattn_func_auto(top)(q, k, v, attn_mask=mask, attn_bias=bias)
    assert torch.equal(flash_dmattn_func_auto()(q, k, v, attn_mask=mask, attn_bias=bias), expect)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_gpu_backends_without_a_gpu_say_why():
    with pytest.raises(RuntimeError, match="cuda: no CUDA GPU"):
        flash_dmattn_func_auto("cuda")
    with pytest.raises(RuntimeError, match="triton: (no CUDA GPU|triton is not installed)"):
        flash_dmattn_func_auto("triton")


def test_unavailable_backend_raises_its_reason(monkeypatch):
    monkeypatch.setitem(registry._REASONS, "flex", "flex: reason given by the test")
    with pytest.raises(RuntimeError, match="'flex' is not available: flex: reason given by the test"):
        flash_dmattn_func_auto("flex")
    with pytest.raises(ValueError, match="unknown backend 'sdpa'; accepted: cuda, triton, flex, cpu"):
        flash_dmattn_func_auto("sdpa")


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed")
def test_triton_func_without_triton_says_so():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        triton_dmattn_func(q, q, q)


@pytest.mark.skipif(not FLEX_AVAILABLE, reason="needs FlexAttention")
def test_flex_rejects_a_mask_of_the_wrong_shape():
    q = torch.randn(2, 5, H, D, device=DEVICE)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(2, 3, 1, 5\)"):
        flash_dmattn.backends.flex_dmattn_func(q, q, q, attn_mask=torch.ones(2, 3, 1, 5, dtype=torch.bool,
                                                                              device=DEVICE))
