// pdl.cuh: programmatic dependent launch (compute capability 9.0 and later).
//
// A call runs up to three kernels in a row on one stream: the key compaction or the tile test,
// the forward, the split-KV combine. Launched plainly, each starts only once the one before has
// exited, and the GPU sits idle for the gap (a few microseconds: a decode call is ~20-300 us).
// Launched programmatically (cudaLaunchAttributeProgrammaticStreamSerialization), the next
// kernel's CTAs are scheduled as soon as every CTA of the one before has called
// let_dependents_launch() (or exited); each then waits in wait_for_prior_grid() until that kernel
// has finished and its writes are visible, and so must call it before it reads or writes any
// memory the kernel before touches. Launched plainly, both calls do nothing.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace fdm {

// Waits until the grid this one depends on has completed and its memory is visible (griddepcontrol.wait).
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the grid that depends on this one be scheduled now (griddepcontrol.launch_dependents).
__device__ __forceinline__ void let_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), launched programmatically when `programmatic`.
template <class... Params, class... Args>
cudaError_t launch_maybe_programmatic(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem,
                                      cudaStream_t stream, bool programmatic, Args &&...args) {
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(block);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = programmatic ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace fdm
