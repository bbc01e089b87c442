"""Shared fixtures and helpers of the flash_dmattn test suite.

Tests import the helpers with `from conftest import ...` (pytest puts tests/ on sys.path).
"""
import zlib
from dataclasses import dataclass

import pytest
import torch

from reference import attention_reference

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = "needs a CUDA GPU"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (given to every test marked requires_cuda)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test that needs a GPU gets the marker `cuda`, so `-k cuda` selects it whatever its name
    (before -k deselects: tryfirst)."""
    for item in items:
        if any(m.name == "skipif" and m.kwargs.get("reason") == NEEDS_CUDA for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = {
    "cpu": [torch.float32, torch.float16, torch.bfloat16],
    "cuda": [torch.float16, torch.bfloat16],
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def device_params():
    """pytest params for `device`: cpu always, cuda skipped without a GPU."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


def device_dtype_params(cpu=None, cuda=None):
    """pytest params for `device, dtype`: every supported dtype of each device (cuda skipped without a GPU)."""
    params = []
    for device, dtypes in (("cpu", cpu or DTYPES["cpu"]), ("cuda", cuda or DTYPES["cuda"])):
        marks = requires_cuda if device == "cuda" else ()
        for dtype in dtypes:
            params.append(pytest.param(device, dtype, id=f"{device}-{DTYPE_NAMES[dtype]}", marks=marks))
    return params


