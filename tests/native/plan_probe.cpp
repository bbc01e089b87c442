// Prints the CUDA launch plan (launch_plan.h, host-only code) for sizes read from stdin, one line
// per problem: "B H H_k max_q max_k total_k total_q block_m block_n sms ctas_per_sm mask_layout
// mask_group_stride force_splits force_gather" -> "heads_per_cta num_m_blocks num_splits
// tiles_per_split gather workspace_bytes key_split rows_first warpgroups row_schedule
// grid_row_blocks" (rows_first for a 50 MB
// L2, the H100's; warpgroups as on a Hopper GPU with an sm_90a build, for a head dim it serves). Used by test_launch_plan.py.
#include <cstdio>

#include "../../csrc/kernels/launch_plan.h"

int main() {
    long long b, h, hk, max_q, max_k, total_k, total_q, block_m, block_n, sms, ctas_per_sm, mask_layout,
        mask_group_stride, force_splits, force_gather;
    while (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld", &b, &h, &hk,
                      &max_q, &max_k, &total_k, &total_q, &block_m, &block_n, &sms, &ctas_per_sm, &mask_layout,
                      &mask_group_stride, &force_splits, &force_gather) == 15) {
        fdm_params p = {};
        p.batch = b;
        p.num_heads = h;
        p.num_heads_k = hk;
        p.head_dim = 128;
        p.max_seqlen_q = max_q;
        p.max_seqlen_k = max_k;
        p.total_q = total_q;
        p.total_k = total_k;
        p.force_num_splits = (int)force_splits;
        p.force_gather = (int)force_gather;
        p.force_key_split = -1;
        p.force_warpgroups = -1;
        p.force_row_schedule = -1;
        // A byte mask with unit key stride; a query-based one with 16-byte aligned rows, so that it
        // is staged (launch_plan.h, use_staged_query_mask).
        alignas(16) static const unsigned char mask_bytes[16] = {1};
        if (mask_layout >= 0) {
            const long long row_step = mask_layout == 0 ? 1 : 16;
            p.mask.ptr = mask_bytes;
            p.mask.dtype = FDM_BYTE;
            p.mask.layout = mask_layout == 0 ? FDM_LAYOUT_KEY : FDM_LAYOUT_QUERY;
            p.mask.stride_k = 1;
            p.mask.stride_kv_head = row_step;
            p.mask.stride_group = mask_group_stride * row_step;
        }
        // The layout as the launcher chooses it on a Hopper GPU with an sm_90a build (fdm_launch.cu).
        const bool warpgroups = fdm::use_warpgroups(p, fdm::use_key_split(p, (int)block_m), true, true);
        const fdm::FwdPlan plan = fdm::make_plan(p, (int)block_m, (int)block_n, (int)sms, (int)ctas_per_sm, warpgroups);
        const int rows_first = fdm::use_rows_first(p, plan, 50LL << 20) ? 1 : 0;
        std::printf("%d %d %d %d %d %zu %d %d %d %d %d\n", plan.heads_per_cta, plan.num_m_blocks, plan.num_splits,
                    plan.tiles_per_split, plan.gather, plan.ws.total, plan.key_split,
                    rows_first, plan.warpgroups, plan.row_schedule, plan.grid_row_blocks);
    }
    return 0;
}
