"""flash_dmattn: varlen attention forward with dynamic masks and additive bias.

`flash_dmattn_varlen_func` is the public entry point; it calls the registered operator
`torch.ops.flash_dmattn.mha_varlen_fwd` (CPU and, when built with CUDA, CUDA kernels).
"""

import torch  # noqa: F401  (loads libc10 / libtorch, which _C links against)

from . import _C  # noqa: F401  (loads the library, which registers torch.ops.flash_dmattn)
from . import _fake  # noqa: F401  (the fake implementation for torch.compile)
from .varlen import cuda_kernels_available, flash_dmattn_varlen_func

__all__ = ["flash_dmattn_varlen_func", "cuda_kernels_available"]
__version__ = "0.1.0"
