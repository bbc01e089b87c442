// combine.cu: the split-KV merge. Each of num_splits CTAs left, for every (query row, head), its
// normalized partial output O_s and log-sum-exp lse_s over its key range. Then
//   lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) O_s
// and a row that saw no key in any range gets out = 0, lse = -inf.
//
// The merge is a few dependent rounds of loads per (row, head) pair, so its time is their latency:
// with many splits (a long sequence cut for a small batch: decode-c has 33) the pair's splits
// are shared by up to 4 warps, each summing its own share, so each warp waits for about one
// round of 8 loads instead of several.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "fwd_launch.h"
#include "pdl.cuh"
#include "softmax.cuh"
#include "tiles.cuh"

namespace fdm {

constexpr int kCombineWarps = 4;                     // warps per CTA
constexpr int kCombineMaxCols = 256 / 4;             // float4 columns of the widest head (D = 256)
constexpr int kLaneSplits = kMaxSplits / 32;         // log-sum-exps per lane at most

// Warps that share one pair's splits: about 8 splits (one round of loads) per warp, at most 4.
inline int combine_warps_per_pair(int num_splits) { return num_splits > 16 ? 4 : num_splits > 8 ? 2 : 1; }

template <class T>
__global__ void __launch_bounds__(32 * kCombineWarps)
    combine_kernel(const __grid_constant__ fdm_params p, const FwdPlan plan, int warps_per_pair) {
    __shared__ float weight_s[kCombineWarps][kMaxSplits];         // exp(lse_s - lse) of each warp's pair
    __shared__ float4 partial_s[kCombineWarps][kCombineMaxCols];  // each warp's share of out, (D / 4)
    const int num_splits = plan.num_splits, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int share = warp % warps_per_pair;  // this warp sums splits share, share + warps_per_pair, ...
    const int64_t pair = static_cast<int64_t>(blockIdx.x) * (kCombineWarps / warps_per_pair) + warp / warps_per_pair;
    const bool active = pair < p.total_q * p.num_heads;  // the last CTA's spare warps only meet the barrier
    wait_for_prior_grid();  // the forward's partials (launched programmatically on compute capability 9.0+)
    const int64_t q_row = pair / p.num_heads, h = pair % p.num_heads;
    const int64_t head_dim = p.head_dim;
    const WorkspaceLayout &w = plan.ws;
    const unsigned char *base = static_cast<const unsigned char *>(p.workspace);
    const float *o_partial = reinterpret_cast<const float *>(base + w.o_partial);      // (splits, total_q, H, D)
    const float *lse_partial = reinterpret_cast<const float *>(base + w.lse_partial);  // (splits, H, total_q)

    // lse over all splits (every warp of the pair computes it): lane l holds splits l + 32 k.
    float lse_s[kLaneSplits];
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < kLaneSplits; ++k) {
        const int s = lane + 32 * k;
        lse_s[k] = active && s < num_splits ? lse_partial[(s * p.num_heads + h) * p.total_q + q_row] : -INFINITY;
        m = fmaxf(m, lse_s[k]);
    }
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    if (m != -INFINITY)
#pragma unroll
        for (int k = 0; k < kLaneSplits; ++k) sum += expf(lse_s[k] - m);  // exp(-inf) = 0 past num_splits
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float lse = sum > 0.f ? m + logf(sum) : -INFINITY;
    float *weight = weight_s[warp];
#pragma unroll
    for (int k = 0; k < kLaneSplits; ++k)
        if (lane + 32 * k < num_splits) weight[lane + 32 * k] = lse != -INFINITY ? expf(lse_s[k] - lse) : 0.f;
    __syncwarp();

    // This warp's share of out[col .. col + 3] = sum_s weight[s] O_s[col .. col + 3]: 4 columns per
    // lane (D is a multiple of 8), the loads of 8 splits in flight at a time.
    T *out_row = static_cast<T *>(p.out) + q_row * p.out_row_stride + h * p.out_head_stride;
    const float *o_pair = o_partial + (q_row * p.num_heads + h) * head_dim;  // split s at + s * split_step
    const int64_t split_step = p.total_q * p.num_heads * head_dim;
    const auto store = [&](int64_t col, float4 acc) {
        *reinterpret_cast<uint32_t *>(out_row + col) = pack2<T>(acc.x, acc.y);
        *reinterpret_cast<uint32_t *>(out_row + col + 2) = pack2<T>(acc.z, acc.w);
    };
    for (int64_t col = 4 * lane; active && col < head_dim; col += 128) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int s = share; s < num_splits; s += warps_per_pair) {
            const float ws = weight[s];  // 0 for a range that saw no key
            const float4 o = *reinterpret_cast<const float4 *>(o_pair + s * split_step + col);
            acc.x += ws * o.x;
            acc.y += ws * o.y;
            acc.z += ws * o.z;
            acc.w += ws * o.w;
        }
        if (warps_per_pair == 1)
            store(col, acc);
        else
            partial_s[warp][col / 4] = acc;
    }
    if (warps_per_pair > 1) {
        // The first warp of the pair adds the other warps' shares.
        __syncthreads();
        for (int64_t col = 4 * lane; active && share == 0 && col < head_dim; col += 128) {
            float4 acc = partial_s[warp][col / 4];
            for (int other = 1; other < warps_per_pair; ++other) {
                const float4 o = partial_s[warp + other][col / 4];
                acc.x += o.x;
                acc.y += o.y;
                acc.z += o.z;
                acc.w += o.w;
            }
            store(col, acc);
        }
    }
    if (active && share == 0 && lane == 0) p.lse[h * p.lse_head_stride + q_row] = lse;
}

template <class T>
int run_combine(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream) {
    const int warps_per_pair = combine_warps_per_pair(plan.num_splits);
    const int64_t pairs = p.total_q * p.num_heads, pairs_per_cta = kCombineWarps / warps_per_pair;
    const int64_t blocks = (pairs + pairs_per_cta - 1) / pairs_per_cta;
    if (blocks == 0) return FDM_OK;
    if (blocks > 0x7fffffffLL) return FDM_ERR_GRID;
    const cudaError_t err =
        launch_maybe_programmatic(combine_kernel<T>, static_cast<unsigned>(blocks), 32 * kCombineWarps, 0, stream,
                                  plan.programmatic != 0, p, plan, warps_per_pair);
    return err == cudaSuccess ? FDM_OK : FDM_ERR_CUDA;
}

template int run_combine<__half>(const fdm_params &, const FwdPlan &, cudaStream_t);
template int run_combine<__nv_bfloat16>(const fdm_params &, const FwdPlan &, cudaStream_t);

}  // namespace fdm