@pytest.fixture(autouse=True)
def seed(request):
    """Every test draws fresh random inputs, reproducibly: the seed is a hash of the test's id."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


# ----------------------------------------------------------------------------------------------
# Random varlen batches, masks and biases
# ----------------------------------------------------------------------------------------------

@dataclass
class Batch:
    q: torch.Tensor              # (total_q, H, D)
    k: torch.Tensor              # (total_k, H_k, D)
    v: torch.Tensor              # (total_k, H_k, D)
    cu_seqlens_q: torch.Tensor   # (B + 1,) int32
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    seqlens: list                # [(Lq, Lk), ...]

    @property
    def num_heads(self):
        return self.q.shape[1]

    @property
    def num_heads_k(self):
        return self.k.shape[1]

    @property
    def total_q(self):
        return self.q.shape[0]

    @property
    def total_k(self):
        return self.k.shape[0]


def cu_seqlens(lengths, device):
    """[3, 0, 5] -> tensor([0, 3, 3, 8], int32)."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def make_batch(seqlens, num_heads, num_heads_k, head_dim, dtype, device):
    """Fresh random q, k, v (standard normal, already rounded to `dtype`) for [(Lq, Lk), ...]."""
    total_q = sum(lq for lq, _ in seqlens)
    total_k = sum(lk for _, lk in seqlens)
    q = torch.randn(total_q, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(total_k, num_heads_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(total_k, num_heads_k, head_dim, dtype=dtype, device=device)
    return Batch(
        q=q, k=k, v=v,
        cu_seqlens_q=cu_seqlens([lq for lq, _ in seqlens], device),
        cu_seqlens_k=cu_seqlens([lk for _, lk in seqlens], device),
        max_seqlen_q=max([lq for lq, _ in seqlens], default=0),
        max_seqlen_k=max([lk for _, lk in seqlens], default=0),
        seqlens=list(seqlens),
    )


def num_operand_heads(batch, heads):
    """'1' | 'H_k' | 'H' -> the number h' of mask/bias heads."""
    return {"1": 1, "H_k": batch.num_heads_k, "H": batch.num_heads}[heads]


def operand_shape(batch, layout, heads, extra_cols=0):
    """Shape of a mask/bias: key-based (total_k, h'), query-based (total_q, h', max_seqlen_k + extra)."""
    hp = num_operand_heads(batch, heads)
    if layout == "key":
        return (batch.total_k, hp)
    assert layout == "query"
    return (batch.total_q, hp, batch.max_seqlen_k + extra_cols)


def _fill_query_padding(x, batch, value):
    """In a query-based tensor, columns j >= Lk of sequence b are outside the sequence: fill them with
    `value`, something that would change the result if the library read it."""
    for b, (_, lk) in enumerate(batch.seqlens):
        q0, q1 = batch.cu_seqlens_q[b].item(), batch.cu_seqlens_q[b + 1].item()
        x[q0:q1, :, lk:] = value
    return x


def keep_to_mask(keep, dtype, zero_one=False):
    """A bool keep-pattern as a mask of `dtype`. Non-bool masks keep where nonzero, so unless
    zero_one is set, kept entries get assorted nonzero values (negative, fractional, large)."""
    if dtype == torch.bool:
        return keep
    if zero_one:
        return keep.to(dtype)
    if dtype == torch.uint8:
        values = torch.randint(1, 256, keep.shape, device=keep.device)
    elif dtype == torch.int8:
        values = torch.randint(1, 128, keep.shape, device=keep.device)
        values = torch.where(torch.rand(keep.shape, device=keep.device) < 0.5, values, -values)
    else:
        choices = torch.tensor([1.0, -1.0, 0.5, 3.0, -0.25, 1e-2], device=keep.device)
        values = choices[torch.randint(0, len(choices), keep.shape, device=keep.device)]
    return torch.where(keep, values, 0).to(dtype)


def make_mask(batch, layout, heads, density=0.7, dtype=torch.bool, extra_cols=3, zero_one=False):
    """A random mask of the given layout ('key' | 'query') and head variant ('1' | 'H_k' | 'H').
    Query-based masks get `extra_cols` columns beyond max_seqlen_k (Kq > max_seqlen_k is legal),
    and their out-of-sequence columns are all True."""
    shape = operand_shape(batch, layout, heads, extra_cols)
    keep = torch.rand(shape, device=batch.q.device) < density
    if layout == "query":
        keep = _fill_query_padding(keep, batch, True)
    return keep_to_mask(keep, dtype, zero_one)


# A bias value that would dominate the softmax if the library read it where it must not.
OUT_OF_SEQUENCE_BIAS = 100.0


def make_bias(batch, layout, heads, dtype=None, extra_cols=3, std=1.0):
    """A random normal bias of the given layout and head variant, in `dtype` (default: q's dtype)."""
    shape = operand_shape(batch, layout, heads, extra_cols)
    bias = std * torch.randn(shape, device=batch.q.device)
    if layout == "query":
        bias = _fill_query_padding(bias, batch, OUT_OF_SEQUENCE_BIAS)
    return bias.to(dtype or batch.q.dtype)


def make_operand(kind, batch, spec, **kwargs):
    """spec None -> None; spec (layout, heads) -> make_mask/make_bias(batch, layout, heads)."""
    if spec is None:
        return None
    layout, heads = spec
    return (make_mask if kind == "mask" else make_bias)(batch, layout, heads, **kwargs)


# ----------------------------------------------------------------------------------------------
# Running the library and checking it
# ----------------------------------------------------------------------------------------------

def run_flash(batch, **kwargs):
    """flash_dmattn_varlen_func on a Batch, with explicit max_seqlen, returning (out, lse)."""
    import flash_dmattn

    kwargs.setdefault("max_seqlen_q", batch.max_seqlen_q)
    kwargs.setdefault("max_seqlen_k", batch.max_seqlen_k)
    return flash_dmattn.flash_dmattn_varlen_func(
        batch.q, batch.k, batch.v,
        cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_k=batch.cu_seqlens_k,
        return_lse=True, **kwargs,
    )


# Absolute floors of the tolerance (see assert_close_to_reference). They only matter when PyTorch's
# own same-dtype error happens to be ~0 (e.g. every row sees a single key, so out = v exactly):
# - fp32: 1e-5, about 100 float32 ulps at |out| ~ 1; covers a different summation order over
#   tens of thousands of keys, far below any real bug.
# - fp16: 1e-3, one fp16 rounding step near |out| ~ 1 (eps = 9.8e-4).
# - bf16: 8e-3, one bf16 rounding step near |out| ~ 1 (eps = 7.8e-3).
OUT_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# lse is float32 whatever the input dtype, and |lse| <= ~20 here (|s| + log Lk): 1e-4 is ~50 float32
# ulps there, room for a different accumulation order of the exp-sum over many keys.
LSE_FLOOR = 1e-4


def _max_abs(x):
    return x.abs().max().item() if x.numel() else 0.0


def assert_close_to_reference(out, lse, ref_out, ref_lse, lowp_out, lowp_lse):
    """FlashAttention-style check of (out, lse) against the float64 reference (ref_*), with the
    tolerance set by how far the same-dtype PyTorch reference (lowp_*) is from float64:

        max|out - ref| <= 2 * max|lowp_out - ref| + OUT_FLOOR[dtype]
        max|lse - ref| <= 2 * max|lowp_lse - ref| + LSE_FLOOR     (on rows that see a key)

    Rows that see no key must be exactly out = 0 and lse = -inf, at exactly the reference's rows.
    NaN never passes.
    """
    assert not torch.isnan(out).any(), "out contains NaN"
    assert not torch.isnan(lse).any(), "lse contains NaN"
    assert out.shape == ref_out.shape, f"out shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    assert lse.shape == ref_lse.shape, f"lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype} != float32"
    assert torch.isfinite(out).all(), "out contains inf"
    assert not torch.isposinf(lse).any(), "lse contains +inf"

    ref_out, ref_lse = ref_out.to(out.device, torch.float64), ref_lse.to(out.device, torch.float64)
    lowp_out, lowp_lse = lowp_out.to(out.device, torch.float64), lowp_lse.to(out.device, torch.float64)
    out64, lse64 = out.double(), lse.double()

    hidden = torch.isneginf(ref_lse)  # (H, total_q): rows that see no key
    wrong = torch.isneginf(lse64) != hidden
    assert not wrong.any(), (
        f"lse is -inf at {torch.isneginf(lse64).sum().item()} rows, the reference at "
        f"{hidden.sum().item()}; first disagreement (head, row) = {wrong.nonzero()[0].tolist()}")
    hidden_out = out64.transpose(0, 1)[hidden]  # (rows, D)
    assert torch.equal(hidden_out, torch.zeros_like(hidden_out)), "rows that see no key must give out = 0"

    out_err = _max_abs(out64 - ref_out)
    out_tol = 2 * _max_abs(lowp_out - ref_out) + OUT_FLOOR[out.dtype]
    assert out_err <= out_tol, f"out: max abs error {out_err:.3g} > tolerance {out_tol:.3g}"

    visible = ~hidden
    lse_err = _max_abs(lse64[visible] - ref_lse[visible])
    lse_tol = 2 * _max_abs(lowp_lse[visible] - ref_lse[visible]) + LSE_FLOOR
    assert lse_err <= lse_tol, f"lse: max abs error {lse_err:.3g} > tolerance {lse_tol:.3g}"


def check_against_reference(batch, out, lse, attn_mask=None, attn_bias=None, scale=None,
                            is_causal=False, softcap=0.0):
    """Computes the float64 and the same-dtype references on the tested op's device and asserts."""
    args = (batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k)
    kwargs = dict(attn_mask=attn_mask, attn_bias=attn_bias, scale=scale,
                  is_causal=bool(is_causal), softcap=softcap or 0.0)
    ref = attention_reference(*args, **kwargs, dtype=torch.float64)
    lowp = attention_reference(*args, **kwargs, dtype=batch.q.dtype)
    assert out.dtype == batch.q.dtype, f"out dtype {out.dtype} != query dtype {batch.q.dtype}"
    assert out.device == batch.q.device and lse.device == batch.q.device
    assert_close_to_reference(out, lse, *ref, *lowp)


def run_and_check(batch, **kwargs):
    """run_flash + check_against_reference with the same mask/bias/scale/causal/softcap."""
    out, lse = run_flash(batch, **kwargs)
    ref_keys = ("attn_mask", "attn_bias", "scale", "is_causal", "softcap")
    check_against_reference(batch, out, lse, **{k: v for k, v in kwargs.items() if k in ref_keys})
    return out, lse


def dense_to_query_based(x, batch, seqlen_q, seqlen_k):
    """(B or 1, h', S_q or 1, S_k) -> the varlen query-based (B * S_q, h', S_k), materialized."""
    x = x.expand(batch, x.shape[1], seqlen_q, seqlen_k)
    return x.permute(0, 2, 1, 3).reshape(batch * seqlen_q, x.shape[1], seqlen_k)


def capture_cuda_graph(fn):
    """Warms `fn` up on a side stream (as torch requires before a capture), then captures one call
    of it in a CUDA graph. Returns (graph, what the captured call returned: static outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result
