// softmax.cuh: the online softmax, in registers: OnlineSoftmax for a warp that owns whole rows,
// KeySplitSoftmax for the key-split layout, where each warp holds a slice of every row's keys.
//
// OnlineSoftmax: a thread holds two rows (gid and gid + 8 of its warp's 16) and, per 8-key MMA tile, two scores of
// each row. Scores arrive as s with x = c s in the log2 domain (c > 0, from transform_scores: the
// scale times log2 e still to apply, or 1), so that exp becomes exp2 and c folds into its FFMA. Per row:
//   m' = max(m, c max_j s_j);  alpha = 2^(m - m');  l = alpha * l + sum_j 2^(c s_j - m');  O = alpha * O
// A row that has seen only -inf keeps m = -inf, l = 0, O = 0 (no NaN from -inf - -inf).
#pragma once

#include <math.h>

namespace fdm {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Max / sum over the 4 threads (tig = 0..3) that share a row.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int kNTiles, int kDTiles>
struct OnlineSoftmax {
    float row_max[2];  // m, log2 domain, rows gid and gid + 8
    float row_sum[2];  // l, this thread's partial sum (the quad is summed at the end)

    __device__ __forceinline__ OnlineSoftmax() {
        row_max[0] = row_max[1] = -INFINITY;
        row_sum[0] = row_sum[1] = 0.f;
    }

    // s: (kNTiles, 4) scores (x = c s), replaced by P = 2^(c s - m'); acc_o rescaled by alpha.
    __device__ __forceinline__ void update(float (&s)[kNTiles][4], float (&acc_o)[kDTiles][4], float c) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float tile_max = -INFINITY;
#pragma unroll
            for (int t = 0; t < kNTiles; ++t) tile_max = fmaxf(tile_max, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
            const float new_max = fmaxf(row_max[r], quad_max(tile_max) * c);
            const float base = new_max == -INFINITY ? 0.f : new_max;  // all hidden so far: P = 0
            const float alpha = exp2f(row_max[r] - base);
            row_max[r] = new_max;
            float sum = 0.f;
#pragma unroll
            for (int t = 0; t < kNTiles; ++t) {
                s[t][2 * r] = exp2f(fmaf(s[t][2 * r], c, -base));
                s[t][2 * r + 1] = exp2f(fmaf(s[t][2 * r + 1], c, -base));
                sum += s[t][2 * r] + s[t][2 * r + 1];
            }
            row_sum[r] = alpha * row_sum[r] + sum;
#pragma unroll
            for (int d = 0; d < kDTiles; ++d) {
                acc_o[d][2 * r] *= alpha;
                acc_o[d][2 * r + 1] *= alpha;
            }
        }
    }

    // O = O / l and lse = ln(sum exp(s)) = (m + log2 l) ln 2; a row with l = 0 gets O = 0, lse = -inf.
    __device__ __forceinline__ void finalize(float (&acc_o)[kDTiles][4], float (&lse)[2]) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = quad_sum(row_sum[r]);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            lse[r] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -INFINITY;
#pragma unroll
            for (int d = 0; d < kDTiles; ++d) {
                acc_o[d][2 * r] *= inv;
                acc_o[d][2 * r + 1] *= inv;
            }
        }
    }
};

// The key-split layout (tile_math.cuh): warp w holds columns [w * 8 kNTiles, (w + 1) * 8 kNTiles)
// of the tile for every row, kMTiles blocks of 16 rows (the first m_tiles of them in use). The row
// maximum of a tile is the maximum of the warps' maxima, exchanged through red_s (kWarps, 16 kMTiles);
// then every warp computes the same m', alpha and its own columns' P. Each warp keeps a partial
// row sum l_w over its columns (all scaled by the same m), so l = sum_w l_w is formed once, at the end.
template <int kMTiles, int kNTiles, int kDTiles, int kWarps>
struct KeySplitSoftmax {
    static constexpr int kBlockM = 16 * kMTiles;
    float row_max[kMTiles][2];  // m, log2 domain, rows 16 mt + gid + 8 r (the same in every warp)
    float row_sum[kMTiles][2];  // l_w: this thread's partial sum over its warp's columns

