// tiles.cuh: tile shapes of the forward kernel and the tensor-core primitives it is built from
// (cp.async global->shared copies, ldmatrix shared->register loads, mma.sync m16n8k16).
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), lane = 4 * gid + tig (gid = lane / 4, tig = lane % 4):
//   A (16 x 16, row-major): a0 = A[gid][2tig..+1], a1 = A[gid+8][2tig..+1], a2 = A[gid][8+2tig..+1],
//                           a3 = A[gid+8][8+2tig..+1]
//   B (16 x 8, "col"):      b0 = B[2tig..+1][gid], b1 = B[8+2tig..+1][gid]
//   C (16 x 8, float):      c0, c1 = C[gid][2tig..+1], c2, c3 = C[gid+8][2tig..+1]
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "launch_plan.h"
#include "wgmma.cuh"

namespace fdm {

// Rows per CTA and keys per K/V tile of each instantiation, also read by the host's launch plan.
constexpr int kFwdWarps = 4;
constexpr int fwd_block_n(int tile_head_dim) { return tile_head_dim <= 128 ? 64 : 32; }
// 32 rows per warp in RowSplitMath (two 16-row MMA tiles: every K and V fragment loaded from
// shared memory feeds two MMAs, half the ldmatrix traffic per FLOP of 16 rows) where 255 registers
// hold two tiles' S and O without spilling: D <= 64 (at D = 96 and 128 ptxas spills inside the
// tile loop, and D = 128 ran 18% slower on the H100, docs/notes.md). 16 rows per warp otherwise;
// also for a staged query mask (its block is rows x kBlockN bytes per stage, and a block-sparse
// mask skips more tiles of shorter row blocks). The key-split layout's block holds kKeySplitRows
// rows (launch_plan.h; KeySplitTile).
constexpr int fwd_block_m(int tile_head_dim, bool key_split, bool staged_mask) {
    if (key_split) return kKeySplitRows;
    return tile_head_dim <= 64 && !staged_mask ? 32 * kFwdWarps : 16 * kFwdWarps;
}
constexpr int kFwdMaxBlockM = 32 * kFwdWarps;  // the largest fwd_block_m

// Tile shapes for one tile head dim (the head dim rounded up to a compiled size) and row block.
template <int kHeadDim_, int kBlockM_>
struct FwdTile {
    static constexpr int kHeadDim = kHeadDim_;                  // D of the tile (>= the real D)
    static constexpr int kWarps = kFwdWarps;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kBlockM = kBlockM_;                    // rows per CTA
    static constexpr int kRowTiles = kBlockM / (16 * kWarps);   // 16-row MMA tiles per warp (RowSplitMath)
    static constexpr int kBlockN = fwd_block_n(kHeadDim);       // keys per K/V tile
    static constexpr int kRowStride = kHeadDim + 8;             // shared row pitch (elements): +16 bytes
                                                                // puts 8 consecutive rows in 8 distinct
                                                                // bank groups, so ldmatrix is conflict-free
    static constexpr int kChunksPerRow = kHeadDim / 8;          // 16-byte chunks per row
    static constexpr int kStages = 2;                           // K/V double buffer

    // Shared memory, in this order (every array aligned to its element size, the tiles to 16 bytes):
    //   q_s      (kBlockM, kRowStride)                  Q tile
    //   k_s      (kStages, kBlockN, kRowStride)         K tiles
    //   v_s      (kStages, kBlockN, kRowStride)         V tiles
    //   then per stage, one entry per key column of the tile (key_tiles.cuh, KeyStage):
    //   row_s    (kStages, kBlockN) int64               K/V row of the column (-1: zero-filled)
    //   bias_s   (kStages, kBlockN) float               key-based bias
    //   key_s    (kStages, kBlockN) int32               local key index j (gathered tiles)
    //   keep_s   (kStages, kBlockN) uint8               key-based mask (1 = keep)
    static constexpr int kQElems = kBlockM * kRowStride;
    static constexpr int kKVElems = kBlockN * kRowStride;
    static constexpr int kKeyStageBytes = kBlockN * (8 + 4 + 4 + 1);
    static constexpr int kSmemBytes = 2 * (kQElems + 2 * kStages * kKVElems) + kStages * kKeyStageBytes;

