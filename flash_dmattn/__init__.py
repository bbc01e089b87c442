"""flash_dmattn: varlen attention forward with dynamic masks and additive bias.

`flash_dmattn_varlen_func` (packed variable-length batches) and `flash_dmattn_func` (dense
batches) are the public entry points; they call the registered operators
`torch.ops.flash_dmattn.mha_varlen_fwd` / `mha_fwd` (CPU and, when built with CUDA, CUDA kernels).
"""

import torch  # noqa: F401  (loads libc10 / libtorch, which _C links against)

from . import _C  # noqa: F401  (loads the library, which registers torch.ops.flash_dmattn)
from . import _fake  # noqa: F401  (the fake implementation for torch.compile)
from .dense import (flash_dmattn_func, flash_dmattn_kvpacked_func, flash_dmattn_qkvpacked_func,
                    flash_dmattn_varlen_kvpacked_func, flash_dmattn_varlen_qkvpacked_func)
from .varlen import cuda_kernels_available, flash_dmattn_varlen_func
from .backends import (CUDA_AVAILABLE, FLEX_AVAILABLE, TRITON_AVAILABLE, flash_dmattn_func_auto,
                       flex_dmattn_func, get_available_backends, triton_dmattn_func)

__all__ = [
    "flash_dmattn_func", "flash_dmattn_qkvpacked_func", "flash_dmattn_kvpacked_func",
    "flash_dmattn_varlen_func", "flash_dmattn_varlen_qkvpacked_func", "flash_dmattn_varlen_kvpacked_func",
    "cuda_kernels_available",
    "flash_dmattn_func_auto", "get_available_backends", "flex_dmattn_func", "triton_dmattn_func",
    "CUDA_AVAILABLE", "TRITON_AVAILABLE", "FLEX_AVAILABLE",
]
__version__ = "0.1.0"
