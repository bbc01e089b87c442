/*
 * fdm_cuda.h: the plain-C launcher of the CUDA varlen forward.
 *
 * Takes the parameter struct (all pointers on the current device) and a stream, picks the
 * kernel instantiation (dtype x tile head dim) and the grid, launches, and returns an
 * fdm_status. It never synchronizes the host, so it can be captured in a CUDA graph.
 */
#ifndef FDM_CUDA_H
#define FDM_CUDA_H

#include <cuda_runtime.h>
#include <stddef.h>

#include "../fdm_params.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The largest head dim the CUDA kernels serve; head dims must be multiples of 8. */
#define FDM_CUDA_MAX_HEAD_DIM 256

/* Bytes of scratch the forward of p needs on the current device (split-KV partial results, planned
 * from the sizes alone, no device data read); 0 when it needs none. The caller allocates them
 * and sets p->workspace before fdm_cuda_forward. */
size_t fdm_cuda_workspace_size(const fdm_params *p);

/* Launches the forward on `stream`. Returns FDM_OK or an fdm_status error. */
int fdm_cuda_forward(const fdm_params *p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FDM_CUDA_H */
