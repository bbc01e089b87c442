/*
 * fdm_cpu.c: the CPU varlen attention forward with dynamic mask and additive bias
 * (SPEC.md section 1), in plain C. Valid C11 and C++17 (torch builds it with g++).
 *
 * What it computes, for sequence b, query head h = hk * G + g, local query i, local key j:
 *
 *   S[i, j] = scale * <q[i], k[j]>;   S = softcap * tanh(S / softcap)   (softcap > 0)
 *   S += bias(b, h, i, j);  S = -inf where mask(b, h, i, j) == 0 or (causal and j > i + Lk - Lq)
 *   P = softmax_j(S);  out[i] = sum_j P[i, j] v[j];  lse[h, i] = log sum_j exp(S[i, j])
 *
 * A row that sees no key gets out = 0 and lse = -inf.
 *
 * How (flash-attention style, everything in float32):
 *
 *   Work item = (sequence b, KV head hk, block of mrows <= BLOCK_M queries). The G query heads
 *   that read KV head hk are packed into one tile of rows = G * mrows, row r = g * mrows + i - q0,
 *   so each K/V tile is converted to float once and used by every head of the group (GQA, MQA).
 *   The scale is folded into Q when the block is loaded.
 *
 *   For the block, keys are consumed in tiles of up to BLOCK_N columns:
 *     1. select_key_tile: the next BLOCK_N keys that at least one row can see. Without a mask
 *        that is a contiguous range; with a mask, keys no row keeps are dropped before anything
 *        of them is loaded (a fully masked stretch of keys is skipped as a whole), so masked keys
 *        cost only the mask read. The key loop stops at the causal limit of the block's last
 *        query. A key-based mask or bias is read once per head g, not per query ("operand rows").
 *     2. load_kv_tile: K and V rows of those keys to float; K is transposed to K^T (dp, BLOCK_N)
 *        so that S = Q K^T runs over keys in its innermost, vectorized loop. With a paged KV
 *        cache (block_table) the rows are looked up per key (fdm_key_row); nothing else changes:
 *        masks and biases stay indexed by the logical key, and the math is the same bit for bit.
 *     3. qk_tile: S = (scale * Q) K^T.
 *     4. load_bias_tile + transform_scores: softcap, + bias, mask and causal -> -inf.
 *     5. softmax_update (online softmax): per row, m_new = max(m, max_c S), P~ = exp(S - m_new),
 *        alpha = exp(m - m_new), l = alpha * l + sum_c P~.
 *     6. pv_tile: acc = alpha * acc + P~ V (innermost loop over the head dim).
 *   Finally store_block: out = acc / l (rounded to the output dtype), lse = m + log(l).
 *
 * Speed: the hot functions are compiled twice on x86-64 (target_clones: AVX2/FMA and baseline)
 * and picked at load time; their loops are written so GCC vectorizes them without -ffast-math
 * (fixed BLOCK_N trip counts, lane-wise reductions, branch-free selects and exp).
 *
 * Threads: none here. The caller runs disjoint ranges of work items on its own threads;
 * fdm_cpu_forward_range writes no globals and owns its scratch (one malloc per call).
 */
#include "fdm_cpu.h"
#include "fdm_convert.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/*
 * Tile sizes.
 * BLOCK_M = 32 queries per work item: each K/V tile is converted once for 32 * G rows, which
 *   amortizes the conversion and transpose, while prefill still has many items to share out.
 * BLOCK_N = 64 keys per tile: one score row is 8 AVX2 vectors, and K^T for D = 128 is 32 KiB,
 *   about one L1 data cache.
 * D_ALIGN = 8: the head dim is zero-padded to a multiple of 8 (dp) in the float tiles, so the
 *   unrolled-by-4 dot product loops need no remainder and rows stay 32-byte aligned.
 */
#define FDM_BLOCK_M 32
#define FDM_BLOCK_N 64
#define FDM_D_ALIGN 8

#if defined(__GNUC__)
#define FDM_RESTRICT __restrict__
#else
#define FDM_RESTRICT
#endif

/*
 * K/V rows of one KV head are a row stride apart (often a page or more), which hardware
 * prefetchers follow poorly: load_kv_tile asks for the row FDM_PREFETCH_ROWS keys ahead.
 */
#define FDM_PREFETCH_ROWS 4
#if defined(__GNUC__)
#define FDM_PREFETCH(addr) __builtin_prefetch(addr)
#else
#define FDM_PREFETCH(addr) ((void)(addr))
#endif

/* Hot kernels: an AVX2/FMA clone and a baseline clone, chosen at load time (x86-64 GCC/Clang). */
#if defined(__x86_64__) && defined(__GNUC__)
#define FDM_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FDM_HOT
#endif

static int64_t fdm_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t fdm_clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }
static int64_t fdm_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t fdm_round_up(int64_t a, int64_t b) { return fdm_ceil_div(a, b) * b; }

