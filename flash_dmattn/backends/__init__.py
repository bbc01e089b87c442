"""Attention backends behind one signature (flash_dmattn_func's) and the selection among them."""

from .registry import (CUDA_AVAILABLE, FLEX_AVAILABLE, TRITON_AVAILABLE, flash_dmattn_func_auto, flex_dmattn_func,
                       get_available_backends, triton_dmattn_func)

__all__ = [
    "CUDA_AVAILABLE", "TRITON_AVAILABLE", "FLEX_AVAILABLE", "get_available_backends", "flash_dmattn_func_auto",
    "flex_dmattn_func", "triton_dmattn_func",
]
