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
// KeySplitMath (decode): warp w owns keys [w kBlockN / 4, (w + 1) kBlockN / 4) of S and head-dim
//   columns [w D / 4, (w + 1) D / 4) of O, for every row of the block (kKeySplitRows at most).
//   A decode block has 1-32 rows, which RowSplitMath gives to 1-2 warps: here all 4 work, and each one's chain of MMAs is
//   2-4x shorter. The price is two barriers per tile: the row maxima (softmax.cuh) and P (kKeySplitRows,
//   kBlockN) pass through shared memory.
// Both expose the same interface to fwd_kernel.cuh: step() per tile, finalize() once, then
// for_each_output() / for_each_lse() to store what this thread holds.
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
    const T *q_s;      // (kBlockM, kRowStride) Q
    const T *k_tile;   // (kBlockN, kRowStride) K_n
    const T *v_tile;   // (kBlockN, kRowStride) V_n
    KeyStage keys;     // the tile's staged per-key data (key_tiles.cuh)
    const uint8_t *qmask;  // (kBlockM, kQMaskStride) the tile's block of a staged query-based mask, or nullptr
    bool gathered;     // the tile's columns hold keys.key[c], not n * kBlockN + c
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
    OnlineSoftmax<kNTiles, kDTiles> softmax[kRowTiles];
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
                                                            op.gathered ? op.keys.key : nullptr, op.qmask, row, 0);
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

    // f(row, col, o[row][col], o[row][col + 1]) for every pair of O this thread holds.
    template <class F>
    __device__ __forceinline__ void for_each_output(const F &f) const {
        const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
        for (int mt = 0; mt < kRowTiles; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int d = 0; d < kDTiles; ++d)
                    f(row0(mt) + gid + 8 * r, d * 8 + 2 * tig, acc_o[mt][d][2 * r], acc_o[mt][d][2 * r + 1]);
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
    static constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kHeadDim = Tile::kHeadDim;
    static constexpr int kStride = Tile::kRowStride, kPStride = Tile::kPStride;
    static constexpr int kMTiles = kKeySplitRows / 16;    // 16-row MMA tiles of the block (at most)
    static constexpr int kWarpKeys = kBlockN / kWarps;    // S columns per warp: 16 or 8
    static constexpr int kNTiles = kWarpKeys / 8;         // 8-key MMA tiles of S per warp
    static constexpr int kWarpCols = kHeadDim / kWarps;   // O columns per warp: D / 4
    static constexpr int kDTiles = kWarpCols / 8;         // 8-column MMA tiles of O per warp
    static_assert(kNTiles >= 1 && kNTiles <= 2 && kWarpCols % 8 == 0, "key-split tile shapes");

    float acc_o[kMTiles][kDTiles][4];  // O, rows 16 mt + (gid, gid + 8), columns col0 + 8d + 2tig + {0, 1}
    static_assert(kMTiles * 16 <= kBlockM, "the block's Q tile holds every row");
    KeySplitSoftmax<kMTiles, kNTiles, kDTiles, kWarps> softmax;
    RowInfo rows[kMTiles];
    int m_tiles;   // row tiles in use: ceil(valid_rows / 16), the same in every warp
    int key0;      // first S column of this warp
    int col0;      // first O column of this warp
    T *p_s;        // (kKeySplitRows, kPStride) P, shared
    float *red_s;  // (kWarps, kKeySplitRows) row maxima / sums, shared
    float lse[kMTiles][2];

    __device__ __forceinline__ KeySplitMath(const MaskContext &ctx, int valid_rows, unsigned char *exchange) {
        const int warp = threadIdx.x / 32, gid = (threadIdx.x % 32) / 4;
        m_tiles = (valid_rows + 15) / 16;
        key0 = warp * kWarpKeys;
        col0 = warp * kWarpCols;
        p_s = reinterpret_cast<T *>(exchange);
        red_s = reinterpret_cast<float *>(p_s + kKeySplitRows * kPStride);
        zero_fragments(acc_o);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) rows[mt] = make_row_info(ctx, 16 * mt + gid);
    }

    // Every thread of the CTA calls it (two barriers inside).
    __device__ __forceinline__ void step(const TileOperands<T> &op, const fdm_params &p, const MaskContext &ctx, int n) {
        const int lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;

        // S = Q K^T: (16 m_tiles, kWarpKeys) per warp, K fragments shared by the row tiles.
        float s[kMTiles][kNTiles][4];
        zero_fragments(s);
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
            uint32_t b[kNTiles][2];
            if constexpr (kNTiles == 2) {
                const int mi = lane / 8;
                uint32_t bk[4];
                ldmatrix_x4(bk, smem_addr(op.k_tile + (key0 + lane % 8 + (mi / 2) * 8) * kStride + kk * 16 + (mi % 2) * 8));
                b[0][0] = bk[0], b[0][1] = bk[1], b[1][0] = bk[2], b[1][1] = bk[3];
            } else {
                ldmatrix_x2(b[0], smem_addr(op.k_tile + (key0 + lane % 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8));
            }
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                if (mt >= m_tiles) break;
                uint32_t a[4];
                ldmatrix_x4(a, smem_addr(op.q_s + (16 * mt + lane % 16) * kStride + kk * 16 + (lane / 16) * 8));
#pragma unroll
                for (int t = 0; t < kNTiles; ++t) mma_16816<T>(s[mt][t], a, b[t][0], b[t][1]);
            }
        }

        // X = c transform(S), then P of this warp's columns, written to p_s for every warp's P V
        // (c, the factor left to the softmax, is the same for every tile of a call).
        float c = 1.f;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if (mt >= m_tiles) break;
            c = transform_scores<Tile, kNTiles>(s[mt], p, ctx, rows[mt], n, op.keys.keep, op.keys.bias,
                                                op.gathered ? op.keys.key : nullptr, op.qmask, 16 * mt + gid, key0);
        }
        softmax.update(s, acc_o, m_tiles, red_s, c);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if (mt >= m_tiles) break;
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int t = 0; t < kNTiles; ++t)
                    *reinterpret_cast<uint32_t *>(p_s + (16 * mt + gid + 8 * r) * kPStride + key0 + 8 * t + 2 * tig) =
                        pack2<T>(s[mt][t][2 * r], s[mt][t][2 * r + 1]);
        }
        __syncthreads();

        // O[:, col0 : col0 + kWarpCols] += P V[:, col0 : col0 + kWarpCols].
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
            uint32_t b[kDTiles][2];