/*
 * cond ? a : b for floats, as an integer and-or. GCC may turn a float ?: into a branch, which
 * stops the loop around it from vectorizing; this form stays branch-free.
 */
static inline float fdm_select(int cond, float a, float b) {
    const uint32_t take_a = (uint32_t)0 - (uint32_t)(cond != 0);
    return fdm_f32_from_bits((fdm_f32_to_bits(a) & take_a) | (fdm_f32_to_bits(b) & ~take_a));
}

/* ------------------------------------------------------------------------------------------ */
/* Scratch and per-block context                                                              */
/* ------------------------------------------------------------------------------------------ */

/* Buffers of one work item, reused by every item of a fdm_cpu_forward_range call. */
typedef struct {
    float *q;             /* (rows, dp): scale * Q of the block, zero-padded from D to dp */
    float *acc;           /* (rows, dp): acc = sum_j exp(S[r, j] - m[r]) V[j], unnormalized */
    float *m;             /* (rows): running max_j S[r, j]; -inf while row r saw no key */
    float *l;             /* (rows): running sum_j exp(S[r, j] - m[r]) */
    float *alpha;         /* (rows): exp(m_old - m_new), this tile's rescale of acc and l */
    int64_t *lim;         /* (rows): last key row r may see: causal bound, else Lk - 1 */
    int64_t *ncols;       /* (rows): row r's scores in this tile are -inf from column ncols on */
    float *s;             /* (rows, BLOCK_N): S of the tile, then P~ = exp(S - m_new) */
    float *k_rows;        /* (BLOCK_N, dp): K tile as float, one key per row */
    float *kt;            /* (dp, BLOCK_N): K^T tile */
    float *v;             /* (BLOCK_N, dp): V tile as float, zero rows past the tile's keys */
    float *bias;          /* (bias rows, BLOCK_N): bias of (operand row t, tile column c) */
    unsigned char *keep;  /* (mask rows, BLOCK_N): mask of (operand row t, tile column c), 0/1 */
    unsigned char *win;   /* (mask rows, BLOCK_N): mask of (operand row t, key cursor + c) */
    unsigned char *any;   /* (BLOCK_N): some row keeps window key cursor + c */
    int64_t *win_col;     /* (BLOCK_N): window columns that go into the tile */
    int64_t *key_idx;     /* (BLOCK_N): local key j of tile column c, increasing in c */
    void *block;          /* the one allocation all of the above live in */
} fdm_scratch;

/* One work item: a block of queries of one sequence and one KV head, all G heads of it. */
typedef struct {
    const fdm_params *p;
    fdm_seq seq;
    int64_t hk;     /* KV head */
    int64_t G;      /* query heads per KV head */
    int64_t q0;     /* first local query of the block */
    int64_t mrows;  /* queries in the block, <= BLOCK_M */
    int64_t rows;   /* G * mrows; row r is head g = r / mrows, query i = q0 + r % mrows */
    int64_t dp;     /* head dim D rounded up to D_ALIGN */
} fdm_block;

/* Reserves `bytes` at *used from base (NULL: only counts); every buffer starts on a cache line. */
static void *fdm_carve(unsigned char *base, int64_t *used, int64_t bytes) {
    void *at = base != NULL ? (void *)(base + *used) : NULL;
    *used += fdm_round_up(bytes, 64);
    return at;
}

/* Lays out the buffers for up to `rows` rows from base (NULL: only measures); returns the bytes. */
static int64_t fdm_scratch_layout(fdm_scratch *w, unsigned char *base, int64_t rows, int64_t dp) {
    const int64_t bn = FDM_BLOCK_N;
    const int64_t f = (int64_t)sizeof(float), i64 = (int64_t)sizeof(int64_t);
    int64_t used = 0;
    w->q = (float *)fdm_carve(base, &used, rows * dp * f);
    w->acc = (float *)fdm_carve(base, &used, rows * dp * f);
    w->m = (float *)fdm_carve(base, &used, rows * f);
    w->l = (float *)fdm_carve(base, &used, rows * f);
    w->alpha = (float *)fdm_carve(base, &used, rows * f);
    w->lim = (int64_t *)fdm_carve(base, &used, rows * i64);
    w->ncols = (int64_t *)fdm_carve(base, &used, rows * i64);
    w->s = (float *)fdm_carve(base, &used, rows * bn * f);
    w->k_rows = (float *)fdm_carve(base, &used, bn * dp * f);
    w->kt = (float *)fdm_carve(base, &used, dp * bn * f);
    w->v = (float *)fdm_carve(base, &used, bn * dp * f);
    w->bias = (float *)fdm_carve(base, &used, rows * bn * f);
    w->keep = (unsigned char *)fdm_carve(base, &used, rows * bn);
    w->win = (unsigned char *)fdm_carve(base, &used, rows * bn);
    w->any = (unsigned char *)fdm_carve(base, &used, bn);
    w->win_col = (int64_t *)fdm_carve(base, &used, bn * i64);
    w->key_idx = (int64_t *)fdm_carve(base, &used, bn * i64);
    return used;
}

