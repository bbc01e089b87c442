// fdm_launch.cu: the plain-C entry point of the CUDA forward. Picks the instantiation
// (dtype x tile head dim: the head dim rounded up to 32, 64, 96, 128, 192 or 256).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fdm_cuda.h"
#include "fwd_launch.h"
#include "tiles.cuh"

namespace {

template <class T>
int dispatch_head_dim(const fdm_params &p, cudaStream_t stream) {
    switch (fdm::tile_head_dim(p.head_dim)) {
        case 32: return fdm::run_fwd<T, 32>(p, stream);
        case 64: return fdm::run_fwd<T, 64>(p, stream);
        case 96: return fdm::run_fwd<T, 96>(p, stream);
        case 128: return fdm::run_fwd<T, 128>(p, stream);
        case 192: return fdm::run_fwd<T, 192>(p, stream);
        case 256: return fdm::run_fwd<T, 256>(p, stream);
        default: return FDM_ERR_HEAD_DIM;
    }
}

}  // namespace

extern "C" int fdm_cuda_forward(const fdm_params *p, cudaStream_t stream) {
    switch (p->dtype) {
        case FDM_F16: return dispatch_head_dim<__half>(*p, stream);
        case FDM_BF16: return dispatch_head_dim<__nv_bfloat16>(*p, stream);
        default: return FDM_ERR_DTYPE;
    }
}