#pragma unroll
            for (int dd = 0; dd + 1 < kDTiles; dd += 2) {
                const int mi = lane / 8;
                uint32_t bv[4];
                ldmatrix_x4_trans(bv, smem_addr(op.v_tile + (kk * 16 + lane % 8 + (mi % 2) * 8) * kStride + col0 + dd * 8 +
                                                (mi / 2) * 8));
                b[dd][0] = bv[0], b[dd][1] = bv[1], b[dd + 1][0] = bv[2], b[dd + 1][1] = bv[3];
            }
            if constexpr (kDTiles % 2 == 1) {
                ldmatrix_x2_trans(b[kDTiles - 1], smem_addr(op.v_tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride +
                                                            col0 + (kDTiles - 1) * 8));
            }
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                if (mt >= m_tiles) break;
                uint32_t a[4];
                ldmatrix_x4(a, smem_addr(p_s + (16 * mt + lane % 16) * kPStride + kk * 16 + (lane / 16) * 8));
#pragma unroll
                for (int d = 0; d < kDTiles; ++d) mma_16816<T>(acc_o[mt][d], a, b[d][0], b[d][1]);
            }
        }
    }

    __device__ __forceinline__ void finalize() { softmax.finalize(acc_o, lse, m_tiles, red_s); }

    template <class F>
    __device__ __forceinline__ void for_each_output(const F &f) const {
        const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if (mt >= m_tiles) break;
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int d = 0; d < kDTiles; ++d)
                    f(16 * mt + gid + 8 * r, col0 + d * 8 + 2 * tig, acc_o[mt][d][2 * r], acc_o[mt][d][2 * r + 1]);
        }
    }
    // Every warp holds the same lse: warp 0 stores it.
    template <class F>
    __device__ __forceinline__ void for_each_lse(const F &f) const {
        if (threadIdx.x >= 32 || threadIdx.x % 4 != 0) return;
        const int gid = threadIdx.x / 4;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if (mt >= m_tiles) break;
            f(16 * mt + gid, lse[mt][0]);
            f(16 * mt + gid + 8, lse[mt][1]);
        }
    }
};

}  // namespace fdm
