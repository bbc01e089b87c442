"""Hugging Face transformers integration: `attn_implementation="flash_dmattn"`.

    import flash_dmattn.integrations.transformers  # registers "flash_dmattn" (register() is idempotent)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flash_dmattn")

Importing this module imports transformers (`import flash_dmattn` alone does not) and registers
`flash_dmattn_attention_forward` with transformers' AttentionInterface and `flash_dmattn_mask` with its
AttentionMaskInterface. Like "flash_attention_2", the mask function hands the attention a 2-D
(B, S_k) bool padding mask, or None when nothing is padded; without it transformers would pass no
mask at all. The attention function turns each batch into a call of `flash_dmattn_varlen_func`:

- padded prefill (2-D mask, S_q == S_k): unpad to a packed varlen batch, attend, re-pad with zeros;
- decoding with a KV cache (S_q < S_k), and every padded batch under torch.compile: the batch as B
  sequences of equal length, padding keys hidden by a key-based mask (no data-dependent shapes);
- padding-free packed rows (B == 1): the `cu_seq_lens_q/k`, `max_length_q/k` kwargs, or position
  ids that restart (a position that does not continue the previous one starts a sequence; under
  torch.compile the row gets one slot per token, most of them empty: correct, but a larger launch);
- otherwise: B sequences of equal length.

GQA runs natively (no repeat_kv), causal masking is bottom-right aligned (what a KV cache needs),
and the optional kwargs `key_mask` / `key_bias`, shaped (B, S_k) or (B, h', S_k) with h' in
{1, H_k, H}, become the op's key-based (total_k, h') mask and bias: dynamic-mask models pass them
from their attention module, or a caller passes them through `model(..., key_mask=...)` to every layer.
"""

import functools
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

import transformers.modeling_utils
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..varlen import flash_dmattn_varlen_func

__all__ = ["ATTN_IMPLEMENTATION", "flash_dmattn_attention_forward", "flash_dmattn_mask", "register"]

ATTN_IMPLEMENTATION = "flash_dmattn"


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------

def flash_dmattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> Optional[torch.Tensor]:
    """The AttentionMaskInterface entry: the (B, L) bool padding mask, L <= kv_length, or None.

    As transformers' flash_attention_mask: the causal pattern is left to the kernel (`mask_function`
    is not materialized; custom or/and mask functions are not supported), a mask with nothing padded
    becomes None, and with a static cache (kv_length = its size) the mask covers the L slots seen so
    far. Two differences: when decoding one token with a static cache, the empty slots are added to
    the mask as padding (L = kv_length), so that every step has the same shapes (one compiled graph
    for the whole generation); and under torch.compile the mask is kept even with nothing padded (the
    check would read it on the host).
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]  # (B, L)
    if q_length == 1 and attention_mask.shape[1] < kv_length:
        attention_mask = F.pad(attention_mask, (0, kv_length - attention_mask.shape[1]), value=False)
    if not torch.compiler.is_compiling() and attention_mask.shape[1] == kv_length and attention_mask.all():
        return None
    return attention_mask


def _skip_flash_preload() -> None:
    """transformers takes every attn_implementation whose name contains "flash" for a flash-attn
    package or hub kernel: `PreTrainedModel._check_and_adjust_attn_implementation` preloads it with
    `lazy_import_flash_attention`, which raises for "flash_dmattn". Turn that preload into a no-op
    for our name only; every other name reaches transformers' function unchanged."""
    original = getattr(transformers.modeling_utils, "lazy_import_flash_attention", None)
    if original is None or getattr(original, "skipped_implementation", None) == ATTN_IMPLEMENTATION:
        return

    @functools.wraps(original)
    def lazy_import_flash_attention(implementation, *args, **kwargs):
        if implementation == ATTN_IMPLEMENTATION:
            return None  # nothing to preload: the op is registered when flash_dmattn is imported
        return original(implementation, *args, **kwargs)

    lazy_import_flash_attention.skipped_implementation = ATTN_IMPLEMENTATION
    transformers.modeling_utils.lazy_import_flash_attention = lazy_import_flash_attention


def register() -> None:
    """Registers "flash_dmattn" with transformers' attention and attention-mask interfaces."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, flash_dmattn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_dmattn_mask)
    _skip_flash_preload()


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------

def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, h, S, D) -> (B * S, h, D): a view for B == 1, else a copy (the strides of B and S do not merge)."""
    batch, heads, seqlen, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch * seqlen, heads, head_dim)


