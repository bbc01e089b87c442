// fdm_launch.cu: the plain-C entry points of the CUDA forward. Plans the launch (launch_plan.h),
// picks the instantiation (dtype x tile head dim: the head dim rounded up to 32, 64, 96, 128, 192
// or 256), launches it: first the key compaction when gathering, then the forward, then with
// split-KV the combine kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fdm_cuda.h"
#include "fwd_launch.h"
#include "launch_plan.h"
#include "tiles.cuh"

namespace {

// Device attributes the plan reads, queried once per device (they never change).
fdm::GpuInfo gpu_info() {
    static fdm::GpuInfo cached[fdm::kMaxDevices];
    static bool known[fdm::kMaxDevices] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return fdm::GpuInfo{0, 0, 0};
    if (device < fdm::kMaxDevices && known[device]) return cached[device];
    fdm::GpuInfo g{0, 0, 0};
    if (cudaDeviceGetAttribute(&g.num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&g.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&g.smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
        return fdm::GpuInfo{0, 0, 0};
    if (device < fdm::kMaxDevices) {
        cached[device] = g;
        known[device] = true;
    }
    return g;
}

template <int kHeadDim>
fdm::TileSmem tile_smem() {
    return fdm::TileSmem{fdm::FwdTile<kHeadDim>::kQBytes, fdm::FwdTile<kHeadDim>::kStageBytes};
}

fdm::TileSmem tile_smem_of(int tile_head_dim) {
    switch (tile_head_dim) {
        case 32: return tile_smem<32>();
        case 64: return tile_smem<64>();
        case 96: return tile_smem<96>();
        case 128: return tile_smem<128>();
        case 192: return tile_smem<192>();
        default: return tile_smem<256>();
    }
}

fdm::FwdPlan plan_for(const fdm_params &p) {
    const int tile_head_dim = fdm::tile_head_dim(p.head_dim);
    return fdm::make_plan(p, fdm::kFwdBlockM, fdm::fwd_block_n(tile_head_dim), gpu_info(), tile_smem_of(tile_head_dim));
}

template <class T>
int forward(const fdm_params &p, cudaStream_t stream) {
    const fdm::FwdPlan plan = plan_for(p);
    if ((plan.num_splits > 1 || plan.gather) && p.workspace == nullptr) return FDM_ERR_WORKSPACE;
    if (plan.gather) {
        const int st = fdm::run_gather_keys(p, plan, stream);
        if (st != FDM_OK) return st;
    }
    int status = FDM_ERR_HEAD_DIM;
    switch (fdm::tile_head_dim(p.head_dim)) {
        case 32: status = fdm::run_fwd<T, 32>(p, plan, stream); break;
        case 64: status = fdm::run_fwd<T, 64>(p, plan, stream); break;
        case 96: status = fdm::run_fwd<T, 96>(p, plan, stream); break;
        case 128: status = fdm::run_fwd<T, 128>(p, plan, stream); break;
        case 192: status = fdm::run_fwd<T, 192>(p, plan, stream); break;
        case 256: status = fdm::run_fwd<T, 256>(p, plan, stream); break;
        default: break;
    }
    if (status == FDM_OK && plan.num_splits > 1) status = fdm::run_combine<T>(p, plan, stream);
    return status;
}

}  // namespace

extern "C" size_t fdm_cuda_workspace_size(const fdm_params *p) {
    if (fdm::tile_head_dim(p->head_dim) == 0) return 0;
    const fdm::FwdPlan plan = plan_for(*p);
    return fdm::workspace_layout(p, &plan).total;
}

extern "C" int fdm_cuda_forward(const fdm_params *p, cudaStream_t stream) {
    switch (p->dtype) {
        case FDM_F16: return forward<__half>(*p, stream);
        case FDM_BF16: return forward<__nv_bfloat16>(*p, stream);
        default: return FDM_ERR_DTYPE;
    }
}
