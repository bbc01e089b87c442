// masking.cuh: reading masks and biases, and turning a tile of scores S into X (scale, softcap,
// bias, mask, causal and length limits).
//
// Key-based operands (total_k, h') arrive staged per key tile in shared memory (key_tiles.cuh: one
// value per key, shared by every query row); query-based operands (total_q, h', Kq) are read per
// element.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "../fdm_params.h"
#include "divisor.h"
#include "softmax.cuh"

namespace fdm {

// Raw bits of one mask or bias element, so a load can stay in flight until the value is used.
__device__ __forceinline__ uint32_t operand_bits(const fdm_operand &m, int64_t offset) {
    switch (m.dtype) {
        case FDM_BYTE: return static_cast<const uint8_t *>(m.ptr)[offset];
        case FDM_F16:
        case FDM_BF16: return static_cast<const uint16_t *>(m.ptr)[offset];
        default: return static_cast<const uint32_t *>(m.ptr)[offset];
    }
}

// SPEC.md: True keeps a score; for non-bool dtypes any nonzero value keeps (+-0 hide, NaN keeps).
__device__ __forceinline__ bool mask_keeps_bits(const fdm_operand &m, uint32_t bits) {
    switch (m.dtype) {
        case FDM_BYTE: return bits != 0;
        case FDM_F16:
        case FDM_BF16: return (bits & 0x7fffu) != 0;
        default: return (bits & 0x7fffffffu) != 0;
    }
}
__device__ __forceinline__ bool mask_keeps(const fdm_operand &m, int64_t offset) {
    return mask_keeps_bits(m, operand_bits(m, offset));
}

__device__ __forceinline__ float bias_from_bits(const fdm_operand &b, uint32_t bits) {
    switch (b.dtype) {
        case FDM_F16: return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
        case FDM_BF16: return __uint_as_float(bits << 16);
        default: return __uint_as_float(bits);
    }
}
__device__ __forceinline__ float bias_value(const fdm_operand &b, int64_t offset) {
    return bias_from_bits(b, operand_bits(b, offset));
}

// What one CTA knows about its (sequence, head, query block) for masking. Local indices fit in
// int: cu_seqlens are int32.
struct MaskContext {
    fdm_seq seq;            // varlen bounds of the sequence (len_k clamped to max_seqlen_k)
    int64_t hk, g;          // KV head and group index of the CTA's first query head
    Divisor heads_per_cta;  // P: block row R is query R / P of group index g + R % P (packed GQA)
    int m0;                 // first packed row of the block
    int is_causal;
    int64_t key_end;        // keys j >= key_end are hidden from every row of the block (length, causal)
    int64_t key_bias0;      // element offset of key 0's key-based bias for the first query head (key
                            // j: + j * bias.stride_k); 0 without a key-based bias
    int64_t key_mask0;      // the same for a key-based mask
};

// Per-thread facts about its two rows (gid and gid + 8 of its warp), computed once per CTA.
struct RowInfo {
    int i[2];              // local query index
    int g[2];              // group index of the row's query head
    bool ok[2];            // i < Lq (rows past the sequence are computed but never read or stored)
    int last_key[2];       // last visible key: min(i + Lk - Lq, Lk - 1) when causal, else Lk - 1
};

__device__ __forceinline__ RowInfo make_row_info(const MaskContext &c, int row0) {
    RowInfo r;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int packed = c.m0 + row0 + 8 * k;
        const QuotRem qh = divmod(c.heads_per_cta, packed);
        r.i[k] = qh.quot;
        r.g[k] = static_cast<int>(c.g) + qh.rem;
        r.ok[k] = r.i[k] < c.seq.len_q;
        const int64_t causal_last = fdm_causal_last_key(&c.seq, r.i[k]);
        r.last_key[k] = static_cast<int>(c.is_causal && causal_last < c.seq.len_k ? causal_last : c.seq.len_k - 1);
    }
    return r;
}

