// binding.cpp: the torch layer of flash_dmattn.
//
// Registers flash_dmattn::mha_varlen_fwd with TORCH_LIBRARY, validates every argument here and
// only here (SPEC.md section 3), turns tensors into the plain-C fdm_params struct and calls the
// CPU implementation (csrc/cpu) or the CUDA launcher (csrc/kernels). Error messages use the
// Python parameter names of flash_dmattn_varlen_func.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string>
#include <tuple>

#include "cpu/fdm_cpu.h"
#include "fdm_params.h"

#ifdef FDM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/fdm_cuda.h"
#endif

namespace {

using at::Tensor;
using c10::optional;

#define FDM_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "flash_dmattn: ", __VA_ARGS__)

// FLASH_DMATTN_DEBUG=1 turns on the checks that read cu_seqlens on a GPU (a host sync).
bool debug_mode() {
    const char *env = std::getenv("FLASH_DMATTN_DEBUG");
    return env != nullptr && env[0] != '\0' && std::string(env) != "0";
}

// An integer launch override from the environment (tests and tuning), `fallback` when unset.
int env_override(const char *name, int fallback) {
    const char *env = std::getenv(name);
    return env != nullptr && env[0] != '\0' ? std::atoi(env) : fallback;
}

std::string shape_str(const Tensor &t) { return c10::str(t.sizes()); }

// ---------------------------------------------------------------- validation (the one place)

struct Sizes {
    int64_t total_q, total_k, heads, heads_k, head_dim, batch;
    bool paged = false;  // block_table given: total_k counts logical keys (cu_seqlens_k[-1]), not cache rows
};

Sizes check_qkv(const Tensor &q, const Tensor &k, const Tensor &v) {
    FDM_CHECK(q.dim() == 3, "query must be 3-D (total_q, num_heads, head_dim), got shape ", shape_str(q));
    FDM_CHECK(k.dim() == 3, "key must be 3-D (total_k, num_heads_k, head_dim), got shape ", shape_str(k));
    FDM_CHECK(v.dim() == 3, "value must be 3-D (total_k, num_heads_k, head_dim), got shape ", shape_str(v));
    Sizes s{q.size(0), k.size(0), q.size(1), k.size(1), q.size(2), 0};
    FDM_CHECK(k.size(2) == s.head_dim, "key head_dim ", k.size(2), " differs from query head_dim ", s.head_dim);
    FDM_CHECK(v.sizes() == k.sizes(), "value shape ", shape_str(v), " differs from key shape ", shape_str(k));
    FDM_CHECK(s.heads_k > 0 && s.heads % s.heads_k == 0, "query num_heads ", s.heads,
              " must be a multiple of key num_heads_k ", s.heads_k);
    // (The CUDA kernels index heads in 32-bit arithmetic.)
    FDM_CHECK(s.heads < (int64_t{1} << 31), "query num_heads must be below 2^31, got ", s.heads);
    FDM_CHECK(s.head_dim > 0, "query head_dim must be positive, got ", s.head_dim);
    FDM_CHECK(k.dtype() == q.dtype(), "key dtype ", k.dtype(), " differs from query dtype ", q.dtype());
    FDM_CHECK(v.dtype() == q.dtype(), "value dtype ", v.dtype(), " differs from query dtype ", q.dtype());
    FDM_CHECK(k.device() == q.device(), "key is on ", k.device(), " but query is on ", q.device());
    FDM_CHECK(v.device() == q.device(), "value is on ", v.device(), " but query is on ", q.device());
    FDM_CHECK(q.stride(2) == 1 || s.head_dim == 1, "query last dim must be contiguous (stride 1), got strides ", q.strides());
    FDM_CHECK(k.stride(2) == 1 || s.head_dim == 1, "key last dim must be contiguous (stride 1), got strides ", k.strides());
    FDM_CHECK(v.stride(2) == 1 || s.head_dim == 1, "value last dim must be contiguous (stride 1), got strides ", v.strides());

    const auto dt = q.scalar_type();
    if (q.is_cuda()) {
        FDM_CHECK(dt == at::kHalf || dt == at::kBFloat16,
                  "query dtype ", q.dtype(), " is not supported on CUDA (float16 or bfloat16)");
#ifdef FDM_WITH_CUDA
        FDM_CHECK(s.head_dim % 8 == 0 && s.head_dim <= FDM_CUDA_MAX_HEAD_DIM, "query head_dim ", s.head_dim,
                  " is not supported on CUDA (multiples of 8 up to ", FDM_CUDA_MAX_HEAD_DIM, ")");
#endif
    } else {
        FDM_CHECK(q.is_cpu(), "query device ", q.device(), " is not supported (cpu or cuda)");
        FDM_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                  "query dtype ", q.dtype(), " is not supported on CPU (float32, float16 or bfloat16)");
    }
    return s;
}

