// warpgroup_math.cuh: the math of one key tile in the warpgroup layout (sm_90a, wgmma).
//
// The CTA's 2 warpgroups (4 warps each) split the block's 128 rows: warpgroup wg owns rows
// [64 wg, 64 wg + 64), warp w of it rows 64 wg + 16 w + [0, 16), every key of the tile and every
// head-dim column of O. For the key tile n staged in shared memory (swizzled, wgmma.cuh):
//   S = Q K_n^T       wgmma m64n{kBlockN}k16, Q and K read by the tensor cores from shared memory
//   X = transform(S)  scale, softcap, bias, mask, causal, length (masking.cuh)
//   P = online_softmax(X)   registers (softmax.cuh)
//   O += P V_n        wgmma m64n{D}k16, P from registers (the S accumulators rounded to T), V
//                     from shared memory read MN-major
// S and O have the register layout of mma.sync's C fragments (wgmma_ops.cuh), so the masking and
// the softmax are the ones RowSplitMath uses. Compared with it, a warp's rows need no ldmatrix of
// Q, K or V (the tensor cores read shared memory themselves), and one wgmma covers 64 rows and
// up to 256 columns, which mma.sync's 16 x 8 tiles cannot keep fed (docs/notes.md, version 13).
// The interface is tile_math.cuh's: step() per tile, finalize(), for_each_output(), for_each_lse();
// and store_output(), which writes out through shared memory in 16-byte rows.
#pragma once

#include "../fdm_params.h"
#include "key_tiles.cuh"
#include "masking.cuh"
#include "softmax.cuh"
#include "tile_math.cuh"
#include "tiles.cuh"
#include "wgmma.cuh"

namespace fdm {

template <class T, class Tile>
struct WarpgroupMath {
    static constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kHeadDim = Tile::kHeadDim;
    static constexpr int kNTiles = kBlockN / 8;   // 8-key column tiles of S per warp
    static constexpr int kDTiles = kHeadDim / 8;  // 8-column tiles of O per warp

    float acc_o[kDTiles][4];  // O, rows row0() + (gid, gid + 8), columns 8d + 2tig + {0, 1}
    OnlineSoftmax<kDTiles> softmax;
    RowInfo rows;
    bool active;              // this warpgroup holds rows of the block (uniform per warpgroup)
    bool pingpong;            // both warpgroups hold rows (uniform per CTA): their steps are staggered
    float lse[2];

    // Named barrier of the stagger (0 is __syncthreads'): warpgroup 0 arrives once its S MMAs are
    // issued, warpgroup 1 waits for that before it issues its own.
    static constexpr int kStaggerBarrier = 1;
    // Named barrier of warpgroup wg's output tile (store_output): kOutputBarrier + wg.
    static constexpr int kOutputBarrier = 2;

    __device__ __forceinline__ static int warpgroup() { return static_cast<int>(threadIdx.x / 128); }
    // First row of this warp's 16.
    __device__ __forceinline__ static int row0() {
        return 64 * warpgroup() + 16 * static_cast<int>((threadIdx.x / 32) % 4);
    }

    __device__ __forceinline__ WarpgroupMath(const MaskContext &ctx, int valid_rows, unsigned char *) {
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) acc_o[d][0] = acc_o[d][1] = acc_o[d][2] = acc_o[d][3] = 0.f;
        active = 64 * warpgroup() < valid_rows;
        pingpong = valid_rows > 64;
        rows = make_row_info(ctx, row0() + (threadIdx.x % 32) / 4);
    }

    // The step of tile n. issue_next() (the next tile's staging and K/V copies; it may hold CTA
    // barriers) is called exactly once by every thread, while this warpgroup's S MMAs run.
    // The warpgroups are staggered so that one's softmax runs while the other's MMAs use the
    // tensor cores: S_0 | S_1, softmax_0 | O_0 += P_0 V, softmax_1 | O_1 += P_1 V.
    template <class IssueNext>
    __device__ __forceinline__ void step(const TileOperands<T> &op, const fdm_params &p, const MaskContext &ctx, int n,
                                         const IssueNext &issue_next) {
        if (!active) {  // a short last block: the second warpgroup has no rows
            issue_next();
            return;
        }
        const int gid = (threadIdx.x % 32) / 4;

        // S = Q K^T: (64, kBlockN) per warpgroup, kHeadDim / 16 MMAs of K = 16.
        float s[kNTiles][4];
        float(&s_flat)[kNTiles * 4] = reinterpret_cast<float(&)[kNTiles * 4]>(s);
        // Shared addresses of its rows of each block of Q and of the K tile, broadcast from lane 0
        // (uniform_u32): the compiler then builds the MMAs' descriptors in uniform registers, four
        // uniform instructions per MMA instead of ~14 in the lanes' registers and R2UR moves.
        const uint32_t q_rows = uniform_u32(smem_addr(op.q_s) + warpgroup() * 64 * kSwizzleRowBytes);
        const uint32_t k_tile = uniform_u32(smem_addr(op.k_tile));
        if (pingpong && warpgroup() == 1) named_barrier_sync(kStaggerBarrier, Tile::kThreads);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk)
            wgmma_qk<T, kBlockN>(s_flat, kmajor_descriptor<kBlockM>(q_rows, kk), kmajor_descriptor<kBlockN>(k_tile, kk),
                                 kk > 0);
        wgmma_commit();
        if (pingpong && warpgroup() == 0) named_barrier_arrive(kStaggerBarrier, Tile::kThreads);
        issue_next();
        wgmma_wait<0>();
        fence_registers(s_flat);