    __device__ __forceinline__ KeySplitSoftmax() {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            row_max[mt][0] = row_max[mt][1] = -INFINITY;
            row_sum[mt][0] = row_sum[mt][1] = 0.f;
        }
    }

    // v[mt][r] (this thread's part of row 16 mt + gid + 8 r) -> the max (kMax) or sum over the
    // row's quad and then over the warps, exchanged through red_s. One CTA barrier; red_s must not
    // be read by any warp still (the callers' barriers see to it).
    template <bool kMax>
    __device__ __forceinline__ static void reduce_over_warps(float (&v)[kMTiles][2], int m_tiles, float *red_s) {
        const int warp = threadIdx.x / 32, gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if (mt >= m_tiles) break;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float quad = kMax ? quad_max(v[mt][r]) : quad_sum(v[mt][r]);
                if (tig == 0) red_s[warp * kBlockM + 16 * mt + gid + 8 * r] = quad;
            }
        }
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if (mt >= m_tiles) break;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float *row = red_s + 16 * mt + gid + 8 * r;
                float x = row[0];
#pragma unroll
                for (int w = 1; w < kWarps; ++w) x = kMax ? fmaxf(x, row[w * kBlockM]) : x + row[w * kBlockM];
                v[mt][r] = x;
            }
        }
    }

    // s: (kMTiles, kNTiles, 4) scores (x = c s, as OnlineSoftmax), replaced by P = 2^(c s - m');
    // acc_o rescaled by alpha. Contains one CTA barrier (every thread must call it).
    __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float (&acc_o)[kMTiles][kDTiles][4],
                                          int m_tiles, float *red_s, float c) {
        float tile_max[kMTiles][2];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                tile_max[mt][r] = -INFINITY;
#pragma unroll
                for (int t = 0; t < kNTiles; ++t)
                    tile_max[mt][r] = fmaxf(tile_max[mt][r], fmaxf(s[mt][t][2 * r], s[mt][t][2 * r + 1]));
            }
        reduce_over_warps<true>(tile_max, m_tiles, red_s);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if (mt >= m_tiles) break;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float new_max = fmaxf(row_max[mt][r], tile_max[mt][r] * c);
                const float base = new_max == -INFINITY ? 0.f : new_max;  // all hidden so far: P = 0
                const float alpha = exp2f(row_max[mt][r] - base);
                row_max[mt][r] = new_max;
                float sum = 0.f;
#pragma unroll
                for (int t = 0; t < kNTiles; ++t) {
                    s[mt][t][2 * r] = exp2f(fmaf(s[mt][t][2 * r], c, -base));
                    s[mt][t][2 * r + 1] = exp2f(fmaf(s[mt][t][2 * r + 1], c, -base));
                    sum += s[mt][t][2 * r] + s[mt][t][2 * r + 1];
                }
                row_sum[mt][r] = alpha * row_sum[mt][r] + sum;
#pragma unroll
                for (int d = 0; d < kDTiles; ++d) {
                    acc_o[mt][d][2 * r] *= alpha;
                    acc_o[mt][d][2 * r + 1] *= alpha;
                }
            }
        }
    }

    // O = O / l, lse = (m + log2 l) ln 2 with l = sum over warps (exchanged through red_s, which no
    // warp may still be reading: the caller's last barrier came after the last update). One barrier.
    __device__ __forceinline__ void finalize(float (&acc_o)[kMTiles][kDTiles][4], float (&lse)[kMTiles][2], int m_tiles,
                                             float *red_s) {
        float l[kMTiles][2];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) l[mt][0] = row_sum[mt][0], l[mt][1] = row_sum[mt][1];
        reduce_over_warps<false>(l, m_tiles, red_s);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if (mt >= m_tiles) break;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float inv = l[mt][r] > 0.f ? 1.f / l[mt][r] : 0.f;
                lse[mt][r] = l[mt][r] > 0.f ? (row_max[mt][r] + log2f(l[mt][r])) * kLn2 : -INFINITY;
#pragma unroll
                for (int d = 0; d < kDTiles; ++d) {
                    acc_o[mt][d][2 * r] *= inv;
                    acc_o[mt][d][2 * r + 1] *= inv;
                }
            }
        }
    }
};

}  // namespace fdm
