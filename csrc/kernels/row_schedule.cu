// row_schedule.cu: the row schedule of a forward launch (launch_plan.h, plan.row_schedule).
//
// The host sizes the grid from sizes alone, so without a schedule it holds B x num_m_blocks row
// blocks per head block, and every sequence shorter than max_seqlen_q leaves CTAs that only read
// its length and exit. With a schedule the grid holds grid_row_blocks per head block (the most the
// batch can have), and this pass, one CTA, writes which (sequence b, row block m_block, head
// block) each CTA computes, in the order of the full grid with the empty row blocks left out:
//   rows_first:  (m_rev, b, head_block)     else: (b, head_block, m_rev)
// where sequence b has n_b = ceil(len_q P / kBlockM) row blocks and m_block = n_b - 1 - m_rev
// (a sequence's last row blocks, the ones with the most causal keys, first):
//   schedule[slot] = {b, m_block, head_block, 0},  slot = CTA index / num_splits
// and slots past the batch's row blocks get b = -1 (the CTA exits).
#include <stdint.h>

#include "fwd_launch.h"
#include "pdl.cuh"
#include "tiles.cuh"

namespace fdm {

constexpr int kScheduleThreads = 1024;

__global__ void __launch_bounds__(kScheduleThreads)
    row_schedule_kernel(const __grid_constant__ fdm_params p, const FwdPlan plan, int4 *schedule) {
    let_dependents_launch();  // the forward may be scheduled now; it waits for this pass to finish
    __shared__ int blocks_s[kScheduleMaxBatch];     // n_b
    __shared__ int first_s[kScheduleMaxBatch + 1];  // sum of n_b' over b' < b
    const int batch = static_cast<int>(p.batch);
    const int heads_per_cta = plan.heads_per_cta;
    const int head_blocks = static_cast<int>(p.num_heads / heads_per_cta);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kScheduleThreads / 32;

    for (int b = threadIdx.x; b < batch; b += kScheduleThreads) {
        const int64_t rows = (p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]) * heads_per_cta;
        blocks_s[b] = static_cast<int>(min_i64(plan.num_m_blocks, (rows + plan.block_m - 1) / plan.block_m));
    }
    __syncthreads();
    if (warp == 0) {  // exclusive prefix sum of n_b, 32 sequences at a time
        int carry = 0;
        for (int b0 = 0; b0 < batch; b0 += 32) {
            const int n = b0 + lane < batch ? blocks_s[b0 + lane] : 0;
            int inclusive = n;
#pragma unroll
            for (int o = 1; o < 32; o *= 2) {
                const int up = __shfl_up_sync(0xffffffffu, inclusive, o);
                if (lane >= o) inclusive += up;
            }
            if (b0 + lane < batch) first_s[b0 + lane] = carry + inclusive - n;
            carry += __shfl_sync(0xffffffffu, inclusive, 31);
        }
        if (lane == 0) first_s[batch] = carry;
    }
    __syncthreads();

    if (plan.rows_first) {
        // Row m_rev holds the sequences with n_b > m_rev, in batch order, after the
        // sum_b min(n_b, m_rev) row blocks of the rows before it.
        for (int m_rev = warp; m_rev < plan.num_m_blocks; m_rev += warps) {
            int before = 0;
            for (int b = lane; b < batch; b += 32) before += min(blocks_s[b], m_rev);
#pragma unroll
            for (int o = 16; o > 0; o /= 2) before += __shfl_xor_sync(0xffffffffu, before, o);
            for (int b0 = 0; b0 < batch; b0 += 32) {
                const int b = b0 + lane;
                const bool has_row = b < batch && blocks_s[b] > m_rev;
                const uint32_t ballot = __ballot_sync(0xffffffffu, has_row);
                const int64_t item = before + __popc(ballot & ((1u << lane) - 1u));
                if (has_row && item < plan.grid_row_blocks) {  // (always, unless cu_seqlens_q is past total_q)
                    for (int h = 0; h < head_blocks; ++h)
                        schedule[item * head_blocks + h] = make_int4(b, blocks_s[b] - 1 - m_rev, h, 0);
                }
                before += __popc(ballot);
            }
        }
    } else {
        // Sequence b's n_b x head_blocks CTAs start at slot first_b x head_blocks, head block by head block.
        for (int b = warp; b < batch; b += warps) {
            const int n = blocks_s[b];
            const int64_t first = static_cast<int64_t>(first_s[b]) * head_blocks;
            if (first_s[b] + n > plan.grid_row_blocks) break;  // (never, unless cu_seqlens_q is past total_q)
            for (int k = lane; k < n * head_blocks; k += 32)  // k = head_block * n + m_rev
                schedule[first + k] = make_int4(b, n - 1 - k % n, k / n, 0);
        }
    }
    const int64_t used = static_cast<int64_t>(min(first_s[batch], plan.grid_row_blocks)) * head_blocks;
    const int64_t slots = static_cast<int64_t>(plan.grid_row_blocks) * head_blocks;
    for (int64_t s = used + threadIdx.x; s < slots; s += kScheduleThreads) schedule[s] = make_int4(-1, 0, 0, 0);
}

int run_row_schedule(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream) {
    const WorkspaceLayout &w = plan.ws;
    row_schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(
        p, plan, reinterpret_cast<int4 *>(static_cast<unsigned char *>(p.workspace) + w.schedule));
    return cudaPeekAtLastError() == cudaSuccess ? FDM_OK : FDM_ERR_CUDA;
}

}  // namespace fdm
