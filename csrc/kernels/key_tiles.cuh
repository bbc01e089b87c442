// key_tiles.cuh: which keys a key tile holds, and staging their per-key data before its K/V load.
//
// A CTA visits key tiles n = 0, 1, ... of its key range. A tile is one of
//   contiguous: keys j = n * kBlockN + c, c < kBlockN (the plain path);
//   gathered:   with a key-based mask and plan.gather, subtile t = n % tiles_per_chunk of chunk
//               ch = n / tiles_per_chunk: entries t * kBlockN + c of the chunk's list of visible
//               keys (key_gather.cu wrote it; a chunk whose keys are all visible is read as the
//               contiguous range, without its list).
// prepare_key_tile stages, per key column c of the tile, into one pipeline stage:
//   row[c]  = the K/V row of key j (fdm_key_row: packed row or page slot), -1 past the keys
//   key[c]  = j, or kNoKey past the keys (gathered tiles only)
//   bias[c] = key-based bias of key j (0 past the keys)
//   keep[c] = key-based mask of key j (contiguous tiles only; gathered keys are all kept)
// and tells whether the tile holds any visible (query, key) pair: tiles that do not are skipped
// before any K/V byte is loaded.
#pragma once

#include <stdint.h>

#include "../fdm_params.h"
#include "launch_plan.h"
#include "masking.cuh"
#include "tiles.cuh"

namespace fdm {

constexpr int kNoKey = 0x7fffffff;  // key[c] of an empty column: above every causal limit

// One pipeline stage's per-key staging in shared memory, (kBlockN,) each.
struct KeyStage {
    int64_t *row;
    float *bias;
    int *key;
    uint8_t *keep;
};

// The gathered key lists of one CTA's (sequence, mask head).
struct GatheredKeys {
    const int32_t *keys;    // (len_k,): chunk ch's visible keys start at keys[ch * kGatherChunk]
    const int32_t *counts;  // (max_chunks,): visible keys per chunk

