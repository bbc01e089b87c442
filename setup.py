"""Builds flash_dmattn._C: the C core, the CPU path and (where possible) the CUDA kernels.

FLASH_DMATTN_BUILD=cpu|cuda|auto (default auto) picks the flavour: auto builds the CUDA
kernels when torch is a CUDA build and nvcc is found, the CPU-only library otherwise.
TORCH_CUDA_ARCH_LIST overrides the CUDA targets (default "8.0;9.0a": sm_90a carries the Hopper
warpgroup kernels, which a plain "9.0" build leaves out); MAX_JOBS the parallelism.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    mode = os.environ.get("FLASH_DMATTN_BUILD", "auto").lower()
    if mode not in ("auto", "cpu", "cuda"):
        raise ValueError(f"FLASH_DMATTN_BUILD must be auto, cpu or cuda, got {mode!r}")
    import torch

    cuda_ok = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "cuda" and not cuda_ok:
        raise RuntimeError("FLASH_DMATTN_BUILD=cuda needs a CUDA build of torch and nvcc (CUDA_HOME)")
    return cuda_ok if mode == "auto" else mode == "cuda"


def extension():
    sources = ["csrc/binding.cpp", "csrc/autograd.cpp", "csrc/cpu/fdm_cpu.c"]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for (C++17 or C++20)
    if not want_cuda():
        return cpp_extension.CppExtension("flash_dmattn._C", sources, extra_compile_args={"cxx": cxx_flags})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
    sources += ["csrc/kernels/fdm_launch.cu", "csrc/kernels/combine.cu", "csrc/kernels/key_gather.cu",
                "csrc/kernels/tile_visibility.cu", "csrc/kernels/row_schedule.cu"]
    sources += sorted(glob.glob("csrc/kernels/instantiations/*.cu", root_dir=HERE))
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return cpp_extension.CUDAExtension(
        "flash_dmattn._C", sources,
        define_macros=[("FDM_WITH_CUDA", None)] + ([("FDM_WITH_SM90A", None)] if "9.0a" in arch_list else []),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})


setup(
    name="flash_dmattn",
    version="0.1.0",
    description="Varlen attention forward with dynamic masks and additive bias (CPU and CUDA)",
    packages=find_packages(include=["flash_dmattn", "flash_dmattn.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
