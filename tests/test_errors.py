"""Every bad input of SPEC.md section 3 is refused with an error that names the argument."""
import math

import pytest
import torch

import flash_dmattn
from conftest import HAS_CUDA, make_batch, requires_cuda

ERRORS = (ValueError, RuntimeError)  # NotImplementedError is a RuntimeError
H, H_K, D = 8, 2, 16
SEQLENS = [(3, 5), (4, 6)]  # total_q = 7, total_k = 11, max_seqlen_q = 4, max_seqlen_k = 6


def valid_args(device="cpu", dtype=torch.float32, head_dim=D):
    batch = make_batch(SEQLENS, H, H_K, head_dim, dtype, device)
    return dict(query=batch.q, key=batch.k, value=batch.v,
                cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_k=batch.cu_seqlens_k,
                max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.max_seqlen_k)


def call(args, **overrides):
    return flash_dmattn.flash_dmattn_varlen_func(**{**args, **overrides})


def assert_refused(args, match, **overrides):
    with pytest.raises(ERRORS, match=match):
        call(args, **overrides)


def test_valid_args_are_accepted():
    """The base arguments of this file are valid, so every refusal below is due to the one change."""
    args = valid_args()
    call(args, attn_mask=torch.ones(11, H_K, dtype=torch.bool), attn_bias=torch.zeros(7, H, 6))


# --- query / key / value -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["query", "key", "value"])
@pytest.mark.parametrize("rank", [2, 4])
def test_wrong_rank(name, rank):
    args = valid_args()
    x = args[name]
    bad = x.reshape(x.shape[0], -1) if rank == 2 else x.unsqueeze(0)
    assert_refused(args, rf"\b{name}\b", **{name: bad})


def test_heads_not_divisible():
    args = valid_args()
    k = torch.randn(11, 3, D)
    assert_refused(args, r"\b(key|query)\b", key=k, value=torch.randn(11, 3, D))


def test_too_many_heads():
    """2^31 query heads (a zero-stride view: no memory) are refused before anything is allocated."""
    args = valid_args()
    q = torch.randn(1, 1, D).expand(7, 2**31, D)
    k = torch.randn(1, 1, D).expand(11, 1, D)
    with pytest.raises(ERRORS, match=r"query num_heads must be below 2\^31"):
        torch.ops.flash_dmattn.mha_varlen_fwd(q, k, k, None, None, args["cu_seqlens_q"], args["cu_seqlens_k"],
                                              4, 6, 0.25, False, 0.0, None)


def test_key_value_heads_differ():
    args = valid_args()
    assert_refused(args, r"\bvalue\b", value=torch.randn(11, 1, D))


def test_key_value_lengths_differ():
    args = valid_args()
    assert_refused(args, r"\bvalue\b", value=torch.randn(10, H_K, D))


@pytest.mark.parametrize("name", ["key", "value"])
def test_head_dim_mismatch(name):
    args = valid_args()
    assert_refused(args, rf"\b{name}\b", **{name: torch.randn(11, H_K, D + 8)})


@pytest.mark.parametrize("name", ["key", "value"])
def test_dtype_mismatch(name):
    args = valid_args()
    assert_refused(args, rf"\b{name}\b", **{name: args[name].to(torch.float16)})


def test_unsupported_query_dtype():
    args = valid_args()
    assert_refused(args, r"\bquery\b", query=args["query"].double(), key=args["key"].double(),
                   value=args["value"].double())


@requires_cuda
@pytest.mark.parametrize("name", ["key", "value", "cu_seqlens_q", "cu_seqlens_k"])
def test_device_mismatch(name):
    args = valid_args("cuda", torch.float16)
    assert_refused(args, rf"\b{name}\b", **{name: args[name].cpu()})


@requires_cuda
@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
def test_mask_bias_device_mismatch(name):
    args = valid_args("cuda", torch.float16)
    operand = torch.ones(11, H_K, dtype=torch.bool) if name == "attn_mask" else torch.zeros(11, H_K).half()
    assert_refused(args, name, **{name: operand})


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_last_dim_not_contiguous(name):
    args = valid_args()
    x = args[name]
    bad = torch.randn(*x.shape[:-1], 2 * D)[..., ::2]
    assert bad.stride(-1) == 2
    assert_refused(args, rf"\b{name}\b", **{name: bad})


# --- cu_seqlens / max_seqlen ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_wrong_dtype(name):
    args = valid_args()
    assert_refused(args, name, **{name: args[name].long()})


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_wrong_rank(name):
    args = valid_args()
    assert_refused(args, name, **{name: args[name].unsqueeze(0)})


def test_cu_seqlens_different_batch_sizes():
    args = valid_args()
    # cu_seqlens_k describes 3 sequences, cu_seqlens_q 2.
    assert_refused(args, r"cu_seqlens_[qk]", cu_seqlens_k=torch.tensor([0, 5, 8, 11], dtype=torch.int32))


@pytest.mark.parametrize("name,bad", [
    ("cu_seqlens_q", [0, 3, 6]),    # ends at 6, total_q is 7
    ("cu_seqlens_q", [0, 3, 8]),    # ends past total_q
    ("cu_seqlens_k", [0, 5, 10]),   # ends at 10, total_k is 11
    ("cu_seqlens_q", [1, 3, 7]),    # does not start at 0
    ("cu_seqlens_k", [2, 5, 11]),
    ("cu_seqlens_q", [0, 5, 4]),    # decreasing (and does not end at total_q either)
    ("cu_seqlens_k", [0, 12, 11]),  # decreasing
])
def test_cu_seqlens_bad_contents_cpu(name, bad):
    """On CPU the op reads cu_seqlens (on CUDA that is a debug-mode check, SPEC.md section 3)."""
    args = valid_args()
    assert_refused(args, name, **{name: torch.tensor(bad, dtype=torch.int32)})


