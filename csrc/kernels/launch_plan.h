// launch_plan.h: the launch heuristics of the forward, decided on the host from sizes alone (no
// device data is read, so a call can be captured in a CUDA graph), and the workspace layout they
// imply (read by the host to size it and by the kernels to address it).
//
// Four decisions, aimed at decoding (few queries, many keys) and sparse key masks:
//   packed GQA: the P = G query heads that share a KV head become rows of one CTA (row R of a
//     block is query R / P of head h0 + R % P), so each K/V tile is loaded once for all of them
//     (decode; and prefill blocks of the warpgroup layout under a query-based mask).
//   split-KV: when the CTAs are fewer than one wave, each (row block, head block) is cut
//     into num_splits key ranges computed by separate CTAs; a combine kernel merges their partial
//     outputs by their log-sum-exp (flash-decoding).
//   gathered keys: with a key-based mask, a compaction pass (key_gather.cu) lists the visible keys
//     of every chunk of gather_chunk(kBlockN) keys, and the kernel's key tiles are filled from
//     those lists, so work and K/V bytes scale with the visible keys. Tile n of a CTA is then
//     "virtual": subtile n % tiles_per_chunk of chunk n / tiles_per_chunk (empty subtiles are
//     skipped).
//   row schedule: when many sequences are shorter than max_seqlen_q, the grid holds only the row
//     blocks the batch can have (ceil(total_q P / kBlockM) + B per head block, not B x
//     num_m_blocks), and a one-CTA pass (row_schedule.cu) tells each CTA its (sequence, row
//     block, head block), in the order of the full grid with the row blocks past their sequence
//     left out. Such a row block cost about 1 us of an SM's CTA slot to read its sequence's length and exit.
//   key split: a block of at most kKeySplitRows rows (a decode block: G heads x 1-8 queries) is
//     computed with the warps splitting each key tile instead of its rows, each warp with its own
//     online softmax over its slices of the keys (tile_math.cuh), so all 4 warps work.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "../fdm_params.h"
#include "divisor.h"