// S (16 rows x 8 kNTiles columns of the key tile, from column col_base; this thread's (kNTiles, 4)
// part) -> X in the log2 domain:
//   x = scale * s;  x = softcap * tanh(x / softcap);  x += bias;  x = -inf where hidden.
// Returns c with X = c * s on return: without bias and softcap (and scale > 0) the scale is left
// to the softmax, which folds it into its exponent, 2^(c s - m) in one FFMA (c = scale log2 e);
// otherwise c = 1 and s holds X, formed with one FFMA per score (x = s * scale log2 e + bias
// log2 e; the key-based bias is staged times log2 e, key_tiles.cuh).
// Element (t, e) is row row0 + 8 * (e / 2) of the block (rows: its facts; row0 = the row of the
// thread's gid), column c = col_base + 8 t + 2 tig + e % 2,
// which holds key
// j = n * kBlockN + c, or keys[c] on a gathered tile (keys != nullptr; kNoKey past its keys).
// keep / kbias: the tile's staged key-based mask and bias (times log2 e); qmask: the tile's staged
// block of a query-based byte mask, (kBlockM, kQMaskStride), or nullptr to read the mask from
// global memory; mask_full: the tile's query-based mask keeps every pair within the limits
// (tile_visibility.cu), so only the limits are applied.
// Each step is one uniform branch per tile, not per element; limits are tested only on tiles that
// cross Lk or the diagonal.
template <class Tile, int kNTiles>
__device__ __forceinline__ float transform_scores(float (&s)[kNTiles][4], const fdm_params &p, const MaskContext &c,
                                                  const RowInfo &rows, int n, const uint8_t *keep,
                                                  const float *kbias, const int *keys, const uint8_t *qmask,
                                                  bool mask_full, int row0, int col_base) {
    const int j0 = n * Tile::kBlockN;
    const int col0 = col_base + 2 * (threadIdx.x % 4);
    const auto key_of = [&](int t, int e) {
        const int col = t * 8 + col0 + e % 2;
        return keys != nullptr ? keys[col] : j0 + col;
    };
    const bool has_bias = p.bias.ptr != nullptr;
    const float scale_log2 = p.scale * kLog2e;
    float factor = 1.f;  // c, returned
    float bias_mul = scale_log2;  // x = s * bias_mul + bias log2 e
    if (p.softcap > 0.f) {  // x = softcap log2 e * tanh(s * scale / softcap), already in the log2 domain
        const float inner = p.scale / p.softcap, outer = p.softcap * kLog2e;
#pragma unroll
        for (int t = 0; t < kNTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] = outer * tanhf(s[t][e] * inner);
        bias_mul = 1.f;
    } else if (!has_bias) {
        if (p.scale > 0.f) {
            factor = scale_log2;
        } else {
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[t][e] *= scale_log2;
        }
    }
    if (has_bias) {
        if (p.bias.layout == FDM_LAYOUT_KEY) {
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[t][e] = fmaf(s[t][e], bias_mul, kbias[t * 8 + col0 + e % 2]);
        } else {
            const int64_t row_off[2] = {fdm_operand_offset(&p.bias, &c.seq, c.hk, rows.g[0], rows.i[0], 0),
                                        fdm_operand_offset(&p.bias, &c.seq, c.hk, rows.g[1], rows.i[1], 0)};
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e / 2, j = key_of(t, e);
                    const float b = rows.ok[r] && j < c.seq.len_k
                                        ? bias_value(p.bias, row_off[r] + int64_t(j) * p.bias.stride_k) * kLog2e
                                        : 0.f;
                    s[t][e] = fmaf(s[t][e], bias_mul, b);
                }
        }
    }
    // The tile's last column holds its largest key (gathered lists are ascending; kNoKey past
    // their keys). last_key < Lk, so one comparison per key covers both limits.
    const int last_col_key = keys != nullptr ? keys[Tile::kBlockN - 1] : j0 + Tile::kBlockN - 1;
    const bool crosses_edge = last_col_key > min(rows.last_key[0], rows.last_key[1]);
    if (crosses_edge) {
#pragma unroll
        for (int t = 0; t < kNTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = key_of(t, e);
                if (j > rows.last_key[e / 2]) s[t][e] = -INFINITY;
            }
    }
    if (p.mask.ptr != nullptr && !mask_full) {
        if (p.mask.layout == FDM_LAYOUT_KEY) {
            if (keys == nullptr) {  // gathered keys are all kept
#pragma unroll
                for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (!keep[t * 8 + col0 + e % 2]) s[t][e] = -INFINITY;
            }
        } else if (qmask != nullptr) {  // rows past the sequence were staged as 0 (hidden)
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!qmask[(row0 + 8 * (e / 2)) * Tile::kQMaskStride + t * 8 + col0 + e % 2]) s[t][e] = -INFINITY;
        } else {
            const int64_t row_off[2] = {fdm_operand_offset(&p.mask, &c.seq, c.hk, rows.g[0], rows.i[0], 0),
                                        fdm_operand_offset(&p.mask, &c.seq, c.hk, rows.g[1], rows.i[1], 0)};
#pragma unroll
            for (int t = 0; t < kNTiles; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e / 2, j = key_of(t, e);
                    const bool keep_ij = rows.ok[r] && j < c.seq.len_k &&
                                         mask_keeps(p.mask, row_off[r] + int64_t(j) * p.mask.stride_k);
                    if (!keep_ij) s[t][e] = -INFINITY;
                }
        }
    }
    return factor;
}

}  // namespace fdm