@requires_cuda
@pytest.mark.parametrize("name,bad", [("cu_seqlens_q", [0, 3, 6]), ("cu_seqlens_k", [2, 5, 11]),
                                      ("cu_seqlens_k", [0, 12, 11])])
def test_cu_seqlens_bad_contents_cuda_debug_mode(monkeypatch, name, bad):
    """On CUDA, reading cu_seqlens is a host sync: it is checked with FLASH_DMATTN_DEBUG=1 (README)."""
    monkeypatch.setenv("FLASH_DMATTN_DEBUG", "1")
    args = valid_args("cuda", torch.float16)
    assert_refused(args, name, **{name: torch.tensor(bad, dtype=torch.int32, device="cuda")})


@requires_cuda
def test_max_seqlen_too_small_cuda_debug_mode(monkeypatch):
    monkeypatch.setenv("FLASH_DMATTN_DEBUG", "1")
    args = valid_args("cuda", torch.float16)
    assert_refused(args, "max_seqlen_k", max_seqlen_k=5)


@pytest.mark.parametrize("name,value", [("max_seqlen_q", 3), ("max_seqlen_k", 5), ("max_seqlen_q", -1),
                                        ("max_seqlen_k", -1)])
def test_max_seqlen_too_small_cpu(name, value):
    args = valid_args()
    assert_refused(args, name, **{name: value})


# --- attn_mask / attn_bias -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
@pytest.mark.parametrize("shape", [(11,), (2, 7, H, 6), (7, 1, H, 6)], ids=["1d", "4d", "4d-b"])
def test_operand_wrong_rank(name, shape):
    args = valid_args()
    operand = torch.ones(shape, dtype=torch.bool) if name == "attn_mask" else torch.zeros(shape)
    assert_refused(args, name, **{name: operand})


@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
@pytest.mark.parametrize("shape", [
    (7, H_K),       # 2-D is key-based: rows must be total_k = 11, not total_q
    (12, H_K),
    (11, H, 6),     # 3-D is query-based: rows must be total_q = 7, not total_k
    (8, H, 6),
    (11, 3),        # h' = 3 is not 1, H_k = 2 or H = 8
    (11, 4),
    (7, 3, 6),
    (7, H, 5),      # Kq = 5 < max_seqlen_k = 6
    (7, H, 0),
], ids=lambda s: "x".join(map(str, s)))
def test_operand_wrong_shape(name, shape):
    args = valid_args()
    operand = torch.ones(shape, dtype=torch.bool) if name == "attn_mask" else torch.zeros(shape)
    assert_refused(args, name, **{name: operand})


def test_kq_must_cover_stated_max_seqlen_k():
    args = valid_args()
    assert_refused(args, "attn_mask", attn_mask=torch.ones(7, H, 6, dtype=torch.bool), max_seqlen_k=9)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.complex64, torch.float64])
def test_mask_unsupported_dtype(dtype):
    args = valid_args()
    assert_refused(args, "attn_mask", attn_mask=torch.ones(11, H_K, dtype=dtype))


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float64, torch.int32, torch.bool])
def test_bias_unsupported_dtype_float32_query(bias_dtype):
    args = valid_args()
    assert_refused(args, "attn_bias", attn_bias=torch.zeros(11, H_K, dtype=bias_dtype))


def test_bias_third_dtype():
    """float16 bias beside a bfloat16 query: neither the query dtype nor float32."""
    args = valid_args(dtype=torch.bfloat16)
    assert_refused(args, "attn_bias", attn_bias=torch.zeros(11, H_K, dtype=torch.float16))


# --- scalars and the rest ------------------------------------------------------------------------

@pytest.mark.parametrize("softcap", [-1.0, -1e-3, math.inf, math.nan])
def test_bad_softcap(softcap):
    args = valid_args()
    assert_refused(args, "softcap", softcap=softcap)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_non_finite_scale(scale):
    args = valid_args()
    assert_refused(args, "scale", scale=scale)


def test_block_table_needs_paged_cache():
    """With block_table, key and value must be paged caches (4-D); tests/test_paged.py has the rest."""
    args = valid_args()
    assert_refused(args, r"\bkey\b.*block_table", block_table=torch.zeros(2, 2, dtype=torch.int32))


def test_errors_come_from_the_registered_op_too():
    """Validation lives in the op: torch.ops called directly refuses too."""
    args = valid_args()
    with pytest.raises(ERRORS, match="attn_mask"):
        torch.ops.flash_dmattn.mha_varlen_fwd(
            args["query"], args["key"], args["value"], torch.ones(5, dtype=torch.bool), None,
            args["cu_seqlens_q"], args["cu_seqlens_k"], 4, 6, 0.25, False, 0.0, None)


# --- CUDA-only refusals --------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("head_dim", [100, 12, 264, 512])
def test_cuda_unsupported_head_dim(head_dim):
    args = valid_args("cuda", torch.float16, head_dim=head_dim)
    assert_refused(args, r"head.?dim|\bquery\b")


@requires_cuda
def test_cuda_float32_query():
    args = valid_args("cuda", torch.float32)
    assert_refused(args, r"\bquery\b")
