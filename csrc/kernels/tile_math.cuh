// tile_math.cuh: the math of one key tile, in the two ways the CTA's 4 warps can share it.
//
// For the key tile n (kBlockN keys) staged in shared memory:
//   S = Q K_n^T                     mma.sync, Q and K from shared memory (ldmatrix)
//   X = transform(S) * log2 e       scale, softcap, bias, mask, causal, length (masking.cuh;
//                                   a lone scale is left to the softmax's exponent)
//   P = online_softmax(X)           registers (softmax.cuh)
//   O += P V_n                      mma.sync, V via ldmatrix.trans
//
// RowSplitMath (prefill): warp w owns kRowTiles row tiles of 16 rows (rows 16 (w + 4 mt) + [0, 16)),
//   every key of the tile and every head-dim column of O; P stays in registers. No warp waits for
//   another.
// KeySplitMath (decode): flash-decoding inside the CTA. A decode block has 1-32 rows (1-2 row
//   tiles), which RowSplitMath gives to 1-2 warps; here every warp takes one row tile and a slice
//   of 16 keys of each key tile (two slices for a block of two row tiles; above D = 128 also half
//   of O's columns) and runs its own online softmax over its slices: S, P and O stay in its
//   registers and no warp waits for another within a step. The slices' softmax states and
//   partial O are merged once, after the last tile, through shared memory.
// Both expose the same interface to fwd_kernel.cuh: step() per tile, finalize() once, then
// for_each_output() / for_each_lse() to store the result rows this thread finishes (KeySplitMath
// reads its slices' merged O back from shared memory there). for_each_output asks for a row's
// destination once and stores all of the row's column pairs there.
#pragma once

#include "../fdm_params.h"
#include "key_tiles.cuh"
#include "masking.cuh"
#include "softmax.cuh"
#include "tiles.cuh"

namespace fdm {

// Shared-memory operands of one step.
template <class T>
struct TileOperands {
    const T *q_s;      // (kBlockM, kRowStride) Q (rows laid out by Tile::offset: padded or swizzled)
    const T *k_tile;   // (kBlockN, kRowStride) K_n
    const T *v_tile;   // (kBlockN, kRowStride) V_n
    KeyStage keys;     // the tile's staged per-key data (key_tiles.cuh)
    const uint8_t *qmask;  // (kBlockM, kQMaskStride) the tile's block of a staged query-based mask, or nullptr
    bool gathered;     // the tile's columns hold keys.key[c], not n * kBlockN + c
    bool mask_full;    // the query-based mask keeps every pair of the tile within the limits
                       // (tile_visibility.cu): nothing to copy or test, qmask is nullptr
};

template <class T, class Tile>
struct RowSplitMath {
    static constexpr int kWarps = Tile::kWarps, kRowTiles = Tile::kRowTiles;
    static constexpr int kBlockN = Tile::kBlockN, kHeadDim = Tile::kHeadDim, kStride = Tile::kRowStride;
    static constexpr int kNTiles = kBlockN / 8;   // 8-key MMA tiles of S per warp
    static constexpr int kDTiles = kHeadDim / 8;  // 8-column MMA tiles of O per warp

    // Row tile mt of warp w is rows [16 (w + kWarps mt), +16) of the block, so a block's first
    // 16 kWarps rows give every warp its first tile.
    // With one row tile the rows' facts are kept in registers; with two, S and O leave no room for
    // them and they are recomputed per key tile (a few integer ops).
    static constexpr bool kKeepRows = kRowTiles == 1;

    float acc_o[kRowTiles][kDTiles][4];  // O, rows row0(mt) + (gid, gid + 8), columns 8d + 2tig + {0, 1}
    OnlineSoftmax<kDTiles> softmax[kRowTiles];
    RowInfo kept_rows[kKeepRows ? kRowTiles : 1];
    int warp_tiles;       // row tiles of this warp that hold rows of the block (0: it only helps with loads)
    float lse[kRowTiles][2];