void check_cu_seqlens(const Tensor &cu, const char *name, const Tensor &q, int64_t batch_plus_one) {
    FDM_CHECK(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.dtype());
    FDM_CHECK(cu.dim() == 1, name, " must be 1-D (batch + 1,), got shape ", shape_str(cu));
    FDM_CHECK(cu.size(0) >= 1, name, " must have at least one entry (batch + 1 >= 1)");
    FDM_CHECK(cu.size(0) == batch_plus_one, name, " has ", cu.size(0), " entries but cu_seqlens_q has ",
              batch_plus_one, " (both must be batch + 1)");
    FDM_CHECK(cu.device() == q.device(), name, " is on ", cu.device(), " but query is on ", q.device());
    FDM_CHECK(cu.is_contiguous(), name, " must be contiguous");
}

// Reads cu_seqlens (a host sync on a GPU): starts at 0, non-decreasing, ends at total (unless total
// is -1: the keys of a paged cache, whose logical count is whatever cu_seqlens_k ends at), max length.
// Returns the last entry.
int64_t check_cu_seqlens_data(const Tensor &cu, const char *name, int64_t total, int64_t max_seqlen,
                              const char *max_name) {
    const Tensor host = cu.cpu();
    const int32_t *c = host.data_ptr<int32_t>();
    const int64_t n = host.size(0);
    FDM_CHECK(c[0] == 0, name, " must start at 0, got ", c[0]);
    int64_t longest = 0;
    for (int64_t b = 0; b + 1 < n; ++b) {
        FDM_CHECK(c[b + 1] >= c[b], name, " must be non-decreasing, got ", c[b], " then ", c[b + 1],
                  " at index ", b);
        longest = std::max<int64_t>(longest, c[b + 1] - c[b]);
    }
    FDM_CHECK(total < 0 || c[n - 1] == total, name, " must end at ", total, " (the packed length), got ",
              c[n - 1]);
    FDM_CHECK(longest <= max_seqlen, max_name, "=", max_seqlen, " is smaller than the longest sequence (",
              longest, ") in ", name);
    return c[n - 1];
}

// ---------------------------------------------------------------- paged KV cache

// The paged caches key and value (num_pages, page_size, H_k, D), checked to be read as rows
// (num_pages * page_size, H_k, D), row = page * page_size + slot, without a copy.
void check_paged_cache(const Tensor &cache, const char *name, const Tensor &k) {
    FDM_CHECK(cache.dim() == 4, name,
              " must be 4-D (num_pages, page_size, num_heads_k, head_dim) with block_table, got shape ",
              shape_str(cache));
    FDM_CHECK(cache.sizes() == k.sizes(), name, " cache shape ", shape_str(cache), " differs from key cache shape ",
              shape_str(k));
    FDM_CHECK(cache.size(1) >= 1, name, " page_size (dim 1) must be >= 1, got shape ", shape_str(cache));
    const bool flattens =
        cache.size(0) <= 1 || cache.size(1) == 1 || cache.stride(0) == cache.size(1) * cache.stride(1);
    FDM_CHECK(flattens, name, " cache pages must be page_size slots apart (stride(0) == page_size * stride(1), so that "
              "(num_pages, page_size) flatten into rows without a copy), got shape ", shape_str(cache), " and strides ",
              cache.strides());
}

// The rows view (num_pages * page_size, H_k, D) of a cache that passed check_paged_cache.
Tensor paged_rows(const Tensor &cache) {
    const int64_t row_stride = cache.size(1) == 1 ? cache.stride(0) : cache.stride(1);
    return cache.as_strided({cache.size(0) * cache.size(1), cache.size(2), cache.size(3)},
                            {row_stride, cache.stride(2), cache.stride(3)}, cache.storage_offset());
}

