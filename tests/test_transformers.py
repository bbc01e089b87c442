"""Hugging Face transformers integration (issue 6, item 3): attn_implementation="flash_dmattn".

A tiny random-weight LlamaForCausalLM (GQA: 4 heads, 2 KV heads) built offline from a config runs
with "flash_dmattn" and with transformers' "eager" attention on the same inputs: logits of padded
and packed batches and of a prompt prefilled in chunks, greedy generation with a KV cache,
torch.compile(fullgraph=True), the key_mask / key_bias kwargs, and Gemma 2's softcap. CPU in
float32; CUDA in bfloat16. Logits pass when their error against float32 eager is at most twice the
same-dtype eager's own error plus a small floor (on the CPU: the floor alone).
"""
import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flash_dmattn.integrations.transformers as hf_integration  # noqa: E402  (registers "flash_dmattn")
from conftest import requires_cuda  # noqa: E402

IMPL = hf_integration.ATTN_IMPLEMENTATION
NUM_HEADS, NUM_KV_HEADS, VOCAB = 4, 2, 128
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
# Floors of the logits tolerance, and the largest eager logit margin that counts as a tie in greedy
# decoding. The logits are O(1) (initializer_range 0.1): a wrong mask, causal alignment or GQA
# head mapping moves them by O(1), far beyond either floor.
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
TIE = {torch.float32: 1e-4, torch.bfloat16: 6e-2}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS, vocab_size=VOCAB, max_position_embeddings=256,
        initializer_range=0.1, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def gemma2_config():
    """Gemma 2: attention logit soft-capping (2.0, which changes the logits by O(1) here), a query scale
    of 1/sqrt(query_pre_attn_scalar), and sliding-window layers whose window exceeds the test's lengths."""
    return transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS, head_dim=16, vocab_size=VOCAB, initializer_range=0.1,
        attn_logit_softcapping=2.0, final_logit_softcapping=None, sliding_window=64, query_pre_attn_scalar=24,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)


def assert_close(ours, eager, ref, dtype):
    """ours, eager: logits in the tested dtype (as float32); ref: float32 eager."""
    err, eager_err = (ours - ref).abs().max().item(), (eager - ref).abs().max().item()
    assert err <= 2 * eager_err + FLOOR[dtype], f"max |logits - eager| = {err:.3g} (eager's own: {eager_err:.3g})"


class Models:
    """One random model in the device's dtype, and its float32 copy (the reference: eager attention)."""

    def __init__(self, device, config=None):
        config = llama_config() if config is None else config
        self.device, self.dtype = device, DTYPE[device]
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=IMPL)
        assert model.config._attn_implementation == IMPL
        self.ref = model.to(device).eval()
        self.model = copy.deepcopy(self.ref).to(self.dtype) if self.dtype != torch.float32 else self.ref

    def logits(self, impl, reference=False, **inputs):
        """Logits (B, S, V) in float32 with attention `impl`; `reference`: the float32 model."""
        model = self.ref if reference else self.model
        model.set_attn_implementation(impl)
        with torch.no_grad():
            return model(**inputs).logits.float()

    def check(self, ours, eager_inputs, select=lambda x: x):
        """`ours` (logits) against eager on `eager_inputs`, compared where `select` picks."""
        eager = self.logits("eager", **eager_inputs)
        ref = self.logits("eager", reference=True, **eager_inputs)
        assert_close(select(ours), select(eager), select(ref), self.dtype)


@pytest.fixture(params=DEVICES)
def models(request):
    return Models(request.param)


def random_ids(batch, seqlen, device):
    return torch.randint(1, VOCAB, (batch, seqlen), device=device)