/* One malloc holds every buffer of up to `rows` rows; returns 0 when out of memory. */
static int fdm_scratch_alloc(fdm_scratch *w, int64_t rows, int64_t dp) {
    const int64_t bytes = fdm_scratch_layout(w, NULL, rows, dp);
    unsigned char *base = (unsigned char *)malloc((size_t)(bytes + 64));
    if (base == NULL) return 0;
    w->block = base;
    base += (64 - (uintptr_t)base % 64) % 64; /* align to a cache line */
    fdm_scratch_layout(w, base, rows, dp);
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Element conversion of whole rows                                                           */
/* ------------------------------------------------------------------------------------------ */

/* dst[0..n) = float(src[off .. off + n)), src of dtype dt (contiguous). */
static inline void fdm_load_row(const void *src, fdm_dtype dt, int64_t off, int64_t n,
                                float *FDM_RESTRICT dst) {
    int64_t d;
    if (dt == FDM_F32) {
        const float *x = (const float *)src + off;
        for (d = 0; d < n; ++d) dst[d] = x[d];
    } else if (dt == FDM_F16) {
        const uint16_t *x = (const uint16_t *)src + off;
        for (d = 0; d < n; ++d) dst[d] = fdm_f16_to_f32(x[d]);
    } else {
        const uint16_t *x = (const uint16_t *)src + off;
        for (d = 0; d < n; ++d) dst[d] = fdm_bf16_to_f32(x[d]);
    }
}

/* dst[off .. off + n) = round_to_dt(mul * src[0..n)), round to nearest even. */
static inline void fdm_store_row(void *dst, fdm_dtype dt, int64_t off,
                                 const float *FDM_RESTRICT src, int64_t n, float mul) {
    int64_t d;
    if (dt == FDM_F32) {
        float *y = (float *)dst + off;
        for (d = 0; d < n; ++d) y[d] = src[d] * mul;
    } else if (dt == FDM_F16) {
        uint16_t *y = (uint16_t *)dst + off;
        for (d = 0; d < n; ++d) y[d] = fdm_f32_to_f16(src[d] * mul);
    } else {
        uint16_t *y = (uint16_t *)dst + off;
        for (d = 0; d < n; ++d) y[d] = fdm_f32_to_bf16(src[d] * mul);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Query block setup                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* q[r, :] = scale * Q[row of (g, i), head hk * G + g, :], zero-padded to dp. */
FDM_HOT static void fdm_load_q_block(const fdm_block *blk, float *FDM_RESTRICT q) {
    const fdm_params *p = blk->p;
    const int64_t D = p->head_dim;
    int64_t r, d;
    for (r = 0; r < blk->rows; ++r) {
        const int64_t g = r / blk->mrows;
        const int64_t i = blk->q0 + r % blk->mrows;
        const int64_t off = (blk->seq.q_start + i) * p->q_row_stride
                          + (blk->hk * blk->G + g) * p->q_head_stride;
        float *qr = q + r * blk->dp;
        fdm_load_row(p->q, p->dtype, off, D, qr);
        for (d = 0; d < D; ++d) qr[d] *= p->scale;
        for (d = D; d < blk->dp; ++d) qr[d] = 0.0f;
    }
}

/* Empty online-softmax state, and each row's last visible key lim[r]. */
static void fdm_init_rows(const fdm_block *blk, fdm_scratch *w) {
    int64_t r;
    memset(w->acc, 0, (size_t)(blk->rows * blk->dp) * sizeof(float));
    for (r = 0; r < blk->rows; ++r) {
        const int64_t i = blk->q0 + r % blk->mrows;
        w->m[r] = -INFINITY;
        w->l[r] = 0.0f;
        w->lim[r] = blk->p->is_causal ? fdm_causal_last_key(&blk->seq, i) : blk->seq.len_k - 1;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Mask reading and key-tile selection                                                        */
/* ------------------------------------------------------------------------------------------ */

/*
 * Operand rows. A mask or bias tile has one row per distinct operand row t: a key-based operand
 * does not depend on the query, so it has one row per head g (G rows) that serves all of that
 * head's queries; a query-based operand has one row per tile row (t = r).
 */
static int64_t fdm_operand_rows(const fdm_block *blk, const fdm_operand *o) {
    return o->layout == FDM_LAYOUT_KEY ? blk->G : blk->rows;
}

/* The operand row that serves tile row r. */
static int64_t fdm_operand_row(const fdm_block *blk, const fdm_operand *o, int64_t r) {
    return o->layout == FDM_LAYOUT_KEY ? r / blk->mrows : r;
}

/* Head g and local query i of operand row t (for a key-based operand, i is any query: q0). */
static void fdm_operand_row_coords(const fdm_block *blk, const fdm_operand *o, int64_t t,
                                   int64_t *g, int64_t *i) {
    *g = o->layout == FDM_LAYOUT_KEY ? t : t / blk->mrows;
    *i = blk->q0 + (o->layout == FDM_LAYOUT_KEY ? 0 : t % blk->mrows);
}

/* dst[c] = (mask(b, hk * G + g, i, j0 + c) != 0), c < n. Floats: +-0.0 drop, NaN keeps. */
static void fdm_read_mask_row(const fdm_block *blk, int64_t g, int64_t i, int64_t j0, int64_t n,
                              unsigned char *FDM_RESTRICT dst) {
    const fdm_operand *o = &blk->p->mask;
    const fdm_seq *seq = &blk->seq;
    int64_t c;
    if (o->dtype == FDM_BYTE) {
        const unsigned char *x = (const unsigned char *)o->ptr;
        for (c = 0; c < n; ++c) dst[c] = x[fdm_operand_offset(o, seq, blk->hk, g, i, j0 + c)] != 0;
    } else if (o->dtype == FDM_F32) {
        const float *x = (const float *)o->ptr;
        for (c = 0; c < n; ++c)
            dst[c] = x[fdm_operand_offset(o, seq, blk->hk, g, i, j0 + c)] != 0.0f;
    } else { /* F16 or BF16: every bit but the sign is zero only for +-0 */
        const uint16_t *x = (const uint16_t *)o->ptr;
        for (c = 0; c < n; ++c)
            dst[c] = (x[fdm_operand_offset(o, seq, blk->hk, g, i, j0 + c)] & 0x7FFFu) != 0;
    }
}

/*
 * win[t, c] = mask of operand row t for key cursor + c, c < width. A query-based row is read
 * only up to its causal limit (keys past it read as 0). A key-based row needs no such cut: every
 * key below j_end is within the limit of the block's last query, which every head g has.
 */
static void fdm_read_mask_window(const fdm_block *blk, const int64_t *lim, int64_t cursor,
                                 int64_t width, unsigned char *win) {
    const fdm_operand *o = &blk->p->mask;
    const int64_t n_rows = fdm_operand_rows(blk, o);
    int64_t t, g, i;
    for (t = 0; t < n_rows; ++t) {
        unsigned char *wr = win + t * FDM_BLOCK_N;
        int64_t n = width;
        if (o->layout == FDM_LAYOUT_QUERY) n = fdm_clamp64(lim[t] - cursor + 1, 0, width);
        fdm_operand_row_coords(blk, o, t, &g, &i);
        fdm_read_mask_row(blk, g, i, cursor, n, wr);
        memset(wr + n, 0, (size_t)(width - n));
    }
}

/* any[c] = OR over operand rows t of win[t, c], for c < width. */
static void fdm_column_any(const unsigned char *FDM_RESTRICT win, int64_t n_rows, int64_t width,
                           unsigned char *FDM_RESTRICT any) {
    int64_t t, c;
    memset(any, 0, (size_t)width);
    for (t = 0; t < n_rows; ++t)
        for (c = 0; c < width; ++c) any[c] |= win[t * FDM_BLOCK_N + c];
}

/*
 * The next key tile: up to BLOCK_N keys j in [*cursor, j_end) that some row keeps, in order.
 * Writes key_idx[0..n) and, with a mask, keep[t, 0..n); advances *cursor; returns n (0: done).
 *
 * Every key below j_end is within the causal limit of the block's last query, which belongs to
 * every head g; so without a mask every key is visible to some row, and with a key-based mask a
 * key is visible to some row exactly when some head keeps it.
 * With a mask, keys are scanned in windows no wider than the room left in the tile; keys of a
 * window that no row keeps are dropped, the others appended with their mask column.
 */
static int64_t fdm_select_key_tile(const fdm_block *blk, fdm_scratch *w, int64_t j_end,
                                   int64_t *cursor) {
    const int64_t bn = FDM_BLOCK_N;
    const int64_t n_rows = fdm_operand_rows(blk, &blk->p->mask);
    int64_t n = 0, c, t, k;
    if (blk->p->mask.ptr == NULL) {
        n = fdm_min64(bn, j_end - *cursor);
        for (c = 0; c < n; ++c) w->key_idx[c] = *cursor + c;
        *cursor += n > 0 ? n : 0;
        return n > 0 ? n : 0;
    }
    while (n < bn && *cursor < j_end) {
        const int64_t width = fdm_min64(bn - n, j_end - *cursor);
        int64_t picked = 0;
        fdm_read_mask_window(blk, w->lim, *cursor, width, w->win);
        fdm_column_any(w->win, n_rows, width, w->any);
        for (c = 0; c < width; ++c) {
            if (w->any[c]) {
                w->key_idx[n + picked] = *cursor + c;
                w->win_col[picked++] = c;
            }
        }
        for (t = 0; t < n_rows; ++t)
            for (k = 0; k < picked; ++k) w->keep[t * bn + n + k] = w->win[t * bn + w->win_col[k]];
        n += picked;
        *cursor += width;
    }
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* K/V tile loading                                                                           */
/* ------------------------------------------------------------------------------------------ */

/*
 * k_rows[c, :] = K[key_idx[c]], v[c, :] = V[key_idx[c]] as float, c < n; zero padding elsewhere.
 * The rows come from fdm_key_row: packed rows, or the page slots of a paged cache.
 */
FDM_HOT static void fdm_load_kv_tile(const fdm_block *blk, const int64_t *key_idx, int64_t n,
                                     float *FDM_RESTRICT k_rows, float *FDM_RESTRICT v) {
    const fdm_params *p = blk->p;
    const int64_t D = p->head_dim, dp = blk->dp;
    const int64_t elem = p->dtype == FDM_F32 ? 4 : 2; /* bytes */
    int64_t c, byte;
    for (c = 0; c < n; ++c) {
        const int64_t row = fdm_key_row(p, &blk->seq, key_idx[c]);
        float *kr = k_rows + c * dp;
        float *vr = v + c * dp;
        if (c + FDM_PREFETCH_ROWS < n) {
            const int64_t ahead = fdm_key_row(p, &blk->seq, key_idx[c + FDM_PREFETCH_ROWS]);
            const char *k_ahead = (const char *)p->k
                                + (ahead * p->k_row_stride + blk->hk * p->k_head_stride) * elem;
            const char *v_ahead = (const char *)p->v
                                + (ahead * p->v_row_stride + blk->hk * p->v_head_stride) * elem;
            for (byte = 0; byte < D * elem; byte += 64) {
                FDM_PREFETCH(k_ahead + byte);
                FDM_PREFETCH(v_ahead + byte);
            }
        }
        fdm_load_row(p->k, p->dtype, row * p->k_row_stride + blk->hk * p->k_head_stride, D, kr);
        fdm_load_row(p->v, p->dtype, row * p->v_row_stride + blk->hk * p->v_head_stride, D, vr);
        memset(kr + D, 0, (size_t)(dp - D) * sizeof(float));
        memset(vr + D, 0, (size_t)(dp - D) * sizeof(float));
    }
    memset(k_rows + n * dp, 0, (size_t)((FDM_BLOCK_N - n) * dp) * sizeof(float));
    memset(v + n * dp, 0, (size_t)((FDM_BLOCK_N - n) * dp) * sizeof(float));
}

/* kt[d, c] = k_rows[c, d]: (BLOCK_N, dp) -> (dp, BLOCK_N). */
FDM_HOT static void fdm_transpose_k(const float *FDM_RESTRICT k_rows, float *FDM_RESTRICT kt,
                                    int64_t dp) {
    int64_t d, c;
    for (d = 0; d < dp; ++d)
        for (c = 0; c < FDM_BLOCK_N; ++c) kt[d * FDM_BLOCK_N + c] = k_rows[c * dp + d];
}

/* ------------------------------------------------------------------------------------------ */
/* Scores                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/*
 * ncols[r]: how many leading tile columns row r may see. key_idx increases, so the keys within
 * row r's causal limit lim[r] are a prefix of the tile.
 */
static void fdm_visible_columns(const fdm_block *blk, const int64_t *key_idx, int64_t n,
                                const int64_t *lim, int64_t *ncols) {
    int64_t r;
    for (r = 0; r < blk->rows; ++r) {
        int64_t c = n;
        while (c > 0 && key_idx[c - 1] > lim[r]) --c;
        ncols[r] = c;
    }
}

/*
 * S = Q K^T for the tile: s[r, c] = sum_d q[r, d] * kt[d, c] (q already holds scale * Q).
 * Rows that see no key of the tile are skipped. The innermost loop runs over the BLOCK_N keys,
 * contiguous in kt and s; d is unrolled by 4 to save loads and stores of the s row.
 */
FDM_HOT static void fdm_qk_tile(const float *FDM_RESTRICT q, const float *FDM_RESTRICT kt,
                                float *FDM_RESTRICT s, const int64_t *ncols, int64_t rows,
                                int64_t dp) {
    int64_t r, d, c;
    for (r = 0; r < rows; ++r) {
        const float *qr = q + r * dp;
        float *sr = s + r * FDM_BLOCK_N;
        if (ncols[r] == 0) continue;
        for (c = 0; c < FDM_BLOCK_N; ++c) sr[c] = 0.0f;
        for (d = 0; d < dp; d += 4) {
            const float q0 = qr[d], q1 = qr[d + 1], q2 = qr[d + 2], q3 = qr[d + 3];
            const float *k0 = kt + d * FDM_BLOCK_N;
            const float *k1 = k0 + FDM_BLOCK_N, *k2 = k1 + FDM_BLOCK_N, *k3 = k2 + FDM_BLOCK_N;
            for (c = 0; c < FDM_BLOCK_N; ++c)
                sr[c] += q0 * k0[c] + q1 * k1[c] + q2 * k2[c] + q3 * k3[c];
        }
    }
}

/* dst[c] = bias(b, hk * G + g, i, key_idx[c]) as float, for c < n. */
static void fdm_read_bias_row(const fdm_block *blk, int64_t g, int64_t i, const int64_t *key_idx,
                              int64_t n, float *FDM_RESTRICT dst) {
    const fdm_operand *o = &blk->p->bias;
    const fdm_seq *seq = &blk->seq;
    int64_t c;
    if (o->dtype == FDM_F32) {
        const float *x = (const float *)o->ptr;
        for (c = 0; c < n; ++c) dst[c] = x[fdm_operand_offset(o, seq, blk->hk, g, i, key_idx[c])];
    } else if (o->dtype == FDM_F16) {
        const uint16_t *x = (const uint16_t *)o->ptr;
        for (c = 0; c < n; ++c)
            dst[c] = fdm_f16_to_f32(x[fdm_operand_offset(o, seq, blk->hk, g, i, key_idx[c])]);
    } else {
        const uint16_t *x = (const uint16_t *)o->ptr;
        for (c = 0; c < n; ++c)
            dst[c] = fdm_bf16_to_f32(x[fdm_operand_offset(o, seq, blk->hk, g, i, key_idx[c])]);
    }
}

/*
 * bias[t, c] for every operand row t and tile column c it needs: all n keys for a key-based row
 * (shared by the rows of head g), the row's visible columns ncols[t] for a query-based one.
 */
static void fdm_load_bias_tile(const fdm_block *blk, const int64_t *key_idx, int64_t n,
                               const int64_t *ncols, float *bias) {
    const fdm_operand *o = &blk->p->bias;
    const int64_t n_rows = fdm_operand_rows(blk, o);
    int64_t t, g, i;
    for (t = 0; t < n_rows; ++t) {
        fdm_operand_row_coords(blk, o, t, &g, &i);
        fdm_read_bias_row(blk, g, i, key_idx, o->layout == FDM_LAYOUT_KEY ? n : ncols[t],
                          bias + t * FDM_BLOCK_N);
    }
}

/*
 * The score transform of SPEC.md, in its order, on visible columns c < ncols[r]:
 * S = softcap * tanh(S / softcap); S += bias; S = -inf where the mask drops (r, c).
 * Columns c >= ncols[r] (past the causal limit, or past the tile's n keys) become -inf.
 */
FDM_HOT static void fdm_transform_scores(const fdm_block *blk, const fdm_scratch *w) {
    const fdm_params *p = blk->p;
    int64_t r, c;
    for (r = 0; r < blk->rows; ++r) {
        const int64_t nc = w->ncols[r];
        float *FDM_RESTRICT sr = w->s + r * FDM_BLOCK_N;
        if (p->softcap > 0.0f)
            for (c = 0; c < nc; ++c) sr[c] = p->softcap * tanhf(sr[c] / p->softcap);
        if (p->bias.ptr != NULL) {
            const float *br = w->bias + fdm_operand_row(blk, &p->bias, r) * FDM_BLOCK_N;
            for (c = 0; c < nc; ++c) sr[c] += br[c];
        }
        if (p->mask.ptr != NULL) {
            const unsigned char *kr = w->keep + fdm_operand_row(blk, &p->mask, r) * FDM_BLOCK_N;
            for (c = 0; c < nc; ++c) sr[c] = fdm_select(kr[c], sr[c], -INFINITY);
        }
        for (c = nc; c < FDM_BLOCK_N; ++c) sr[c] = -INFINITY;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Online softmax and P V                                                                     */
/* ------------------------------------------------------------------------------------------ */

/*
 * exp(x) for x <= 0, as the softmax needs it, branch-free so loops over it vectorize.
 * x = n ln2 + t with n = round(x / ln2) and |t| <= ln2 / 2 (ln2 split in two parts, Cody-Waite);
 * exp(t) by a polynomial (Cephes expf, about 1 ulp); times 2^n built in the exponent bits.
 * Results at the bottom of float's normal range (x < about -87) flush to 0, and exp(-inf) = 0:
 * a tile's P~ holds 1 at the row max, so such terms are far below rounding. x is clamped to -104
 * first (NaN too), so n always fits an int.
 */
static inline float fdm_exp_nonpos(float x) {
    const float xc = fdm_select(x > -104.0f, x, -104.0f);
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* 1.5 * 2^23 rounds */
    const int32_t biased_exp = (int32_t)n + 127;
    float t = xc - n * 0.693359375f;
    t = t - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * t + 1.3981999507e-3f;
    y = y * t + 8.3334519073e-3f;
    y = y * t + 4.1665795894e-2f;
    y = y * t + 1.6666665459e-1f;
    y = y * t + 5.0000001201e-1f;
    y = y * t * t + t + 1.0f;
    /* 2^n, or +0.0 for n <= -126, so that no subnormal comes out */
    return y * fdm_f32_from_bits((uint32_t)(biased_exp > 1 ? biased_exp : 0) << 23);
}

/* max_c sr[c] over a tile row, as a tree of elementwise maxima (vectorizes; -inf if all are). */
static inline float fdm_row_max(const float *FDM_RESTRICT sr) {
    float half[FDM_BLOCK_N / 2];
    int64_t c, width;
    for (c = 0; c < FDM_BLOCK_N / 2; ++c)
        half[c] = fdm_select(sr[c] > sr[c + FDM_BLOCK_N / 2], sr[c], sr[c + FDM_BLOCK_N / 2]);
    for (width = FDM_BLOCK_N / 4; width >= 1; width /= 2)
        for (c = 0; c < width; ++c)
            half[c] = fdm_select(half[c] > half[c + width], half[c], half[c + width]);
    return half[0];
}

/*
 * Online softmax over one tile, per row r with visible columns (ncols[r] > 0):
 *   m_new = max(m, max_c S[r, c]);  P~[r, c] = exp(S[r, c] - m_new);  alpha = exp(m - m_new);
 *   l = alpha * l + sum_c P~[r, c];  m = m_new.
 * A row whose visible scores are all -inf (e.g. bias -inf) keeps its state: ncols[r] = 0.
 */
FDM_HOT static void fdm_softmax_update(float *FDM_RESTRICT s, float *FDM_RESTRICT m,
                                       float *FDM_RESTRICT l, float *FDM_RESTRICT alpha,
                                       int64_t *FDM_RESTRICT ncols, int64_t rows) {
    int64_t r, c, u;
    for (r = 0; r < rows; ++r) {
        float *sr = s + r * FDM_BLOCK_N;
        float lane_sum[8];
        float tile_max, m_new, sum;
        alpha[r] = 1.0f;
        if (ncols[r] == 0) continue;
        tile_max = fdm_row_max(sr);
        m_new = tile_max > m[r] ? tile_max : m[r];
        if (m_new == -INFINITY) {
            ncols[r] = 0;
            continue;
        }
        for (c = 0; c < FDM_BLOCK_N; ++c) sr[c] = fdm_exp_nonpos(sr[c] - m_new);
        for (u = 0; u < 8; ++u) lane_sum[u] = 0.0f;
        for (c = 0; c < FDM_BLOCK_N; c += 8)
            for (u = 0; u < 8; ++u) lane_sum[u] += sr[c + u];
        sum = 0.0f;
        for (u = 0; u < 8; ++u) sum += lane_sum[u];
        alpha[r] = fdm_exp_nonpos(m[r] - m_new);
        l[r] = alpha[r] * l[r] + sum;
        m[r] = m_new;
    }
}

/*
 * acc[r, :] = alpha[r] * acc[r, :] + sum_c P~[r, c] V[c, :], over c < ncols[r] (rounded up to 4;
 * P~ is 0 past ncols and those V rows are finite). The innermost loop runs over the head dim;
 * c is unrolled by 4, and groups of 4 zero probabilities (masked keys) are skipped.
 */
FDM_HOT static void fdm_pv_tile(const float *FDM_RESTRICT pmat, const float *FDM_RESTRICT v,
                                float *FDM_RESTRICT acc, const float *alpha, const int64_t *ncols,
                                int64_t rows, int64_t dp) {
    int64_t r, c, d;
    for (r = 0; r < rows; ++r) {
        const float *pr = pmat + r * FDM_BLOCK_N;
        const int64_t c_end = fdm_round_up(ncols[r], 4);
        float *ar = acc + r * dp;
        if (alpha[r] != 1.0f)
            for (d = 0; d < dp; ++d) ar[d] *= alpha[r];
        for (c = 0; c < c_end; c += 4) {
            const float p0 = pr[c], p1 = pr[c + 1], p2 = pr[c + 2], p3 = pr[c + 3];
            const float *v0 = v + c * dp;
            const float *v1 = v0 + dp, *v2 = v1 + dp, *v3 = v2 + dp;
            if (p0 == 0.0f && p1 == 0.0f && p2 == 0.0f && p3 == 0.0f) continue;
            for (d = 0; d < dp; ++d) ar[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Output                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/*
 * out[row, h, :] = acc[r, :] / l[r] in the output dtype; lse[h, row] = m[r] + log(l[r]).
 * A row that saw no key (m = -inf) gets out = 0 (acc is still 0) and lse = -inf.
 */
FDM_HOT static void fdm_store_block(const fdm_block *blk, const fdm_scratch *w) {
    const fdm_params *p = blk->p;
    int64_t r;
    for (r = 0; r < blk->rows; ++r) {
        const int64_t h = blk->hk * blk->G + r / blk->mrows;
        const int64_t row = blk->seq.q_start + blk->q0 + r % blk->mrows;
        const int seen = w->m[r] != -INFINITY;
        fdm_store_row(p->out, p->dtype, row * p->out_row_stride + h * p->out_head_stride,
                      w->acc + r * blk->dp, p->head_dim, seen ? 1.0f / w->l[r] : 0.0f);
        if (p->lse != NULL)
            p->lse[h * p->lse_head_stride + row] = seen ? w->m[r] + logf(w->l[r]) : -INFINITY;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Work items                                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Work item index -> (sequence b, KV head hk, query block qb), qb fastest. */
static void fdm_run_item(const fdm_params *p, fdm_scratch *w, int64_t item) {
    const int64_t n_qblocks = fdm_ceil_div(p->max_seqlen_q, FDM_BLOCK_M);
    const int64_t qb = item % n_qblocks;
    const int64_t hk = (item / n_qblocks) % p->num_heads_k;
    const int64_t b = item / (n_qblocks * p->num_heads_k);
    fdm_block blk;
    int64_t j_end, cursor = 0, n;

    blk.p = p;
    blk.seq = fdm_seq_of(p, b);
    blk.hk = hk;
    blk.G = p->num_heads / p->num_heads_k;
    blk.q0 = qb * FDM_BLOCK_M;
    if (blk.q0 >= blk.seq.len_q) return;
    blk.mrows = fdm_min64(FDM_BLOCK_M, blk.seq.len_q - blk.q0);
    blk.rows = blk.G * blk.mrows;
    blk.dp = fdm_round_up(p->head_dim, FDM_D_ALIGN);

    fdm_load_q_block(&blk, w->q);
    fdm_init_rows(&blk, w);
    /* Keys past the last query's limit are hidden from every row of the block. */
    j_end = fdm_min64(blk.seq.len_k, w->lim[blk.mrows - 1] + 1);
    while ((n = fdm_select_key_tile(&blk, w, j_end, &cursor)) > 0) {
        fdm_load_kv_tile(&blk, w->key_idx, n, w->k_rows, w->v);
        fdm_transpose_k(w->k_rows, w->kt, blk.dp);
        fdm_visible_columns(&blk, w->key_idx, n, w->lim, w->ncols);
        fdm_qk_tile(w->q, w->kt, w->s, w->ncols, blk.rows, blk.dp);
        if (p->bias.ptr != NULL) fdm_load_bias_tile(&blk, w->key_idx, n, w->ncols, w->bias);
        fdm_transform_scores(&blk, w);
        fdm_softmax_update(w->s, w->m, w->l, w->alpha, w->ncols, blk.rows);
        fdm_pv_tile(w->s, w->v, w->acc, w->alpha, w->ncols, blk.rows, blk.dp);
    }
    fdm_store_block(&blk, w);
}

int64_t fdm_cpu_num_work_items(const fdm_params *p) {
    if (p->batch <= 0 || p->num_heads_k <= 0 || p->max_seqlen_q <= 0) return 0;
    return p->batch * p->num_heads_k * fdm_ceil_div(p->max_seqlen_q, FDM_BLOCK_M);
}

static int fdm_float_dtype(fdm_dtype dt) {
    return dt == FDM_F32 || dt == FDM_F16 || dt == FDM_BF16;
}

int fdm_cpu_forward_range(const fdm_params *p, int64_t begin, int64_t end) {
    fdm_scratch w;
    int64_t item;
    if (!fdm_float_dtype(p->dtype)) return FDM_ERR_DTYPE;
    if (p->mask.ptr != NULL && !fdm_float_dtype(p->mask.dtype) && p->mask.dtype != FDM_BYTE)
        return FDM_ERR_DTYPE;
    if (p->bias.ptr != NULL && !fdm_float_dtype(p->bias.dtype)) return FDM_ERR_DTYPE;
    if (begin >= end) return FDM_OK;
    if (!fdm_scratch_alloc(&w, FDM_BLOCK_M * (p->num_heads / p->num_heads_k),
                           fdm_round_up(p->head_dim, FDM_D_ALIGN)))
        return FDM_ERR_OUT_OF_MEMORY;
    for (item = begin; item < end; ++item) fdm_run_item(p, &w, item);
    free(w.block);
    return FDM_OK;
}