// block_table (B, max_pages) int32: its layout, and that it covers max_seqlen_k keys.
void check_block_table(const Tensor &bt, const Tensor &q, int64_t batch, int64_t page_size, int64_t max_seqlen_k) {
    FDM_CHECK(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.dtype());
    FDM_CHECK(bt.dim() == 2, "block_table must be 2-D (batch, max_pages), got shape ", shape_str(bt));
    FDM_CHECK(bt.size(0) == batch, "block_table has ", bt.size(0), " rows but the batch has ", batch,
              " sequences (len(cu_seqlens_q) - 1)");
    FDM_CHECK(bt.device() == q.device(), "block_table is on ", bt.device(), " but query is on ", q.device());
    FDM_CHECK(bt.stride(1) == 1 || bt.size(1) <= 1, "block_table last dim must be contiguous (stride 1), got strides ",
              bt.strides());
    FDM_CHECK(bt.size(1) * page_size >= max_seqlen_k, "block_table has max_pages=", bt.size(1), " pages of page_size=",
              page_size, " keys per sequence, fewer than max_seqlen_k=", max_seqlen_k);
}

// Reads block_table and cu_seqlens_k (a host sync on a GPU): every page a sequence uses,
// block_table[b, 0 .. ceil(len_k / page_size)), is in [0, num_pages). Entries past those are never read.
void check_block_table_data(const Tensor &bt, const Tensor &cu_seqlens_k, int64_t page_size, int64_t num_pages) {
    const Tensor table = bt.cpu(), cu = cu_seqlens_k.cpu();
    const auto t = table.accessor<int32_t, 2>();
    const int32_t *c = cu.data_ptr<int32_t>();
    for (int64_t b = 0; b < table.size(0); ++b) {
        const int64_t used = (c[b + 1] - c[b] + page_size - 1) / page_size;
        for (int64_t j = 0; j < used; ++j) {
            FDM_CHECK(t[b][j] >= 0 && t[b][j] < num_pages, "block_table[", b, ", ", j, "] = ", t[b][j],
                      " is not a page of the key/value cache (num_pages=", num_pages, "); sequence ", b, " has ",
                      c[b + 1] - c[b], " keys, in pages block_table[", b, ", 0:", used, "]");
        }
    }
}

bool mask_dtype_ok(at::ScalarType t) {
    return t == at::kBool || t == at::kByte || t == at::kChar || t == at::kHalf || t == at::kBFloat16 ||
           t == at::kFloat;
}

fdm_operand absent_operand() {
    fdm_operand o;
    o.ptr = nullptr;
    o.dtype = FDM_F32;
    o.layout = FDM_LAYOUT_KEY;
    o.stride_q = o.stride_k = o.stride_kv_head = o.stride_group = o.stride_seq = 0;
    return o;
}

// The checks every mask/bias layout shares (device, dtype, head count h'), then the operand's
// pointer, dtype and head strides: head h = hk * G + g reads head(h) of h', a stride of 0 broadcasts.
fdm_operand operand_heads(const Tensor &t, const char *name, bool is_mask, const Tensor &q, const Sizes &s,
                          int64_t hp, int64_t head_stride, const std::function<std::string()> &accepted) {
    FDM_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but query is on ", q.device());
    const auto dt = t.scalar_type();
    if (is_mask) {
        FDM_CHECK(mask_dtype_ok(dt), name, " dtype ", t.dtype(),
                  " is not supported (bool, uint8, int8, float16, bfloat16 or float32)");
    } else {
        FDM_CHECK(dt == q.scalar_type() || dt == at::kFloat, name, " dtype ", t.dtype(),
                  " must be the query dtype (", q.dtype(), ") or float32");
    }
    FDM_CHECK(hp == 1 || hp == s.heads_k || hp == s.heads, name, " has ", hp, " heads in shape ", shape_str(t),
              "; ", accepted());
    fdm_operand o = absent_operand();
    o.ptr = t.data_ptr();
    switch (dt) {
        case at::kFloat: o.dtype = FDM_F32; break;
        case at::kHalf: o.dtype = FDM_F16; break;
        case at::kBFloat16: o.dtype = FDM_BF16; break;
        default: o.dtype = FDM_BYTE; break;
    }
    if (hp == 1) head_stride = 0;
    if (hp == s.heads) {
        o.stride_kv_head = (s.heads / s.heads_k) * head_stride;
        o.stride_group = head_stride;
    } else {
        o.stride_kv_head = head_stride;  // hp == H_k (or 1 with stride 0)
    }
    return o;
}

