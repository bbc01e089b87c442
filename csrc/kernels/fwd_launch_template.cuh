// fwd_launch_template.cuh: grid, shared memory and launch of one fwd_kernel instantiation.
#pragma once

#include "fwd_kernel.cuh"
#include "fwd_launch.h"
#include "pdl.cuh"

namespace fdm {

template <class T, int kHeadDim, FwdLayout kLayout, bool kStagedMask>
int run_fwd(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream) {
    using Tile = FwdTileOf<kHeadDim, kLayout, kStagedMask>;
    constexpr int kSmemBytes = Tile::smem_bytes(kStagedMask);
    // One CTA per (key range, row block of the grid, head block); row blocks past a sequence's end
    // return at once (launch_plan.h: grid_row_blocks, the row schedule).
    const int64_t num_ctas = static_cast<int64_t>(plan.num_splits) * plan.grid_row_blocks *
                             (p.num_heads / plan.heads_per_cta);
    if (num_ctas == 0) return FDM_OK;
    if (num_ctas >= 0x7fffffffLL) return FDM_ERR_GRID;  // (grid_row_blocks is clamped to 2^31 - 1)

    auto kernel = fwd_kernel<T, kHeadDim, kLayout, kStagedMask>;
    // The shared-memory opt-in is per (function, device) and costs microseconds of host time:
    // done once per device (a benign race sets it twice at worst).
    static bool smem_configured[kMaxDevices] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return FDM_ERR_CUDA;
    if (device >= kMaxDevices || !smem_configured[device]) {
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes) != cudaSuccess)
            return FDM_ERR_CUDA;
        if (device < kMaxDevices) smem_configured[device] = true;
    }
    const cudaError_t err = launch_maybe_programmatic(kernel, static_cast<unsigned>(num_ctas), Tile::kThreads,
                                                      kSmemBytes, stream, plan.programmatic != 0, p, plan);
    return err == cudaSuccess ? FDM_OK : FDM_ERR_CUDA;
}

}  // namespace fdm
