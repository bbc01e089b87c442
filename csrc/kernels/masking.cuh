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
#include "softmax.cuh"

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

// What one CTA knows about its (sequence, head, query block) for masking. Local indices fit in
// int: cu_seqlens are int32.
struct MaskContext {
    fdm_seq seq;        // varlen bounds of the sequence (len_k clamped to max_seqlen_k)
    int64_t hk, g;      // KV head and group index of the CTA's first query head
    int heads_per_cta;  // P: block row R is query R / P of group index g + R % P (packed GQA)
    int m0;             // first packed row of the block
    int is_causal;
};

// Per-thread facts about its two rows (gid and gid + 8 of its warp), computed once per CTA.
struct RowInfo {
    int i[2];              // local query index
    int g[2];              // group index of the row's query head
    bool ok[2];            // i < Lq (rows past the sequence are computed but never read or stored)
    int last_key[2];       // last visible key: i + Lk - Lq when causal, else Lk - 1
};

__device__ __forceinline__ RowInfo make_row_info(const MaskContext &c, int row0) {
    RowInfo r;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int packed = c.m0 + row0 + 8 * k;
        r.i[k] = packed / c.heads_per_cta;
        r.g[k] = static_cast<int>(c.g) + packed % c.heads_per_cta;
        r.ok[k] = r.i[k] < c.seq.len_q;
        r.last_key[k] = static_cast<int>(c.is_causal ? fdm_causal_last_key(&c.seq, r.i[k]) : c.seq.len_k - 1);
    }
    return r;
}

// Prepares key tile n for one stage and tells whether any pair in it is visible (the same answer
// in every thread: with a mask present it ends with a CTA barrier). Key-based operands are read
// for the CTA's first head; the launch plan packs heads only when they all read the same values.
//   key-based mask: kmask_s[0..kBlockN) = keep flags of the tile's keys
//   key-based bias: kbias_s[0..kBlockN) = bias of the tile's keys (0 past Lk)
//   query-based mask: scans the tile's (kBlockM, kBlockN) block of the mask, nothing staged
template <class Tile>
__device__ bool prepare_key_tile(const fdm_params &p, const MaskContext &c, int n, uint8_t *kmask_s,
                                 float *kbias_s) {
    const int j0 = n * Tile::kBlockN;
    const int tid = threadIdx.x;
    const bool key_mask = p.mask.ptr != nullptr && p.mask.layout == FDM_LAYOUT_KEY;
    const bool key_bias = p.bias.ptr != nullptr && p.bias.layout == FDM_LAYOUT_KEY;
    bool any = false;
    if (tid < Tile::kBlockN) {  // both loads in flight together
        const int j = j0 + tid;
        const bool in_seq = j < c.seq.len_k;
        if (key_mask) {
            any = in_seq && mask_keeps(p.mask, fdm_operand_offset(&p.mask, &c.seq, c.hk, c.g, 0, j));
            kmask_s[tid] = any;
        }
        if (key_bias)
            kbias_s[tid] = in_seq ? bias_value(p.bias, fdm_operand_offset(&p.bias, &c.seq, c.hk, c.g, 0, j)) : 0.f;
    }
    if (p.mask.ptr == nullptr) return true;
    if (!key_mask) {
        for (int e = tid; e < Tile::kBlockM * Tile::kBlockN && !any; e += Tile::kThreads) {
            const int packed = c.m0 + e / Tile::kBlockN, j = j0 + e % Tile::kBlockN;
            const int i = packed / c.heads_per_cta, g = static_cast<int>(c.g) + packed % c.heads_per_cta;
            any = i < c.seq.len_q && j < c.seq.len_k && (!c.is_causal || j <= fdm_causal_last_key(&c.seq, i)) &&
                  mask_keeps(p.mask, fdm_operand_offset(&p.mask, &c.seq, c.hk, g, i, j));
        }
    }
    return __syncthreads_or(any) != 0;
}

// S (16 x kBlockN per warp, this thread's (kNTiles, 4) part) -> X in the log2 domain:
//   x = scale * s;  x = softcap * tanh(x / softcap);  x += bias;  x = -inf where hidden.
// Element (t, e) is row gid + 8 * (e / 2), column 8 t + 2 tig + e % 2. Each step is one uniform
// branch per tile, not per element; bounds are tested only on tiles that cross Lk or the diagonal.
template <class Tile, int kNTiles>
__device__ __forceinline__ void transform_scores(float (&s)[kNTiles][4], const fdm_params &p, const MaskContext &c,
                                                 const RowInfo &rows, int n, const uint8_t *kmask_s,
                                                 const float *kbias_s) {
    const int j0 = n * Tile::kBlockN;
    const int col0 = 2 * (threadIdx.x % 4);
    const bool has_bias = p.bias.ptr != nullptr;
    if (p.softcap > 0.f) {
        const float inv_cap = 1.f / p.softcap;
#pragma unroll
        for (int t = 0; t < kNTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] = p.softcap * tanhf(s[t][e] * p.scale * inv_cap);
    } else {
        const float mul = has_bias ? p.scale : p.scale * kLog2e;
#pragma unroll
        for (int t = 0; t < kNTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] *= mul;
    }
    if (has_bias) {
        if (p.bias.layout == FDM_LAYOUT_KEY) {
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[t][e] += kbias_s[t * 8 + col0 + e % 2];
        } else {
            const int64_t row_off[2] = {fdm_operand_offset(&p.bias, &c.seq, c.hk, rows.g[0], rows.i[0], 0),
                                        fdm_operand_offset(&p.bias, &c.seq, c.hk, rows.g[1], rows.i[1], 0)};
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e / 2, j = j0 + t * 8 + col0 + e % 2;
                    if (rows.ok[r] && j < c.seq.len_k)
                        s[t][e] += bias_value(p.bias, row_off[r] + int64_t(j) * p.bias.stride_k);
                }
        }
    }
    if (has_bias || p.softcap > 0.f) {
#pragma unroll
        for (int t = 0; t < kNTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] *= kLog2e;
    }
    const bool crosses_edge = j0 + Tile::kBlockN > c.seq.len_k ||
                              (c.is_causal && j0 + Tile::kBlockN - 1 > min(rows.last_key[0], rows.last_key[1]));
    if (crosses_edge) {
#pragma unroll
        for (int t = 0; t < kNTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + t * 8 + col0 + e % 2;
                if (j >= c.seq.len_k || j > rows.last_key[e / 2]) s[t][e] = -INFINITY;
            }
    }
    if (p.mask.ptr != nullptr) {
        if (p.mask.layout == FDM_LAYOUT_KEY) {
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!kmask_s[t * 8 + col0 + e % 2]) s[t][e] = -INFINITY;
        } else {
            const int64_t row_off[2] = {fdm_operand_offset(&p.mask, &c.seq, c.hk, rows.g[0], rows.i[0], 0),
                                        fdm_operand_offset(&p.mask, &c.seq, c.hk, rows.g[1], rows.i[1], 0)};
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e / 2, j = j0 + t * 8 + col0 + e % 2;
                    const bool keep = rows.ok[r] && j < c.seq.len_k &&
                                      mask_keeps(p.mask, row_off[r] + int64_t(j) * p.mask.stride_k);
                    if (!keep) s[t][e] = -INFINITY;
                }
        }
    }
}

}  // namespace fdm