// A varlen mask or bias: key-based (total_k, h') or query-based (total_q, h', Kq).
fdm_operand make_operand(const optional<Tensor> &opt, const char *name, bool is_mask, const Tensor &q,
                         const Sizes &s, int64_t max_seqlen_k) {
    if (!opt.has_value()) return absent_operand();
    const Tensor &t = *opt;
    // The accepted shapes, formatted only when a check fails.
    const auto accepted = [&] {
        return c10::str("accepted: key-based (total_k=", s.total_k, ", h') or query-based (total_q=", s.total_q,
                        ", h', Kq >= max_seqlen_k=", max_seqlen_k, ") with h' in {1, ", s.heads_k, ", ", s.heads,
                        "}");
    };
    FDM_CHECK(t.dim() == 2 || t.dim() == 3, name, " has shape ", shape_str(t), "; ", accepted());
    const int64_t rows = t.size(0);
    if (t.dim() == 2) {
        FDM_CHECK(rows == s.total_k, name, " is 2-D (key-based) with ", rows, " rows but total_k is ", s.total_k,
                  s.paged ? " (with block_table: cu_seqlens_k[-1], the logical key count, not the cache rows)" : "",
                  "; ", accepted());
    } else {
        FDM_CHECK(rows == s.total_q, name, " is 3-D (query-based) with ", rows, " rows but total_q is ",
                  s.total_q, "; ", accepted());
        FDM_CHECK(t.size(2) >= max_seqlen_k, name, " has Kq=", t.size(2), " keys per row, less than max_seqlen_k=",
                  max_seqlen_k, "; ", accepted());
    }
    fdm_operand o = operand_heads(t, name, is_mask, q, s, t.size(1), t.stride(1), accepted);
    o.layout = t.dim() == 2 ? FDM_LAYOUT_KEY : FDM_LAYOUT_QUERY;
    if (o.layout == FDM_LAYOUT_KEY) {
        o.stride_k = t.stride(0);
    } else {
        o.stride_q = t.stride(0);
        o.stride_k = t.stride(2);
    }
    return o;
}

// A dense mask or bias (B or 1, h', S_q or 1, S_k) of mha_fwd, whose batch is packed as sequence b =
// rows [b * S_q, (b + 1) * S_q). Size-1 dims broadcast by stride 0; S_q == 1 is the key-based form.
fdm_operand make_dense_operand(const optional<Tensor> &opt, const char *name, bool is_mask, const Tensor &q,
                               const Sizes &s, int64_t seqlen_q, int64_t seqlen_k) {
    if (!opt.has_value()) return absent_operand();
    const Tensor &t = *opt;
    const auto accepted = [&] {
        return c10::str("accepted: (batch=", s.batch, " or 1, h', seqlen_q=", seqlen_q, " or 1, seqlen_k=", seqlen_k,
                        ") with h' in {1, ", s.heads_k, ", ", s.heads, "}");
    };
    FDM_CHECK(t.dim() == 4, name, " has shape ", shape_str(t), "; ", accepted());
    FDM_CHECK((t.size(0) == s.batch || t.size(0) == 1) && (t.size(2) == seqlen_q || t.size(2) == 1) &&
                  t.size(3) == seqlen_k,
              name, " has shape ", shape_str(t), "; ", accepted());
    fdm_operand o = operand_heads(t, name, is_mask, q, s, t.size(1), t.stride(1), accepted);
    const int64_t batch_stride = t.size(0) == 1 ? 0 : t.stride(0);
    if (t.size(2) == 1) {  // one row per key: key_base = b * S_k
        o.layout = FDM_LAYOUT_KEY;
        o.stride_k = t.stride(3);
        o.stride_seq = batch_stride - seqlen_k * o.stride_k;
    } else {  // q_start = b * S_q
        o.layout = FDM_LAYOUT_QUERY;
        o.stride_q = t.stride(2);
        o.stride_k = t.stride(3);
        o.stride_seq = batch_stride - seqlen_q * o.stride_q;
    }
    return o;
}

fdm_dtype to_fdm_dtype(at::ScalarType t) {
    return t == at::kHalf ? FDM_F16 : (t == at::kBFloat16 ? FDM_BF16 : FDM_F32);
}

void describe_qkv(fdm_params &p, const Tensor &q, const Tensor &k, const Tensor &v) {
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.q_row_stride = q.stride(0);
    p.q_head_stride = q.stride(1);
    p.k_row_stride = k.stride(0);
    p.k_head_stride = k.stride(1);
    p.v_row_stride = v.stride(0);
    p.v_head_stride = v.stride(1);
}

