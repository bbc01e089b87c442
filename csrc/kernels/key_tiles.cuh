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
//   key[c]  = j, or kNoKey past the keys (read by the scores only on gathered tiles)
//   bias[c] = key-based bias of key j times log2 e (0 past the keys)
//   keep[c] = key-based mask of key j (contiguous tiles only; gathered keys are all kept)
// and, under a key-based mask, tells whether the tile holds any visible (query, key) pair: tiles
// that do not are skipped before any K/V byte is loaded. Under a query-based mask the tiles were
// tested up front (tile_visibility.cu), and TileBitmap skips the hidden ones before this.
#pragma once

#include <stdint.h>

#include "../fdm_params.h"
#include "launch_plan.h"
#include "masking.cuh"
#include "tiles.cuh"

namespace fdm {

constexpr int kNoKey = 0x7fffffff;  // key[c] of an empty column: above every causal limit

// Whether the copies of a listed gathered tile read their rows' keys from the list themselves
// (load_key_tile_async), so that staging the tile needs no CTA barrier: in the warpgroup layout,
// where that barrier sat inside the step and undid the warpgroups' stagger (prefill-c 1.10x on an
// H200, docs/notes.md version 30). The 4-warp layouts copy from the staged rows after a barrier:
// reading the list there made decode 5-8% slower.
template <class Tile>
constexpr bool kListedRowsFromList = Tile::kWarps == 8;

// Keys and subtiles of a gathered chunk (FwdPlan::tiles_per_chunk, known at compile time here).
template <class Tile>
constexpr int kGatherChunkOf = gather_chunk(Tile::kBlockN);
template <class Tile>
constexpr int kTilesPerChunk = kGatherChunkOf<Tile> / Tile::kBlockN;

// One pipeline stage's per-key staging in shared memory, (kBlockN,) each.
struct KeyStage {
    int64_t *row;
    float *bias;
    int *key;
    uint8_t *keep;
};

// The gathered key lists of one CTA's (sequence, mask head).
struct GatheredKeys {
    const int32_t *keys;    // (len_k,): chunk ch's visible keys start at keys[ch * gather_chunk]
    const int32_t *counts;  // (max_chunks,): visible keys per chunk

    __device__ static GatheredKeys of(const fdm_params &p, const FwdPlan &plan, const MaskContext &c) {
        const WorkspaceLayout &w = plan.ws;
        const unsigned char *base = static_cast<const unsigned char *>(p.workspace);
        const int64_t head = gather_list_head(&p, c.hk, c.g);
        GatheredKeys g;
        g.keys = reinterpret_cast<const int32_t *>(base + w.keys) + head * p.total_k + c.seq.k_start;
        g.counts = reinterpret_cast<const int32_t *>(base + w.counts) + (head * p.batch + c.seq.b) * plan.max_chunks;
        return g;
    }
};

// Where gathered tile n's keys come from: entries [entry0, entry0 + kBlockN) of its chunk's list,
// or, when every key of the chunk is visible (listed = false), the keys chunk_start + entry0 on.
struct GatheredTile {
    int chunk_start;  // first local key of the chunk
    int entry0;       // first list entry of the tile
    int count;        // visible keys of the chunk
    bool listed;      // the keys are read from the list (some of the chunk's keys are hidden)

