// fdm_launch.cu: the plain-C entry points of the CUDA forward. Plans the launch (launch_plan.h),
// picks the instantiation (dtype x tile head dim: the head dim rounded up to 32, 64, 96, 128, 192
// or 256, x layout: rows, keys or warpgroups, x staged query mask or not), launches it: first the
// row schedule when the grid leaves out empty row blocks, the key compaction when gathering or the
// tile test of a query-based mask, then the forward, then with split-KV the combine kernel (the
// forward after a pass, and the combine, programmatically on compute capability 9.0+, pdl.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>

#include "fdm_cuda.h"
#include "fwd_launch.h"
#include "launch_plan.h"
#include "tiles.cuh"

namespace {

// What the plan needs to know of the current device. Queried once per device: each attribute
// query costs host time, and a call used to make nine of them.
struct DeviceFacts {
    int sms = 0;       // streaming multiprocessors (0 = unknown: the plan then never splits)
    int l2_bytes = 0;  // L2 cache size (0 = unknown: CTAs are ordered sequences first)
    int cc_major = 0;  // compute capability, major.minor
    int cc_minor = 0;
};

DeviceFacts query_device_facts(int device) {
    DeviceFacts f;
    const auto get = [device](cudaDeviceAttr attr) {
        int value = 0;
        return cudaDeviceGetAttribute(&value, attr, device) == cudaSuccess ? value : 0;
    };
    f.sms = get(cudaDevAttrMultiProcessorCount);
    f.l2_bytes = get(cudaDevAttrL2CacheSize);
    f.cc_major = get(cudaDevAttrComputeCapabilityMajor);
    f.cc_minor = get(cudaDevAttrComputeCapabilityMinor);
    return f;
}

DeviceFacts device_facts() {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return {};
    if (device >= fdm::kMaxDevices) return query_device_facts(device);
    static DeviceFacts facts[fdm::kMaxDevices];
    static std::once_flag queried[fdm::kMaxDevices];
    std::call_once(queried[device], [device] { facts[device] = query_device_facts(device); });
    return facts[device];
}

// Row block, key tile and resident CTAs per SM of the instantiation for (tile head dim, layout,
// staged mask).
struct FwdShape {
    int block_m, block_n, ctas_per_sm;
};
template <int kHeadDim, fdm::FwdLayout kLayout, bool kStagedMask>
FwdShape shape_of() {
    using Tile = fdm::FwdTileOf<kHeadDim, kLayout, kStagedMask>;
    const int by_smem = fdm::fwd_ctas_per_sm(Tile::smem_bytes(kStagedMask));
    return {Tile::kBlockM, Tile::kBlockN, by_smem < Tile::kMaxCtasPerSm ? by_smem : Tile::kMaxCtasPerSm};
}
template <int kHeadDim>
FwdShape shape_of(fdm::FwdLayout layout, bool staged_mask) {
    using fdm::FwdLayout;
    if constexpr (fdm::is_warpgroup_head_dim(kHeadDim)) {
        if (layout == FwdLayout::kWarpgroups)
            return staged_mask ? shape_of<kHeadDim, FwdLayout::kWarpgroups, true>()
                               : shape_of<kHeadDim, FwdLayout::kWarpgroups, false>();
    }
    if (layout == FwdLayout::kKeys)
        return staged_mask ? shape_of<kHeadDim, FwdLayout::kKeys, true>() : shape_of<kHeadDim, FwdLayout::kKeys, false>();
    return staged_mask ? shape_of<kHeadDim, FwdLayout::kRows, true>() : shape_of<kHeadDim, FwdLayout::kRows, false>();
}
FwdShape fwd_shape(int tile_head_dim, fdm::FwdLayout layout, bool staged_mask) {
    switch (tile_head_dim) {
        case 32: return shape_of<32>(layout, staged_mask);
        case 64: return shape_of<64>(layout, staged_mask);
        case 96: return shape_of<96>(layout, staged_mask);
        case 128: return shape_of<128>(layout, staged_mask);
        case 192: return shape_of<192>(layout, staged_mask);
        default: return shape_of<256>(layout, staged_mask);
    }
}

// The warpgroup layout's kernels are real code only in a build for sm_90a (setup.py defines
// FDM_WITH_SM90A then), and that code runs on compute capability 9.0 alone.
bool warpgroups_available(const DeviceFacts &device) {
#ifdef FDM_WITH_SM90A
    return device.cc_major == 9 && device.cc_minor == 0;
#else
    (void)device;
    return false;
#endif
}

// The key-split choice (blocks of at most kKeySplitRows rows) is the same for every row block of
// 16 rows or more; it is made with the key-split instantiation's block, which it then uses. The
// warpgroup layout replaces the row split where it is available (launch_plan.h, use_warpgroups).
fdm::FwdPlan plan_for(const fdm_params &p, const DeviceFacts &device) {
    const int tile_head_dim = fdm::tile_head_dim(p.head_dim);
    const bool key_split = fdm::use_key_split(p, fdm::fwd_block_m(tile_head_dim, true, false));
    const bool warpgroups = fdm::use_warpgroups(p, key_split, fdm::is_warpgroup_head_dim(tile_head_dim),
                                                warpgroups_available(device));
    const fdm::FwdLayout layout = warpgroups ? fdm::FwdLayout::kWarpgroups
                                             : key_split ? fdm::FwdLayout::kKeys : fdm::FwdLayout::kRows;
    const FwdShape shape = fwd_shape(tile_head_dim, layout, fdm::use_staged_query_mask(p));
    fdm::FwdPlan plan = fdm::make_plan(p, shape.block_m, shape.block_n, device.sms, shape.ctas_per_sm,
                                       warpgroups);
    plan.rows_first = fdm::use_rows_first(p, plan, device.l2_bytes) ? 1 : 0;
    return plan;
}

template <class T, int kHeadDim>
int run_layout(const fdm_params &p, const fdm::FwdPlan &plan, cudaStream_t stream) {
    using fdm::FwdLayout;
    if constexpr (fdm::is_warpgroup_head_dim(kHeadDim)) {
        if (plan.warpgroups)
            return plan.staged_query_mask ? fdm::run_fwd<T, kHeadDim, FwdLayout::kWarpgroups, true>(p, plan, stream)
                                          : fdm::run_fwd<T, kHeadDim, FwdLayout::kWarpgroups, false>(p, plan, stream);
    }
    if (plan.staged_query_mask)
        return plan.key_split ? fdm::run_fwd<T, kHeadDim, FwdLayout::kKeys, true>(p, plan, stream)
                              : fdm::run_fwd<T, kHeadDim, FwdLayout::kRows, true>(p, plan, stream);
    return plan.key_split ? fdm::run_fwd<T, kHeadDim, FwdLayout::kKeys, false>(p, plan, stream)
                          : fdm::run_fwd<T, kHeadDim, FwdLayout::kRows, false>(p, plan, stream);
}

template <class T>
int forward(const fdm_params &p, cudaStream_t stream) {
    const DeviceFacts device = device_facts();
    fdm::FwdPlan plan = plan_for(p, device);
    // On compute capability 9.0+ a kernel that follows one of this call's kernels is launched
    // programmatically (pdl.cuh): scheduled during the tail of the one before, not after it.
    const bool programmatic = device.cc_major >= 9;
    if ((plan.num_splits > 1 || plan.gather || plan.tile_bitmap || plan.row_schedule) && p.workspace == nullptr)
        return FDM_ERR_WORKSPACE;
    if (plan.row_schedule) {
        const int st = fdm::run_row_schedule(p, plan, stream);
        if (st != FDM_OK) return st;
    }
    if (plan.gather) {
        const int st = fdm::run_gather_keys(p, plan, stream);
        if (st != FDM_OK) return st;
    }
    if (plan.tile_bitmap) {
        const int st = fdm::run_tile_visibility(p, plan, stream);
        if (st != FDM_OK) return st;
    }
    plan.programmatic = programmatic && (plan.gather || plan.tile_bitmap || plan.row_schedule);
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
    plan.programmatic = programmatic;
    if (status == FDM_OK && plan.num_splits > 1) status = fdm::run_combine<T>(p, plan, stream);
    return status;
}

}  // namespace

extern "C" size_t fdm_cuda_workspace_size(const fdm_params *p) {
    if (fdm::tile_head_dim(p->head_dim) == 0) return 0;
    return plan_for(*p, device_facts()).ws.total;
}

extern "C" int fdm_cuda_forward(const fdm_params *p, cudaStream_t stream) {
    switch (p->dtype) {
        case FDM_F16: return forward<__half>(*p, stream);
        case FDM_BF16: return forward<__nv_bfloat16>(*p, stream);
        default: return FDM_ERR_DTYPE;
    }
}
