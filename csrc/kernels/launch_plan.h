// launch_plan.h: the launch heuristics of the forward, decided on the host from sizes alone (no
// device data is read, so a call can be captured in a CUDA graph).
//
// Two decisions, both aimed at decoding (few queries, many keys):
//   packed GQA: the P = G query heads that share a KV head become rows of one CTA (row R of a
//     block is query R / P of head h0 + R % P), so each K/V tile is loaded once for all of them.
//   split-KV: when the CTAs cannot fill the GPU, each (row block, head block) is cut into
//     num_splits key ranges computed by separate CTAs; a combine kernel merges their partial
//     outputs by their log-sum-exp (flash-decoding).
#pragma once

#include <stdint.h>

#include "../fdm_params.h"

namespace fdm {

// Kernel argument: how the grid maps onto the problem.
struct FwdPlan {
    int heads_per_cta;      // P: query heads packed into the rows of one CTA (G or 1)
    int num_m_blocks;       // row blocks per (sequence, head block): ceil(max_seqlen_q * P / kBlockM)
    int num_splits;         // key ranges per row block (1: no split-KV)
    int tiles_per_split;    // key tiles of kBlockN per range
};

// Packed GQA needs every key-based operand to be the same for the heads of a group (h' != H);
// it is used for short query blocks (decode), where it saves the most.
inline bool can_pack_gqa(const fdm_params &p, int block_m) {
    const int64_t group = p.num_heads / p.num_heads_k;
    const bool mask_ok = p.mask.ptr == nullptr || p.mask.layout == FDM_LAYOUT_QUERY || p.mask.stride_group == 0;
    const bool bias_ok = p.bias.ptr == nullptr || p.bias.layout == FDM_LAYOUT_QUERY || p.bias.stride_group == 0;
    return group > 1 && mask_ok && bias_ok && p.max_seqlen_q * group <= 2 * block_m;
}

inline FwdPlan make_plan(const fdm_params &p, int block_m, int block_n, int num_sms) {
    FwdPlan plan;
    plan.heads_per_cta = can_pack_gqa(p, block_m) ? static_cast<int>(p.num_heads / p.num_heads_k) : 1;
    plan.num_m_blocks = static_cast<int>((p.max_seqlen_q * plan.heads_per_cta + block_m - 1) / block_m);
    const int64_t ctas = static_cast<int64_t>(plan.num_m_blocks) * (p.num_heads / plan.heads_per_cta) * p.batch;
    const int64_t key_tiles = (p.max_seqlen_k + block_n - 1) / block_n;
    int64_t splits = 1;
    if (ctas > 0 && ctas < num_sms && key_tiles >= 8) {
        // About two CTAs per SM, each range at least 4 key tiles, at most 128 ranges.
        splits = (2 * num_sms + ctas - 1) / ctas;
        if (splits > key_tiles / 4) splits = key_tiles / 4;
        if (splits > 128) splits = 128;
        if (splits < 1) splits = 1;
    }
    plan.tiles_per_split = static_cast<int>((key_tiles + splits - 1) / splits);
    if (plan.tiles_per_split < 1) plan.tiles_per_split = 1;
    plan.num_splits = static_cast<int>((key_tiles + plan.tiles_per_split - 1) / plan.tiles_per_split);
    if (plan.num_splits < 1) plan.num_splits = 1;
    return plan;
}

// Split-KV scratch: o_partial (num_splits, total_q, H, D) float, then lse_partial (num_splits, H, total_q).
inline size_t workspace_bytes(const fdm_params &p, const FwdPlan &plan) {
    if (plan.num_splits <= 1) return 0;
    const size_t rows = static_cast<size_t>(plan.num_splits) * p.total_q * p.num_heads;
    return rows * (p.head_dim + 1) * sizeof(float);
}

}  // namespace fdm