    template <class Tile>
    __device__ __forceinline__ static GatheredTile of(const GatheredKeys &g, const MaskContext &c, int n) {
        GatheredTile t;
        const int chunk = n / kTilesPerChunk<Tile>;
        t.chunk_start = chunk * kGatherChunkOf<Tile>;
        t.entry0 = (n % kTilesPerChunk<Tile>) * Tile::kBlockN;
        t.count = g.counts[chunk];
        t.listed = t.count != static_cast<int>(min_i64(kGatherChunkOf<Tile>, c.seq.len_k - t.chunk_start));
        return t;
    }
};

// First tile at or after n that may hold a key of a gathered list: subtiles past their chunk's
// count are empty and skipped without a barrier (every thread reads the same count).
template <class Tile>
__device__ __forceinline__ int skip_empty_subtiles(const GatheredKeys &g, int n, int n_stop) {
    while (n < n_stop) {
        const int chunk = n / kTilesPerChunk<Tile>, t = n % kTilesPerChunk<Tile>;
        if (t * Tile::kBlockN < g.counts[chunk]) break;
        n = (chunk + 1) * kTilesPerChunk<Tile>;
    }
    return n;
}

// What thread tid < kBlockN stages for column tid of a tile, read from global memory. Fetched one
// tile ahead (prepare_key_tile), so its loads are in flight while the current tile is computed;
// mask and bias stay the stored bits until they are staged, so nothing waits on them before.
struct KeyColumn {
    int n;               // the tile it belongs to; -1: nothing fetched
    int key;             // local key index j, kNoKey past the tile's keys
    int64_t row;         // K/V row of j (-1: none; only paged tiles, and listed ones where
                         // kListedRowsFromList is false, need it)
    uint32_t bias_bits;  // key-based bias of j as stored (0 without one)
    uint32_t keep_bits;  // key-based mask of j as stored (1 when there is none to read)
};

template <class Tile>
__device__ __forceinline__ KeyColumn fetch_key_column(const fdm_params &p, const FwdPlan &plan, const MaskContext &c,
                                                      const GatheredKeys &gathered, int n) {
    KeyColumn col;
    col.n = n;
    int j = n * Tile::kBlockN + static_cast<int>(threadIdx.x);
    if (plan.gather) {
        const GatheredTile t = GatheredTile::of<Tile>(gathered, c, n);
        const int e = t.entry0 + static_cast<int>(threadIdx.x);  // entry of the chunk's list
        j = kNoKey;
        if (e < t.count) j = t.listed ? gathered.keys[t.chunk_start + e] : t.chunk_start + e;
    } else if (j >= c.seq.len_k) {
        j = kNoKey;
    }
    const bool has_key = j != kNoKey;
    col.key = j;
    col.row = has_key && ((plan.gather && !kListedRowsFromList<Tile>) || p.block_table != nullptr)
                  ? fdm_key_row(&p, &c.seq, j)
                  : -1;
    col.bias_bits = has_key && p.bias.ptr != nullptr && p.bias.layout == FDM_LAYOUT_KEY
                        ? operand_bits(p.bias, c.key_bias0 + j * p.bias.stride_k)
                        : 0u;
    const bool read_mask = has_key && !plan.gather && p.mask.ptr != nullptr && p.mask.layout == FDM_LAYOUT_KEY;
    col.keep_bits = read_mask ? operand_bits(p.mask, c.key_mask0 + j * p.mask.stride_k)
                              : (has_key ? 1u : 0u);
    return col;
}

// The tile bits of one CTA's row block under a query-based mask (tile_visibility.cu): tile n may
// hold a visible pair iff bit n is set in the words of any mask head the block's rows use, and the
// mask keeps every pair of it within the limits iff its full bit is set in all of them.
struct TileBitmap {
    const uint32_t *words;       // (bitmap_words,) of the block's first mask head: visible tiles
    const uint32_t *full_words;  // (bitmap_words,) the same for full tiles
    int64_t head_step;           // words between the block's words of consecutive mask heads
    int heads;                   // mask heads to combine: P with packed GQA over a mask that differs
                                 // per head, else 1

    __device__ static TileBitmap of(const fdm_params &p, const FwdPlan &plan, const MaskContext &c, int m_block) {
        const WorkspaceLayout &w = plan.ws;
        const unsigned char *workspace = static_cast<const unsigned char *>(p.workspace);
        const int64_t head = gather_list_head(&p, c.hk, c.g);
        TileBitmap t;
        t.head_step = p.batch * plan.num_m_blocks * plan.bitmap_words;
        const int64_t first = head * t.head_step + (c.seq.b * plan.num_m_blocks + m_block) * plan.bitmap_words;
        t.words = reinterpret_cast<const uint32_t *>(workspace + w.tile_bits) + first;
        t.full_words = reinterpret_cast<const uint32_t *>(workspace + w.full_bits) + first;
        t.heads = gather_group_heads(&p) > 1 ? c.heads_per_cta.d : 1;
        return t;
    }

