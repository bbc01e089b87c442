"""GPU-only cases (skipped without CUDA): head dims, decode, tile edges, sparsity, CUDA graphs, compile."""
import pytest
import torch

import flash_dmattn
from conftest import (
    HAS_CUDA,
    capture_cuda_graph,
    check_against_reference,
    make_batch,
    make_bias,
    make_mask,
    run_and_check,
    run_flash,
)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [8, 32, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dims(head_dim, dtype, causal):
    batch = make_batch([(70, 130), (1, 5), (129, 64), (33, 33)], 4, 2, head_dim, dtype, "cuda")
    run_and_check(batch, attn_mask=make_mask(batch, "key", "H_k"), attn_bias=make_bias(batch, "query", "H"),
                  is_causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias_dtype", ["query", "float32"])
def test_decode_32k_keys(dtype, bias_dtype):
    """One query against 32k keys (and a second shorter sequence), key-based mask and bias."""
    batch = make_batch([(1, 32768), (1, 1000)], 16, 2, 128, dtype, "cuda")
    bias = make_bias(batch, "key", "H", dtype=dtype if bias_dtype == "query" else torch.float32)
    run_and_check(batch, attn_mask=make_mask(batch, "key", "H_k", density=0.5), attn_bias=bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["key", "query"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tile_edges(dtype, layout, causal):
    lengths = [1, 63, 64, 65, 127, 128, 129, 255, 257]
    seqlens = list(zip(lengths, reversed(lengths))) + [(n, n) for n in lengths]
    batch = make_batch(seqlens, 4, 1, 64, dtype, "cuda")
    run_and_check(batch, attn_mask=make_mask(batch, layout, "H"), attn_bias=make_bias(batch, layout, "1"),
                  is_causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["key", "query"])
def test_sparse_mask_2_percent(dtype, layout):
    """A 2% dense mask: most key tiles hold no visible key; some rows see nothing at all."""
    batch = make_batch([(64, 4096), (200, 1500), (3, 9000)], 8, 2, 64, dtype, "cuda")
    mask = make_mask(batch, layout, "H_k", density=0.02)
    run_and_check(batch, attn_mask=mask, attn_bias=make_bias(batch, "key", "H"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_sequences_in_batch(dtype):
    batch = make_batch([(5, 300), (70, 70), (1, 2000), (33, 129)], 8, 2, 128, dtype, "cuda")
    mask = make_mask(batch, "key", "H_k")
    ck = batch.cu_seqlens_k.tolist()
    mask[ck[0]:ck[1]] = False
    mask[ck[2]:ck[3]] = False
    out, lse = run_and_check(batch, attn_mask=mask, attn_bias=make_bias(batch, "key", "1"), is_causal=True)
    cq = batch.cu_seqlens_q.tolist()
    assert torch.isneginf(lse[:, cq[0]:cq[1]]).all() and (out[cq[0]:cq[1]] == 0).all()
    assert torch.isneginf(lse[:, cq[2]:cq[3]]).all() and (out[cq[2]:cq[3]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gqa_variants_long(dtype):
    for num_heads_k in (1, 4, 16):
        batch = make_batch([(300, 700), (513, 513)], 16, num_heads_k, 64, dtype, "cuda")
        run_and_check(batch, attn_mask=make_mask(batch, "query", "H_k"), attn_bias=make_bias(batch, "key", "H_k"),
                      softcap=20.0, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_graph_capture_and_replay(dtype):
    """Capture the op once, change the inputs' contents in place, replay: the new inputs' result."""
    batch = make_batch([(3, 200), (64, 64), (1, 1000)], 8, 2, 64, dtype, "cuda")
    mask = make_mask(batch, "key", "H_k")
    bias = make_bias(batch, "query", "H")
    kwargs = dict(attn_mask=mask, attn_bias=bias, is_causal=True)

    # max_seqlen given: no host synchronization inside the capture.
    graph, (out, lse) = capture_cuda_graph(lambda: run_flash(batch, **kwargs))

    for _ in range(2):
        for t in (batch.q, batch.k, batch.v, bias):
            t.copy_(torch.randn_like(t))
        mask.copy_(torch.rand(mask.shape, device="cuda") < 0.6)
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference(batch, out, lse, **kwargs)


def attention_step(q, k, v, mask, cu_q, cu_k, max_q: int, max_k: int):
    out = flash_dmattn.flash_dmattn_varlen_func(q, k, v, attn_mask=mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                max_seqlen_q=max_q, max_seqlen_k=max_k, is_causal=True)
    return out.float().relu()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compile_inductor_fullgraph(dtype):
    torch._dynamo.reset()
    batch = make_batch([(17, 300), (64, 64)], 8, 2, 128, dtype, "cuda")
    mask = make_mask(batch, "key", "H")
    args = (batch.q, batch.k, batch.v, mask, batch.cu_seqlens_q, batch.cu_seqlens_k,
            batch.max_seqlen_q, batch.max_seqlen_k)
    compiled = torch.compile(attention_step, fullgraph=True)
    torch.testing.assert_close(compiled(*args), attention_step(*args), rtol=0, atol=0)
    out, lse = run_flash(batch, attn_mask=mask, is_causal=True)
    check_against_reference(batch, out, lse, attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("layout", ["key", "query"])
def test_opcheck_cuda_bf16(layout):
    batch = make_batch([(5, 130), (0, 3), (64, 64)], 4, 2, 64, torch.bfloat16, "cuda")
    mask = make_mask(batch, layout, "H")
    bias = make_bias(batch, layout, "H_k", dtype=torch.float32)
    torch.library.opcheck(torch.ops.flash_dmattn.mha_varlen_fwd, (
        batch.q, batch.k, batch.v, mask, bias, batch.cu_seqlens_q, batch.cu_seqlens_k,
        batch.max_seqlen_q, batch.max_seqlen_k, 0.125, True, 0.0, None))


def test_runs_on_current_stream_and_device_tensors_only():
    """The op works on a side stream with its inputs made there."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        batch = make_batch([(40, 300), (7, 9)], 8, 8, 64, torch.float16, "cuda")
        bias = make_bias(batch, "key", "H")
        out, lse = run_flash(batch, attn_bias=bias)
    stream.synchronize()
    check_against_reference(batch, out, lse, attn_bias=bias)
