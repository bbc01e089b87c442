// fwd_kernel.cuh: the varlen attention forward kernel (SPEC.md section 1) on tensor cores.
//
// One CTA computes one (row block of kBlockM rows, head block, sequence b, key range) with 4
// warps, or 2 warpgroups in the warpgroup layout (kBlockM: of the instantiation's tile,
// tiles.cuh). A row is one (query, head) pair: with packed GQA (launch_plan.h) the P heads of a KV
// group share a CTA, so row R is query R / P of head h0 + R % P; without it P = 1.
// For every visible key tile n (kBlockN keys) of the CTA's key range, Math (tile_math.cuh:
// RowSplitMath or KeySplitMath; warpgroup_math.cuh: WarpgroupMath; the plan's choice) computes
// S = Q K_n^T, the masked online softmax and O += P V_n.
// K/V tiles are copied with cp.async into a ring of Tile::kStages stages: the next kStages - 1
// visible tiles are in flight while tile n is computed.
// Key tiles whose mask hides every pair are never loaded (a query-based mask's tiles are tested
// up front by tile_visibility.cu), and with gathered keys a tile holds only visible keys
// (key_tiles.cuh). With split-KV the CTA writes its normalized partial O and lse
// to the workspace for the combine kernel.
#pragma once

#include <type_traits>

#include "../fdm_params.h"
#include "key_tiles.cuh"
#include "launch_plan.h"
#include "masking.cuh"
#include "pdl.cuh"
#include "tile_math.cuh"
#include "tiles.cuh"
#include "warpgroup_math.cuh"
#include "wgmma.cuh"