    // The first tile in [n, n_stop) whose bit is set, n_stop when none; the same in every thread.
    // (Consecutive calls read the same word: an L1 hit.)
    __device__ __forceinline__ int next(int n, int n_stop) const {
        while (n < n_stop) {
            uint32_t word = 0;
            // (Loops over the mask heads stay rolled: unrolled, they were 1400 of the query-mask
            // kernel's 9400 SASS instructions, and instruction-cache misses were 6.7% of prefill-d's
            // stall samples; heads is 1 but for packed rows of per-head masks.)
#pragma unroll 1
            for (int h = 0; h < heads; ++h) word |= words[h * head_step + n / 32];
            word >>= n % 32;
            if (word != 0) return min(n + __ffs(word) - 1, n_stop);
            n = (n / 32 + 1) * 32;
        }
        return n_stop;
    }

    // Whether tile n is full: its mask need not be copied or tested.
    __device__ __forceinline__ bool full(int n) const {
        uint32_t word = 0xffffffffu;
#pragma unroll 1
        for (int h = 0; h < heads; ++h) word &= full_words[h * head_step + n / 32];
        return (word >> (n % 32)) & 1u;
    }
};

// Stages tile n (see the top of the file) into `st` and tells whether it holds a visible pair (a
// key-based mask's test; true otherwise), the same answer in every thread. `next` carries the
// columns fetched ahead: used when they are tile n's, then refilled with those of the tile after
// n (when before n_stop): n + 1, or with kFromBitmap the next one whose bit is set in `bitmap`.
// Ends with a CTA barrier whenever the K/V loader or the key-mask test reads what other threads
// staged.
template <class Tile, bool kFromBitmap>
__device__ bool prepare_key_tile(const fdm_params &p, const FwdPlan &plan, const MaskContext &c,
                                 const GatheredKeys &gathered, const TileBitmap &bitmap, int n, int n_stop,
                                 KeyStage st, KeyColumn &next) {
    const int tid = threadIdx.x;
    // (Tiles from a query-based mask's bitmap have no key-based mask.)
    const bool key_mask = !kFromBitmap && p.mask.ptr != nullptr && p.mask.layout == FDM_LAYOUT_KEY;
    bool any = false;
    if (tid < Tile::kBlockN) {
        const KeyColumn col = next.n == n ? next : fetch_key_column<Tile>(p, plan, c, gathered, n);
        const bool has_key = col.key != kNoKey;
        const bool keep = has_key && (plan.gather || !key_mask || mask_keeps_bits(p.mask, col.keep_bits));
        st.key[tid] = col.key;
        st.row[tid] = col.row;
        st.bias[tid] = col.bias_bits != 0u ? bias_from_bits(p.bias, col.bias_bits) * kLog2e : 0.f;  // log2 domain
        st.keep[tid] = keep;
        any = key_mask && keep;  // the contiguous tiles' test (gathered tiles have their own, below)
        next.n = -1;
        const int n_ahead = kFromBitmap && plan.tile_bitmap ? bitmap.next(n + 1, n_stop) : n + 1;
        if (n_ahead < n_stop) next = fetch_key_column<Tile>(p, plan, c, gathered, n_ahead);
    }
    if (!key_mask) {  // no mask, or a query-based one whose tiles TileBitmap already chose
        if (p.block_table != nullptr) __syncthreads();
        return true;
    }
    if (plan.gather) {
        // The lists are ascending, so the tile holds a visible pair iff its first key is below
        // key_end. On a chunk whose keys are all visible every thread knows that key, and the tile
        // needs no barrier; the copies of a paged tile, and of a listed one unless they read the
        // list themselves (kListedRowsFromList), read what other threads staged (its rows), and
        // after that barrier its first key is read from the stage.
        const GatheredTile g = GatheredTile::of<Tile>(gathered, c, n);
        const bool staged_list = g.listed && !kListedRowsFromList<Tile>;
        if (staged_list || p.block_table != nullptr) __syncthreads();
        const int first = !g.listed     ? g.chunk_start + g.entry0
                          : staged_list ? st.key[0]
                                        : gathered.keys[g.chunk_start + g.entry0];
        return first < c.key_end;
    }
    return __syncthreads_or(any) != 0;
}

// Copies the (kBlockM, kBlockN) block of a staged query-based mask (launch_plan.h,
// use_staged_query_mask) for tile n into a (kBlockM, kQMaskStride) shared tile: row r of the block
// (query (m0 + r) / P, group index g + (m0 + r) % P) gets mask bytes j = n * kBlockN + c. Rows past
// the sequence and columns past the mask's max_seqlen_k are zero-filled (hidden), unread.
template <class Tile>
__device__ __forceinline__ void load_query_mask_tile_async(const fdm_params &p, const MaskContext &c, int n,
                                                           uint8_t *tile) {
    constexpr int kChunksPerRow = Tile::kBlockN / 16;
    constexpr int kChunks = Tile::kBlockM * kChunksPerRow;
    constexpr int kIters = (kChunks + Tile::kThreads - 1) / Tile::kThreads;
    const uint8_t *mask = static_cast<const uint8_t *>(p.mask.ptr);
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
        const int chunk = threadIdx.x + it * Tile::kThreads;
        if (kChunks % Tile::kThreads != 0 && chunk >= kChunks) break;  // (a 32 x 32 block: 64 chunks)
        const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * 16;
        const int packed = c.m0 + row, j = n * Tile::kBlockN + col;
        const QuotRem qh = divmod(c.heads_per_cta, packed);
        const int i = qh.quot;
        const int64_t g = c.g + qh.rem;
        const int64_t left = p.max_seqlen_k - j;  // mask bytes of the row from j on
        const int bytes = i < c.seq.len_q && left > 0 ? static_cast<int>(min_i64(16, left)) : 0;
        const uint8_t *src = bytes > 0 ? mask + fdm_operand_offset(&p.mask, &c.seq, c.hk, g, i, j) : mask;
        cp_async_16_bytes(smem_addr(tile + row * Tile::kQMaskStride + col), src, bytes);
    }
}