    __device__ __forceinline__ static int row0(int mt) { return 16 * (static_cast<int>(threadIdx.x / 32) + kWarps * mt); }

    __device__ __forceinline__ RowSplitMath(const MaskContext &ctx, int valid_rows, unsigned char *) {
        zero_fragments(acc_o);
        warp_tiles = 0;
#pragma unroll
        for (int mt = 0; mt < kRowTiles; ++mt) {
            if (row0(mt) < valid_rows) warp_tiles = mt + 1;
            if constexpr (kKeepRows) kept_rows[mt] = make_row_info(ctx, row0(mt) + (threadIdx.x % 32) / 4);
        }
    }

    __device__ __forceinline__ void step(const TileOperands<T> &op, const fdm_params &p, const MaskContext &ctx, int n) {
        // One uniform branch per tile: a warp whose tiles all hold rows runs them together (K/V
        // fragments shared), one with only its first tile (a short last block) runs that one.
        if (warp_tiles == kRowTiles)
            step_tiles<kRowTiles>(op, p, ctx, n);
        else if (kRowTiles > 1 && warp_tiles == 1)
            step_tiles<1>(op, p, ctx, n);
    }

    // The step for this warp's first kTiles row tiles.
    template <int kTiles>
    __device__ __forceinline__ void step_tiles(const TileOperands<T> &op, const fdm_params &p, const MaskContext &ctx,
                                               int n) {
        const int lane = threadIdx.x % 32, mi = lane / 8;

        // S = Q K^T: (16, kBlockN) per row tile; each K fragment feeds every row tile.
        float s[kTiles][kNTiles][4];
        zero_fragments(s);
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
            uint32_t a[kTiles][4];
#pragma unroll
            for (int mt = 0; mt < kTiles; ++mt)
                ldmatrix_x4(a[mt], smem_addr(op.q_s + (row0(mt) + lane % 16) * kStride + kk * 16 + (lane / 16) * 8));
#pragma unroll
            for (int nn = 0; nn < kBlockN / 16; ++nn) {
                uint32_t bk[4];
                ldmatrix_x4(bk, smem_addr(op.k_tile + (nn * 16 + lane % 8 + (mi / 2) * 8) * kStride + kk * 16 +
                                          (mi % 2) * 8));
#pragma unroll
                for (int mt = 0; mt < kTiles; ++mt) {
                    mma_16816<T>(s[mt][2 * nn], a[mt], bk[0], bk[1]);
                    mma_16816<T>(s[mt][2 * nn + 1], a[mt], bk[2], bk[3]);
                }
            }
        }

        // X = transform(S) in the log2 domain, then P.
#pragma unroll
        for (int mt = 0; mt < kTiles; ++mt) {
            const int row = row0(mt) + lane / 4;
            const float c = transform_scores<Tile, kNTiles>(s[mt], p, ctx, kKeepRows ? kept_rows[mt] : make_row_info(ctx, row),
                                                            n, op.keys.keep, op.keys.bias,
                                                            op.gathered ? op.keys.key : nullptr, op.qmask,
                                                            op.mask_full, row, 0);
            softmax[mt].update(s[mt], acc_o[mt], c);
        }

