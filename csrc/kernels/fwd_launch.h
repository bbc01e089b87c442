// fwd_launch.h: the per-instantiation entry point the launcher dispatches to.
#pragma once

#include <cuda_runtime.h>

#include "../fdm_params.h"

namespace fdm {

// Launches fwd_kernel<T, kHeadDim> on `stream`; returns an fdm_status. Defined in
// fwd_launch_template.cuh and instantiated once per (T, kHeadDim) in instantiations/.
template <class T, int kHeadDim>
int run_fwd(const fdm_params &p, cudaStream_t stream);

}  // namespace fdm
