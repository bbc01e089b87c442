// softmax.cuh: the online softmax, in registers, of a warp that owns 16 rows of a key tile's
// scores (all of the tile's keys, or a slice of them: tile_math.cuh's KeySplitMath merges the
// slices' states once, at the end).
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

template <int kDTiles>
struct OnlineSoftmax {
    float row_max[2];  // m, log2 domain, rows gid and gid + 8
    float row_sum[2];  // l, this thread's partial sum (the quad is summed at the end)

    __device__ __forceinline__ OnlineSoftmax() {
        row_max[0] = row_max[1] = -INFINITY;
        row_sum[0] = row_sum[1] = 0.f;
    }

    // s: (kNTiles, 4) scores (x = c s), replaced by P = 2^(c s - m'); acc_o rescaled by alpha.
    template <int kNTiles>
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

}  // namespace fdm