def _uniform_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """(B + 1,) int32 [0, S, 2S, ...]: B sequences of length S."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def _key_operand(x: Optional[torch.Tensor], name: str, query: torch.Tensor, key: torch.Tensor):
    """The kwarg `name`, (B, S_k) or (B, h', S_k) with h' in {1, H_k, H} -> a (B, S_k, h') view."""
    if x is None:
        return None
    batch, num_heads, _, _ = query.shape
    _, num_heads_k, seqlen_k, _ = key.shape
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    if (x3.dim() != 3 or x3.shape[0] != batch or x3.shape[2] != seqlen_k
            or x3.shape[1] not in (1, num_heads_k, num_heads)):
        raise ValueError(
            f"flash_dmattn: {name} has shape {tuple(x.shape)}; accepted: (batch, kv_length) = ({batch}, {seqlen_k}) "
            f"or (batch, heads, kv_length) with heads in (1, {num_heads_k}, {num_heads})")
    if x3.device != query.device:
        raise ValueError(f"flash_dmattn: {name} is on {x3.device}, the query on {query.device}")
    return x3.transpose(1, 2)


def _rows(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, S_k, h') -> the key-based layout (B * S_k, h')."""
    return None if x is None else x.reshape(-1, x.shape[-1])


def _check_supported(module, query, dropout, s_aux, sliding_window, seqlen_k, attention_mask) -> None:
    if dropout:
        raise ValueError(f"flash_dmattn: attention dropout is not supported (dropout={dropout}); set the model's "
                         "attention_dropout to 0.0 or call model.eval()")
    if module.training and torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("flash_dmattn is forward-only (no backward): run the model under torch.no_grad() or "
                           "model.eval(), or train with another attn_implementation")
    if s_aux is not None:
        raise NotImplementedError("flash_dmattn: attention sinks (s_aux) are not supported")
    if sliding_window is not None and seqlen_k > sliding_window:
        raise NotImplementedError(f"flash_dmattn: sliding-window attention is not supported (sliding_window="
                                  f"{sliding_window} < kv_length={seqlen_k})")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"flash_dmattn: attention_mask must be a 2-D (batch, kv_length) padding mask, got shape "
                         f"{tuple(attention_mask.shape)}; pass per-key dynamic masks as key_mask / key_bias")


# ----------------------------------------------------------------------------------------------
# The batch forms
# ----------------------------------------------------------------------------------------------

def _attend_uniform(run, query, key, value, padding_mask, key_mask, key_bias) -> torch.Tensor:
    """B sequences of S_q queries and S_k keys; padding keys hidden by the key-based mask.

    padding_mask (B, S_k) bool or None; key_mask (B, S_k, h') bool or None; key_bias (B, S_k, h') or None.
    Returns (B, S_q, H, D).
    """
    batch, num_heads, seqlen_q, head_dim = query.shape
    seqlen_k = key.shape[2]
    mask = key_mask
    if padding_mask is not None:
        keep = padding_mask.unsqueeze(-1)                               # (B, S_k, 1)
        mask = keep if key_mask is None else keep & key_mask            # (B, S_k, 1 or h')
    out = run(_tokens(query), _tokens(key), _tokens(value), _rows(mask), _rows(key_bias),
              _uniform_cu_seqlens(batch, seqlen_q, query.device), _uniform_cu_seqlens(batch, seqlen_k, query.device),
              seqlen_q, seqlen_k)                                       # (B * S_q, H, D)
    return out.view(batch, seqlen_q, num_heads, head_dim)


def _attend_unpadded(run, query, key, value, padding_mask, key_mask, key_bias) -> torch.Tensor:
    """Prefill with padding (S_q == S_k == S): the valid tokens as a packed varlen batch, re-padded with zeros.

    padding_mask (B, S) bool; key_mask, key_bias (B, S, h') or None. Returns (B, S, H, D). Synchronizes
    the host (the number of valid tokens sets the shapes).
    """
    batch, num_heads, seqlen, head_dim = query.shape
    batch_idx, seq_idx = padding_mask.nonzero(as_tuple=True)          # (total,) each
    lengths = padding_mask.sum(dim=1, dtype=torch.int32)              # (B,)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    max_seqlen = int(lengths.max())

    def unpad(x):  # (B, h, S, D) -> (total, h, D); (B, S, h') -> (total, h')
        return None if x is None else (x.transpose(1, 2) if x.dim() == 4 else x)[batch_idx, seq_idx]

    out = run(unpad(query), unpad(key), unpad(value), unpad(key_mask), unpad(key_bias),
              cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)           # (total, H, D)
    padded = out.new_zeros(batch, seqlen, num_heads, head_dim)
    padded[batch_idx, seq_idx] = out
    return padded


def _attend_packed(run, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   key_mask, key_bias) -> torch.Tensor:
    """Padding-free rows (normally B == 1) holding the sequences given by cu_seqlens. Returns (B, S_q, H, D)."""
    batch, num_heads, seqlen_q, head_dim = query.shape
    out = run(_tokens(query), _tokens(key), _tokens(value), _rows(key_mask), _rows(key_bias),
              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)  # (B * S_q, H, D)
    return out.view(batch, seqlen_q, num_heads, head_dim)


def _max_length(max_length, bound: int) -> int:
    """A max_length_q/k kwarg (int or 0-d tensor) as an int; under torch.compile a tensor gives way to
    `bound` (the number of tokens, a valid upper bound) instead of a host read."""
    if isinstance(max_length, torch.Tensor):
        return bound if torch.compiler.is_compiling() else int(max_length)
    return int(max_length)


def _attend_position_ids(run, query, key, value, position_ids, key_mask, key_bias) -> torch.Tensor:
    """One row (B == 1, S_q == S_k == N) that may pack several sequences. Returns (1, N, H, D).

    A token starts a sequence where its position id does not continue the previous one (the rule of
    transformers' masks for packed rows). Eager: the exact cu_seqlens, at one host synchronization
    (as flash_attention_2). Under torch.compile, shapes cannot depend on the data: cu_seqlens has N
    slots, the real sequences first and empty ones after, and max_seqlen is N.
    """
    pos = position_ids.reshape(-1)                                                             # (N,)
    starts = torch.cat([torch.ones_like(pos[:1], dtype=torch.bool), pos[1:] != pos[:-1] + 1])  # (N,)
    sequence = starts.cumsum(0) - 1                                                            # (N,)
    lengths = torch.zeros_like(pos, dtype=torch.int32).scatter_add_(
        0, sequence, torch.ones_like(sequence, dtype=torch.int32))                             # (N,)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))                           # (N + 1,)
    if torch.compiler.is_compiling():
        count, max_seqlen = pos.numel(), pos.numel()
    else:
        count, max_seqlen = torch.stack([starts.sum(), lengths.max()]).tolist()
    cu_seqlens = cu_seqlens[: count + 1]
    return _attend_packed(run, query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, key_mask, key_bias)


# ----------------------------------------------------------------------------------------------
# The AttentionInterface entry
# ----------------------------------------------------------------------------------------------

def flash_dmattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    s_aux: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    cu_seq_lens_k: Optional[torch.Tensor] = None,
    max_length_q: Optional[Union[int, torch.Tensor]] = None,
    max_length_k: Optional[Union[int, torch.Tensor]] = None,
    key_mask: Optional[torch.Tensor] = None,
    key_bias: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention signature over flash_dmattn_varlen_func.

    Args:
        module: the attention module; its `is_causal` applies unless `is_causal` is given.
        query: (B, H, S_q, D); key, value: (B, H_k, S_k, D) with H % H_k == 0 (GQA natively, no repeat_kv).
        attention_mask: None, or the (B, L) bool padding mask of `flash_dmattn_mask`, L <= S_k (L < S_k:
            a static cache, whose slots past L are not used yet).
        scaling: score scale (default 1 / sqrt(D)). softcap: logit soft-capping, None or 0 is off.
        dropout: must be 0.
        position_ids, cu_seq_lens_q/k, max_length_q/k: padding-free packing, as for flash_attention_2
            (used when there is no attention_mask). A tensor max_length is read on the host, or replaced
            by the number of tokens under torch.compile: pass ints for the tightest launch.
        key_mask: None or (B, S_k) / (B, h', S_k), h' in {1, H_k, H}: nonzero keeps a key for every
            query of its sequence (bool, int or float).
        key_bias: None or the same shapes: added to the scores of a key, in the query dtype or float32.

    Returns:
        (attn_output (B, S_q, H, D) in the query dtype, None): no attention weights.
    """
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    _check_supported(module, query, dropout, s_aux, sliding_window, seqlen_k, attention_mask)
    if key_bias is not None and key_bias.dtype not in (torch.float32, query.dtype):
        key_bias = key_bias.to(query.dtype)
    if key_mask is not None and key_mask.dtype != torch.bool:
        key_mask = key_mask != 0
    key_mask = _key_operand(key_mask, "key_mask", query, key)  # (B, S_k, h') bool
    key_bias = _key_operand(key_bias, "key_bias", query, key)
    run = functools.partial(flash_dmattn_varlen_func, scale=scaling, softcap=softcap,
                            is_causal=module.is_causal if is_causal is None else is_causal)

    if attention_mask is not None:
        padding_mask = attention_mask.bool()  # (B, L)
        kv_length = padding_mask.shape[1]
        if kv_length < seqlen_k:  # a static cache: only its first L slots hold keys
            key, value = key[:, :, :kv_length], value[:, :, :kv_length]
            key_mask = None if key_mask is None else key_mask[:, :kv_length]
            key_bias = None if key_bias is None else key_bias[:, :kv_length]
        if seqlen_q == kv_length and not torch.compiler.is_compiling():
            out = _attend_unpadded(run, query, key, value, padding_mask, key_mask, key_bias)
        else:
            out = _attend_uniform(run, query, key, value, padding_mask, key_mask, key_bias)
    elif all(x is not None for x in (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)):
        num_tokens_q, num_tokens_k = query.shape[0] * seqlen_q, key.shape[0] * seqlen_k
        out = _attend_packed(run, query, key, value, cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32),
                             _max_length(max_length_q, num_tokens_q), _max_length(max_length_k, num_tokens_k),
                             key_mask, key_bias)
    elif (position_ids is not None and position_ids.numel() == seqlen_q and query.shape[0] == 1
          and 1 < seqlen_q == seqlen_k):
        out = _attend_position_ids(run, query, key, value, position_ids, key_mask, key_bias)
    else:
        out = _attend_uniform(run, query, key, value, None, key_mask, key_bias)
    return out, None


register()