namespace fdm {

constexpr int kGatherMinKeys = 2048;   // gathered keys from this max_seqlen_k on (the heuristic)
// Keys per compaction chunk for key tiles of block_n keys: 32 tiles of 64 or 128 keys, 1024 keys of
// 32-key tiles. A chunk of v visible keys fills ceil(v / block_n) tiles, the last one partly:
// longer chunks waste less (at 50% density 1024 keys make 4.5 tiles of 128 on average, 2048 keys
// 8.5, 4096 keys 16.5; at 25%, 1024 keys make 4.5 tiles of 64, 2048 keys 8.5).
FDM_HOST_DEVICE constexpr int gather_chunk(int block_n) { return block_n >= 64 ? 32 * block_n : 1024; }
constexpr int kMaxSplits = 128;        // split-KV ranges per row block at most
constexpr int kMinSplitTiles = 8;      // key tiles per range at least (amortizes the partial write)
constexpr int kWavesUniform = 1;       // a split grid holds about this many waves of CTAs when every
constexpr int kWavesMixed = 3;         // sequence has max_seqlen_k keys, and this many otherwise
constexpr int kKeySplitRows = 32;      // rows of a block the key-split layout computes at most
constexpr int kScheduleMaxBatch = 256; // sequences a row schedule serves at most (row_schedule.cu keeps them in shared memory)

// How a CTA's threads share a key tile (fwd_kernel.cuh): RowSplitMath or KeySplitMath
// (tile_math.cuh: 4 warps, mma.sync, any sm_80+ GPU) or WarpgroupMath (warpgroup_math.cuh: 2
// warpgroups, wgmma, sm_90a only).
enum class FwdLayout { kRows, kKeys, kWarpgroups };

// The workspace, in bytes from its start (every part 16-byte aligned):
//   o_partial   (num_splits, total_q, H, D) float     split-KV partial outputs   } num_splits > 1
//   lse_partial (num_splits, H, total_q) float        their log-sum-exps         }
//   keys        (list heads, total_k) int32           gathered keys: the visible local key indices
//                                                     of each chunk, ascending, from the chunk's
//                                                     first row (k_start + ch * gather_chunk)
//   counts      (list heads, B, max_chunks) int32     visible keys per chunk
//   tile_bits   (list heads, B, num_m_blocks, bitmap_words) uint32
//                                                     query-based mask: bit n of a row block's words
//                                                     = key tile n holds a visible pair of its rows
//   full_bits   (list heads, B, num_m_blocks, bitmap_words) uint32
//                                                     and bit n here = the mask keeps every pair of
//                                                     tile n within the rows' length and causal limits
//   schedule    (grid_row_blocks * head blocks) int4  row schedule: {b, m_block, head_block, 0} of
//                                                     each CTA (less its split), b = -1: none
struct WorkspaceLayout {
    size_t o_partial, lse_partial, keys, counts, tile_bits, full_bits, schedule, total;
};

// Divisors (divisor.h) of the forward's index math, fixed per launch: the CTA index's factors and
// the packed rows' heads.
struct PlanDivisors {
    Divisor heads;        // P = heads_per_cta: packed row R is query R / P of head R % P
    Divisor splits;       // num_splits
    Divisor head_blocks;  // H / P
    Divisor batch;        // B
    Divisor m_blocks;     // num_m_blocks
    Divisor group;        // G = H / H_k: query head h is group index h % G of KV head h / G
};

// Kernel argument: how the grid maps onto the problem.
struct FwdPlan {
    int heads_per_cta;      // P: query heads packed into the rows of one CTA (G or 1)
    int num_m_blocks;       // row blocks per (sequence, head block): ceil(max_seqlen_q * P / kBlockM)
    int num_splits;         // key ranges per row block (1: no split-KV)
    int tiles_per_split;    // key tiles of kBlockN (virtual tiles when gathering) per range
    int gather;             // 1: key tiles are filled from the gathered key lists
    int tiles_per_chunk;    // gather_chunk(kBlockN) / kBlockN
    int max_chunks;         // ceil(max_seqlen_k / gather_chunk(kBlockN))
    int key_split;          // 1: KeySplitMath, 0: RowSplitMath (tile_math.cuh) or WarpgroupMath
    int warpgroups;         // 1: WarpgroupMath (warpgroup_math.cuh; use_warpgroups)
    int tile_bitmap;        // 1: a query-based mask's key tiles are tested up front (tile_visibility.cu)
    int block_m;            // rows per row block (kBlockM of the instantiation)
    int block_n;            // keys per key tile (kBlockN of the instantiation)
    int bitmap_words;       // 32-bit words of tile bits per row block: ceil(key tiles / 32)
    int staged_query_mask;  // 1: each tile's (kBlockM, kBlockN) block of the query-based mask is
                            // copied to shared memory with its K/V (use_staged_query_mask)
    int rows_first;         // CTA order (fwd_kernel.cuh): 1: row blocks outermost, 0: sequences and
                            // heads outermost (use_rows_first)
    int programmatic;       // 1: the next launch may start during the tail of the kernel before it
                            // (pdl.cuh); the launcher sets it per launch
    int row_schedule;       // 1: CTAs read their (sequence, row block, head block) from the row
                            // schedule in the workspace (use_row_schedule, row_schedule.cu)
    int grid_row_blocks;    // row blocks per head block in the grid: B * num_m_blocks, or with a
                            // row schedule the most the batch can have
    PlanDivisors div;       // (set last by make_plan, from the fields above)
    WorkspaceLayout ws;     // workspace_layout(p, this), set last by make_plan: the kernels read
                            // their parts' offsets here instead of recomputing them
};

// Gathered key lists and tile bitmaps are kept per distinct mask head: h' = H gives one list per query head,
// h' = H_k one per KV head, h' = 1 one in all (the mask's zero strides say which).
// (The group size in 32-bit arithmetic: the binding refuses 2^31 heads or more.)
FDM_HOST_DEVICE int64_t gather_kv_heads(const fdm_params *p) { return p->mask.stride_kv_head != 0 ? p->num_heads_k : 1; }
FDM_HOST_DEVICE int64_t gather_group_heads(const fdm_params *p) {
    return p->mask.stride_group != 0 ? static_cast<int32_t>(p->num_heads) / static_cast<int32_t>(p->num_heads_k) : 1;
}
FDM_HOST_DEVICE int64_t gather_list_head(const fdm_params *p, int64_t hk, int64_t g) {
    return (gather_kv_heads(p) > 1 ? hk : 0) * gather_group_heads(p) + (gather_group_heads(p) > 1 ? g : 0);
}

FDM_HOST_DEVICE size_t align16(size_t n) { return (n + 15) / 16 * 16; }

FDM_HOST_DEVICE WorkspaceLayout workspace_layout(const fdm_params *p, const FwdPlan *plan) {
    WorkspaceLayout w;
    size_t at = 0;
    const size_t split_rows = plan->num_splits > 1 ? static_cast<size_t>(plan->num_splits) * p->total_q * p->num_heads : 0;
    w.o_partial = at;
    at += align16(split_rows * p->head_dim * sizeof(float));
    w.lse_partial = at;
    at += align16(split_rows * sizeof(float));
    const size_t list_heads = plan->gather ? static_cast<size_t>(gather_kv_heads(p) * gather_group_heads(p)) : 0;
    w.keys = at;
    at += align16(list_heads * p->total_k * sizeof(int32_t));
    w.counts = at;
    at += align16(list_heads * p->batch * plan->max_chunks * sizeof(int32_t));
    const size_t bitmap_heads = plan->tile_bitmap ? static_cast<size_t>(gather_kv_heads(p) * gather_group_heads(p)) : 0;
    const size_t bitmap_bytes = align16(bitmap_heads * p->batch * plan->num_m_blocks * plan->bitmap_words * sizeof(uint32_t));
    w.tile_bits = at;
    at += bitmap_bytes;
    w.full_bits = at;
    at += bitmap_bytes;
    w.schedule = at;
    if (plan->row_schedule)
        at += static_cast<size_t>(plan->grid_row_blocks) * (p->num_heads / plan->heads_per_cta) * 4 * sizeof(int32_t);
    w.total = at;
    return w;
}

// Packed GQA needs every key-based operand to be the same for the heads of a group (h' != H).
inline bool heads_share_key_operands(const fdm_params &p) {
    const bool mask_ok = p.mask.ptr == nullptr || p.mask.layout == FDM_LAYOUT_QUERY || p.mask.stride_group == 0;
    const bool bias_ok = p.bias.ptr == nullptr || p.bias.layout == FDM_LAYOUT_QUERY || p.bias.stride_group == 0;
    return p.num_heads / p.num_heads_k > 1 && mask_ok && bias_ok;
}

// Packed GQA for short query blocks (decode), where it saves the most.
inline bool can_pack_gqa(const fdm_params &p, int block_m) {
    return heads_share_key_operands(p) && p.max_seqlen_q * (p.num_heads / p.num_heads_k) <= 2 * block_m;
}

// The gathered-key path pays off once a sequence spans a few chunks; FLASH_DMATTN_GATHER_KEYS
// (p.force_gather) overrides the choice.
inline bool use_gather(const fdm_params &p) {
    if (p.mask.ptr == nullptr || p.mask.layout != FDM_LAYOUT_KEY || p.max_seqlen_k == 0) return false;
    if (p.force_gather >= 0) return p.force_gather != 0;
    return p.max_seqlen_k >= kGatherMinKeys;
}

// A query-based byte mask whose rows all start 16-byte aligned is copied block by block into
// shared memory with cp.async, with the tile's K and V, so its reads never stall the scores;
// any other query-based mask is read element by element from global memory.
inline bool use_staged_query_mask(const fdm_params &p) {
    const fdm_operand &m = p.mask;
    if (m.ptr == nullptr || m.layout != FDM_LAYOUT_QUERY || m.dtype != FDM_BYTE || m.stride_k != 1) return false;
    const int64_t strides = m.stride_q | m.stride_kv_head | m.stride_group | m.stride_seq;
    return reinterpret_cast<uintptr_t>(m.ptr) % 16 == 0 && strides % 16 == 0;
}

// Rows of a block: with packed GQA, max_seqlen_q * G; else max_seqlen_q.
inline int64_t block_rows(const fdm_params &p, int block_m) {
    return p.max_seqlen_q * (can_pack_gqa(p, block_m) ? p.num_heads / p.num_heads_k : 1);
}

// The key-split layout when every row block has at most kKeySplitRows rows (decode): RowSplitMath
// would leave 2-3 of the 4 warps idle. FLASH_DMATTN_KEY_SPLIT overrides it (1 is honoured only
// for such blocks: the layout holds no more rows).
inline bool use_key_split(const fdm_params &p, int block_m) {
    const bool fits = block_rows(p, block_m) <= kKeySplitRows;
    if (p.force_key_split >= 0) return p.force_key_split != 0 && fits;
    return fits;
}

// The warpgroup layout under a staged query-based mask: when the mask is the same for the G >= 2
// heads of a KV group, they are packed into its 128-row blocks whatever the queries (block row R
// is query R / G of head h0 + R % G), so a block holds 128 / G queries, and with 64-key tiles
// (tiles.cuh, WarpgroupTile) a block mask of 64 x 64 tiles hides as many of its tiles as of the row
// split's 64-query blocks, where 128 queries of one head would see twice as many (docs/notes.md,
// version 25).
inline bool warpgroups_take_query_mask(const fdm_params &p) {
    return use_staged_query_mask(p) && p.mask.stride_group == 0 && heads_share_key_operands(p);
}

// The warpgroup layout (wgmma, warpgroup_math.cuh) for the blocks the row split would take
// (prefill), where `available` (an sm_90a build on a Hopper GPU) and the tile head dim is one of
// its tiles (64, 128, 256). Under a query-based mask only as warpgroups_take_query_mask says: the
// 4-warp row split's 64 x 64 tiles serve the others. FLASH_DMATTN_WARPGROUPS (p.force_warpgroups)
// overrides the choice within those limits.
inline bool use_warpgroups(const fdm_params &p, bool key_split, bool head_dim_ok, bool available) {
    if (!available || !head_dim_ok) return false;
    if (p.mask.ptr != nullptr && p.mask.layout == FDM_LAYOUT_QUERY && !warpgroups_take_query_mask(p)) return false;
    if (p.force_warpgroups >= 0) return p.force_warpgroups != 0;
    return !key_split;
}

// Packed GQA (P = G heads per CTA): short blocks (can_pack_gqa), and the warpgroup layout under a
// query-based mask (warpgroups_take_query_mask).
inline bool use_packed_gqa(const fdm_params &p, int block_m, bool warpgroups) {
    return can_pack_gqa(p, block_m) || (warpgroups && warpgroups_take_query_mask(p));
}

// The order of the CTAs. Either way a head's last row blocks (causal: the most keys) start first.
// Sequences and heads outermost keeps the CTAs running at once on a few heads' K/V, which stay in
// L2; row blocks outermost runs every sequence's and head's block m at once, so the longest
// sequences' blocks all start first and short ones fill the tail, but the K/V of the whole batch
// is in use at once. On the H100 prefill benchmark (docs/notes.md) rows-first was 4% slower at
// D = 128 (82 MB of K/V against 50 MB of L2) and 5% faster at D = 64 (41 MB), and 14% faster with
// a block-sparse query mask, whose CTAs read only a tenth of their keys.
inline bool use_rows_first(const fdm_params &p, const FwdPlan &plan, int64_t l2_bytes) {
    if (plan.tile_bitmap) return true;
    const int64_t keys = p.total_k > 0 ? p.total_k : p.batch * p.max_seqlen_k;
    return keys * p.num_heads_k * p.head_dim * 2 * 2 <= l2_bytes;  // K and V, 2-byte elements
}

// The row schedule when it leaves out at least a quarter of the grid's row blocks (and the batch
// has at most kScheduleMaxBatch sequences); FLASH_DMATTN_ROW_SCHEDULE (p.force_row_schedule)
// overrides the choice within the batch limit. `bound`: the row blocks per head block the batch
// can have, ceil(total_q P / block_m) + B (every sequence wastes less than one block).
inline bool use_row_schedule(const fdm_params &p, int64_t full, int64_t bound) {
    if (p.batch > kScheduleMaxBatch || full == 0) return false;
    if (p.force_row_schedule >= 0) return p.force_row_schedule != 0;
    return bound * 4 <= full * 3;
}

// ctas_per_sm: resident CTAs of this instantiation per SM (tiles.cuh, fwd_ctas_per_sm);
// warpgroups: the launcher's choice of the warpgroup layout (use_warpgroups, knowing the GPU).
inline FwdPlan make_plan(const fdm_params &p, int block_m, int block_n, int num_sms, int ctas_per_sm, bool warpgroups) {
    FwdPlan plan;
    plan.heads_per_cta = use_packed_gqa(p, block_m, warpgroups) ? static_cast<int>(p.num_heads / p.num_heads_k) : 1;
    plan.key_split = !warpgroups && use_key_split(p, block_m) ? 1 : 0;
    plan.warpgroups = warpgroups ? 1 : 0;
    plan.block_m = block_m;
    plan.block_n = block_n;
    plan.tile_bitmap = p.mask.ptr != nullptr && p.mask.layout == FDM_LAYOUT_QUERY && p.max_seqlen_k > 0 ? 1 : 0;
    plan.bitmap_words = static_cast<int>(((p.max_seqlen_k + block_n - 1) / block_n + 31) / 32);
    plan.staged_query_mask = use_staged_query_mask(p) ? 1 : 0;
    plan.rows_first = 0;  // the launcher sets it (use_rows_first), knowing the device's L2
    plan.programmatic = 0;  // the launcher sets it per launch
    plan.num_m_blocks = static_cast<int>((p.max_seqlen_q * plan.heads_per_cta + block_m - 1) / block_m);
    const int64_t full_rows = static_cast<int64_t>(plan.num_m_blocks) * p.batch;
    const int64_t bound_rows = (p.total_q * plan.heads_per_cta + block_m - 1) / block_m + p.batch;
    plan.row_schedule = use_row_schedule(p, full_rows, bound_rows) ? 1 : 0;
    // (Clamped to the int range: a grid that large is refused by the launcher, FDM_ERR_GRID.)
    const int64_t grid_rows = plan.row_schedule && bound_rows < full_rows ? bound_rows : full_rows;
    plan.grid_row_blocks = static_cast<int>(grid_rows < 0x7fffffffLL ? grid_rows : 0x7fffffffLL);
    plan.gather = use_gather(p) ? 1 : 0;
    const int chunk = gather_chunk(block_n);
    plan.tiles_per_chunk = chunk / block_n;
    plan.max_chunks = static_cast<int>((p.max_seqlen_k + chunk - 1) / chunk);
    const int64_t key_tiles = plan.gather ? static_cast<int64_t>(plan.max_chunks) * plan.tiles_per_chunk
                                          : (p.max_seqlen_k + block_n - 1) / block_n;
    const int64_t head_blocks = p.num_heads / plan.heads_per_cta;
    const int64_t ctas = static_cast<int64_t>(plan.grid_row_blocks) * head_blocks;
    const int64_t slots = static_cast<int64_t>(num_sms) * (ctas_per_sm > 0 ? ctas_per_sm : 1);
    int64_t splits = 1;
    if (p.force_num_splits > 0) {
        splits = p.force_num_splits;
    } else if (ctas > 0 && num_sms > 0 && ctas * key_tiles <= slots) {
        // A tiny problem (one wave even at one key tile per CTA, e.g. a small decode batch): its
        // time is the latency of one CTA's tile chain, so each CTA takes a single tile.
        splits = key_tiles;
    } else if (ctas > 0 && num_sms > 0 && ctas < slots && key_tiles >= 2 * kMinSplitTiles) {
        // Fewer CTAs than one wave: split. The whole grid's key-tile work comes from the host-known
        // total_k (the lengths themselves stay on the device; a paged cache without key-based
        // operands leaves total_k unknown, 0, and its bound B * max_seqlen_k serves): ranges of
        // about work / (waves * slots) tiles keep every SM busy to the end even when the
        // lengths differ widely. (dev/sweep_splits.py measures this choice against fixed ones.)
        const int64_t keys = p.total_k > 0 ? p.total_k : p.batch * p.max_seqlen_k;
        const int64_t work = plan.num_m_blocks * head_blocks * ((keys + block_n - 1) / block_n);
        // Equal lengths (total_k = B * max_seqlen_k) split into equal CTAs: one wave, no tail.
        // Mixed lengths leave ragged last ranges: more, smaller waves balance them.
        const int64_t waves = p.total_k == p.batch * p.max_seqlen_k ? kWavesUniform : kWavesMixed;
        int64_t per_split = (work + waves * slots - 1) / (waves * slots);
        if (per_split < kMinSplitTiles) per_split = kMinSplitTiles;
        splits = (key_tiles + per_split - 1) / per_split;
    }
    if (splits > kMaxSplits) splits = kMaxSplits;
    if (splits > key_tiles) splits = key_tiles;
    if (splits < 1) splits = 1;
    // Equal ranges; then drop ranges left empty by the rounding.
    plan.tiles_per_split = static_cast<int>((key_tiles + splits - 1) / splits);
    if (plan.tiles_per_split < 1) plan.tiles_per_split = 1;
    plan.num_splits = static_cast<int>((key_tiles + plan.tiles_per_split - 1) / plan.tiles_per_split);
    if (plan.num_splits < 1) plan.num_splits = 1;
    plan.div.heads = make_divisor(plan.heads_per_cta);
    plan.div.splits = make_divisor(plan.num_splits);
    plan.div.head_blocks = make_divisor(static_cast<int>(head_blocks));
    plan.div.batch = make_divisor(static_cast<int>(p.batch));
    plan.div.m_blocks = make_divisor(plan.num_m_blocks);
    plan.div.group = make_divisor(static_cast<int>(p.num_heads / p.num_heads_k));
    plan.ws = workspace_layout(&p, &plan);
    return plan;
}

}  // namespace fdm