        // O += P V: P (16, kBlockN) per row tile as A fragments straight from the S accumulators;
        // each V fragment feeds every row tile.
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
            uint32_t a[kTiles][4];
#pragma unroll
            for (int mt = 0; mt < kTiles; ++mt) p_fragment<T>(s[mt], kk, a[mt]);
#pragma unroll
            for (int dd = 0; dd < kHeadDim / 16; ++dd) {
                uint32_t bv[4];
                ldmatrix_x4_trans(bv, smem_addr(op.v_tile + (kk * 16 + lane % 8 + (mi % 2) * 8) * kStride + dd * 16 +
                                                (mi / 2) * 8));
#pragma unroll
                for (int mt = 0; mt < kTiles; ++mt) {
                    mma_16816<T>(acc_o[mt][2 * dd], a[mt], bv[0], bv[1]);
                    mma_16816<T>(acc_o[mt][2 * dd + 1], a[mt], bv[2], bv[3]);
                }
            }
        }
    }

    __device__ __forceinline__ void finalize() {
#pragma unroll
        for (int mt = 0; mt < kRowTiles; ++mt) softmax[mt].finalize(acc_o[mt], lse[mt]);
    }

    // For every row this thread holds: dst = row_dest(row), then store(dst, col, o[row][col],
    // o[row][col + 1]) for each of its column pairs.
    template <class RowDest, class Store>
    __device__ __forceinline__ void for_each_output(const RowDest &row_dest, const Store &store) const {
        const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
        for (int mt = 0; mt < kRowTiles; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const auto dst = row_dest(row0(mt) + gid + 8 * r);
#pragma unroll
                for (int d = 0; d < kDTiles; ++d) store(dst, d * 8 + 2 * tig, acc_o[mt][d][2 * r], acc_o[mt][d][2 * r + 1]);
            }
    }
    // f(row, lse[row]), once per row.
    template <class F>
    __device__ __forceinline__ void for_each_lse(const F &f) const {
        if (threadIdx.x % 4 != 0) return;
        const int gid = (threadIdx.x % 32) / 4;
#pragma unroll
        for (int mt = 0; mt < kRowTiles; ++mt) {
            f(row0(mt) + gid, lse[mt][0]);
            f(row0(mt) + gid + 8, lse[mt][1]);
        }
    }
};

template <class T, class Tile>
struct KeySplitMath {
    static constexpr int kWarps = Tile::kWarps;
    static constexpr int kBlockN = Tile::kBlockN, kHeadDim = Tile::kHeadDim;
    // O columns per warp: all of them up to D = 128, half above (64 accumulators a thread at most).
    static constexpr int kColParts = kHeadDim > 128 ? 2 : 1;
    static constexpr int kWarpCols = kHeadDim / kColParts;
    static constexpr int kDTiles = kWarpCols / 8;  // 8-column MMA tiles of O per warp
    static_assert(kDTiles % 2 == 0, "O column tiles come in pairs (one ldmatrix.x4 of V each)");
    // A key tile is cut into slices of 16 keys (one k-step of P V). With one row tile every warp
    // takes one slice (and column part); with two, a warp takes two slices of its row tile.
    static constexpr int kSliceKeys = 16;
    static constexpr int kSlices = kBlockN / kSliceKeys;
    static_assert(kSlices * kColParts == kWarps && kKeySplitRows == 32, "one slice per warp for one row tile");

    // After the last tile, in `scratch` (the K/V stages, free by then), the warps' partial results:
    //   stats  (kWarps, 16, 2) float               m_w and l_w of each row of each warp
    //   o_part (kWarps, 16, kPartStride) float     O_w (not normalized) of each warp
    static constexpr int kPartStride = kWarpCols + 8;  // 8 floats of padding: conflict-free float2 writes
                                                       // (and a row's float4 reads are consecutive)
    static_assert((kWarps * 32 + kWarps * 16 * kPartStride) * 4 <= 2 * Tile::kStages * Tile::kKVElems * int(sizeof(T)),
                  "the partial results fit in the K/V stages");

    float acc_o[kDTiles][4];  // O_w: rows 16 mt + (gid, gid + 8), columns col0 + 8d + 2tig + {0, 1}
    OnlineSoftmax<kDTiles> softmax;  // m_w, l_w over this warp's slices
    RowInfo rows;
    int m_tiles;  // row tiles of the block: 1 (<= 16 rows) or 2, the same in every warp
    int group;    // warps that share this warp's row tile and columns: kSlices / m_tiles
    int mt;       // this warp's row tile
    int rank;     // its place in the group: it takes slices rank, rank + group, ...
    int col0;     // its first O column
    float *scratch;
    float lse[2];      // lse of rows gid, gid + 8 (group == 1) or of merge_row (lse[0])
    int merge_row;     // after finalize() with group > 1: the row (of the row tile) this lane merges
    int merge_lane;    // and its place among the row's 2 group lanes
    float weight[kSlices];  // 2^(m_w - m) / l of group warp w for merge_row