    __device__ static GatheredKeys of(const fdm_params &p, const FwdPlan &plan, const MaskContext &c) {
        const WorkspaceLayout w = workspace_layout(&p, &plan);
        const unsigned char *base = static_cast<const unsigned char *>(p.workspace);
        const int64_t head = gather_list_head(&p, c.hk, c.g);
        GatheredKeys g;
        g.keys = reinterpret_cast<const int32_t *>(base + w.keys) + head * p.total_k + c.seq.k_start;
        g.counts = reinterpret_cast<const int32_t *>(base + w.counts) + (head * p.batch + c.seq.b) * plan.max_chunks;
        return g;
    }
};

// First tile at or after n that may hold a key of a gathered list: subtiles past their chunk's
// count are empty and skipped without a barrier (every thread reads the same count).
template <class Tile>
__device__ __forceinline__ int skip_empty_subtiles(const FwdPlan &plan, const GatheredKeys &g, int n, int n_stop) {
    while (n < n_stop) {
        const int chunk = n / plan.tiles_per_chunk, t = n % plan.tiles_per_chunk;
        if (t * Tile::kBlockN < g.counts[chunk]) break;
        n = (chunk + 1) * plan.tiles_per_chunk;
    }
    return n;
}

// Stages tile n (see the top of the file) and tells whether it holds a visible pair; the same
// answer in every thread. Ends with a CTA barrier whenever the K/V loader or the visibility test
// reads what other threads staged.
template <class Tile>
__device__ bool prepare_key_tile(const fdm_params &p, const FwdPlan &plan, const MaskContext &c,
                                 const GatheredKeys &gathered, int n, KeyStage st) {
    constexpr int kBlockN = Tile::kBlockN;
    const int tid = threadIdx.x;
    const bool key_mask = p.mask.ptr != nullptr && p.mask.layout == FDM_LAYOUT_KEY;
    const bool key_bias = p.bias.ptr != nullptr && p.bias.layout == FDM_LAYOUT_KEY;
    const bool paged = p.block_table != nullptr;

    if (plan.gather) {
        bool any = false;
        if (tid < kBlockN) {
            const int chunk = n / plan.tiles_per_chunk;
            const int chunk_start = chunk * kGatherChunk;
            const int count = gathered.counts[chunk];
            const int chunk_len = static_cast<int>(min_i64(kGatherChunk, c.seq.len_k - chunk_start));
            const int e = (n % plan.tiles_per_chunk) * kBlockN + tid;  // entry of the chunk's list
            int j = kNoKey;
            if (e < count) j = count == chunk_len ? chunk_start + e : gathered.keys[chunk_start + e];
            const bool has_key = j != kNoKey;
            st.key[tid] = j;
            st.row[tid] = has_key ? fdm_key_row(&p, &c.seq, j) : -1;
            if (key_bias)
                st.bias[tid] = has_key ? bias_value(p.bias, fdm_operand_offset(&p.bias, &c.seq, c.hk, c.g, 0, j)) : 0.f;
            any = j < c.key_end;
        }
        return __syncthreads_or(any) != 0;
    }

    const int j0 = n * kBlockN;
    bool any = false;
    if (tid < kBlockN) {  // the loads of every staged array in flight together
        const int j = j0 + tid;
        const bool in_seq = j < c.seq.len_k;
        if (key_mask) {
            any = in_seq && mask_keeps(p.mask, fdm_operand_offset(&p.mask, &c.seq, c.hk, c.g, 0, j));
            st.keep[tid] = any;
        }
        if (key_bias)
            st.bias[tid] = in_seq ? bias_value(p.bias, fdm_operand_offset(&p.bias, &c.seq, c.hk, c.g, 0, j)) : 0.f;
        if (paged) st.row[tid] = in_seq ? fdm_key_row(&p, &c.seq, j) : -1;
    }
    if (p.mask.ptr == nullptr) {
        if (paged) __syncthreads();
        return true;
    }
    if (!key_mask) {  // query-based: scan the tile's (kBlockM, kBlockN) block of the mask
        for (int e = tid; e < Tile::kBlockM * kBlockN && !any; e += Tile::kThreads) {
            const int packed = c.m0 + e / kBlockN, j = j0 + e % kBlockN;
            const int i = packed / c.heads_per_cta, g = static_cast<int>(c.g) + packed % c.heads_per_cta;
            any = i < c.seq.len_q && j < c.seq.len_k && (!c.is_causal || j <= fdm_causal_last_key(&c.seq, i)) &&
                  mask_keeps(p.mask, fdm_operand_offset(&p.mask, &c.seq, c.hk, g, i, j));
        }
    }
    return __syncthreads_or(any) != 0;
}

// Starts the cp.async copy of tile n's K and V rows into one stage (one commit group).
template <class Tile, class T>
__device__ __forceinline__ void load_key_tile_async(const fdm_params &p, const FwdPlan &plan, const MaskContext &c,
                                                    int n, const KeyStage &st, T *k_tile, T *v_tile) {
    const int head_dim = static_cast<int>(p.head_dim);
    const T *k_head = static_cast<const T *>(p.k) + c.hk * p.k_head_stride;  // row 0 of the KV head
    const T *v_head = static_cast<const T *>(p.v) + c.hk * p.v_head_stride;
    if (plan.gather || p.block_table != nullptr) {  // rows staged by prepare_key_tile
        load_rows_async<Tile, Tile::kBlockN>(
            k_tile, [&](int r) { return st.row[r] < 0 ? nullptr : k_head + st.row[r] * p.k_row_stride; }, k_head,
            head_dim);
        load_rows_async<Tile, Tile::kBlockN>(
            v_tile, [&](int r) { return st.row[r] < 0 ? nullptr : v_head + st.row[r] * p.v_row_stride; }, v_head,
            head_dim);
    } else {  // packed rows k_start + j
        const int64_t j0 = static_cast<int64_t>(n) * Tile::kBlockN;
        const T *k_rows = k_head + (c.seq.k_start + j0) * p.k_row_stride;
        const T *v_rows = v_head + (c.seq.k_start + j0) * p.v_row_stride;
        const int64_t valid = c.seq.len_k - j0;
        load_rows_async<Tile, Tile::kBlockN>(
            k_tile, [&](int r) { return r < valid ? k_rows + r * p.k_row_stride : nullptr; }, k_head, head_dim);
        load_rows_async<Tile, Tile::kBlockN>(
            v_tile, [&](int r) { return r < valid ? v_rows + r * p.v_row_stride : nullptr; }, v_head, head_dim);
    }
    cp_async_commit();
}

}  // namespace fdm
