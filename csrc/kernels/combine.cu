// combine.cu: the split-KV merge. Each of num_splits CTAs left, for every (query row, head), its
// normalized partial output O_s and log-sum-exp lse_s over its key range. Then
//   lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) O_s
// and a row that saw no key in any range gets out = 0, lse = -inf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "fwd_launch.h"
#include "pdl.cuh"
#include "softmax.cuh"
#include "tiles.cuh"

namespace fdm {

constexpr int kCombineWarps = 4;  // one warp per (query row, head)

template <class T>
__global__ void __launch_bounds__(32 * kCombineWarps)
    combine_kernel(const __grid_constant__ fdm_params p, const FwdPlan plan) {
    __shared__ float weight_s[kCombineWarps][kMaxSplits];  // exp(lse_s - lse) of each warp's pair
    const int num_splits = plan.num_splits;
    const int64_t pair = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
    if (pair >= p.total_q * p.num_heads) return;
    const int lane = threadIdx.x % 32;
    wait_for_prior_grid();  // the forward's partials (launched programmatically on compute capability 9.0+)
    const int64_t q_row = pair / p.num_heads, h = pair % p.num_heads;
    const int64_t head_dim = p.head_dim;
    const WorkspaceLayout w = workspace_layout(&p, &plan);
    const unsigned char *base = static_cast<const unsigned char *>(p.workspace);
    const float *o_partial = reinterpret_cast<const float *>(base + w.o_partial);      // (splits, total_q, H, D)
    const float *lse_partial = reinterpret_cast<const float *>(base + w.lse_partial);  // (splits, H, total_q)
    auto lse_of = [&](int s) { return lse_partial[(s * p.num_heads + h) * p.total_q + q_row]; };

    float m = -INFINITY;
    for (int s = lane; s < num_splits; s += 32) m = fmaxf(m, lse_of(s));
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    if (m != -INFINITY)
        for (int s = lane; s < num_splits; s += 32) sum += expf(lse_of(s) - m);
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float lse = sum > 0.f ? m + logf(sum) : -INFINITY;
    float *weight = weight_s[threadIdx.x / 32];
    for (int s = lane; s < num_splits; s += 32) weight[s] = lse != -INFINITY ? expf(lse_of(s) - lse) : 0.f;
    __syncwarp();

    // out[col .. col + 3] = sum_s weight[s] O_s[col .. col + 3]: 4 columns per lane (D is a multiple
    // of 8), the loads of 8 splits in flight at a time.
    T *out_row = static_cast<T *>(p.out) + q_row * p.out_row_stride + h * p.out_head_stride;
    const float *o_pair = o_partial + (q_row * p.num_heads + h) * head_dim;  // split s at + s * split_step
    const int64_t split_step = p.total_q * p.num_heads * head_dim;
    for (int64_t col = 4 * lane; col < head_dim; col += 128) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int s = 0; s < num_splits; ++s) {
            const float ws = weight[s];  // 0 for a range that saw no key
            const float4 o = *reinterpret_cast<const float4 *>(o_pair + s * split_step + col);
            acc.x += ws * o.x;
            acc.y += ws * o.y;
            acc.z += ws * o.z;
            acc.w += ws * o.w;
        }
        *reinterpret_cast<uint32_t *>(out_row + col) = pack2<T>(acc.x, acc.y);
        *reinterpret_cast<uint32_t *>(out_row + col + 2) = pack2<T>(acc.z, acc.w);
    }
    if (lane == 0) p.lse[h * p.lse_head_stride + q_row] = lse;
}

template <class T>
int run_combine(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream) {
    const int64_t pairs = p.total_q * p.num_heads;
    const int64_t blocks = (pairs + kCombineWarps - 1) / kCombineWarps;
    if (blocks == 0) return FDM_OK;
    if (blocks > 0x7fffffffLL) return FDM_ERR_GRID;
    const cudaError_t err = launch_maybe_programmatic(combine_kernel<T>, static_cast<unsigned>(blocks),
                                                      32 * kCombineWarps, 0, stream, plan.programmatic != 0, p, plan);
    return err == cudaSuccess ? FDM_OK : FDM_ERR_CUDA;
}

template int run_combine<__half>(const fdm_params &, const FwdPlan &, cudaStream_t);
template int run_combine<__nv_bfloat16>(const fdm_params &, const FwdPlan &, cudaStream_t);

}  // namespace fdm
