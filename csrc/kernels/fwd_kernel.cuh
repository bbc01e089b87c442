// fwd_kernel.cuh: the varlen attention forward kernel (SPEC.md section 1) on tensor cores.
//
// One CTA computes one (row block of kBlockM rows, head block, sequence b, key range); each of its
// 4 warps owns 16 rows. A row is one (query, head) pair: with packed GQA (launch_plan.h) the
// P heads of a KV group share a CTA, so row R is query R / P of head h0 + R % P; without it P = 1.
// For every visible key tile n (kBlockN keys) of the CTA's key range:
//   S = Q K_n^T                     mma.sync, Q and K from shared memory (ldmatrix)
//   X = transform(S) * log2 e       scale, softcap, bias, mask, causal, length (masking.cuh)
//   P = online_softmax(X)           registers (softmax.cuh)
//   O += P V_n                      mma.sync, P from registers, V via ldmatrix.trans
// K/V tiles are double-buffered with cp.async: tile n+1 is in flight while tile n is computed.
// Key tiles whose mask hides every pair are never loaded, and with gathered keys a tile holds
// only visible keys (key_tiles.cuh). With split-KV the CTA writes its normalized partial O and lse
// to the workspace for the combine kernel.
#pragma once

#include "../fdm_params.h"
#include "key_tiles.cuh"
#include "launch_plan.h"
#include "masking.cuh"
#include "softmax.cuh"
#include "tiles.cuh"

