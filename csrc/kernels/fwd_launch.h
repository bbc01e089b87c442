// fwd_launch.h: the per-instantiation entry point the launcher dispatches to, and the combine step.
#pragma once

#include <cuda_runtime.h>

#include "../fdm_params.h"
#include "launch_plan.h"

namespace fdm {

// Devices whose per-device launch state (the shared-memory opt-in) is cached; more are served uncached.
constexpr int kMaxDevices = 64;

// Launches fwd_kernel<T, kHeadDim, kLayout, kStagedMask> over the plan's grid on `stream`;
// returns an fdm_status. Defined in fwd_launch_template.cuh, instantiated once per (T, kHeadDim,
// kLayout, kStagedMask) in instantiations/.
template <class T, int kHeadDim, FwdLayout kLayout, bool kStagedMask>
int run_fwd(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream);

// Merges the plan's num_splits partial results in p.workspace into out and lse (combine.cu).
template <class T>
int run_combine(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream);

// Writes the gathered key lists of a key-based mask into p.workspace (key_gather.cu).
int run_gather_keys(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream);

// Writes the row schedule (which row block and head block each CTA computes) into p.workspace
// (row_schedule.cu).
int run_row_schedule(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream);

// Writes the tile bits of a query-based mask into p.workspace (tile_visibility.cu).
int run_tile_visibility(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream);

}  // namespace fdm
