"""A small set of CUDA calls for `compute-sanitizer --tool memcheck`: every mask/bias layout and
head variant, causal, GQA, empty and fully masked sequences, lengths off the tile edges, each
head dim tile, split-KV, gathered keys and paged K/V. Each call is also checked against a float64 reference (exits 1 on a mismatch)."""

import math
import os
import sys

import torch

import flash_dmattn

sys.path.insert(0, "tests")
from reference import attention_reference  # noqa: E402


def operand(kind, heads, total_q, total_k, max_k, dtype, is_mask):
    if kind is None:
        return None
    shape = (total_k, heads) if kind == "key" else (total_q, heads, max_k)
    if is_mask:  # "query-full": nearly all kept, so most tiles are full (tile_visibility.cu)
        return torch.rand(shape, device="cuda") < (0.9995 if kind == "query-full" else 0.7)
    return torch.randn(shape, device="cuda", dtype=dtype)


def page_table(lens, page_size):
    """(B, max_pages) int32: every sequence's pages, drawn in shuffled order from a pool with spares."""
    width = max(1, math.ceil(max(lens) / page_size))
    order = torch.randperm(len(lens) * width + 3, device="cuda")
    return order[: len(lens) * width].view(len(lens), width).to(torch.int32)


def scatter_pages(x, cu_k, table, page_size):
    """x (total_k, H_k, D) written into a cache (pages, page_size, H_k, D) through the page table."""
    cache = torch.randn(table.numel() + 3, page_size, *x.shape[1:], device="cuda", dtype=x.dtype)
    lens = (cu_k[1:] - cu_k[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), lens)  # sequence of each key
    j = torch.arange(x.shape[0], device="cuda") - cu_k[:-1].long()[seq]          # its local index
    rows = table[seq, j // page_size].long() * page_size + j % page_size
    cache.view(-1, *x.shape[1:])[rows] = x
    return cache


def run_case(lens, H, H_k, D, dtype, mask_kind, mask_heads, bias_kind, bias_heads, causal, env=None, page_size=0):
    os.environ.pop("FLASH_DMATTN_NUM_SPLITS", None)
    os.environ.pop("FLASH_DMATTN_GATHER_KEYS", None)
    os.environ.pop("FLASH_DMATTN_WARPGROUPS", None)
    os.environ.pop("FLASH_DMATTN_ROW_SCHEDULE", None)
    os.environ.update(env or {})
    cu_q = torch.tensor([0] + [q for q, _ in lens], device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [k for _, k in lens], device="cuda").cumsum(0).to(torch.int32)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    max_q, max_k = max(q for q, _ in lens), max(k for _, k in lens)
    q = torch.randn(total_q, H, D, device="cuda", dtype=dtype)
    k = torch.randn(total_k, H_k, D, device="cuda", dtype=dtype)
    v = torch.randn(total_k, H_k, D, device="cuda", dtype=dtype)
    mask = operand(mask_kind, mask_heads, total_q, total_k, max_k, dtype, True)
    bias = operand(bias_kind, bias_heads, total_q, total_k, max_k, dtype, False)
    k_in, v_in, table = k, v, None
    if page_size:
        table = page_table([n for _, n in lens], page_size)
        k_in, v_in = scatter_pages(k, cu_k, table, page_size), scatter_pages(v, cu_k, table, page_size)
    out, lse = flash_dmattn.flash_dmattn_varlen_func(
        q, k_in, v_in, attn_mask=mask, attn_bias=bias, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
        max_seqlen_k=max_k, is_causal=causal, block_table=table, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, cu_q, cu_k, attn_mask=mask, attn_bias=bias,
                                       scale=1 / math.sqrt(D), is_causal=causal)
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    finite = torch.isfinite(ref_lse)
    ok = (not out.isnan().any()) and err < 0.05 and torch.equal(finite, torch.isfinite(lse))
    return ok, err


def main():
    lens = [(1, 65), (0, 7), (63, 129), (17, 0), (130, 64)]
    cases = []
    for mask_kind in (None, "key", "query"):
        for bias_kind in (None, "key", "query"):
            cases.append((lens, 8, 2, 64, torch.bfloat16, mask_kind, 2, bias_kind, 8, True))
    for heads in (1, 2, 8):
        cases.append((lens, 8, 2, 96, torch.float16, "key", heads, "query", heads, False))
    for D in (32, 80, 128, 192, 256):
        cases.append(([(70, 200), (5, 300)], 4, 1, D, torch.bfloat16, "key", 1, "key", 4, True))
    # Decode shapes: packed GQA (h' != H) and split-KV (few CTAs, many keys), with and without packing.
    cases.append(([(1, 3001), (3, 1500), (0, 900), (2, 0)], 8, 2, 128, torch.bfloat16, "key", 2, "key", 1, True))
    cases.append(([(2, 2049)], 8, 2, 64, torch.float16, "query", 8, "query", 1, False))
    cases.append(([(4, 2500), (1, 700)], 8, 2, 256, torch.bfloat16, "key", 8, "key", 8, True))
    # Query-based masks' tile bitmap: packed GQA over a per-head mask (h' = H), one mask head, prefill
    # rows; max_seqlen_k a multiple of 16, so the bool masks are staged through shared memory.
    cases.append(([(3, 2208), (1, 150), (0, 40)], 8, 2, 128, torch.bfloat16, "query", 8, "key", 2, True))
    cases.append(([(130, 3008), (67, 67)], 4, 2, 64, torch.float16, "query", 1, None, 0, True))
    cases.append(([(130, 3000), (67, 67)], 4, 2, 64, torch.float16, "query", 1, None, 0, True))
    cases.append(([(130, 3008), (67, 67), (5, 200)], 8, 2, 128, torch.bfloat16, "query-full", 1, "key", 2, True))
    cases.append(([(130, 3008), (67, 67), (5, 200)], 8, 2, 128, torch.bfloat16, "query-full", 8, None, 0, False))
    # The warpgroup layout under a staged query-based mask (Hopper; the cases above with h' = 1 and
    # max_seqlen_k a multiple of 16 take it too): D = 256, h' = H_k, split-KV, a block of 9 queries
    # x 4 heads (one warpgroup idle).
    cases.append(([(200, 2112), (33, 700), (0, 10), (9, 0)], 8, 2, 256, torch.float16, "query", 2, "key", 2, True,
                  {"FLASH_DMATTN_NUM_SPLITS": "3"}))
    # Gathered keys (forced on, also short sequences), forced split counts, paged K/V.
    gather = {"FLASH_DMATTN_GATHER_KEYS": "1"}
    cases.append((lens, 8, 2, 64, torch.bfloat16, "key", 2, "key", 2, True, gather))
    cases.append(([(3, 2100), (1, 5000), (0, 10), (2, 0)], 8, 2, 128, torch.bfloat16, "key", 8, "query", 1, True,
                  {**gather, "FLASH_DMATTN_NUM_SPLITS": "5"}))
    cases.append(([(300, 2300), (5, 1100)], 4, 4, 96, torch.float16, "key", 1, "key", 4, False, gather))
    cases.append(([(1, 3001), (3, 1500), (2, 0)], 8, 2, 128, torch.bfloat16, "key", 2, None, 0, True,
                  {"FLASH_DMATTN_NUM_SPLITS": "64", "FLASH_DMATTN_GATHER_KEYS": "0"}))
    # The combine's last CTA with fewer (query, head) pairs than warps (5 queries x 3 heads), at
    # split counts merged by 1 and 2 warps per pair.
    for splits in ("7", "12"):
        cases.append(([(3, 2100), (2, 1500), (0, 30)], 3, 1, 64, torch.bfloat16, "key", 1, "key", 1, True,
                      {"FLASH_DMATTN_NUM_SPLITS": splits}))
    for page_size in (1, 7, 64):
        cases.append(([(2, 700), (1, 65), (0, 30), (4, 0)], 8, 2, 128, torch.bfloat16, "key", 2, "key", 2, True,
                      gather if page_size == 7 else None, page_size))
    # The warpgroup layout (Hopper; prefill blocks take it by default): forced onto decode blocks,
    # over gathered keys with splits, paged, and its 64-row tail (one warpgroup idle).
    warpgroups = {"FLASH_DMATTN_WARPGROUPS": "1"}
    cases.append(([(1, 3001), (3, 1500), (0, 900), (2, 0)], 8, 2, 128, torch.bfloat16, "key", 8, "key", 1, True,
                  warpgroups))
    cases.append(([(200, 2100), (64, 700), (0, 10), (9, 0)], 4, 2, 256, torch.float16, "key", 2, "query", 4, True,
                  {**warpgroups, **gather, "FLASH_DMATTN_NUM_SPLITS": "3"}))
    cases.append(([(150, 700), (1, 65), (0, 30), (40, 0)], 8, 2, 64, torch.bfloat16, "key", 2, "key", 2, True,
                  gather, 7))
    # The row schedule (a grid without the row blocks past their sequence), forced: row blocks first
    # under a query-based mask, and with split-KV.
    schedule = {"FLASH_DMATTN_ROW_SCHEDULE": "1"}
    cases.append(([(700, 900), (1, 1), (0, 40), (130, 0), (65, 200)], 8, 2, 128, torch.bfloat16, "query", 2, "key", 1,
                  True, schedule))
    cases.append(([(300, 333), (2, 2), (0, 5), (129, 64)], 4, 1, 64, torch.float16, None, 0, None, 0, False,
                  {**schedule, "FLASH_DMATTN_NUM_SPLITS": "3"}))
    failures = 0
    for case in cases:
        ok, err = run_case(*case)
        failures += not ok
        extra = " ".join(f"{k.split('_')[-1].lower()}={v}" for k, v in (case[10] if len(case) > 10 and case[10] else {}).items())
        extra += f" page_size={case[11]}" if len(case) > 11 else ""
        print(f"{'ok  ' if ok else 'FAIL'} D={case[3]} {case[4]} mask={case[5]}/{case[6]} "
              f"bias={case[7]}/{case[8]} causal={case[9]} {extra} max_err={err:.2e}")
    torch.cuda.synchronize()
    print(f"{len(cases) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