namespace fdm {

template <class T, int kHeadDim>
__global__ void __launch_bounds__(FwdTile<kHeadDim>::kThreads)
    fwd_kernel(const __grid_constant__ fdm_params p, const FwdPlan plan) {
    using Tile = FwdTile<kHeadDim>;
    constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kStride = Tile::kRowStride;
    constexpr int kNTiles = kBlockN / 8;   // 8-key MMA tiles of S per warp
    constexpr int kDTiles = kHeadDim / 8;  // 8-column MMA tiles of O per warp

    // blockIdx.x = ((b * head_blocks + head_block) * num_m_blocks + m_block) * num_splits + split:
    // neighbouring CTAs share K/V in L2.
    int64_t idx = blockIdx.x;
    const int split = static_cast<int>(idx % plan.num_splits);
    idx /= plan.num_splits;
    const int m_block = static_cast<int>(idx % plan.num_m_blocks);
    idx /= plan.num_m_blocks;
    const int P = plan.heads_per_cta;
    const int64_t head_blocks = p.num_heads / P;
    const int64_t h0 = (idx % head_blocks) * P;  // first query head of the CTA
    const int64_t b = idx / head_blocks;
    const int64_t group = p.num_heads / p.num_heads_k;

    MaskContext ctx;
    ctx.seq = fdm_seq_of(&p, b);
    ctx.seq.len_k = min_i64(ctx.seq.len_k, p.max_seqlen_k);  // query-based rows hold max_seqlen_k keys at most
    ctx.hk = h0 / group;
    ctx.g = h0 % group;
    ctx.heads_per_cta = P;
    ctx.m0 = m_block * kBlockM;
    ctx.is_causal = p.is_causal;
    if (ctx.m0 >= ctx.seq.len_q * P) return;
    const int valid_rows = static_cast<int>(min_i64(kBlockM, ctx.seq.len_q * P - ctx.m0));

    // Keys past the causal limit of the block's last query are never visited; this CTA's key range
    // is tiles [n_begin, n_stop) (virtual tiles of kGatherChunk-key chunks when gathering).
    ctx.key_end = ctx.seq.len_k;
    if (p.is_causal)
        ctx.key_end = min_i64(ctx.key_end, fdm_causal_last_key(&ctx.seq, (ctx.m0 + valid_rows - 1) / P) + 1);
    int num_n_tiles = 0;
    if (ctx.key_end > 0)
        num_n_tiles = plan.gather ? static_cast<int>((ctx.key_end + kGatherChunk - 1) / kGatherChunk) * plan.tiles_per_chunk
                                  : static_cast<int>((ctx.key_end + kBlockN - 1) / kBlockN);
    const int n_begin = split * plan.tiles_per_split;
    const int n_stop = static_cast<int>(min_i64(num_n_tiles, n_begin + plan.tiles_per_split));
    const GatheredKeys gathered = plan.gather ? GatheredKeys::of(p, plan, ctx) : GatheredKeys{nullptr, nullptr};

    extern __shared__ __align__(16) unsigned char smem[];
    T *q_s = reinterpret_cast<T *>(smem);                                 // (kBlockM, kStride)
    T *k_s = q_s + Tile::kQElems;                                         // (kStages, kBlockN, kStride)
    T *v_s = k_s + Tile::kStages * Tile::kKVElems;                        // (kStages, kBlockN, kStride)
    int64_t *row_s = reinterpret_cast<int64_t *>(v_s + Tile::kStages * Tile::kKVElems);  // (kStages, kBlockN)
    float *bias_s = reinterpret_cast<float *>(row_s + Tile::kStages * kBlockN);          // (kStages, kBlockN)
    int *key_s = reinterpret_cast<int *>(bias_s + Tile::kStages * kBlockN);              // (kStages, kBlockN)
    uint8_t *keep_s = reinterpret_cast<uint8_t *>(key_s + Tile::kStages * kBlockN);      // (kStages, kBlockN)
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
            const int packed = ctx.m0 + r;
            return r < valid_rows ? q_g + (packed / P) * p.q_row_stride + (packed % P) * p.q_head_stride : nullptr;
        },
        q_g, head_dim);
    cp_async_commit();

    // Finds the first visible key tile at or after n, staging its per-key data in `stage`.
    KeyColumn fetched_ahead;
    fetched_ahead.n = -1;
    auto next_visible = [&](int n, int stage) {
        while (true) {
            if (plan.gather) n = skip_empty_subtiles<Tile>(plan, gathered, n, n_stop);
            if (n >= n_stop || prepare_key_tile<Tile>(p, plan, ctx, gathered, n, n_stop, key_stage(stage), fetched_ahead))
                return n;
            ++n;
        }
    };
    auto load_kv_async = [&](int n, int stage) {
        load_key_tile_async<Tile>(p, plan, ctx, n, key_stage(stage), k_s + stage * Tile::kKVElems,
                                  v_s + stage * Tile::kKVElems);
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gid = lane / 4, tig = lane % 4;
    const int warp_row0 = warp * 16;  // first row of this warp inside the block
    const bool warp_has_rows = warp_row0 < valid_rows;  // else it only helps with loads (decode)
    const RowInfo rows = make_row_info(ctx, warp_row0 + gid);

    float acc_o[kDTiles][4];  // O, rows (gid, gid + 8), columns 8d + 2tig + {0, 1}
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) acc_o[d][0] = acc_o[d][1] = acc_o[d][2] = acc_o[d][3] = 0.f;
    OnlineSoftmax<kNTiles, kDTiles> softmax;

    int stage = 0;
    int n = next_visible(n_begin, stage);
    if (n < n_stop) load_kv_async(n, stage);

    while (n < n_stop) {
        const int n_next = next_visible(n + 1, stage ^ 1);
        if (n_next < n_stop) {
            load_kv_async(n_next, stage ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (warp_has_rows) {
            const T *k_tile = k_s + stage * Tile::kKVElems;
            const T *v_tile = v_s + stage * Tile::kKVElems;

            // S = Q K^T: (16, kBlockN) per warp.
            float s[kNTiles][4];
#pragma unroll
            for (int t = 0; t < kNTiles; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                uint32_t a[4];
                ldmatrix_x4(a, smem_addr(q_s + (warp_row0 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8));
#pragma unroll
                for (int nn = 0; nn < kBlockN / 16; ++nn) {
                    const int mi = lane / 8;
                    uint32_t bk[4];
                    ldmatrix_x4(bk, smem_addr(k_tile + (nn * 16 + lane % 8 + (mi / 2) * 8) * kStride + kk * 16 +
                                              (mi % 2) * 8));
                    mma_16816<T>(s[2 * nn], a, bk[0], bk[1]);
                    mma_16816<T>(s[2 * nn + 1], a, bk[2], bk[3]);
                }
            }

            // X = transform(S) in the log2 domain.
            const KeyStage st = key_stage(stage);
            transform_scores<Tile, kNTiles>(s, p, ctx, rows, n, st.keep, st.bias, plan.gather ? st.key : nullptr);
            softmax.update(s, acc_o);

            // O += P V: P (16, kBlockN) as A fragments straight from the S accumulators.
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                uint32_t a[4];
                a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
                a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
                a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dd = 0; dd < kHeadDim / 16; ++dd) {
                    const int mi = lane / 8;
                    uint32_t bv[4];
                    ldmatrix_x4_trans(bv, smem_addr(v_tile + (kk * 16 + lane % 8 + (mi % 2) * 8) * kStride + dd * 16 +
                                                    (mi / 2) * 8));
                    mma_16816<T>(acc_o[2 * dd], a, bv[0], bv[1]);
                    mma_16816<T>(acc_o[2 * dd + 1], a, bv[2], bv[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with `stage` before it is refilled
        n = n_next;
        stage ^= 1;
    }
    cp_async_wait<0>();  // the Q copy, when no key tile was visible

    // out = O / l, lse = ln l + m; rows past the sequence are not written. With split-KV this
    // CTA's partial goes to the workspace: o_partial (splits, total_q, H, D), lse_partial (splits, H, total_q).
    float lse[2];
    softmax.finalize(acc_o, lse);
    const WorkspaceLayout w = workspace_layout(&p, &plan);
    float *o_partial = reinterpret_cast<float *>(static_cast<unsigned char *>(p.workspace) + w.o_partial);
    float *lse_partial = reinterpret_cast<float *>(static_cast<unsigned char *>(p.workspace) + w.lse_partial);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = warp_row0 + gid + r * 8;
        if (row >= valid_rows) continue;
        const int packed = ctx.m0 + row;
        const int64_t q_row = ctx.seq.q_start + packed / P, h = h0 + packed % P;
        if (plan.num_splits == 1) {
            T *out_row = static_cast<T *>(p.out) + q_row * p.out_row_stride + h * p.out_head_stride;
#pragma unroll
            for (int d = 0; d < kDTiles; ++d) {
                const int col = d * 8 + 2 * tig;
                if (col < head_dim)
                    *reinterpret_cast<uint32_t *>(out_row + col) = pack2<T>(acc_o[d][2 * r], acc_o[d][2 * r + 1]);
            }
            if (tig == 0) p.lse[h * p.lse_head_stride + q_row] = lse[r];
        } else {
            float *o_row = o_partial + ((split * p.total_q + q_row) * p.num_heads + h) * head_dim;
#pragma unroll
            for (int d = 0; d < kDTiles; ++d) {
                const int col = d * 8 + 2 * tig;
                if (col < head_dim) *reinterpret_cast<float2 *>(o_row + col) = make_float2(acc_o[d][2 * r], acc_o[d][2 * r + 1]);
            }
            if (tig == 0) lse_partial[(split * p.num_heads + h) * p.total_q + q_row] = lse[r];
        }
    }
}

}  // namespace fdm