// The logical key count of a paged call on a GPU outside debug mode, where cu_seqlens_k is not read:
// the rows of the key-based mask/bias (which must agree), or 0 when there is none (nothing reads it then).
int64_t paged_total_k_of_operands(const optional<Tensor> &attn_mask, const optional<Tensor> &attn_bias) {
    const bool mask_key = attn_mask.has_value() && attn_mask->dim() == 2;
    const bool bias_key = attn_bias.has_value() && attn_bias->dim() == 2;
    FDM_CHECK(!mask_key || !bias_key || attn_bias->size(0) == attn_mask->size(0), "attn_bias is 2-D (key-based) with ",
              bias_key ? attn_bias->size(0) : 0, " rows but attn_mask has ", mask_key ? attn_mask->size(0) : 0,
              "; with block_table both have one row per logical key (total_k = cu_seqlens_k[-1])");
    return mask_key ? attn_mask->size(0) : (bias_key ? attn_bias->size(0) : 0);
}

// Everything SPEC.md section 3 refuses, checked before any kernel runs; fills the struct.
// With block_table, k and v come in as the paged caches (num_pages, page_size, H_k, D) and leave as
// their rows (num_pages * page_size, H_k, D), the tensors the forward reads.
fdm_params validate_and_describe(const Tensor &q, Tensor &k, Tensor &v, const optional<Tensor> &attn_mask,
                                 const optional<Tensor> &attn_bias, const Tensor &cu_seqlens_q,
                                 const Tensor &cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                 bool is_causal, double softcap, const optional<Tensor> &block_table) {
    const bool paged = block_table.has_value();
    int64_t num_pages = 0, page_size = 0;
    if (paged) {
        check_paged_cache(k, "key", k);
        check_paged_cache(v, "value", k);
        num_pages = k.size(0);
        page_size = k.size(1);
        k = paged_rows(k);
        v = paged_rows(v);
    }
    Sizes s = check_qkv(q, k, v);
    s.paged = paged;
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, cu_seqlens_q.dim() == 1 ? cu_seqlens_q.size(0) : -1);
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q, cu_seqlens_q.size(0));
    s.batch = cu_seqlens_q.size(0) - 1;
    FDM_CHECK(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
    FDM_CHECK(max_seqlen_k >= 0, "max_seqlen_k must be >= 0, got ", max_seqlen_k);
    FDM_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
    FDM_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0 (0 = off), got ", softcap);
    if (paged) check_block_table(*block_table, q, s.batch, page_size, max_seqlen_k);
    if (q.is_cpu() || debug_mode()) {
        check_cu_seqlens_data(cu_seqlens_q, "cu_seqlens_q", s.total_q, max_seqlen_q, "max_seqlen_q");
        const int64_t k_end =
            check_cu_seqlens_data(cu_seqlens_k, "cu_seqlens_k", paged ? -1 : s.total_k, max_seqlen_k, "max_seqlen_k");
        if (paged) {
            s.total_k = k_end;  // the logical key count; the cache may hold more (or fewer) rows
            check_block_table_data(*block_table, cu_seqlens_k, page_size, num_pages);
        }
    } else if (paged) {
        s.total_k = paged_total_k_of_operands(attn_mask, attn_bias);
    }

    fdm_params p{};  // every pointer NULL, every stride and override 0
    describe_qkv(p, q, k, v);
    p.dtype = to_fdm_dtype(q.scalar_type());
    p.out = nullptr;
    p.out_row_stride = p.out_head_stride = 0;
    p.lse = nullptr;
    p.lse_head_stride = 0;
    p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
    p.batch = s.batch;
    p.total_q = s.total_q;
    p.total_k = s.total_k;
    p.max_seqlen_q = max_seqlen_q;
    p.max_seqlen_k = max_seqlen_k;
    p.num_heads = s.heads;
    p.num_heads_k = s.heads_k;
    p.head_dim = s.head_dim;
    p.scale = static_cast<float>(scale);
    p.softcap = static_cast<float>(softcap);
    p.is_causal = is_causal ? 1 : 0;
    p.mask = make_operand(attn_mask, "attn_mask", true, q, s, max_seqlen_k);
    p.bias = make_operand(attn_bias, "attn_bias", false, q, s, max_seqlen_k);
    if (paged) {  // key j of sequence b: row block_table[b, j / page_size] * page_size + j % page_size
        p.block_table = block_table->data_ptr<int32_t>();
        p.block_table_stride = block_table->stride(0);
        p.max_pages = block_table->size(1);
        p.page_size = page_size;
        p.num_pages = num_pages;
    }
    p.workspace = nullptr;
    // Launch overrides (docs/api.md, "Environment"): FLASH_DMATTN_NUM_SPLITS=n forces n key ranges
    // per row block, FLASH_DMATTN_GATHER_KEYS=0/1 turns the gathered-key path off/on,
    // FLASH_DMATTN_KEY_SPLIT=0/1 picks the warps' layout (rows or keys of a tile),
    // FLASH_DMATTN_WARPGROUPS=0/1 turns the Hopper warpgroup layout off/on,
    // FLASH_DMATTN_ROW_SCHEDULE=0/1 the row schedule (a grid without empty row blocks) off/on.
    p.force_num_splits = std::max(0, env_override("FLASH_DMATTN_NUM_SPLITS", 0));
    p.force_gather = env_override("FLASH_DMATTN_GATHER_KEYS", -1);
    p.force_key_split = env_override("FLASH_DMATTN_KEY_SPLIT", -1);
    p.force_warpgroups = env_override("FLASH_DMATTN_WARPGROUPS", -1);
    p.force_row_schedule = env_override("FLASH_DMATTN_ROW_SCHEDULE", -1);
    return p;
}