def padding_mask(lengths, seqlen, side, device):
    """(B, S) int64 with lengths[b] ones, padded on the `side` ('left' | 'right')."""
    ones = torch.arange(seqlen, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return (ones.flip(1) if side == "left" else ones).long()


def random_key_mask(mask, heads=None):
    """A random (B, S) or (B, heads, S) bool key mask that keeps the first real token of every row
    (so that every real query sees a key); `mask` is the (B, S) padding mask."""
    batch, seqlen = mask.shape
    shape = (batch, seqlen) if heads is None else (batch, heads, seqlen)
    keep = torch.rand(shape, device=mask.device) < 0.6
    first = torch.nn.functional.one_hot(mask.argmax(dim=1), seqlen).bool()  # (B, S)
    return keep | (first if heads is None else first[:, None, :])


def test_import_flash_dmattn_does_not_import_transformers():
    code = "import sys, flash_dmattn; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_with_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface()[IMPL] is hf_integration.flash_dmattn_attention_forward
    assert AttentionMaskInterface()[IMPL] is hf_integration.flash_dmattn_mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_eager(models, side):
    """Three sequences of lengths 11, 4, 7 padded to 11: logits at every real token."""
    mask = padding_mask([11, 4, 7], 11, side, models.device)
    inputs = dict(input_ids=random_ids(3, 11, models.device), attention_mask=mask)
    ours = models.logits(IMPL, **inputs)
    models.check(ours, inputs, select=lambda x: x[mask.bool()])


@pytest.mark.parametrize("device", DEVICES)
def test_gemma2_softcap_matches_eager(device):
    """Gemma 2 passes softcap=2.0 and its own scaling to the attention: a right-padded batch."""
    models = Models(device, gemma2_config())
    mask = padding_mask([12, 8], 12, "right", device)
    inputs = dict(input_ids=random_ids(2, 12, device), attention_mask=mask)
    models.check(models.logits(IMPL, **inputs), inputs, select=lambda x: x[mask.bool()])


@pytest.mark.parametrize("route", ["position_ids", "cu_seq_lens"])
def test_packed_row_matches_each_sequence_alone(models, route):
    """Sequences of 5, 9 and 3 tokens in one row, against each run alone with eager. The row's
    sequences are told by position ids that restart at 0, or by the cu_seq_lens_* / max_length_*
    kwargs alone (position ids 0..16: RoPE scores depend on relative positions only)."""
    lengths = [5, 9, 3]
    sequences = [random_ids(1, n, models.device) for n in lengths]
    if route == "position_ids":
        kwargs = dict(position_ids=torch.cat([torch.arange(n, device=models.device) for n in lengths])[None])
    else:
        cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32, device=models.device)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    ours = models.logits(IMPL, input_ids=torch.cat(sequences, dim=1), **kwargs)
    start = 0
    for ids in sequences:
        n = ids.shape[1]
        models.check(ours[:, start:start + n], dict(input_ids=ids))
        start += n


@pytest.mark.parametrize("cache", ["dynamic", "static", "static_compiled"])
def test_greedy_generation_matches_eager(models, cache):
    """20 greedy tokens for 2 left-padded prompts (KV cache decoding: S_q = 1 < S_k, padding keys
    masked). Tokens must be equal up to a tie: where they first differ, eager's logits of the two
    tokens must be within TIE. "static_compiled": generate compiles our decoding step, which must
    give no graph break and one graph for all steps (the static cache's empty slots are masked, so
    the shapes do not change from step to step; a recompile fails the test)."""
    mask = padding_mask([9, 5], 9, "left", models.device)
    ids = random_ids(2, 9, models.device) * mask
    generated, logits = {}, {}
    for impl in ("eager", IMPL):
        compiled = cache == "static_compiled" and impl == IMPL
        kwargs = dict(disable_compile=not compiled)
        if compiled:
            if models.device == "cpu":
                kwargs["compile_config"] = transformers.CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
                kwargs["compile_config"]._compile_all_devices = True  # generate compiles on GPUs only otherwise
            else:
                kwargs["compile_config"] = transformers.CompileConfig(fullgraph=True)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
        models.model.set_attn_implementation(impl)
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
            out = models.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                        cache_implementation=None if cache == "dynamic" else "static",
                                        output_logits=True, return_dict_in_generate=True, **kwargs)
        generated[impl], logits[impl] = out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1).float()
        if compiled:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
            assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert generated[IMPL].shape == (2, 20)
    for row in range(2):
        differ = (generated[IMPL][row] != generated["eager"][row]).nonzero()
        if len(differ):
            step = differ[0].item()
            step_logits = logits["eager"][row, step]
            margin = step_logits.max() - step_logits[generated[IMPL][row, step]]
            assert margin <= TIE[models.dtype], f"row {row}: tokens differ at step {step}, eager margin {margin:.3g}"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prefill_in_chunks_matches_eager(models, cache):
    """A left-padded prompt fed in two chunks of 7 and 4 tokens: the second chunk has S_q = 4 queries
    after 7 cached keys (bottom-right causal alignment with S_q > 1, padding keys masked); a static
    cache of 32 slots holds keys in its first 11 slots only."""
    mask = padding_mask([11, 6], 11, "left", models.device)
    ids = random_ids(2, 11, models.device) * mask

    def second_chunk_logits(impl, model):
        model.set_attn_implementation(impl)
        if cache == "dynamic":
            past = transformers.DynamicCache(config=model.config)
        else:
            past = transformers.StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            model(input_ids=ids[:, :7], attention_mask=mask[:, :7], past_key_values=past)
            return model(input_ids=ids[:, 7:], attention_mask=mask, past_key_values=past).logits.float()

    ours = second_chunk_logits(IMPL, models.model)
    eager, ref = second_chunk_logits("eager", models.model), second_chunk_logits("eager", models.ref)
    assert_close(ours, eager, ref, models.dtype)


