// Prints the CUDA launch plan (launch_plan.h, host-only code) for sizes read from stdin, one line
// per problem: "B H H_k max_q max_k total_k block_m block_n sms smem_per_sm smem_per_block q_bytes
// stage_bytes mask_layout mask_group_stride force_splits force_gather" -> "heads_per_cta
// num_m_blocks num_splits tiles_per_split gather num_stages smem_bytes workspace_bytes".
// Used by test_launch_plan.py.
#include <cstdio>

#include "../../csrc/kernels/launch_plan.h"

int main() {
    long long b, h, hk, max_q, max_k, total_k, block_m, block_n, sms, smem_per_sm, smem_per_block, q_bytes,
        stage_bytes, mask_layout, mask_group_stride, force_splits, force_gather;
    while (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld", &b, &h,
                      &hk, &max_q, &max_k, &total_k, &block_m, &block_n, &sms, &smem_per_sm, &smem_per_block,
                      &q_bytes, &stage_bytes, &mask_layout, &mask_group_stride, &force_splits,
                      &force_gather) == 17) {
        fdm_params p = {};
        p.batch = b;
        p.num_heads = h;
        p.num_heads_k = hk;
        p.head_dim = 128;
        p.max_seqlen_q = max_q;
        p.max_seqlen_k = max_k;
        p.total_q = b * max_q;
        p.total_k = total_k;
        p.force_num_splits = (int)force_splits;
        p.force_gather = (int)force_gather;
        static const char mask_byte = 1;
        if (mask_layout >= 0) {
            p.mask.ptr = &mask_byte;
            p.mask.layout = mask_layout == 0 ? FDM_LAYOUT_KEY : FDM_LAYOUT_QUERY;
            p.mask.stride_kv_head = 1;
            p.mask.stride_group = mask_group_stride;
        }
        const fdm::GpuInfo gpu{(int)sms, (int)smem_per_sm, (int)smem_per_block};
        const fdm::TileSmem smem{(int)q_bytes, (int)stage_bytes};
        const fdm::FwdPlan plan = fdm::make_plan(p, (int)block_m, (int)block_n, gpu, smem);
        std::printf("%d %d %d %d %d %d %d %zu\n", plan.heads_per_cta, plan.num_m_blocks, plan.num_splits,
                    plan.tiles_per_split, plan.gather, plan.num_stages, plan.smem_bytes,
                    fdm::workspace_layout(&p, &plan).total);
    }
    return 0;
}