    // Then, with a staged query-based mask (launch_plan.h, use_staged_query_mask):
    //   qmask_s  (kStages, kBlockM, kQMaskStride) uint8 the tile's block of the mask (1 = keep)
    static constexpr int kQMaskStride = kBlockN + 16;           // rows 16-byte aligned for cp.async
    static constexpr int kQMaskStageBytes = kBlockM * kQMaskStride;
    // (The key-split layout merges its warps' partial results in the K/V stages, after the last tile.)
    static constexpr int smem_bytes(bool staged_mask) {
        return kSmemBytes + (staged_mask ? kStages * kQMaskStageBytes : 0);
    }
    static constexpr int kMaxCtasPerSm = 8;  // no register cap: the plan counts shared memory alone here

    // Element offset of (row, col) in a (kRows, kRowStride) shared tile: padded rows.
    template <int kRows>
    __device__ __forceinline__ static int offset(int row, int col) {
        return row * kRowStride + col;
    }
};

// Resident CTAs per SM the forward's shared memory allows on sm_80/sm_90 (227 KB per SM usable by
// CTAs, 1 KB reserved per CTA); the launch plan sizes its waves with it.
constexpr int fwd_ctas_per_sm(int smem_bytes) { return (227 * 1024) / (smem_bytes + 1024); }

// Tile shapes of the key-split layout (KeySplitMath, decode): blocks of kKeySplitRows rows, 4 warps
// splitting each key tile. Decode streams K/V and computes little, so a CTA's tile rate is set by
// how many tiles it has in flight: three stages (two tiles in flight while one is computed) where
// they fit two CTAs per SM, else two. Three stages of 64 keys at D = 128 fit only without the
// padded rows' 16 bytes, so where the head dim is a multiple of 64 (rows of whole 128-byte
// groups) the tiles are swizzled instead: 16-byte chunk c of row r sits at chunk c ^ (r % 8) of
// its 8-chunk group, which puts the 8 rows of an ldmatrix in 8 distinct bank groups too.
template <int kHeadDim_, bool kStagedMask_>
struct KeySplitTile {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kWarps = kFwdWarps;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kBlockM = kKeySplitRows;
    static constexpr int kBlockN = fwd_block_n(kHeadDim);
    static constexpr int kChunksPerRow = kHeadDim / 8;
    static constexpr bool kSwizzled = kHeadDim % 64 == 0;
    static constexpr int kRowStride = kSwizzled ? kHeadDim : kHeadDim + 8;  // shared row pitch (elements)

    // Shared memory, as in FwdTile (q_s, k_s, v_s, then row_s, bias_s, key_s, keep_s per stage, then
    // qmask_s with a staged query-based mask), with kStages stages:
    static constexpr int kQElems = kBlockM * kRowStride;
    static constexpr int kKVElems = kBlockN * kRowStride;
    static constexpr int kKeyStageBytes = kBlockN * (8 + 4 + 4 + 1);
    static constexpr int kQMaskStride = kBlockN + 16;
    static constexpr int kQMaskStageBytes = kBlockM * kQMaskStride;
    static constexpr int bytes_of(int stages) {
        return 2 * (kQElems + 2 * stages * kKVElems) + stages * kKeyStageBytes +
               (kStagedMask_ ? stages * kQMaskStageBytes : 0);
    }
    static constexpr int kStages = fwd_ctas_per_sm(bytes_of(3)) >= 2 ? 3 : 2;
    static constexpr int kSmemBytes = bytes_of(kStages);
    static constexpr int smem_bytes(bool) { return kSmemBytes; }  // (the staged mask is kStagedMask_)
    static constexpr int kMaxCtasPerSm = 8;  // no register cap: the plan counts shared memory alone here

    // Element offset of (row, col) in a shared tile (col a multiple of 8 for a chunk's start).
    template <int kRows>
    __device__ __forceinline__ static int offset(int row, int col) {
        if constexpr (kSwizzled)
            return row * kHeadDim + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
        else
            return row * kRowStride + col;
    }
};

// Head dims of the warpgroup layout: whole 64-column swizzle blocks, and a PV MMA of N = D.
constexpr bool is_warpgroup_head_dim(int tile_head_dim) {
    return tile_head_dim == 64 || tile_head_dim == 128 || tile_head_dim == 256;
}
// Keys per tile of the warpgroup layout: 64 under a staged query-based mask (a block mask of 64 x
// 64 tiles then hides whole key tiles; launch_plan.h, warpgroups_take_query_mask).
constexpr int warpgroup_block_n(int tile_head_dim, bool staged_mask) {
    return tile_head_dim <= 128 && !staged_mask ? 128 : 64;
}

// Tile shapes of the warpgroup layout (warpgroup_math.cuh): 2 warpgroups, each 64 rows of the
// block, so one CTA holds 128 rows; keys per tile chosen so S (64 x kBlockN) and O (64 x D) of a
// warpgroup fit its registers: 64 + 64 floats per thread at D = 128, 32 + 128 at D = 256.
template <int kHeadDim_, bool kStagedMask_>
struct WarpgroupTile {
    static_assert(is_warpgroup_head_dim(kHeadDim_), "warpgroup layout head dims: 64, 128, 256");
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kWarps = 8;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kBlockM = 128;
    static constexpr int kBlockN = warpgroup_block_n(kHeadDim, kStagedMask_);
    static constexpr int kChunksPerRow = kHeadDim / 8;
    static constexpr int kStages = 2;

