// key_gather.cu: the compaction pass of the gathered-key path (launch_plan.h). For every
// (mask list head, sequence b, chunk ch of C = gather_chunk(block_n) keys, launch_plan.h) one CTA
// reads the key-based mask of the chunk's keys and writes, in ascending order, the local indices j
// of the visible ones:
//   keys[head, k_start + ch * C + e] = e-th visible key of the chunk   (e < count)
//   counts[head, b, ch] = count
// Each list lives in the chunk's own rows, so no prefix sum across chunks (and no second pass)
// is needed; the forward kernel reads a chunk's list only up to its count, and not at all when
// every key of the chunk is visible (it reads the range then, key_tiles.cuh), so such a chunk's
// list is not written.
#include <stdint.h>

#include "fwd_launch.h"
#include "masking.cuh"
#include "pdl.cuh"
#include "tiles.cuh"

namespace fdm {

constexpr int kGatherThreads = 256;
constexpr int kMaxKeysPerThread = 16;  // consecutive keys of one thread: C / kGatherThreads, C <= 4096
static_assert(gather_chunk(128) <= kMaxKeysPerThread * kGatherThreads && gather_chunk(32) % kGatherThreads == 0,
              "every chunk is whole keys per thread, at most kMaxKeysPerThread");

// Bit e: key e of a thread's run of `count` keys (mask element offset + e * stride_k) is visible.
// Every load is issued before any is tested: with a load on each key's dtype branch, tested at
// once (mask_keeps), each load waited for the one before, ~0.5 us a key within a decode call
// (CTAs of 4 keys a thread took ~4 us, of 32 keys 17.6 us: docs/notes.md version 36).
template <class Storage>
__device__ __forceinline__ uint32_t keep_bits(const fdm_operand &m, int64_t offset, int count) {
    const Storage *mask = static_cast<const Storage *>(m.ptr) + offset;
    uint32_t bits[kMaxKeysPerThread];
#pragma unroll
    for (int e = 0; e < kMaxKeysPerThread; ++e) bits[e] = e < count ? mask[e * m.stride_k] : 0u;
    uint32_t keep = 0;
#pragma unroll
    for (int e = 0; e < kMaxKeysPerThread; ++e)
        if (e < count && mask_keeps_bits(m, bits[e])) keep |= 1u << e;
    return keep;
}

__global__ void __launch_bounds__(kGatherThreads)
    gather_keys_kernel(const __grid_constant__ fdm_params p, const FwdPlan plan, int32_t *keys, int32_t *counts) {
    let_dependents_launch();  // the forward may be scheduled now; it waits for this pass to finish
    int64_t idx = blockIdx.x;
    const int chunk = static_cast<int>(idx % plan.max_chunks);
    idx /= plan.max_chunks;
    const int64_t b = idx % p.batch, head = idx / p.batch;
    fdm_seq seq = fdm_seq_of(&p, b);
    seq.len_k = min_i64(seq.len_k, p.max_seqlen_k);
    const int chunk_keys = plan.tiles_per_chunk * plan.block_n;  // C
    const int keys_per_thread = chunk_keys / kGatherThreads;
    const int chunk_start = chunk * chunk_keys;
    if (chunk_start >= seq.len_k) return;  // the forward never reads this chunk
    // A representative (KV head, group index) of the list head (launch_plan.h, gather_list_head).
    const int64_t group_heads = gather_group_heads(&p);
    const int64_t hk = head / group_heads, g = head % group_heads;

    // keep bit e: key j = first + e is visible.
    const int first = chunk_start + threadIdx.x * keys_per_thread;
    const int my_keys = static_cast<int>(min_i64(keys_per_thread, seq.len_k - first));
    uint32_t keep = 0;
    if (my_keys > 0) {
        const int64_t offset = fdm_operand_offset(&p.mask, &seq, hk, g, 0, first);
        switch (p.mask.dtype) {
            case FDM_BYTE: keep = keep_bits<uint8_t>(p.mask, offset, my_keys); break;
            case FDM_F16:
            case FDM_BF16: keep = keep_bits<uint16_t>(p.mask, offset, my_keys); break;
            default: keep = keep_bits<uint32_t>(p.mask, offset, my_keys); break;
        }
    }

    // Exclusive prefix sum of the per-thread counts over the CTA: within the warp by shuffles,
    // then across the warps through shared memory.
    __shared__ int warp_total[kGatherThreads / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int mine = __popc(keep);
    int inclusive = mine;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
        const int up = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += up;
    }
    if (lane == 31) warp_total[warp] = inclusive;
    __syncthreads();
    int offset = inclusive - mine, count = 0;
#pragma unroll
    for (int w = 0; w < kGatherThreads / 32; ++w) {
        if (w < warp) offset += warp_total[w];
        count += warp_total[w];
    }

    const bool all_visible = count == static_cast<int>(min_i64(chunk_keys, seq.len_k - chunk_start));
    int32_t *list = keys + head * p.total_k + seq.k_start + chunk_start;  // (C,) at most
    while (keep != 0 && !all_visible) {
        const int e = __ffs(keep) - 1;
        list[offset++] = first + e;
        keep &= keep - 1;
    }
    if (threadIdx.x == 0) counts[(head * p.batch + b) * plan.max_chunks + chunk] = count;
}

int run_gather_keys(const fdm_params &p, const FwdPlan &plan, cudaStream_t stream) {
    const int64_t heads = gather_kv_heads(&p) * gather_group_heads(&p);
    const int64_t blocks = heads * p.batch * plan.max_chunks;
    if (blocks == 0) return FDM_OK;
    if (blocks > 0x7fffffffLL) return FDM_ERR_GRID;
    const WorkspaceLayout &w = plan.ws;
    unsigned char *base = static_cast<unsigned char *>(p.workspace);
    gather_keys_kernel<<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
        p, plan, reinterpret_cast<int32_t *>(base + w.keys), reinterpret_cast<int32_t *>(base + w.counts));
    return cudaPeekAtLastError() == cudaSuccess ? FDM_OK : FDM_ERR_CUDA;
}

}  // namespace fdm
