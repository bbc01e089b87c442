"""Backend selection: which attention implementations can run here, and picking one.

Backends, in priority order:
- "cuda":   flash_dmattn_func on our compiled CUDA kernels (needs the CUDA build and a GPU).
- "triton": the Triton kernel of flash_dmattn.backends.triton_kernel (needs triton and a CUDA GPU).
- "flex":   PyTorch FlexAttention with mask_mod / score_mod (needs torch.nn.attention.flex_attention).
- "cpu":    flash_dmattn_func on our CPU kernels (always available).
Every backend has flash_dmattn_func's signature and SPEC.md's semantics, mask included.
"""

import importlib.util
from typing import Callable, Dict, List, Optional

import torch

from ..dense import flash_dmattn_func
from ..varlen import cuda_kernels_available

BACKENDS = ("cuda", "triton", "flex", "cpu")


def _unavailable_reasons() -> Dict[str, str]:
    """{backend: why it cannot run here} for every backend that cannot."""
    reasons = {}
    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        reasons["cuda"] = "cuda: no CUDA GPU"
    elif not cuda_kernels_available():
        reasons["cuda"] = "cuda: flash_dmattn was built without its CUDA kernels"
    if importlib.util.find_spec("triton") is None:
        reasons["triton"] = "triton: triton is not installed (pip install triton)"
    elif not has_gpu:
        reasons["triton"] = "triton: no CUDA GPU"
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        reasons["flex"] = f"flex: torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return reasons


_REASONS = _unavailable_reasons()
CUDA_AVAILABLE = "cuda" not in _REASONS
TRITON_AVAILABLE = "triton" not in _REASONS
FLEX_AVAILABLE = "flex" not in _REASONS


def get_available_backends() -> List[str]:
    """The backends that can run here, highest priority first (cuda > triton > flex > cpu)."""
    return [name for name in BACKENDS if name not in _REASONS]


def triton_dmattn_func(query, key, value, attn_mask=None, attn_bias=None, scale=None, is_causal=None,
                       softcap=None, deterministic=None, return_lse=False):
    """The Triton backend (see flash_dmattn.backends.triton_kernel.triton_dmattn_func); triton is
    imported on the first call, so `import flash_dmattn` does not pay for it."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("triton_dmattn_func: triton is not installed (pip install triton)")
    from .triton_kernel import triton_dmattn_func as kernel_func

    return kernel_func(query, key, value, attn_mask, attn_bias, scale, is_causal, softcap, deterministic,
                       return_lse)


def flex_dmattn_func(query, key, value, attn_mask=None, attn_bias=None, scale=None, is_causal=None,
                     softcap=None, deterministic=None, return_lse=False):
    """The FlexAttention backend (see flash_dmattn.backends.flex.flex_dmattn_func); imported on the
    first call, so torch builds without FlexAttention can still import flash_dmattn."""
    if not FLEX_AVAILABLE:
        raise RuntimeError(f"flex_dmattn_func: {_REASONS['flex']}")
    from .flex import flex_dmattn_func as flex_func

    return flex_func(query, key, value, attn_mask, attn_bias, scale, is_causal, softcap, deterministic,
                     return_lse)


_FUNCS: Dict[str, Callable] = {
    "cuda": flash_dmattn_func,
    "triton": triton_dmattn_func,
    "flex": flex_dmattn_func,
    "cpu": flash_dmattn_func,
}


def flash_dmattn_func_auto(backend: Optional[str] = None) -> Callable:
    """The attention callable of `backend` (default: the first of get_available_backends()).

    The callable has flash_dmattn_func's signature: (query, key, value, attn_mask=None, attn_bias=None,
    scale=None, is_causal=None, softcap=None, deterministic=None, return_lse=False) -> out or (out, lse).

    Raises:
        ValueError: `backend` is not one of "cuda", "triton", "flex", "cpu".
        RuntimeError: `backend` cannot run here; the message says why.
    """
    if backend is None:
        return _FUNCS[get_available_backends()[0]]
    if backend not in _FUNCS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if backend in _REASONS:
        raise RuntimeError(f"backend {backend!r} is not available: {_REASONS[backend]}")
    return _FUNCS[backend]