    // Shared memory, from a 1024-byte aligned start (every tile swizzled, wgmma.cuh):
    //   q_s      (kBlockM, kHeadDim)                    Q tile
    //   k_s      (kStages, kBlockN, kHeadDim)           K tiles
    //   v_s      (kStages, kBlockN, kHeadDim)           V tiles
    //   row_s, bias_s, key_s, keep_s                    per key column, as in FwdTile
    static constexpr int kQElems = kBlockM * kHeadDim;
    static constexpr int kKVElems = kBlockN * kHeadDim;
    static constexpr int kKeyStageBytes = kBlockN * (8 + 4 + 4 + 1);
    static constexpr int kSmemBytes =
        kSwizzleAlign + 2 * (kQElems + 2 * kStages * kKVElems) + kStages * kKeyStageBytes;  // with the alignment slack
    // Then, with a staged query-based mask, as in FwdTile:
    //   qmask_s  (kStages, kBlockM, kQMaskStride) uint8 the tile's block of the mask (1 = keep)
    static constexpr int kQMaskStride = kBlockN + 16;
    static constexpr int kQMaskStageBytes = kBlockM * kQMaskStride;
    static constexpr int smem_bytes(bool staged_mask) {
        return kSmemBytes + (staged_mask ? kStages * kQMaskStageBytes : 0);
    }
    // Resident CTAs per SM: ptxas gives these kernels ~255 registers a thread (capping them at 128
    // for two CTAs of D = 64 spilled 1.7 KB), so registers allow one, whatever the shared memory.
    static constexpr int kMaxCtasPerSm = 1;