std::tuple<Tensor, Tensor> alloc_outputs(const Tensor &q, fdm_params &p) {
    Tensor out = at::empty(q.sizes(), q.options());
    Tensor lse = at::empty({p.num_heads, p.total_q}, q.options().dtype(at::kFloat));
    p.out = out.data_ptr();
    p.out_row_stride = out.stride(0);
    p.out_head_stride = out.stride(1);
    p.lse = lse.data_ptr<float>();
    p.lse_head_stride = lse.stride(0);
    return {out, lse};
}

// ---------------------------------------------------------------- running

#ifdef FDM_WITH_CUDA
// cp.async moves 16-byte chunks: q/k/v need 16-byte aligned rows and heads, else we copy them.
Tensor aligned_for_cuda(const Tensor &t) {
    const int64_t elems = 16 / t.element_size();
    const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % elems == 0 &&
                    t.stride(1) % elems == 0;
    return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}
#endif

// Allocates out (total_q, H, D) and lse (H, total_q), runs the CPU or CUDA forward of p.
std::tuple<Tensor, Tensor> run_forward(fdm_params &p, const Tensor &q, const Tensor &k, const Tensor &v) {
    auto outputs = alloc_outputs(q, p);
    if (q.is_cpu()) {
        std::atomic<int> status{FDM_OK};
        at::parallel_for(0, fdm_cpu_num_work_items(&p), 1, [&](int64_t begin, int64_t end) {
            const int st = fdm_cpu_forward_range(&p, begin, end);
            if (st != FDM_OK) status.store(st);
        });
        TORCH_CHECK(status.load() == FDM_OK, "flash_dmattn: CPU forward failed: ",
                    fdm_status_string(status.load()));
        return outputs;
    }
#ifdef FDM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const Tensor q_a = aligned_for_cuda(q), k_a = aligned_for_cuda(k), v_a = aligned_for_cuda(v);
    describe_qkv(p, q_a, k_a, v_a);
    // Split-KV scratch (a few MB at most), from torch's caching allocator on the current stream.
    const size_t workspace_bytes = fdm_cuda_workspace_size(&p);
    Tensor workspace;
    if (workspace_bytes > 0) {
        workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, q.options().dtype(at::kByte));
        p.workspace = workspace.data_ptr();
    }
    const int st = fdm_cuda_forward(&p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(st == FDM_OK, "flash_dmattn: CUDA forward failed: ", fdm_status_string(st),
                st == FDM_ERR_CUDA ? c10::str(" (", cudaGetErrorString(cudaGetLastError()), ")") : std::string());
    return outputs;
#else
    TORCH_CHECK(false, "flash_dmattn: this build has no CUDA kernels");
#endif
}

// ---------------------------------------------------------------- the ops