namespace fdm {

// kLayout: the plan's layout (RowSplitMath, KeySplitMath or WarpgroupMath). kStagedMask: the
// plan's staged_query_mask (a query-based byte mask copied per tile into shared memory); a path of
// its own, so that calls without one run code that does not carry it.
template <class T, int kHeadDim, FwdLayout kLayout, bool kStagedMask>
__global__ void __launch_bounds__(FwdTileOf<kHeadDim, kLayout, kStagedMask>::kThreads)
    fwd_kernel(const __grid_constant__ fdm_params p, const FwdPlan launch_plan) {
    // A staged query-based mask rules out gathered keys (those need a key-based mask): the
    // kernels for it leave that path out.
    FwdPlan plan = launch_plan;
    if constexpr (kStagedMask) plan.gather = 0;
    constexpr bool kKeySplit = kLayout == FwdLayout::kKeys;
    using Tile = FwdTileOf<kHeadDim, kLayout, kStagedMask>;
    using Math = std::conditional_t<kLayout == FwdLayout::kWarpgroups, WarpgroupMath<T, Tile>,
                                    std::conditional_t<kKeySplit, KeySplitMath<T, Tile>, RowSplitMath<T, Tile>>>;
    constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
    // Launched programmatically (pdl.cuh: after the row schedule, the key compaction or the tile
    // test), the CTA waits for that pass's output before its first read of it (below), so that
    // its own set-up and Q copy overlap the pass's tail; the combine may be scheduled from now on.
    let_dependents_launch();

    // The CTA order (launch_plan.h, use_rows_first), with row block m_block = num_m_blocks - 1 - m_rev:
    //   rows_first: blockIdx.x = ((m_rev * B + b) * head_blocks + head_block) * num_splits + split
    //   else:       blockIdx.x = ((b * head_blocks + head_block) * num_m_blocks + m_rev) * num_splits + split
    //   key split:  blockIdx.x = ((b * num_m_blocks + m_rev) * num_splits + split) * head_blocks + head_block
    // (the key split's head blocks of one key range run side by side: their K/V rows are neighbours)
    // With a row schedule (row_schedule.cu) the same order without the row blocks past their
    // sequence: (b, m_block, head_block) = schedule[blockIdx.x / num_splits].
    // (32-bit index math by the plan's divisors: the grid holds fewer than 2^31 CTAs, FDM_ERR_GRID.)
    // step(d): idx = idx / d, returning idx % d.
    int idx = static_cast<int>(blockIdx.x);
    const auto step = [&](const Divisor &d) {
        const QuotRem qr = divmod(d, idx);
        idx = qr.quot;
        return qr.rem;
    };
    const bool heads_inner = kKeySplit && !plan.row_schedule && !plan.rows_first;
    int head_block = heads_inner ? step(plan.div.head_blocks) : 0;
    const int split = step(plan.div.splits);
    const int P = plan.heads_per_cta;
    int b;
    int m_block;
    if (plan.row_schedule) {
        wait_for_prior_grid();
        const WorkspaceLayout &w = plan.ws;
        const int4 slot = reinterpret_cast<const int4 *>(static_cast<const unsigned char *>(p.workspace) + w.schedule)[idx];
        if (slot.x < 0) return;
        b = slot.x;
        m_block = slot.y;
        head_block = slot.z;
    } else if (plan.rows_first) {
        head_block = step(plan.div.head_blocks);
        b = step(plan.div.batch);
        m_block = plan.num_m_blocks - 1 - idx;
    } else {
        if (!heads_inner) head_block = step(plan.div.head_blocks);
        m_block = plan.num_m_blocks - 1 - step(plan.div.m_blocks);
        b = idx;
    }
    const int h0 = head_block * P;  // first query head of the CTA

    MaskContext ctx;
    ctx.seq = fdm_seq_of(&p, b);
    ctx.seq.len_k = min_i64(ctx.seq.len_k, p.max_seqlen_k);  // query-based rows hold max_seqlen_k keys at most
    ctx.hk = divide(plan.div.group, h0);
    ctx.g = h0 - static_cast<int>(ctx.hk) * plan.div.group.d;
    ctx.heads_per_cta = plan.div.heads;
    ctx.m0 = m_block * kBlockM;
    ctx.is_causal = p.is_causal;
    ctx.key_bias0 = p.bias.layout == FDM_LAYOUT_KEY ? fdm_operand_offset(&p.bias, &ctx.seq, ctx.hk, ctx.g, 0, 0) : 0;
    ctx.key_mask0 = p.mask.layout == FDM_LAYOUT_KEY ? fdm_operand_offset(&p.mask, &ctx.seq, ctx.hk, ctx.g, 0, 0) : 0;
    if (ctx.m0 >= ctx.seq.len_q * P) return;
    const int valid_rows = static_cast<int>(min_i64(kBlockM, ctx.seq.len_q * P - ctx.m0));

    // Keys past the causal limit of the block's last query are never visited; this CTA's key range
    // is tiles [n_begin, n_stop) (virtual tiles of the gathered chunks when gathering).
    ctx.key_end = ctx.seq.len_k;
    if (p.is_causal)
        ctx.key_end = min_i64(ctx.key_end, fdm_causal_last_key(&ctx.seq, divide(plan.div.heads, ctx.m0 + valid_rows - 1)) + 1);
    int num_n_tiles = 0;
    if (ctx.key_end > 0)
        num_n_tiles = plan.gather ? static_cast<int>((ctx.key_end + kGatherChunkOf<Tile> - 1) / kGatherChunkOf<Tile>) *
                                        kTilesPerChunk<Tile>
                                  : static_cast<int>((ctx.key_end + kBlockN - 1) / kBlockN);
    const int n_begin = split * plan.tiles_per_split;
    const int n_stop = static_cast<int>(min_i64(num_n_tiles, n_begin + plan.tiles_per_split));
    const GatheredKeys gathered = plan.gather ? GatheredKeys::of(p, plan, ctx) : GatheredKeys{nullptr, nullptr};
    const TileBitmap bitmap = plan.tile_bitmap ? TileBitmap::of(p, plan, ctx, m_block) : TileBitmap{nullptr, nullptr, 0, 0};

    extern __shared__ __align__(16) unsigned char smem_start[];
    unsigned char *smem = smem_start;
    // The swizzled tiles of the warpgroup layout start at the next 1024-byte boundary (its tile's
    // smem_bytes holds the slack).
    if constexpr (kLayout == FwdLayout::kWarpgroups)
        smem += (kSwizzleAlign - smem_addr(smem_start) % kSwizzleAlign) % kSwizzleAlign;
    // Q/K/V tiles: (rows, kRowStride) padded, or (rows, kHeadDim) swizzled (Tile::offset).
    T *q_s = reinterpret_cast<T *>(smem);                                 // (kBlockM, D)
    T *k_s = q_s + Tile::kQElems;                                         // (kStages, kBlockN, D)
    T *v_s = k_s + Tile::kStages * Tile::kKVElems;                        // (kStages, kBlockN, D)
    int64_t *row_s = reinterpret_cast<int64_t *>(v_s + Tile::kStages * Tile::kKVElems);  // (kStages, kBlockN)
    float *bias_s = reinterpret_cast<float *>(row_s + Tile::kStages * kBlockN);          // (kStages, kBlockN)
    int *key_s = reinterpret_cast<int *>(bias_s + Tile::kStages * kBlockN);              // (kStages, kBlockN)
    uint8_t *keep_s = reinterpret_cast<uint8_t *>(key_s + Tile::kStages * kBlockN);      // (kStages, kBlockN)
    uint8_t *qmask_s = keep_s + Tile::kStages * kBlockN;  // (kStages, kBlockM, kQMaskStride), staged masks only
    const auto qmask_stage = [&](int stage) -> uint8_t * {
        if constexpr (kStagedMask)
            return qmask_s + stage * Tile::kQMaskStageBytes;
        else
            return nullptr;
    };
    const auto key_stage = [&](int stage) {
        return KeyStage{row_s + stage * kBlockN, bias_s + stage * kBlockN, key_s + stage * kBlockN,
                        keep_s + stage * kBlockN};
    };

    // Q rows of the block: row r is query (m0 + r) / P of head h0 + (m0 + r) % P.
    const T *q_g = static_cast<const T *>(p.q) + ctx.seq.q_start * p.q_row_stride + h0 * p.q_head_stride;
    const int head_dim = static_cast<int>(p.head_dim);
    load_rows_async<Tile, kBlockM>(
        q_s,
        [&](int r) -> const T * {
            const int packed = ctx.m0 + r, i = divide(plan.div.heads, packed);  // query i, head packed % P
            return r < valid_rows ? q_g + i * p.q_row_stride + (packed - i * plan.div.heads.d) * p.q_head_stride : nullptr;
        },
        q_g, head_dim);
    cp_async_commit();
    wait_for_prior_grid();  // the gathered lists and tile bits are read from here on

    // Finds the first visible key tile at or after n, staging its per-key data in `stage` and
    // fetching ahead the per-key data of the tile that may follow it.
    KeyColumn fetched_ahead;
    fetched_ahead.n = -1;
    auto next_visible = [&](int n, int stage) {
        while (true) {
            if (plan.gather) n = skip_empty_subtiles<Tile>(gathered, n, n_stop);
            if (plan.tile_bitmap) n = bitmap.next(n, n_stop);
            if (n >= n_stop || prepare_key_tile<Tile, kStagedMask>(p, plan, ctx, gathered, bitmap, n, n_stop,
                                                                   key_stage(stage), fetched_ahead))
                return n;
            // A gathered tile is hidden only when its first key is at or past key_end; the lists
            // ascend, so every tile after it is hidden too.
            if (plan.gather) return n_stop;
            ++n;
        }
    };
    // Bit s: the tile in stage s is full (TileBitmap::full), so its staged mask block is neither
    // copied nor tested.
    unsigned full_stages = 0;
    auto load_kv_async = [&](int n, int stage) {
        bool full = false;
        if constexpr (kStagedMask) full = plan.tile_bitmap && bitmap.full(n);
        full_stages = (full_stages & ~(1u << stage)) | (unsigned(full) << stage);
        load_key_tile_async<Tile>(p, plan, ctx, gathered, n, key_stage(stage), k_s + stage * Tile::kKVElems,
                                  v_s + stage * Tile::kKVElems, full ? nullptr : qmask_stage(stage));
    };

    // After the last tile the K/V stages are free: KeySplitMath merges its warps' results there.
    Math math(ctx, valid_rows, reinterpret_cast<unsigned char *>(k_s));

    int stage = 0;
    int n = next_visible(n_begin, stage);
    const bool any_tile = n < n_stop;  // (uniform: next_visible returns the same n in every thread)
    if (any_tile) load_kv_async(n, stage);

    const auto operands = [&](int stage) {
        const bool full = (full_stages >> stage) & 1u;
        return TileOperands<T>{q_s, k_s + stage * Tile::kKVElems, v_s + stage * Tile::kKVElems, key_stage(stage),
                               full ? nullptr : qmask_stage(stage), plan.gather != 0, full};
    };
    if constexpr (kLayout == FwdLayout::kWarpgroups) {
        // One barrier per tile: it publishes tile n (landed, and fenced for the tensor cores' reads)
        // and tells that every warpgroup is done with tile n - 1, whose stage the next visible tile
        // then refills; the step starts that copy once its own S = Q K^T is under way.
        static_assert(Tile::kStages == 2, "the warpgroup layout double-buffers its K/V tiles");
        while (n < n_stop) {
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads();
            int n_next = n_stop;
            math.step(operands(stage), p, ctx, n, [&] {
                n_next = next_visible(n + 1, stage ^ 1);
                if (n_next < n_stop) load_kv_async(n_next, stage ^ 1);
            });
            n = n_next;
            stage ^= 1;
        }
    } else {
        // A ring of kStages stages: while tile n is computed (in `stage`), the next kAhead visible
        // tiles are in flight, ahead[i] in stage + 1 + i (mod kStages); n_stop past the last one.
        constexpr int kAhead = Tile::kStages - 1;
        const auto stage_after = [](int s, int k) { return (s + k) % Tile::kStages; };
        int ahead[kAhead];
        int last = n;  // the last tile whose copy was started (n_stop: no more)
#pragma unroll
        for (int i = 0; i + 1 < kAhead; ++i) {  // all but the last slot; each step fills that one
            last = last < n_stop ? next_visible(last + 1, stage_after(stage, 1 + i)) : n_stop;
            if (last < n_stop) load_kv_async(last, stage_after(stage, 1 + i));
            ahead[i] = last;
        }
        while (n < n_stop) {
            last = last < n_stop ? next_visible(last + 1, stage_after(stage, kAhead)) : n_stop;
            if (last < n_stop) load_kv_async(last, stage_after(stage, kAhead));
            ahead[kAhead - 1] = last;
            int in_flight = 0;  // copies started after tile n's, which may stay pending
#pragma unroll
            for (int i = 0; i < kAhead; ++i) in_flight += ahead[i] < n_stop;
            cp_async_wait_at_most<kAhead>(in_flight);
            __syncthreads();
            math.step(operands(stage), p, ctx, n);
            __syncthreads();  // every warp is done with `stage` before it is refilled
            n = ahead[0];
#pragma unroll
            for (int i = 0; i + 1 < kAhead; ++i) ahead[i] = ahead[i + 1];
            stage = stage_after(stage, 1);
        }
    }
    cp_async_wait<0>();  // the Q copy, when no key tile was visible

    // out = O / l, lse = ln l + m; rows past the sequence are not written. With split-KV this
    // CTA's partial goes to the workspace: o_partial (splits, total_q, H, D), lse_partial (splits, H, total_q).
    math.finalize();
    const WorkspaceLayout &w = plan.ws;
    float *o_partial = reinterpret_cast<float *>(static_cast<unsigned char *>(p.workspace) + w.o_partial);
    float *lse_partial = reinterpret_cast<float *>(static_cast<unsigned char *>(p.workspace) + w.lse_partial);
    // Row `row` of the block: query q_start + q, head h0 + h, with q = (m0 + row) / P, h = (m0 + row) % P.
    const auto q_row_of = [&](int row) -> int64_t { return ctx.seq.q_start + divmod(plan.div.heads, ctx.m0 + row).quot; };
    const auto head_of = [&](int row) -> int64_t { return h0 + divmod(plan.div.heads, ctx.m0 + row).rem; };
    const auto out_row_of = [&](int row) -> T * {  // its row of out, nullptr past the sequence
        if (row >= valid_rows) return nullptr;
        return static_cast<T *>(p.out) + q_row_of(row) * p.out_row_stride + head_of(row) * p.out_head_stride;
    };
    bool stored = false;
    if constexpr (kLayout == FwdLayout::kWarpgroups) {
        // out (T) through the Q tile in 16-byte chunks (WarpgroupMath::store_output; out's rows are
        // 16-byte aligned: the binding allocates it contiguous, D a multiple of 8).
        if (plan.num_splits == 1) {
            // Each thread waited for its own copies only: without a tile step (and its barrier)
            // another thread's Q copy may still land where this one writes O.
            if (!any_tile) __syncthreads();
            math.store_output(q_s, out_row_of, head_dim);
            stored = true;
        }
    }
    if (!stored) {
        // A result row's destination, computed once per row: its row of out (T) or of o_partial
        // (float), nullptr past the sequence.
        const auto out_row = [&](int row) -> unsigned char * {
            if (plan.num_splits == 1) return reinterpret_cast<unsigned char *>(out_row_of(row));
            if (row >= valid_rows) return nullptr;
            return reinterpret_cast<unsigned char *>(
                o_partial + ((split * p.total_q + q_row_of(row)) * p.num_heads + head_of(row)) * head_dim);
        };
        math.for_each_output(out_row, [&](unsigned char *dst, int col, float o0, float o1) {
            if (dst == nullptr || col >= head_dim) return;
            if (plan.num_splits == 1)
                *reinterpret_cast<uint32_t *>(reinterpret_cast<T *>(dst) + col) = pack2<T>(o0, o1);
            else
                *reinterpret_cast<float2 *>(reinterpret_cast<float *>(dst) + col) = make_float2(o0, o1);
        });
    }
    math.for_each_lse([&](int row, float lse) {
        if (row >= valid_rows) return;
        const int64_t q_row = q_row_of(row), h = head_of(row);
        if (plan.num_splits == 1)
            p.lse[h * p.lse_head_stride + q_row] = lse;
        else
            lse_partial[(split * p.num_heads + h) * p.total_q + q_row] = lse;
    });
}

}  // namespace fdm