    // Element offset of (row, col) in a swizzled (kRows, kHeadDim) shared tile (wgmma.cuh).
    template <int kRows>
    __device__ __forceinline__ static int offset(int row, int col) {
        return swizzled_offset<kRows>(row, col);
    }
};

// The tile of fwd_kernel<T, kHeadDim, kLayout, kStagedMask>.
template <int kHeadDim, FwdLayout kLayout, bool kStagedMask>
using FwdTileOf =
    std::conditional_t<kLayout == FwdLayout::kWarpgroups, WarpgroupTile<kHeadDim, kStagedMask>,
                       std::conditional_t<kLayout == FwdLayout::kKeys, KeySplitTile<kHeadDim, kStagedMask>,
                                          FwdTile<kHeadDim, fwd_block_m(kHeadDim, false, kStagedMask)>>>;

// Tile head dim serving a real head dim (multiple of 8, <= 256); 0 when none does.
inline int tile_head_dim(int64_t d) {
    if (d <= 0 || d % 8 != 0) return 0;
    const int sizes[] = {32, 64, 96, 128, 192, 256};
    for (int s : sizes)
        if (d <= s) return s;
    return 0;
}

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy of the first src_bytes (0..16) bytes at src (16-byte aligned); the
// rest of the 16 shared bytes is zero-filled.
__device__ __forceinline__ void cp_async_16_bytes(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// 16-byte asynchronous copy; when !valid the 16 shared bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, bool valid) {
    cp_async_16_bytes(dst, src, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
// Waits until at most `pending` (0..kMax, the same in every thread) of this thread's commit groups
// are still in flight.
template <int kMax>
__device__ __forceinline__ void cp_async_wait_at_most(int pending) {
    if constexpr (kMax > 0) {
        if (pending >= kMax) {
            cp_async_wait<kMax>();
            return;
        }
        cp_async_wait_at_most<kMax - 1>(pending);
    } else {
        cp_async_wait<0>();
    }
}

// Copies kRows rows into a (kRows, D) shared tile laid out by Tile::offset. row_ptr(r) is the global
// address of row r (head_dim elements, 16-byte aligned) or nullptr for a row to zero-fill; columns >= head_dim
// become 0 too, so padded keys contribute 0 * 0 and never NaN. `any_valid` is any readable global
// address (cp.async wants one even when it copies 0 bytes).
template <class Tile, int kRows, class T, class RowPtr>
__device__ __forceinline__ void load_rows_async(T *s_tile, const RowPtr &row_ptr, const T *any_valid, int head_dim) {
    constexpr int kChunks = kRows * Tile::kChunksPerRow;
    static_assert(kChunks % Tile::kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int it = 0; it < kChunks / Tile::kThreads; ++it) {
        const int c = threadIdx.x + it * Tile::kThreads;
        const int row = c / Tile::kChunksPerRow, col = (c % Tile::kChunksPerRow) * 8;
        const T *src = row_ptr(row);
        const bool valid = src != nullptr && col < head_dim;
        cp_async_16(smem_addr(s_tile + Tile::template offset<kRows>(row, col)), valid ? src + col : any_valid, valid);
    }
}

// Whether load_kv_rows_async computes a thread's chunk column once per tile: possible where a
// copy iteration covers whole rows (kThreads a multiple of kChunksPerRow), then a thread's column
// is the same in every iteration, and a copy costs the row's 64-bit offset and a constant shared
// step. Measured on an H200 (docs/notes.md, version 24): prefill-b 1.03x with the warpgroup tile,
// but decode-b 0.97x with the key-split tile (fewer instructions, 248 -> 204 registers, and a
// slower schedule), so the warpgroup tiles alone use it.
template <class Tile>
constexpr bool kColumnOnceCopy = Tile::kThreads % Tile::kChunksPerRow == 0 && Tile::kWarps == 8;

// Copies the K and V rows of one key tile: key column r reads row row_of(r) of k_head / v_head
// (a row index, -1 to zero-fill). Each thread reads its columns' row indices once, all together,
// before it issues any copy, and uses each for both K and V.
template <class Tile, class T, class RowOf>
__device__ __forceinline__ void load_kv_rows_async(T *k_tile, T *v_tile, const T *k_head, const T *v_head,
                                                   int64_t k_row_stride, int64_t v_row_stride, const RowOf &row_of,
                                                   int head_dim) {
    constexpr int kIters = Tile::kBlockN * Tile::kChunksPerRow / Tile::kThreads;
    static_assert(kIters * Tile::kThreads == Tile::kBlockN * Tile::kChunksPerRow, "whole chunks per thread");
    if constexpr (kColumnOnceCopy<Tile>) {
        constexpr int kRowsPerIter = Tile::kThreads / Tile::kChunksPerRow;
        const int row = static_cast<int>(threadIdx.x) / Tile::kChunksPerRow;  // of iteration 0
        const int col = (static_cast<int>(threadIdx.x) % Tile::kChunksPerRow) * 8;
        const bool col_ok = col < head_dim;
        const T *k_col = k_head + (col_ok ? col : 0);  // this thread's chunk of row 0
        const T *v_col = v_head + (col_ok ? col : 0);
        int64_t rows[kIters];
#pragma unroll
        for (int it = 0; it < kIters; ++it) rows[it] = row_of(row + it * kRowsPerIter);
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const bool valid = col_ok && rows[it] >= 0;
            const int64_t r = valid ? rows[it] : 0;
            const int dst = Tile::template offset<Tile::kBlockN>(row + it * kRowsPerIter, col);
            cp_async_16(smem_addr(k_tile + dst), k_col + r * k_row_stride, valid);
            cp_async_16(smem_addr(v_tile + dst), v_col + r * v_row_stride, valid);
        }
    } else {
        int64_t rows[kIters];
#pragma unroll
        for (int it = 0; it < kIters; ++it) rows[it] = row_of((threadIdx.x + it * Tile::kThreads) / Tile::kChunksPerRow);
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int c = threadIdx.x + it * Tile::kThreads;
            const int row = c / Tile::kChunksPerRow, col = (c % Tile::kChunksPerRow) * 8;
            const bool valid = rows[it] >= 0 && col < head_dim;
            const int64_t r = valid ? rows[it] : 0;
            const uint32_t dst = Tile::template offset<Tile::kBlockN>(row, col);
            cp_async_16(smem_addr(k_tile + dst), k_head + r * k_row_stride + (valid ? col : 0), valid);
            cp_async_16(smem_addr(v_tile + dst), v_head + r * v_row_stride + (valid ? col : 0), valid);
        }
    }
}

// Whether a tile's contiguous K/V tiles use load_kv_range_async: its copies must come in whole
// rows per iteration (not at D = 96 and 192 with 4 warps: 12 and 24 chunks per row). The D = 128
// warpgroup tile keeps the row copy: measured on an H200 (docs/notes.md, version 20) the range
// copy made that kernel 5-10% slower on prefill-b/c (a different schedule at 255 registers, not
// the copies themselves) while the other kernels got 1-7% faster.
template <class Tile>
constexpr bool kRangeCopy = Tile::kThreads % Tile::kChunksPerRow == 0 &&
                            Tile::kBlockN % (Tile::kThreads / Tile::kChunksPerRow) == 0 &&
                            !(Tile::kWarps == 8 && Tile::kHeadDim == 128 && Tile::kBlockN == 128);

// Copies the K and V rows of one key tile whose keys are consecutive rows: key column r reads
// rows k_row0 + r * k_row_stride and v_row0 + r * v_row_stride for r < valid_rows (the rest are
// zero-filled). Thread t copies chunk t % kChunksPerRow of rows t / kChunksPerRow + it *
// kRowsPerIter, so its global addresses advance by a constant step: one 64-bit add per copy,
// and on a full tile (valid_rows >= kBlockN, head_dim = the tile's) no bounds test at all.
// (1-8% faster than load_kv_rows_async's per-row index math where it is used; docs/notes.md,
// version 20.)
template <class Tile, class T>
__device__ __forceinline__ void load_kv_range_async(T *k_tile, T *v_tile, const T *k_row0, const T *v_row0,
                                                    int64_t k_row_stride, int64_t v_row_stride, int64_t valid_rows,
                                                    int head_dim) {
    static_assert(Tile::kThreads % Tile::kChunksPerRow == 0, "whole rows per copy iteration");
    constexpr int kRowsPerIter = Tile::kThreads / Tile::kChunksPerRow;
    constexpr int kIters = Tile::kBlockN / kRowsPerIter;
    static_assert(kIters * kRowsPerIter == Tile::kBlockN, "whole copy iterations per tile");
    const int row = static_cast<int>(threadIdx.x) / Tile::kChunksPerRow;
    const int col = (static_cast<int>(threadIdx.x) % Tile::kChunksPerRow) * 8;
    const T *k = k_row0 + row * k_row_stride + col;  // this thread's chunk of its first row
    const T *v = v_row0 + row * v_row_stride + col;
    const int64_t k_step = kRowsPerIter * k_row_stride, v_step = kRowsPerIter * v_row_stride;
    if (valid_rows >= Tile::kBlockN && head_dim == Tile::kHeadDim) {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int dst = Tile::template offset<Tile::kBlockN>(row + it * kRowsPerIter, col);
            cp_async_16(smem_addr(k_tile + dst), k + it * k_step, true);
            cp_async_16(smem_addr(v_tile + dst), v + it * v_step, true);
        }
    } else {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int dst = Tile::template offset<Tile::kBlockN>(row + it * kRowsPerIter, col);
            const bool ok = row + it * kRowsPerIter < valid_rows && col < head_dim;
            cp_async_16(smem_addr(k_tile + dst), ok ? k + it * k_step : k_row0, ok);
            cp_async_16(smem_addr(v_tile + dst), ok ? v + it * v_step : v_row0, ok);
        }
    }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// C += A B for one m16n8k16 tile, float accumulators.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x = 0 for a (kM, kN) array of MMA accumulator fragments (S or O tiles).
template <int kM, int kN>
__device__ __forceinline__ void zero_fragments(float (&x)[kM][kN][4]) {
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int n = 0; n < kN; ++n) x[m][n][0] = x[m][n][1] = x[m][n][2] = x[m][n][3] = 0.f;
}
template <int kN>
__device__ __forceinline__ void zero_fragments(float (&x)[kN][4]) {
#pragma unroll
    for (int n = 0; n < kN; ++n) x[n][0] = x[n][1] = x[n][2] = x[n][3] = 0.f;
}

// Two floats rounded to one 32-bit register of T pairs (lo = a, hi = b).
template <class T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
}

// The A fragment (16 x 16, tiles.cuh header) of P's keys [16 kk, 16 kk + 16) from a row tile of
// score accumulators s (kNTiles 8-key C fragments), rounded to T: P V takes P straight from S.
template <class T, int kNTiles>
__device__ __forceinline__ void p_fragment(const float (&s)[kNTiles][4], int kk, uint32_t (&a)[4]) {
    a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

}  // namespace fdm