std::tuple<Tensor, Tensor> mha_varlen_fwd(const Tensor &q, const Tensor &k, const Tensor &v,
                                          const optional<Tensor> &attn_mask, const optional<Tensor> &attn_bias,
                                          const Tensor &cu_seqlens_q, const Tensor &cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, double scale, bool is_causal, double softcap,
                                          const optional<Tensor> &block_table) {
    Tensor k_rows = k, v_rows = v;  // paged caches become their rows (validate_and_describe)
    fdm_params p = validate_and_describe(q, k_rows, v_rows, attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k, scale, is_causal, softcap, block_table);
    return run_forward(p, q, k_rows, v_rows);
}

// Dense (batch, seqlen, heads, head_dim) attention: a varlen batch of equal lengths. The batch and
// sequence dims are flattened into packed rows (a view whenever the strides allow, as for packed
// qkv), and the dense mask/bias keep their own strides through stride_seq.
std::tuple<Tensor, Tensor> mha_fwd(const Tensor &q, const Tensor &k, const Tensor &v,
                                   const optional<Tensor> &attn_mask, const optional<Tensor> &attn_bias, double scale,
                                   bool is_causal, double softcap) {
    FDM_CHECK(q.dim() == 4, "query must be 4-D (batch, seqlen_q, num_heads, head_dim), got shape ", shape_str(q));
    FDM_CHECK(k.dim() == 4, "key must be 4-D (batch, seqlen_k, num_heads_k, head_dim), got shape ", shape_str(k));
    FDM_CHECK(v.dim() == 4, "value must be 4-D (batch, seqlen_k, num_heads_k, head_dim), got shape ", shape_str(v));
    const int64_t batch = q.size(0), seqlen_q = q.size(1), seqlen_k = k.size(1);
    FDM_CHECK(k.size(0) == batch && v.size(0) == batch, "key and value batch sizes (", k.size(0), ", ", v.size(0),
              ") must equal the query batch size ", batch);
    const Tensor q_rows = q.reshape({batch * seqlen_q, q.size(2), q.size(3)});
    Tensor k_rows = k.reshape({batch * k.size(1), k.size(2), k.size(3)});
    Tensor v_rows = v.reshape({batch * v.size(1), v.size(2), v.size(3)});
    const auto cu_options = q.options().dtype(at::kInt);
    const Tensor cu_seqlens_q = at::arange(batch + 1, cu_options).mul_(seqlen_q);
    const Tensor cu_seqlens_k = at::arange(batch + 1, cu_options).mul_(seqlen_k);
    fdm_params p = validate_and_describe(q_rows, k_rows, v_rows, c10::nullopt, c10::nullopt, cu_seqlens_q,
                                         cu_seqlens_k, seqlen_q, seqlen_k, scale, is_causal, softcap, c10::nullopt);
    const Sizes s{p.total_q, p.total_k, p.num_heads, p.num_heads_k, p.head_dim, p.batch};
    p.mask = make_dense_operand(attn_mask, "attn_mask", true, q, s, seqlen_q, seqlen_k);
    p.bias = make_dense_operand(attn_bias, "attn_bias", false, q, s, seqlen_q, seqlen_k);
    auto [out, lse] = run_forward(p, q_rows, k_rows, v_rows);
    // out (B * S_q, H, D) -> (B, S_q, H, D); lse (H, B * S_q) -> (B, H, S_q), a strided view.
    return {out.view({batch, seqlen_q, p.num_heads, p.head_dim}),
            lse.view({p.num_heads, batch, seqlen_q}).permute({1, 0, 2})};
}

}  // namespace

TORCH_LIBRARY(flash_dmattn, m) {
    m.def(
        "mha_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? attn_bias, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, "
        "bool is_causal, float softcap, Tensor? block_table) -> (Tensor, Tensor)");
    m.def(
        "mha_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? attn_bias, float scale, "
        "bool is_causal, float softcap) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flash_dmattn, CPU, m) {
    m.impl("mha_varlen_fwd", &mha_varlen_fwd);
    m.impl("mha_fwd", &mha_fwd);
}

#ifdef FDM_WITH_CUDA
TORCH_LIBRARY_IMPL(flash_dmattn, CUDA, m) {
    m.impl("mha_varlen_fwd", &mha_varlen_fwd);
    m.impl("mha_fwd", &mha_fwd);
}
#endif

// `import flash_dmattn._C` loads this library, whose static initializers register the op.
extern "C" PyObject *PyInit__C(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "flash_dmattn operator library", -1,
                                        nullptr, nullptr, nullptr, nullptr, nullptr};
    return PyModule_Create(&module);
}