        // X = transform(S) in the log2 domain, then P; O is rescaled by the softmax.
        const float c = transform_scores<Tile, kNTiles>(s, p, ctx, rows, n, op.keys.keep, op.keys.bias,
                                                        op.gathered ? op.keys.key : nullptr, op.qmask, op.mask_full,
                                                        row0() + gid, 0);
        softmax.update(s, acc_o, c);

        // O += P V: P (64, kBlockN) as A fragments straight from the S accumulators.
        uint32_t a[kBlockN / 16][4];
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) p_fragment<T>(s, kk, a[kk]);
        float(&o_flat)[kDTiles * 4] = reinterpret_cast<float(&)[kDTiles * 4]>(acc_o);
        const uint32_t v_tile = uniform_u32(smem_addr(op.v_tile));
        fence_registers(o_flat);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) wgmma_pv<T, kHeadDim>(o_flat, a[kk], mnmajor_descriptor<kBlockN>(v_tile, kk));
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(o_flat);
    }

    __device__ __forceinline__ void finalize() { softmax.finalize(acc_o, lse); }

    template <class RowDest, class Store>
    __device__ __forceinline__ void for_each_output(const RowDest &row_dest, const Store &store) const {
        const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const auto dst = row_dest(row0() + gid + 8 * r);
#pragma unroll
            for (int d = 0; d < kDTiles; ++d) store(dst, d * 8 + 2 * tig, acc_o[d][2 * r], acc_o[d][2 * r + 1]);
        }
    }

    // Stores O (finalized) rounded to T through shared memory: this warpgroup's 64 rows go to its rows
    // of o_s, a swizzled (kBlockM, kHeadDim) tile (conflict-free 4-byte writes: the 8 rows of a
    // fragment sit in 8 different 16-byte bank groups), then to global memory in 16-byte chunks,
    // row_dest(row) being the row's destination (nullptr: not stored) and columns from head_dim on
    // left out. The caller passes the Q tile: this warpgroup's S = Q K^T MMAs have completed and it
    // reads no other warpgroup's rows, so only its own 128 threads need to meet. A thread then
    // issues kHeadDim / 16 16-byte stores instead of kHeadDim / 4 4-byte ones, whose queue
    // held the CTA's end (docs/notes.md, version 33).
    template <class RowDest>
    __device__ __forceinline__ void store_output(T *o_s, const RowDest &row_dest, int head_dim) const {
        if (!active) return;
        const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0() + gid + 8 * r;
#pragma unroll
            for (int d = 0; d < kDTiles; ++d)
                *reinterpret_cast<uint32_t *>(o_s + Tile::template offset<kBlockM>(row, d * 8 + 2 * tig)) =
                    pack2<T>(acc_o[d][2 * r], acc_o[d][2 * r + 1]);
        }
        if (warpgroup() == 0)  // (constant barrier ids: a computed one makes ptxas reserve all 16)
            named_barrier_sync(kOutputBarrier, 128);
        else
            named_barrier_sync(kOutputBarrier + 1, 128);
        constexpr int kChunksPerRow = kHeadDim / 8, kRowsPerPass = 128 / kChunksPerRow;
        const int t = threadIdx.x % 128, col = (t % kChunksPerRow) * 8;
        if (col >= head_dim) return;
#pragma unroll
        for (int it = 0; it < 64 / kRowsPerPass; ++it) {
            const int row = 64 * warpgroup() + t / kChunksPerRow + it * kRowsPerPass;
            T *dst = row_dest(row);
            if (dst != nullptr)
                *reinterpret_cast<uint4 *>(dst + col) =
                    *reinterpret_cast<const uint4 *>(o_s + Tile::template offset<kBlockM>(row, col));
        }
    }

    template <class F>
    __device__ __forceinline__ void for_each_lse(const F &f) const {
        if (threadIdx.x % 4 != 0) return;
        const int gid = (threadIdx.x % 32) / 4;
        f(row0() + gid, lse[0]);
        f(row0() + gid + 8, lse[1]);
    }
};

}  // namespace fdm