    __device__ __forceinline__ KeySplitMath(const MaskContext &ctx, int valid_rows, unsigned char *after_last_tile) {
        const int warp = threadIdx.x / 32;
        m_tiles = valid_rows > 16 ? 2 : 1;
        group = kSlices / m_tiles;
        mt = warp % m_tiles;
        rank = (warp / m_tiles) % group;
        col0 = (warp / m_tiles / group) * kWarpCols;
        scratch = reinterpret_cast<float *>(after_last_tile);
        zero_fragments(acc_o);
        rows = make_row_info(ctx, 16 * mt + (threadIdx.x % 32) / 4);
    }

    __device__ __forceinline__ void step(const TileOperands<T> &op, const fdm_params &p, const MaskContext &ctx, int n) {
#pragma unroll 1
        for (int k = 0; k < m_tiles; ++k) step_slice(op, p, ctx, n, (rank + k * group) * kSliceKeys);
    }

    // Keys [key0, key0 + 16) of tile n for this warp's 16 rows.
    __device__ __forceinline__ void step_slice(const TileOperands<T> &op, const fdm_params &p, const MaskContext &ctx,
                                               int n, int key0) {
        constexpr int kNTiles = kSliceKeys / 8;
        const int lane = threadIdx.x % 32, mi = lane / 8, row0 = 16 * mt;

        // S = Q K^T: (16, 16), rows row0.., keys key0.. of the tile.
        float s[kNTiles][4];
        zero_fragments(s);
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
            uint32_t a[4], bk[4];
            ldmatrix_x4(a, smem_addr(op.q_s + Tile::template offset<Tile::kBlockM>(row0 + lane % 16, kk * 16 + (lane / 16) * 8)));
            ldmatrix_x4(bk, smem_addr(op.k_tile + Tile::template offset<kBlockN>(key0 + lane % 8 + (mi / 2) * 8,
                                                                                kk * 16 + (mi % 2) * 8)));
            mma_16816<T>(s[0], a, bk[0], bk[1]);
            mma_16816<T>(s[1], a, bk[2], bk[3]);
        }

        // X = transform(S) in the log2 domain, then P, in registers.
        const float c = transform_scores<Tile, kNTiles>(s, p, ctx, rows, n, op.keys.keep, op.keys.bias,
                                                        op.gathered ? op.keys.key : nullptr, op.qmask,
                                                        op.mask_full, row0 + lane / 4, key0);
        softmax.update(s, acc_o, c);

        // O[:, col0 : col0 + kWarpCols] += P V[key0 : key0 + 16, col0 : col0 + kWarpCols].
        uint32_t a[4];
        p_fragment<T>(s, 0, a);
#pragma unroll
        for (int dd = 0; dd < kDTiles / 2; ++dd) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, smem_addr(op.v_tile + Tile::template offset<kBlockN>(key0 + lane % 8 + (mi % 2) * 8,
                                                                                       col0 + dd * 16 + (mi / 2) * 8)));
            mma_16816<T>(acc_o[2 * dd], a, bv[0], bv[1]);
            mma_16816<T>(acc_o[2 * dd + 1], a, bv[2], bv[3]);
        }
    }

    // Merges the partial results of each group (the warps with this warp's row tile and columns):
    //   m = max_w m_w,  l = sum_w 2^(m_w - m) l_w,  O = sum_w 2^(m_w - m) O_w / l,  lse = (m + log2 l) ln 2
    // (a row every slice saw only hidden keys: m = -inf, l = 0, O = 0, lse = -inf). Every warp
    // publishes its (m_w, l_w, O_w), then the group's warps share the merge: each takes 16 / group
    // of the rows, 2 group lanes a row, and here computes its row's weights 2^(m_w - m) / l;
    // for_each_output() reads the O_w back. Every thread calls it (one CTA barrier); the K/V
    // stages must be free (no copy in flight, no warp reading).
    __device__ __forceinline__ void finalize() {
        if (group == 1) {
            softmax.finalize(acc_o, lse);
            return;
        }
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l_w = quad_sum(softmax.row_sum[r]);
            if (tig == 0) {
                stats(warp, gid + 8 * r)[0] = softmax.row_max[r];
                stats(warp, gid + 8 * r)[1] = l_w;
            }
#pragma unroll
            for (int d = 0; d < kDTiles; ++d)
                *reinterpret_cast<float2 *>(o_part(warp, gid + 8 * r) + 8 * d + 2 * tig) =
                    make_float2(acc_o[d][2 * r], acc_o[d][2 * r + 1]);
        }
        __syncthreads();
        const int lanes_per_row = 2 * group;
        merge_row = rank * (16 / group) + lane / lanes_per_row;
        merge_lane = lane % lanes_per_row;
        float m = -INFINITY;