def test_compiled_forward_fullgraph_matches_eager(models):
    """torch.compile(fullgraph=True) of the model's forward: a padded batch with a key_mask (padding
    and key_mask combined into one key-based mask), then one row of two packed sequences and the same
    shapes holding one sequence (cu_seqlens with a slot per token, from the position ids on the device)."""
    backend = "aot_eager" if models.device == "cpu" else "inductor"
    torch._dynamo.reset()
    models.model.set_attn_implementation(IMPL)
    forward = torch.compile(models.model.forward, fullgraph=True, backend=backend)

    device = models.device
    mask = padding_mask([12, 7], 12, "left", device)
    key_mask = random_key_mask(mask)
    ids, row = random_ids(2, 12, device), random_ids(1, 10, device)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]], device=device)  # two sequences: 4 and 6 tokens
    single = torch.arange(10, device=device)[None]
    with torch.no_grad():  # all compiled calls first: the eager runs below switch the model's attention
        padded_out = forward(input_ids=ids, attention_mask=mask, key_mask=key_mask, use_cache=False).logits.float()
        packed_out = forward(input_ids=row, position_ids=packed, use_cache=False).logits.float()
        single_out = forward(input_ids=row, position_ids=single, use_cache=False).logits.float()

    models.check(padded_out, dict(input_ids=ids, attention_mask=mask * key_mask), select=lambda x: x[mask.bool()])
    models.check(packed_out[:, :4], dict(input_ids=row[:, :4]))
    models.check(packed_out[:, 4:], dict(input_ids=row[:, 4:]))
    models.check(single_out, dict(input_ids=row))


@pytest.mark.parametrize("layout", ["per_key", "per_head_with_bias"])
def test_key_mask_and_bias_kwargs(models, layout):
    """key_mask / key_bias through model(...) reach every layer: against eager with the same keys
    masked (a 2-D mask), or with a 4-D additive mask built from the causal pattern, the per-KV-head
    key mask and the per-head key bias."""
    device, dtype = models.device, models.dtype
    batch, seqlen = 2, 10
    mask = padding_mask([10, 7], seqlen, "left", device)
    ids = random_ids(batch, seqlen, device)
    valid = mask.bool()
    if layout == "per_key":
        key_mask = random_key_mask(mask)
        ours = models.logits(IMPL, input_ids=ids, attention_mask=mask, key_mask=key_mask)
        models.check(ours, dict(input_ids=ids, attention_mask=mask * key_mask), select=lambda x: x[valid])
        return

    key_mask = random_key_mask(mask, heads=NUM_KV_HEADS)                     # (B, H_k, S_k)
    key_bias = torch.randn(batch, NUM_HEADS, seqlen, device=device)          # (B, H, S_k) float32
    ours = models.logits(IMPL, input_ids=ids, attention_mask=mask, key_mask=key_mask, key_bias=key_bias)

    def additive_mask(dtype):  # (B, H, S_q, S_k): what eager adds to its scores
        group = NUM_HEADS // NUM_KV_HEADS
        keep = key_mask.repeat_interleave(group, dim=1)[:, :, None, :] & valid[:, None, None, :]
        keep = keep & torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
        return torch.where(keep, key_bias[:, :, None, :], torch.finfo(dtype).min).to(dtype)

    eager = models.logits("eager", input_ids=ids, attention_mask=additive_mask(dtype))
    ref = models.logits("eager", reference=True, input_ids=ids, attention_mask=additive_mask(torch.float32))
    assert_close(ours[valid], eager[valid], ref[valid], dtype)


class _Attention(torch.nn.Module):
    is_causal = True


def _call(query=None, key=None, attention_mask=None, module=None, **kwargs):
    query = torch.randn(2, NUM_HEADS, 3, 8) if query is None else query
    key = torch.randn(2, NUM_KV_HEADS, 5, 8) if key is None else key
    module = _Attention().eval() if module is None else module
    return hf_integration.flash_dmattn_attention_forward(module, query, key, key, attention_mask, **kwargs)


def test_call_shapes_dtypes_and_errors():
    query, key = torch.randn(2, NUM_HEADS, 3, 8), torch.randn(2, NUM_KV_HEADS, 5, 8)
    out, weights = _call(query, key)
    assert out.shape == (2, 3, NUM_HEADS, 8) and weights is None
    keep = torch.rand(2, NUM_KV_HEADS, 5) < 0.5
    keep[..., 0] = True
    bias = torch.randn(2, 1, 5)
    expected, _ = _call(query, key, key_mask=keep, key_bias=bias)
    assert not torch.equal(expected, out)
    for mask_dtype, bias_dtype in ((torch.int64, torch.float64), (torch.float16, torch.float32)):
        got, _ = _call(query, key, key_mask=keep.to(mask_dtype), key_bias=bias.to(bias_dtype))
        torch.testing.assert_close(got, expected)  # nonzero keeps; a float64 bias is cast to the query dtype
    with pytest.raises(ValueError, match="dropout"):
        _call(dropout=0.1)
    with pytest.raises(ValueError, match="2-D"):
        _call(attention_mask=torch.ones(2, 1, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_mask has shape \(2, 3, 5\)"):
        _call(key_mask=torch.ones(2, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_bias has shape"):
        _call(key_bias=torch.zeros(2, 4))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        _call(sliding_window=4)
    with pytest.raises(RuntimeError, match="forward-only"):
        _call(query=torch.randn(2, NUM_HEADS, 3, 8, requires_grad=True), module=_Attention().train())
