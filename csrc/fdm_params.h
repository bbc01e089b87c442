/*
 * fdm_params.h: the one parameter struct of a varlen attention forward call.
 *
 * Plain C (C11, and also valid C++ / CUDA so every layer includes it unchanged).
 * The CPU kernel (csrc/cpu), the CUDA launcher (csrc/kernels) and the torch
 * binding (csrc/binding.cpp) all speak this struct; nothing in it knows torch.
 *
 * Notation (SPEC.md section 1): B sequences, H query heads, H_k key/value heads,
 * G = H / H_k query heads per KV head, D head dim. For sequence b, query i (local),
 * key j (local), query head h = hk * G + g (hk = KV head, g = index in its group):
 *
 *   S[i, j] = scale * <q[i], k[j]>            (then softcap, + bias, mask, causal)
 *   P = softmax_j(S);  out[i] = sum_j P[i, j] v[j];  lse[h, i] = log sum_j exp(S[i, j])
 *
 * All strides are in elements (not bytes). A stride of 0 broadcasts.
 */
#ifndef FDM_PARAMS_H
#define FDM_PARAMS_H

#include <stdint.h>

#if defined(__CUDACC__)
#define FDM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FDM_HOST_DEVICE static inline
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Element types. q/k/v/out share one of F32 (CPU only), F16, BF16. */
typedef enum {
    FDM_F32 = 0,
    FDM_F16 = 1,
    FDM_BF16 = 2,
    FDM_BYTE = 3  /* bool / uint8 / int8 mask: nonzero keeps */
} fdm_dtype;

/* Which packed axis a mask/bias row runs along (SPEC.md section 2). */
typedef enum {
    FDM_LAYOUT_KEY = 0,   /* (total_k, h'): one value per key, broadcast over queries */
    FDM_LAYOUT_QUERY = 1  /* (total_q, h', Kq): one value per (query, key) */
} fdm_layout;

/*
 * A mask or a bias. Element (b, h = hk * G + g, i, j) lives at
 *
 *   ptr + (q_start[b] + i) * stride_q + (key_base[b] + j) * stride_k
 *       + hk * stride_kv_head + g * stride_group + b * stride_seq
 *
 * with key_base[b] = k_start[b] for FDM_LAYOUT_KEY and 0 for FDM_LAYOUT_QUERY
 * (fdm_operand_offset below). Key-based: stride_q = 0. Head broadcasting:
 * h' = H gives (stride_kv_head, stride_group) = (G * s, s); h' = H_k gives (s, 0);
 * h' = 1 gives (0, 0), where s is the tensor's head stride. stride_seq is 0 for the packed varlen
 * layouts; the dense (B or 1, h', S_q or 1, S_k) operands of mha_fwd use it to turn the packed
 * row index (b * S + i) back into the tensor's own batch stride.
 */
typedef struct {
    const void *ptr;        /* NULL: operand absent */
    fdm_dtype dtype;        /* mask: FDM_BYTE, F16, BF16, F32 (nonzero keeps); bias: F16, BF16, F32 */
    fdm_layout layout;      /* key-based or query-based */
    int64_t stride_q;       /* per packed query row (0 for key-based) */
    int64_t stride_k;       /* per key: packed key row (key-based) or column j (query-based) */
    int64_t stride_kv_head; /* per KV head hk */
    int64_t stride_group;   /* per query head inside its GQA group, g */
    int64_t stride_seq;     /* per sequence b, on top of the packed row (0 for varlen layouts) */
} fdm_operand;

