// tile_visibility.cu: the tile test of a query-based mask, done up front for every key tile
// (launch_plan.h, plan.tile_bitmap). Key tile n of a row block is visible when some row of the
// block and key j of the tile have j < Lk, j <= the row's causal limit and a mask that keeps
// (query, j). The tile is full when the mask keeps every such pair (j < Lk and j <= the row's
// causal limit; vacuously for rows that see none of the tile). One CTA per (mask head, sequence
// b, row block, word of 32 key tiles): its kBitmapWarps warps test every kBitmapWarps-th of the
// word's 32 tiles (so that many tiles' mask loads are in flight at once; one warp walking all 32
// left the pass at 7% occupancy, docs/notes.md version 31), and it writes bit n % 32 of word n / 32:
//   tile_bits[head, b, m_block, word]   visible
//   full_bits[head, b, m_block, word]   full
// The forward kernel then moves from visible tile to visible tile with one uniform word read per
// 32 tiles (key_tiles.cuh, TileBitmap) instead of a mask round trip and a barrier per tile, and
// neither copies nor tests the mask of a full tile: its limits alone decide (masking.cuh).
//
// A row block with packed GQA holds queries m0 / P .. (m0 + kBlockM - 1) / P of P heads; the word
// of one mask head tests all of those queries, so a block's word may keep a tile only its other
// heads need: the kernel then computes a tile that is hidden for some of its rows, never misses one.
#include <stdint.h>

#include "fwd_launch.h"
#include "masking.cuh"
#include "pdl.cuh"
#include "tiles.cuh"

namespace fdm {

constexpr int kBitmapWarps = 4;                     // warps per CTA, which share one word's tiles
constexpr int kLaneQueries = kFwdMaxBlockM / 32;    // queries per lane: a block's rows hold at most kFwdMaxBlockM

constexpr int kMaxSpanLoads = 8;  // 16-byte loads of the widest key tile (128 keys)

// Whether the 4 bytes of x are all nonzero.
__device__ __forceinline__ bool no_zero_byte(uint32_t x) { return ((x - 0x01010101u) & ~x & 0x80808080u) == 0; }

// Whether mask row `row_off` (element offset of key 0) keeps any key j in [j0, j_end) (returned)
// and every one of them (and-ed into `all`; true for an empty range). Byte masks
// with unit key stride are read 16 keys at a time where the 16 bytes are aligned and inside the
// row (max_seqlen_k keys); everything else one element at a time. A whole aligned span (a tile
// the row sees entirely, the common case) issues all its loads before it tests any: one memory
// round trip per tile instead of one per 16 keys (the pass ran 97 us on prefill-d, an H200, with
// the loads one after another; docs/notes.md, version 24).
__device__ __forceinline__ bool row_keeps(const fdm_operand &m, int64_t row_off, int j0, int j_end,
                                          int64_t max_k, bool &all) {
    bool any = false;
    if (m.dtype == FDM_BYTE && m.stride_k == 1) {
        const uint8_t *row = static_cast<const uint8_t *>(m.ptr) + row_off;
        const int span = j_end - j0;
        if (span > 0 && span % 16 == 0 && span <= 16 * kMaxSpanLoads &&
            (reinterpret_cast<uintptr_t>(row + j0) & 15) == 0 && j_end <= max_k) {
            uint4 v[kMaxSpanLoads];  // bytes [j0 + 16 k, +16)
#pragma unroll
            for (int k = 0; k < kMaxSpanLoads; ++k)
                v[k] = 16 * k < span ? *reinterpret_cast<const uint4 *>(row + j0 + 16 * k) : make_uint4(0, 0, 0, 0);
            uint32_t bits = 0;
            bool every = true;  // of the loads inside the span
#pragma unroll
            for (int k = 0; k < kMaxSpanLoads; ++k) {
                bits |= v[k].x | v[k].y | v[k].z | v[k].w;
                if (16 * k < span)
                    every &= no_zero_byte(v[k].x) && no_zero_byte(v[k].y) && no_zero_byte(v[k].z) && no_zero_byte(v[k].w);
            }
            all &= every;
            return bits != 0;
        }
        for (int j = j0; j < j_end; j += 16) {
            const int valid = min(16, j_end - j);  // bytes of this group inside [j0, j_end)
            if ((reinterpret_cast<uintptr_t>(row + j) & 15) == 0 && j + 16 <= max_k) {
                const uint4 v = *reinterpret_cast<const uint4 *>(row + j);
                const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int bytes = min(4, max(0, valid - 4 * k));  // of word k that are in range
                    const uint32_t keep = bytes == 4 ? 0xffffffffu : (1u << (8 * bytes)) - 1u;
                    any |= (w[k] & keep) != 0;
                    all &= no_zero_byte(w[k] | ~keep);  // bytes out of range count as kept
                }
            } else {
                for (int e = 0; e < valid; ++e) {
                    any |= row[j + e] != 0;
                    all &= row[j + e] != 0;
                }
            }
        }
        return any;
    }
    for (int j = j0; j < j_end; ++j) {
        const bool keeps = mask_keeps(m, row_off + int64_t(j) * m.stride_k);
        any |= keeps;
        all &= keeps;
    }
    return any;
}

