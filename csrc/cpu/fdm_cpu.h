/*
 * fdm_cpu.h: the C CPU implementation of the varlen forward (SPEC.md section 1).
 *
 * The work is cut into independent items, one per (sequence b, KV head hk, query block);
 * the caller runs items [begin, end) on each thread (the binding uses torch's thread
 * pool), so the C code itself starts no threads.
 */
#ifndef FDM_CPU_H
#define FDM_CPU_H

#include "../fdm_params.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of work items of this call (0 when there is nothing to compute). */
int64_t fdm_cpu_num_work_items(const fdm_params *p);

/* Computes work items [begin, end): writes their rows of out and lse. Returns an fdm_status. */
int fdm_cpu_forward_range(const fdm_params *p, int64_t begin, int64_t end);

#ifdef __cplusplus
}
#endif

#endif /* FDM_CPU_H */