typedef struct {
    /* Inputs, packed over the batch. */
    const void *q;          /* (total_q, H, D) */
    const void *k;          /* (total_k, H_k, D) */
    const void *v;          /* (total_k, H_k, D) */
    int64_t q_row_stride, q_head_stride;   /* last dim contiguous for q, k, v, out */
    int64_t k_row_stride, k_head_stride;
    int64_t v_row_stride, v_head_stride;
    fdm_dtype dtype;        /* dtype of q, k, v and out */

    /* Outputs. */
    void *out;              /* (total_q, H, D), dtype as q */
    int64_t out_row_stride, out_head_stride;
    float *lse;             /* (H, total_q) float32: lse[h * lse_head_stride + row] */
    int64_t lse_head_stride;

    /* Varlen bookkeeping: sequence b owns packed rows [cu_seqlens_q[b], cu_seqlens_q[b+1]). */
    const int32_t *cu_seqlens_q; /* (B + 1,) on the device of q */
    const int32_t *cu_seqlens_k; /* (B + 1,) */
    int64_t batch;          /* B */
    int64_t total_q, total_k;
    int64_t max_seqlen_q, max_seqlen_k; /* upper bounds of the per-sequence lengths */

    /* Sizes. */
    int64_t num_heads;      /* H */
    int64_t num_heads_k;    /* H_k, divides H */
    int64_t head_dim;       /* D */

    /* Score transform. */
    float scale;            /* S = scale * <q, k> */
    float softcap;          /* > 0: S = softcap * tanh(S / softcap); 0: off */
    int is_causal;          /* nonzero: hide j > i + Lk - Lq (bottom-right aligned) */

    fdm_operand mask;       /* ptr NULL: every key visible */
    fdm_operand bias;       /* ptr NULL: no bias */

    /* Paged KV cache. block_table NULL: k and v are packed rows, key j of sequence b is row
     * k_start + j. Otherwise k and v are caches (num_pages, page_size, H_k, D) whose first two dims
     * flatten into rows (row = page * page_size + slot, same row/head strides as above), and key j
     * of sequence b lives in page block_table[b * block_table_stride + j / page_size], slot
     * j % page_size (fdm_key_row). Key-based mask/bias stay indexed by the logical row k_start + j. */
    const int32_t *block_table; /* (B, max_pages) int32, or NULL */
    int64_t block_table_stride; /* elements between sequences in block_table */
    int64_t max_pages;          /* block_table.size(1) */
    int64_t page_size;          /* keys per page (>= 1); 0 when unpaged */
    int64_t num_pages;          /* pages in the caches (page indices must be in [0, num_pages)) */

    /* Launch overrides for tests and tuning (CUDA only; the CPU kernel ignores them). */
    int force_num_splits;   /* > 0: that many key ranges per row block (at most one key tile each); 0: heuristic */
    int force_gather;       /* key-based mask: 1 gathers the visible keys, 0 never, -1 heuristic */
    int force_key_split;    /* 1: warps split each key tile (decode layout), 0: warps split the rows, -1 heuristic */
    int force_warpgroups;   /* sm_90a builds on Hopper: 1 the warpgroup (wgmma) layout wherever it applies, 0 never, -1 heuristic */
    int force_row_schedule; /* 1: the grid leaves out row blocks past their sequence (batches of at most 256 sequences), 0 never, -1 heuristic */

    /* CUDA only: scratch of fdm_cuda_workspace_size(p) bytes (split-KV partial results, gathered
     * key lists), allocated by the caller; NULL when that size is 0. */
    void *workspace;
} fdm_params;

/* Status codes of the C entry points; fdm_status_string names them. */
typedef enum {
    FDM_OK = 0,
    FDM_ERR_DTYPE = 1,          /* dtype not compiled for this backend */
    FDM_ERR_HEAD_DIM = 2,       /* head dim not compiled for this backend */
    FDM_ERR_GRID = 3,           /* problem too large for one launch */
    FDM_ERR_OUT_OF_MEMORY = 4,  /* scratch allocation failed */
    FDM_ERR_CUDA = 5,           /* a CUDA runtime call failed (see cudaGetLastError) */
    FDM_ERR_WORKSPACE = 6       /* the planned split-KV needs p->workspace, which is NULL */
} fdm_status;

FDM_HOST_DEVICE const char *fdm_status_string(int status) {
    switch (status) {
        case FDM_OK: return "ok";
        case FDM_ERR_DTYPE: return "unsupported dtype for this backend";
        case FDM_ERR_HEAD_DIM: return "unsupported head dim for this backend";
        case FDM_ERR_GRID: return "problem too large for one kernel launch";
        case FDM_ERR_OUT_OF_MEMORY: return "out of memory for scratch buffers";
        case FDM_ERR_CUDA: return "CUDA runtime error";
        case FDM_ERR_WORKSPACE: return "missing workspace for split-KV";
        default: return "unknown error";
    }
}

/* The varlen helper: where sequence b starts and how long it is. Every kernel uses it. */
typedef struct {
    int64_t b;                /* the sequence's index in the batch */
    int64_t q_start, k_start; /* first packed row of the sequence's queries / keys */
    int64_t len_q, len_k;     /* Lq, Lk (either may be 0) */
} fdm_seq;

FDM_HOST_DEVICE fdm_seq fdm_seq_of(const fdm_params *p, int64_t b) {
    fdm_seq s;
    s.b = b;
    s.q_start = p->cu_seqlens_q[b];
    s.k_start = p->cu_seqlens_k[b];
    s.len_q = p->cu_seqlens_q[b + 1] - s.q_start;
    s.len_k = p->cu_seqlens_k[b + 1] - s.k_start;
    return s;
}

/* Element offset of mask/bias at (sequence s, KV head hk, group index g, local i, local j). */
FDM_HOST_DEVICE int64_t fdm_operand_offset(const fdm_operand *o, const fdm_seq *s,
                                           int64_t hk, int64_t g, int64_t i, int64_t j) {
    const int64_t key_base = (o->layout == FDM_LAYOUT_KEY) ? s->k_start : 0;
    return (s->q_start + i) * o->stride_q + (key_base + j) * o->stride_k
         + hk * o->stride_kv_head + g * o->stride_group + s->b * o->stride_seq;
}

/* Row of key j (local) of sequence s in p->k / p->v: the packed row, or its page slot. */
FDM_HOST_DEVICE int64_t fdm_key_row(const fdm_params *p, const fdm_seq *s, int64_t j) {
    if (p->block_table == 0) return s->k_start + j;
    const int64_t page = p->block_table[s->b * p->block_table_stride + j / p->page_size];
    return page * p->page_size + j % p->page_size;
}

/* Causal (bottom-right aligned): query i sees keys j <= i + Lk - Lq. */
FDM_HOST_DEVICE int64_t fdm_causal_last_key(const fdm_seq *s, int64_t i) {
    return i + s->len_k - s->len_q;
}

#ifdef __cplusplus
}
#endif

#endif /* FDM_PARAMS_H */