__global__ void __launch_bounds__(32 * kBitmapWarps)
    tile_visibility_kernel(const __grid_constant__ fdm_params p, const FwdPlan plan, uint32_t *tile_bits,
                           uint32_t *full_bits) {
    let_dependents_launch();  // the forward may be scheduled now; it waits for this pass to finish
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int64_t idx = blockIdx.x;  // the word (one per CTA: the grid holds exactly the words)
    const int64_t out_index = idx;
    const int word = static_cast<int>(idx % plan.bitmap_words);
    idx /= plan.bitmap_words;
    const int m_block = static_cast<int>(idx % plan.num_m_blocks);
    idx /= plan.num_m_blocks;
    const int64_t b = idx % p.batch, head = idx / p.batch;
    // A representative (KV head, group index) of the mask head (launch_plan.h, gather_list_head).
    const int64_t hk = head / gather_group_heads(&p), g = head % gather_group_heads(&p);
    fdm_seq seq = fdm_seq_of(&p, b);
    seq.len_k = min_i64(seq.len_k, p.max_seqlen_k);

    uint32_t bits = 0, full = 0;  // this warp's tiles' bits
    const int P = plan.heads_per_cta;
    const int64_t rows = seq.len_q * P, m0 = static_cast<int64_t>(m_block) * plan.block_m;
    if (m0 < rows) {
        // This lane's queries of the block: q_first + lane + 32 k (<= q_last).
        const int64_t q_first = m0 / P, q_last = (min_i64(m0 + plan.block_m, rows) - 1) / P;
        int64_t row_off[kLaneQueries];
        int last_key[kLaneQueries];  // last visible key of the query, -1 for none (past q_last)
#pragma unroll
        for (int k = 0; k < kLaneQueries; ++k) {
            const int64_t i = q_first + lane + 32 * k;
            last_key[k] = -1;
            row_off[k] = 0;
            if (i <= q_last) {
                last_key[k] = static_cast<int>(
                    min_i64(seq.len_k - 1, p.is_causal ? fdm_causal_last_key(&seq, i) : seq.len_k - 1));
                row_off[k] = fdm_operand_offset(&p.mask, &seq, hk, g, i, 0);
            }
        }
        for (int t = warp; t < 32; t += kBitmapWarps) {
            const int j0 = (word * 32 + t) * plan.block_n;
            if (j0 >= seq.len_k) break;
            bool any = false, all = true;
#pragma unroll
            for (int k = 0; k < kLaneQueries; ++k)
                if (last_key[k] >= 0)
                    any |= row_keeps(p.mask, row_off[k], j0, min(j0 + plan.block_n, last_key[k] + 1),
                                         p.max_seqlen_k, all);
            if (__any_sync(0xffffffffu, any)) bits |= 1u << t;
            if (__all_sync(0xffffffffu, all)) full |= 1u << t;
        }
    }
    // The word: the OR of the warps' visible bits; each tile's full bit comes from its one warp.
    __shared__ uint32_t word_bits[2];  // visible, full
    if (threadIdx.x == 0) word_bits[0] = word_bits[1] = 0;
    __syncthreads();
    if (lane == 0) {
        atomicOr(&word_bits[0], bits);
        atomicOr(&word_bits[1], full);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        tile_bits[out_index] = word_bits[0];
        full_bits[out_index] = word_bits[1];
    }
}

int run_tile_visibility(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream) {
    const int64_t words = gather_kv_heads(&p) * gather_group_heads(&p) * p.batch * plan.num_m_blocks * plan.bitmap_words;
    const int64_t blocks = words;
    if (blocks == 0) return FDM_OK;
    if (blocks > 0x7fffffffLL) return FDM_ERR_GRID;
    const WorkspaceLayout &w = plan.ws;
    unsigned char *workspace = static_cast<unsigned char *>(p.workspace);
    uint32_t *tile_bits = reinterpret_cast<uint32_t *>(workspace + w.tile_bits);
    uint32_t *full_bits = reinterpret_cast<uint32_t *>(workspace + w.full_bits);
    tile_visibility_kernel<<<static_cast<unsigned>(blocks), 32 * kBitmapWarps, 0, stream>>>(p, plan, tile_bits, full_bits);
    return cudaPeekAtLastError() == cudaSuccess ? FDM_OK : FDM_ERR_CUDA;
}

}  // namespace fdm