// Starts the cp.async copy of tile n's K and V rows into one stage, and of its block of a staged
// query-based mask into qmask_tile (when not nullptr): one commit group.
template <class Tile, class T>
__device__ __forceinline__ void load_key_tile_async(const fdm_params &p, const FwdPlan &plan, const MaskContext &c,
                                                    const GatheredKeys &gathered, int n, const KeyStage &st, T *k_tile, T *v_tile,
                                                    uint8_t *qmask_tile) {
    const int head_dim = static_cast<int>(p.head_dim);
    const T *k_head = static_cast<const T *>(p.k) + c.hk * p.k_head_stride;  // row 0 of the KV head
    const T *v_head = static_cast<const T *>(p.v) + c.hk * p.v_head_stride;
    // Keys j0 + [0, valid) in packed rows, unless the tile is paged or a listed gathered one.
    int64_t j0 = static_cast<int64_t>(n) * Tile::kBlockN, valid = c.seq.len_k - j0;
    bool listed = false;
    if (plan.gather) {
        const GatheredTile g = GatheredTile::of<Tile>(gathered, c, n);
        listed = g.listed;
        j0 = g.chunk_start + g.entry0;
        valid = g.count - g.entry0;
    }
    if (p.block_table != nullptr || (listed && !kListedRowsFromList<Tile>)) {  // rows staged by prepare_key_tile
        load_kv_rows_async<Tile>(k_tile, v_tile, k_head, v_head, p.k_row_stride, p.v_row_stride,
                                 [&](int r) { return st.row[r]; }, head_dim);
    } else if (kListedRowsFromList<Tile> && listed) {
        // Column r: entry j0 + r of the chunk's list, a packed row here (not paged).
        const int32_t *entries = gathered.keys + j0;
        const int64_t k_start = c.seq.k_start;
        load_kv_rows_async<Tile>(k_tile, v_tile, k_head, v_head, p.k_row_stride, p.v_row_stride,
                                 [&](int r) { return r < valid ? k_start + entries[r] : int64_t(-1); }, head_dim);
    } else if constexpr (kRangeCopy<Tile>) {  // packed rows k_start + j0 + [0, valid)
        const int64_t row0 = c.seq.k_start + j0;
        load_kv_range_async<Tile>(k_tile, v_tile, k_head + row0 * p.k_row_stride, v_head + row0 * p.v_row_stride,
                                  p.k_row_stride, p.v_row_stride, valid, head_dim);
    } else {  // the same, where the copies do not come in whole rows (kRangeCopy)
        const int64_t row0 = c.seq.k_start + j0;
        load_kv_rows_async<Tile>(k_tile, v_tile, k_head, v_head, p.k_row_stride, p.v_row_stride,
                                 [&](int r) { return r < valid ? row0 + r : int64_t(-1); }, head_dim);
    }
    if (qmask_tile != nullptr) load_query_mask_tile_async<Tile>(p, c, n, qmask_tile);
    cp_async_commit();
}

}  // namespace fdm
