"""torch integration (SPEC.md section 5): opcheck, torch.compile(fullgraph=True), fake tensors."""
import pytest
import torch

import flash_dmattn
from conftest import check_against_reference, device_params, make_batch, make_bias, make_mask

OP = torch.ops.flash_dmattn.mha_varlen_fwd
H, H_K, D = 4, 2, 32
SEQLENS = [(3, 7), (0, 4), (5, 5), (2, 0)]
LOWP = {"cpu": torch.bfloat16, "cuda": torch.float16}


def op_args(batch, mask=None, bias=None, scale=0.2, is_causal=False, softcap=0.0):
    return (batch.q, batch.k, batch.v, mask, bias, batch.cu_seqlens_q, batch.cu_seqlens_k,
            batch.max_seqlen_q, batch.max_seqlen_k, scale, is_causal, softcap, None)


OPCHECK_CASES = ["plain", "key_mask_key_bias", "query_mask_query_bias", "key_mask_query_bias_causal",
                 "softcap_f32_bias"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("device", device_params())
def test_opcheck(device, case):
    dtype = LOWP[device]
    batch = make_batch(SEQLENS, H, H_K, D, dtype, device)
    kwargs = {
        "plain": {},
        "key_mask_key_bias": dict(mask=make_mask(batch, "key", "H_k"), bias=make_bias(batch, "key", "1")),
        "query_mask_query_bias": dict(mask=make_mask(batch, "query", "H"), bias=make_bias(batch, "query", "H_k")),
        "key_mask_query_bias_causal": dict(mask=make_mask(batch, "key", "1", dtype=torch.uint8),
                                           bias=make_bias(batch, "query", "H"), is_causal=True),
        "softcap_f32_bias": dict(bias=make_bias(batch, "key", "H", dtype=torch.float32), softcap=5.0),
    }[case]
    torch.library.opcheck(OP, op_args(batch, **kwargs))


def test_op_schema():
    schema = str(OP.default._schema).replace("SymInt", "int")  # SymInt is as good as int here
    assert schema.startswith("flash_dmattn::mha_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
                             "Tensor? attn_bias, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                             "int max_seqlen_q, int max_seqlen_k, float scale, bool is_causal, "
                             "float softcap, Tensor? block_table) -> (Tensor, Tensor)"), schema


def test_fake_tensor_shapes():
    """Under FakeTensorMode the op gives out (total_q, H, D) in q's dtype and lse (H, total_q) float32."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = make_batch(SEQLENS, H, H_K, D, torch.bfloat16, "cpu")
    mask = make_mask(batch, "key", "H")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in (batch.q, batch.k, batch.v, mask,
                                              batch.cu_seqlens_q, batch.cu_seqlens_k)]
        out, lse = OP(fake[0], fake[1], fake[2], fake[3], None, fake[4], fake[5],
                      batch.max_seqlen_q, batch.max_seqlen_k, 0.2, False, 0.0, None)
    assert out.shape == (batch.total_q, H, D) and out.dtype == torch.bfloat16
    assert lse.shape == (H, batch.total_q) and lse.dtype == torch.float32


class RecordingBackend:
    """A torch.compile backend that keeps the captured FX graphs and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def attention_block(q, k, v, key_scores, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int):
    """A small model step: a key mask computed in the graph, the op, and some ops after it."""
    mask = key_scores > -0.5
    out, lse = flash_dmattn.flash_dmattn_varlen_func(
        q, k, v, attn_mask=mask, attn_bias=key_scores, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, is_causal=True, return_lse=True)
    return out * 2.0, lse


def check_compiled_against_eager(batch, compiled, device):
    key_scores = make_bias(batch, "key", "H_k")
    args = (batch.q, batch.k, batch.v, key_scores, batch.cu_seqlens_q, batch.cu_seqlens_k,
            batch.max_seqlen_q, batch.max_seqlen_k)
    out_c, lse_c = compiled(*args)
    out_e, lse_e = attention_block(*args)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(lse_c, lse_e, rtol=0, atol=0)
    # ... and eager is right (so the comparison above is not two wrong answers agreeing).
    check_against_reference(batch, out_e / 2.0, lse_e, attn_mask=key_scores > -0.5, attn_bias=key_scores,
                            is_causal=True)


def count_op_nodes(gm):
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and "flash_dmattn" in str(node.target))


@pytest.mark.parametrize("device", device_params())
def test_compile_fullgraph_one_node(device):
    """fullgraph=True: no graph break; the op is exactly one node of the captured graph."""
    torch._dynamo.reset()
    backend = RecordingBackend()
    compiled = torch.compile(attention_block, backend=backend, fullgraph=True)
    batch = make_batch(SEQLENS, H, H_K, D, LOWP[device], device)
    check_compiled_against_eager(batch, compiled, device)
    assert len(backend.graphs) == 1
    assert count_op_nodes(backend.graphs[0]) == 1, backend.graphs[0].code


@pytest.mark.parametrize("device", device_params())
def test_compile_aot_eager_new_shapes(device):
    """aot_eager (functionalization + the fake implementation) matches eager, also after a shape change."""
    torch._dynamo.reset()
    compiled = torch.compile(attention_block, backend="aot_eager", fullgraph=True)
    for seqlens in (SEQLENS, [(9, 13), (1, 1), (4, 2)]):
        batch = make_batch(seqlens, H, H_K, D, LOWP[device], device)
        check_compiled_against_eager(batch, compiled, device)


def test_backward_refuses_instead_of_returning_wrong_gradients():
    """Forward works on tensors that require grad; backward raises (no backward pass yet)."""
    q = torch.randn(6, 4, 16, requires_grad=True)
    k, v = torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = flash_dmattn.flash_dmattn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with torch.no_grad():
        expect = flash_dmattn.flash_dmattn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.equal(out.detach(), expect)
    with pytest.raises(NotImplementedError, match="backward"):
        out.sum().backward()
    dense = flash_dmattn.flash_dmattn_func(q.view(1, 6, 4, 16), k.view(1, 9, 2, 16), v.view(1, 9, 2, 16))
    with pytest.raises(NotImplementedError, match="backward"):
        dense.sum().backward()


def test_autograd_node_only_where_a_gradient_is_asked():
    """The C++ Autograd kernel: no graph node when no input requires grad (nor under inference
    mode); with one that does (q, or only the bias), out gets a node whose backward refuses, and
    lse never has a gradient."""
    op = torch.ops.flash_dmattn.mha_varlen_fwd
    q, k, v = torch.randn(5, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    bias = torch.randn(7, 2)  # key-based, per KV head
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)

    def call(q, bias):
        return op(q, k, v, None, bias, cu_q, cu_k, 3, 4, 0.25, False, 0.0, None)

    out, lse = call(q, bias)
    assert out.grad_fn is None and not out.requires_grad and not lse.requires_grad
    with torch.inference_mode():
        out_inference, _ = call(q, bias)
    assert torch.equal(out_inference, out)
    for grad_q, grad_bias in ((True, False), (False, True)):
        q_g, bias_g = q.clone().requires_grad_(grad_q), bias.clone().requires_grad_(grad_bias)
        out_g, lse_g = call(q_g, bias_g)
        assert out_g.requires_grad and out_g.grad_fn is not None
        assert not lse_g.requires_grad
        assert torch.equal(out_g.detach(), out) and torch.equal(lse_g, lse)
        with pytest.raises(NotImplementedError, match="mha_varlen_fwd has no backward pass"):
            out_g.sum().backward()