#pragma unroll
        for (int k = 0; k < kSlices; ++k)
            if (k < group) m = fmaxf(m, stats(group_warp(k), merge_row)[0]);
        const float base = m == -INFINITY ? 0.f : m;
        float l = 0.f;
#pragma unroll
        for (int k = 0; k < kSlices; ++k) {
            weight[k] = 0.f;
            if (k < group) {
                const float *st = stats(group_warp(k), merge_row);
                weight[k] = exp2f(st[0] - base);
                l += weight[k] * st[1];
            }
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int k = 0; k < kSlices; ++k) weight[k] *= inv;
        lse[0] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
    }

    template <class RowDest, class Store>
    __device__ __forceinline__ void for_each_output(const RowDest &row_dest, const Store &store) const {
        if (group == 1) {  // one warp per row tile and columns: its fragments are the result
            const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const auto dst = row_dest(16 * mt + gid + 8 * r);
#pragma unroll
                for (int d = 0; d < kDTiles; ++d)
                    store(dst, col0 + d * 8 + 2 * tig, acc_o[d][2 * r], acc_o[d][2 * r + 1]);
            }
            return;
        }
        // Row merge_row: this lane's 4 columns c, c + 4 * lanes_per_row, ... (a row's lanes read
        // consecutive 16 bytes: conflict-free), O = sum_w weight_w O_w.
        const int step = 8 * group;
        const auto dst = row_dest(16 * mt + merge_row);
        for (int c = 4 * merge_lane; c < kWarpCols; c += step) {
            float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int k = 0; k < kSlices; ++k) {
                if (k < group) {
                    const float4 v = *reinterpret_cast<const float4 *>(o_part(group_warp(k), merge_row) + c);
                    o.x = fmaf(weight[k], v.x, o.x);
                    o.y = fmaf(weight[k], v.y, o.y);
                    o.z = fmaf(weight[k], v.z, o.z);
                    o.w = fmaf(weight[k], v.w, o.w);
                }
            }
            store(dst, col0 + c, o.x, o.y);
            store(dst, col0 + c + 2, o.z, o.w);
        }
    }
    template <class F>
    __device__ __forceinline__ void for_each_lse(const F &f) const {
        if (col0 != 0) return;
        if (group == 1) {
            if (threadIdx.x % 4 != 0) return;
            const int gid = (threadIdx.x % 32) / 4;
            f(16 * mt + gid, lse[0]);
            f(16 * mt + gid + 8, lse[1]);
        } else if (merge_lane == 0) {
            f(16 * mt + merge_row, lse[0]);
        }
    }

  private:
    // Warp k of this warp's group (rank k, same row tile and columns).
    __device__ __forceinline__ int group_warp(int k) const { return mt + m_tiles * (k + group * (col0 / kWarpCols)); }
    // (m_w, l_w) of row `row` (of 16) of warp w.
    __device__ __forceinline__ float *stats(int w, int row) const { return scratch + (w * 16 + row) * 2; }
    // Row `row` (of 16) of warp w's published O_w: kWarpCols floats.
    __device__ __forceinline__ float *o_part(int w, int row) const {
        return scratch + kWarps * 32 + (w * 16 + row) * kPartStride;
    }
};

}  // namespace fdm
