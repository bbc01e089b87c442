// masking.cuh: reading masks and biases, and deciding which key tiles a CTA must visit.
//
// Key-based operands (total_k, h') are staged once per key tile into shared memory (one value per
// key, shared by every query row); query-based operands (total_q, h', Kq) are read per element.
// A key tile with no visible (query, key) pair is skipped before any K/V byte is loaded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "../fdm_params.h"

namespace fdm {

// SPEC.md: True keeps a score; for non-bool dtypes any nonzero value keeps (+-0 hide, NaN keeps).
__device__ __forceinline__ bool mask_keeps(const fdm_operand &m, int64_t offset) {
    switch (m.dtype) {
        case FDM_BYTE: return static_cast<const uint8_t *>(m.ptr)[offset] != 0;
        case FDM_F16:
        case FDM_BF16: return (static_cast<const uint16_t *>(m.ptr)[offset] & 0x7fffu) != 0;
        default: return (static_cast<const uint32_t *>(m.ptr)[offset] & 0x7fffffffu) != 0;
    }
}

__device__ __forceinline__ float bias_value(const fdm_operand &b, int64_t offset) {
    switch (b.dtype) {
        case FDM_F16: return __half2float(static_cast<const __half *>(b.ptr)[offset]);
        case FDM_BF16: return __bfloat162float(static_cast<const __nv_bfloat16 *>(b.ptr)[offset]);
        default: return static_cast<const float *>(b.ptr)[offset];
    }
}

// What one CTA knows about its (sequence, head, query block) for masking.
struct MaskContext {
    fdm_seq seq;       // varlen bounds of the sequence (len_k clamped to max_seqlen_k)
    int64_t hk, g;     // KV head and index inside the GQA group of the CTA's query head
    int m0;            // first local query of the block
    int is_causal;
};

// Causal and length limits of (local query i, local key j), without the mask.
__device__ __forceinline__ bool in_bounds(const MaskContext &c, int64_t i, int64_t j) {
    return i < c.seq.len_q && j < c.seq.len_k && (!c.is_causal || j <= fdm_causal_last_key(&c.seq, i));
}

// Prepares key tile n for stage `stage` and tells whether any pair in it is visible (the same
// answer in every thread: it ends with a CTA barrier when a mask is present).
//   key-based mask: kmask_s[0..kBlockN) = keep flags of the tile's keys
//   key-based bias: kbias_s[0..kBlockN) = bias of the tile's keys (only when the tile is visible)
//   query-based mask: scans the (kBlockM, kBlockN) tile of the mask, nothing staged
template <class Tile>
__device__ bool prepare_key_tile(const fdm_params &p, const MaskContext &c, int n, uint8_t *kmask_s,
                                 float *kbias_s) {
    const int j0 = n * Tile::kBlockN;
    const int tid = threadIdx.x;
    bool visible = true;
    if (p.mask.ptr != nullptr) {
        bool any = false;
        if (p.mask.layout == FDM_LAYOUT_KEY) {
            if (tid < Tile::kBlockN) {
                const int64_t j = j0 + tid;
                const bool keep = j < c.seq.len_k && mask_keeps(p.mask, fdm_operand_offset(&p.mask, &c.seq, c.hk,
                                                                                           c.g, 0, j));
                kmask_s[tid] = keep;
                any = keep;
            }
        } else {
#pragma unroll 4
            for (int e = tid; e < Tile::kBlockM * Tile::kBlockN; e += Tile::kThreads) {
                const int64_t i = c.m0 + e / Tile::kBlockN, j = j0 + e % Tile::kBlockN;
                if (in_bounds(c, i, j) &&
                    mask_keeps(p.mask, fdm_operand_offset(&p.mask, &c.seq, c.hk, c.g, i, j))) {
                    any = true;
                    break;
                }
            }
        }
        visible = __syncthreads_or(any) != 0;
    }
    if (visible && p.bias.ptr != nullptr && p.bias.layout == FDM_LAYOUT_KEY && tid < Tile::kBlockN) {
        const int64_t j = j0 + tid;
        kbias_s[tid] = j < c.seq.len_k ? bias_value(p.bias, fdm_operand_offset(&p.bias, &c.seq, c.hk, c.g, 0, j))
                                       : 0.f;
    }
    return visible;
}

// Score of (local query i, local key j, column col of the tile) after the SPEC.md transform:
// x = scale * qk (softcapped), + bias, -inf where hidden.
__device__ __forceinline__ float transform_score(const fdm_params &p, const MaskContext &c, float qk, int64_t i,
                                                 int64_t j, int col, const uint8_t *kmask_s,
                                                 const float *kbias_s) {
    if (!in_bounds(c, i, j)) return -INFINITY;
    if (p.mask.ptr != nullptr) {
        const bool keep = p.mask.layout == FDM_LAYOUT_KEY
                              ? kmask_s[col] != 0
                              : mask_keeps(p.mask, fdm_operand_offset(&p.mask, &c.seq, c.hk, c.g, i, j));
        if (!keep) return -INFINITY;
    }
    float x = qk * p.scale;
    if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
    if (p.bias.ptr != nullptr) {
        x += p.bias.layout == FDM_LAYOUT_KEY
                 ? kbias_s[col]
                 : bias_value(p.bias, fdm_operand_offset(&p.bias, &c.seq, c.hk, c.g, i, j));
    }
    return x;
}

}  // namespace fdm
