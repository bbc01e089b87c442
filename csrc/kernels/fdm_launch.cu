// fdm_launch.cu: the plain-C entry points of the CUDA forward. Plans the launch (launch_plan.h),
// picks the instantiation (dtype x tile head dim: the head dim rounded up to 32, 64, 96, 128, 192
// or 256, x warp layout x staged query mask or not), launches it: first the key compaction when gathering or the tile test of
// a query-based mask, then the forward, then with split-KV the combine kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fdm_cuda.h"
#include "fwd_launch.h"
#include "launch_plan.h"
#include "tiles.cuh"

namespace {

int num_sms() {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        return 0;  // unknown: the plan then never splits
    return sms;
}

int smem_bytes(int tile_head_dim, bool key_split, bool staged_mask) {
    switch (tile_head_dim) {
        case 32: return fdm::FwdTile<32>::smem_bytes(key_split, staged_mask);
        case 64: return fdm::FwdTile<64>::smem_bytes(key_split, staged_mask);
        case 96: return fdm::FwdTile<96>::smem_bytes(key_split, staged_mask);
        case 128: return fdm::FwdTile<128>::smem_bytes(key_split, staged_mask);
        case 192: return fdm::FwdTile<192>::smem_bytes(key_split, staged_mask);
        default: return fdm::FwdTile<256>::smem_bytes(key_split, staged_mask);
    }
}

fdm::FwdPlan plan_for(const fdm_params &p) {
    const int tile_head_dim = fdm::tile_head_dim(p.head_dim);
    const bool key_split = fdm::use_key_split(p, fdm::kFwdBlockM);
    return fdm::make_plan(p, fdm::kFwdBlockM, fdm::fwd_block_n(tile_head_dim), num_sms(),
                          fdm::fwd_ctas_per_sm(smem_bytes(tile_head_dim, key_split, fdm::use_staged_query_mask(p))));
}

template <class T, int kHeadDim>
int run_layout(const fdm_params &p, const fdm::FwdPlan &plan, cudaStream_t stream) {
    if (plan.staged_query_mask)
        return plan.key_split ? fdm::run_fwd<T, kHeadDim, true, true>(p, plan, stream)
                              : fdm::run_fwd<T, kHeadDim, false, true>(p, plan, stream);
    return plan.key_split ? fdm::run_fwd<T, kHeadDim, true, false>(p, plan, stream)
                          : fdm::run_fwd<T, kHeadDim, false, false>(p, plan, stream);
}

template <class T>
int forward(const fdm_params &p, cudaStream_t stream) {
    const fdm::FwdPlan plan = plan_for(p);
    if ((plan.num_splits > 1 || plan.gather || plan.tile_bitmap) && p.workspace == nullptr) return FDM_ERR_WORKSPACE;
    if (plan.gather) {
        const int st = fdm::run_gather_keys(p, plan, stream);
        if (st != FDM_OK) return st;
    }
    if (plan.tile_bitmap) {
        const int st = fdm::run_tile_visibility(p, plan, stream);
        if (st != FDM_OK) return st;
    }
    int status = FDM_ERR_HEAD_DIM;
    switch (fdm::tile_head_dim(p.head_dim)) {
        case 32: status = run_layout<T, 32>(p, plan, stream); break;
        case 64: status = run_layout<T, 64>(p, plan, stream); break;
        case 96: status = run_layout<T, 96>(p, plan, stream); break;
        case 128: status = run_layout<T, 128>(p, plan, stream); break;
        case 192: status = run_layout<T, 192>(p, plan, stream); break;
        case 256: status = run_layout<T, 256>(p, plan, stream); break;
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
