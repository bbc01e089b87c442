#!/usr/bin/env python3
"""Benchmark of flash_dmattn_varlen_func against what a user would otherwise run.

    python benchmarks/bench_varlen.py                       # cuda if available, else cpu; all suites
    python benchmarks/bench_varlen.py --device cpu --quick
    python benchmarks/bench_varlen.py --device cuda --suite decode --markdown docs/benchmarks.md
    python benchmarks/bench_varlen.py --device cpu --suite paged --quick

Suites (benchmarks/shapes.py): on CPU a decode-like and a prefill-like shape in float32 and
bfloat16 plus the seed example (issue 2); on CUDA the decode shapes of issue 4 and the prefill
shapes of issue 5. "paged" (issue 7; in "all" on CUDA): decode-a .. decode-d (CPU: the float32
decode-like shapes) with the contiguous K/V and with paged caches of page sizes 1, 16 and 256
(shuffled pages of a pool with spare pages, one block table for K and V), ours only; each paged
output must match the contiguous one (PAGED_TOL) before it is timed, and the table gives each
paged time as a multiple of the contiguous time (issue 7: page size >= 16 within 1.10x, page
size 1 within 1.30x). Peers (benchmarks/peers.py): "sdpa" = scaled_dot_product_attention on the
padded batch with a materialized mask (timed call only; its build is shown separately), and
"flex" = compiled FlexAttention on the packed batch (CUDA; its block-mask build is shown
separately).

Before timing, every kernel's output is checked against a float64 (CPU) / float32 (CUDA)
reference computed by SDPA's math backend on the same padded inputs; a kernel whose max error
is over the tolerance (RTOL * max|ref| + ATOL, per dtype) is marked WRONG and not timed, and the
script exits with status 1. A contender that raises gets "error: ..." in its cell and the run goes
on; our op is first called once per case in a child process (--probe), so that a segfault or a
CUDA fault in the library is reported for that case instead of ending the run.

Metrics:
  ms          median time of one call (CUDA: triton.testing.do_bench, which flushes the L2 before
              each call so inputs come from HBM, also for problems that would fit in the 50 MB L2,
              so no rotation among input sets is needed; CUDA events with the same flush without
              triton; CPU: time.perf_counter, median after a warm-up)
  TFLOP/s     4 * pairs * D / time. "dense" counts the (query, key) pairs that causality alone
              leaves visible, summed over query heads (issue 5's prefill metric: a mask that hides
              keys does not lower it); "useful" counts only the pairs the mask leaves visible.
  % bytes     byte floor / time, byte floor = (Q + K + V + mask + bias read once, O + LSE written
              once) / copy bandwidth measured in this run (a large device-to-device copy, bytes
              read + written over its time). A kernel that skips masked K/V can exceed 100%.
              Paged rows add the block table entries used (4 bytes per page) to the floor.
  % FLOPs     dense FLOPs / tensor rate / time, tensor rate = an 8192^3 bf16 matmul in this run.
  memory      ours: the mask + bias tensors (key-based: O(total_k)); sdpa: padded Q, K, V, O and the
              materialized mask; flex: block mask + per-token index tensors + mask + bias.
"""
import argparse
import datetime
import faulthandler
import gc
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))           # the repo root, for an uninstalled in-place build

import peers                                      # noqa: E402
from shapes import (PAGE_SIZES, Case, Inputs, PagedCache, Work, cpu_cases, cpu_paged_cases,  # noqa: E402
                    cuda_decode_cases, cuda_paged_cases, cuda_prefill_cases, make_inputs, make_paged,
                    shrink, work_of)

# Max error allowed against the reference: RTOL[dtype] * max|reference| + ATOL[dtype].
RTOL = {torch.float32: 1e-4, torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# Max |paged - contiguous| allowed (the same keys in the same order: only a different split of the
# keys among CTAs may change the rounding).
PAGED_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Issue 7: paged time / contiguous time at most this, per page size (page size >= 16, page size 1).
PAGED_TARGET = {1: 1.30, 16: 1.10, 256: 1.10}
GB = 1e9


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

class Timer:
    """Median milliseconds of fn() on one device."""

    def __init__(self, device: str, quick: bool):
        self.device, self.quick = device, quick
        self.do_bench = None
        self._flush = None
        if device == "cuda":
            try:
                from triton.testing import do_bench
                self.do_bench = do_bench
            except Exception:
                self._flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")

    @property
    def method(self) -> str:
        if self.device == "cpu":
            return "time.perf_counter, median"
        return "triton do_bench (L2 flushed), median" if self.do_bench else "CUDA events (L2 flushed), median"

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def once_ms(self, fn: Callable) -> float:
        """One synchronized call (for one-off costs such as building a mask)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def median_ms(self, fn: Callable) -> float:
        if self.device == "cuda":
            warmup, rep = (10, 30) if self.quick else (25, 100)
            if self.do_bench is not None:
                return float(self.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
            return self._events_ms(fn, warmup, rep)
        return self._cpu_ms(fn)

    def _events_ms(self, fn, warmup_ms, rep_ms):
        fn()
        est = self.once_ms(fn)
        n_warm = max(1, int(warmup_ms / max(est, 1e-3)))
        n_rep = max(3, min(1000, int(rep_ms / max(est, 1e-3))))
        for _ in range(n_warm):
            fn()
        times = []
        for _ in range(n_rep):
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def _cpu_ms(self, fn):
        budget_s, min_reps, max_reps = (0.3, 3, 10) if self.quick else (1.5, 5, 50)
        fn()                                            # warm-up
        times = []
        t_end = time.perf_counter() + budget_s
        while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _copy_bandwidth(timer: Timer, nbytes: int = 2 ** 30) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer.median_ms(lambda: dst.copy_(src)) * 1e-3)


def _matmul_rate(timer: Timer, n: int = 8192) -> float:
    """FLOP/s of an n^3 bf16 matmul on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / (timer.median_ms(lambda: a @ b) * 1e-3)


def measure_floors(timer: Timer) -> Dict[str, float]:
    """Copy bandwidth and bf16 tensor rate of this GPU, measured now."""
    floors = {"bandwidth": _copy_bandwidth(timer), "tensor_rate": _matmul_rate(timer)}
    torch.cuda.empty_cache()
    return floors


# ----------------------------------------------------------------------------------------------
# One row of results
# ----------------------------------------------------------------------------------------------

@dataclass
class PeerResult:
    ms: Optional[float] = None
    err: Optional[float] = None
    build_ms: Optional[float] = None      # sdpa: pad + materialize; flex: create_block_mask (compiled)
    compile_s: Optional[float] = None     # flex: first calls (torch.compile), block mask + attention
    compile_detail: str = ""
    bytes: Optional[int] = None
    status: str = ""                      # "" when timed, else why not ("skipped (...)", "error: ...")
    floor_bytes: Optional[int] = None     # paged: the byte floor plus the block table entries used
    detail: str = ""                      # paged: the pool and block table


@dataclass
class Row:
    case: Case
    work: Optional[Work] = None
    tol: Optional[float] = None
    ours: PeerResult = field(default_factory=PeerResult)
    ours_alloc: Optional[int] = None      # CUDA: peak bytes allocated during one call of ours
    peers: Dict[str, PeerResult] = field(default_factory=dict)
    paged: Dict[int, PeerResult] = field(default_factory=dict)   # paged suite: page size -> ours on paged K/V
    wrong: bool = False
    seconds: float = 0.0                  # wall time of the whole case (inputs, checks, timing, compiles)


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = re.sub(r"\s+", " ", msg)
    return f"error: {type(e).__name__}: {msg[:100]}"


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = (out.to(ref.dtype) - ref).abs()
    if not torch.isfinite(out).all():
        return math.inf
    return float(d.max().item()) if d.numel() else 0.0


# ----------------------------------------------------------------------------------------------
# The three contenders
# ----------------------------------------------------------------------------------------------

def run_ours(inp: Inputs):
    import flash_dmattn
    return flash_dmattn.flash_dmattn_varlen_func(
        inp.q, inp.k, inp.v, attn_mask=inp.mask, attn_bias=inp.bias,
        cu_seqlens_q=inp.cu_seqlens_q, cu_seqlens_k=inp.cu_seqlens_k,
        max_seqlen_q=inp.max_seqlen_q, max_seqlen_k=inp.max_seqlen_k, is_causal=inp.causal)


def run_paged(inp: Inputs, cache: PagedCache):
    """Ours on the paged caches: the same call with key/value = the caches and their block table."""
    import flash_dmattn
    return flash_dmattn.flash_dmattn_varlen_func(
        inp.q, cache.k, cache.v, attn_mask=inp.mask, attn_bias=inp.bias,
        cu_seqlens_q=inp.cu_seqlens_q, cu_seqlens_k=inp.cu_seqlens_k,
        max_seqlen_q=inp.max_seqlen_q, max_seqlen_k=inp.max_seqlen_k, is_causal=inp.causal,
        block_table=cache.block_table)


def bench_ours(row: Row, inp: Inputs, ref, timer: Timer):
    res = row.ours
    res.bytes = inp.nbytes("mask", "bias")
    try:
        out = run_ours(inp)
        if ref is not None:
            res.err = _max_err(out, ref)
            if not res.err <= row.tol:
                res.status = f"WRONG (max err {res.err:.3g} > tol {row.tol:.3g})"
                row.wrong = True
                return
        del out
        if timer.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run_ours(inp)
            torch.cuda.synchronize()
            row.ours_alloc = torch.cuda.max_memory_allocated() - base
        res.ms = timer.median_ms(lambda: run_ours(inp))
    except Exception as e:  # noqa: BLE001 - one failing contender must not end the run
        res.status = _short_error(e)


def bench_sdpa(row: Row, inp: Inputs, ref, timer: Timer, limit_bytes: float) -> PeerResult:
    case = row.case
    res = PeerResult()
    need = peers.sdpa_padded_bytes(case, inp, case.dtype)
    res.bytes = need["total"]
    if need["peak"] > limit_bytes:
        res.status = f"skipped (needs {need['peak'] / GB:.1f} GB)"
        return res
    if timer.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if need["peak"] > 0.9 * free:
            res.status = f"skipped (needs {need['peak'] / GB:.1f} GB, {free / GB:.1f} GB free)"
            return res
    padded = None
    try:
        holder = {}
        res.build_ms = timer.once_ms(lambda: holder.setdefault("p", peers.build_padded(case, inp, case.dtype)))
        padded = holder.pop("p")
        out = peers.sdpa_run(padded)
        if ref is not None:
            res.err = _max_err(peers.unpad(out, padded.valid_q), ref)
            if not res.err <= row.tol:
                res.status = f"wrong (max err {res.err:.3g} > tol {row.tol:.3g})"
                return res
        del out
        res.ms = timer.median_ms(lambda: peers.sdpa_run(padded))
    except Exception as e:  # noqa: BLE001
        res.status = _short_error(e)
    finally:
        padded = None                               # noqa: F841 - frees the padded copies and the mask
        _free(timer.device)
    return res


def bench_flex(row: Row, inp: Inputs, ref, timer: Timer, compile: bool) -> PeerResult:
    res = PeerResult()
    peer = None
    try:
        t0 = time.perf_counter()
        peer = peers.FlexPeer(row.case, inp, compile=compile)
        peer.build_block_mask()                     # first build compiles create_block_mask
        timer.sync()
        t1 = time.perf_counter()
        out = peer.run()                            # first call compiles flex_attention
        timer.sync()
        t2 = time.perf_counter()
        res.compile_s = t2 - t0
        res.compile_detail = f"block mask {t1 - t0:.1f} s + attention {t2 - t1:.1f} s"
        res.build_ms = timer.once_ms(peer.build_block_mask)
        res.bytes = peer.block_mask_bytes + peer.extra_bytes
        if ref is not None:
            res.err = _max_err(peer.unpack(out), ref)
            if not res.err <= row.tol:
                res.status = f"wrong (max err {res.err:.3g} > tol {row.tol:.3g})"
                return res
        del out
        res.ms = timer.median_ms(peer.run)
    except Exception as e:  # noqa: BLE001
        res.status = _short_error(e)
    finally:
        peer = None                                 # noqa: F841
        _free(timer.device)
    return res


def bench_paged(row: Row, inp: Inputs, contiguous: Optional[torch.Tensor], page_size: int,
                timer: Timer) -> PeerResult:
    """Ours on paged caches of one page size: checked against the contiguous output, then timed.
    The caches are built here and freed before returning (one page size in memory at a time)."""
    res = PeerResult()
    if contiguous is None:
        res.status = "not run (no contiguous output to check against)"
        return res
    cache = None
    try:
        cache = make_paged(inp, page_size, seed=row.case.seed * 1000 + page_size)
        res.bytes, res.detail = cache.nbytes, cache.describe()
        res.floor_bytes = row.work.bytes + 4 * cache.used_pages
        out = run_paged(inp, cache)
        res.err = _max_err(out, contiguous)
        tol = PAGED_TOL[row.case.dtype]
        if not res.err <= tol:
            res.status = f"WRONG (max diff {res.err:.3g} > {tol:.3g})"
            row.wrong = True
            return res
        del out
        res.ms = timer.median_ms(lambda: run_paged(inp, cache))
    except Exception as e:  # noqa: BLE001 - one failing page size must not end the run
        res.status = _short_error(e)
    finally:
        cache = None                                # noqa: F841 - frees the caches before the next page size
        _free(timer.device)
    return res


# A crash inside the library (a segfault, or a CUDA fault that poisons the context) cannot be
# caught in-process. So before the real run, a child process calls our op once per case; a case
# whose call killed the child (or left a CUDA error) is reported as an error and not called here.

def probe_child(args) -> int:
    """--probe-child: call our op once per selected case and report one line per case on stdout."""
    import flash_dmattn  # noqa: F401
    for case in select_cases(args):
        inp = None
        try:
            inp = make_inputs(case, args.device)
            run_ours(inp)
            if case.suite == "paged":                 # a paged call that raises is reported in its cell
                for page_size in PAGE_SIZES:
                    try:
                        run_paged(inp, make_paged(inp, page_size, seed=case.seed * 1000 + page_size))
                    except Exception as e:  # noqa: BLE001
                        if args.device == "cuda" and "CUDA" in str(e):
                            raise
            if args.device == "cuda":
                torch.cuda.synchronize()
            print(f"PROBE\t{case.name}\tok", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"PROBE\t{case.name}\t{_short_error(e)}", flush=True)
            if args.device == "cuda" and "CUDA" in str(e):
                return 3                                # the context may be unusable: start afresh
        del inp
        _free(args.device)
    return 0


def probe_ours(args, cases: List[Case]) -> Dict[str, str]:
    """{case name: "" if our op ran, else the error to show}, from child processes."""
    results: Dict[str, str] = {}
    remaining = [c.name for c in cases]
    for _ in range(4):
        if not remaining:
            break
        cmd = [sys.executable, os.path.abspath(__file__), "--probe-child", "--device", args.device,
               "--suite", args.suite, "--only", "^(" + "|".join(re.escape(n) for n in remaining) + ")$"]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, stdout, stderr = "timeout", (e.stdout or b"").decode(errors="replace"), ""
        for line in stdout.splitlines():
            if line.startswith("PROBE\t"):
                _, name, status = line.split("\t", 2)
                results[name] = "" if status == "ok" else status
        remaining = [n for n in remaining if n not in results]
        if code in (0, 3):
            continue
        if remaining:                                   # the first unreported case killed the child
            name = remaining.pop(0)
            results[name] = f"error: crashed the process ({code}) in the probe; not run"
            print(f"note: our op crashed on {name} in the probe run ({code}); its stderr ends:\n"
                  + "\n".join(stderr.strip().splitlines()[-12:]), flush=True)
    for name in remaining:
        results[name] = "error: not run (the probe crashed too often)"
    return results


def checked_reference(row: Row, inp, args):
    """The reference output of row's case (None without --check), and row.tol from its magnitude."""
    if not args.check:
        return None
    case, dev = row.case, args.device
    ref_dtype = torch.float64 if dev == "cpu" else torch.float32
    budget = (1 if dev == "cpu" else 4) * 2 ** 30
    ref = peers.reference(case, inp, ref_dtype, budget)
    row.tol = RTOL[case.dtype] * float(ref.abs().max().item() if ref.numel() else 0.0) + ATOL[case.dtype]
    return ref


def run_case(case: Case, args, timer: Timer, probe_error: str = "") -> Row:
    row = Row(case)
    dev = args.device
    inp = make_inputs(case, dev)
    row.work = work_of(case, inp)
    ref = checked_reference(row, inp, args)
    if probe_error:
        row.ours.status = probe_error
        row.ours.bytes = inp.nbytes("mask", "bias")
    else:
        bench_ours(row, inp, ref, timer)
    _free(dev)
    if "sdpa" in args.peers:
        row.peers["sdpa"] = bench_sdpa(row, inp, ref, timer, args.sdpa_max_gb * GB)
    if "flex" in args.peers:
        row.peers["flex"] = bench_flex(row, inp, ref, timer, compile=(dev == "cuda" or args.flex_compile))
    del ref, inp
    _free(dev)
    return row


def run_paged_case(case: Case, args, timer: Timer, probe_error: str = "") -> Row:
    """Paged suite: ours on the contiguous K/V (checked against the reference, timed), then on
    paged caches of each page size (checked against the contiguous output, timed)."""
    row = Row(case)
    dev = args.device
    inp = make_inputs(case, dev)
    row.work = work_of(case, inp)
    row.ours.bytes = inp.nbytes("mask", "bias")
    if probe_error:
        row.ours.status = probe_error
        return row
    ref = checked_reference(row, inp, args)
    bench_ours(row, inp, ref, timer)
    del ref
    contiguous = None
    if not row.ours.status:
        contiguous = run_ours(inp).float()
    _free(dev)
    for page_size in PAGE_SIZES:
        row.paged[page_size] = bench_paged(row, inp, contiguous, page_size, timer)
    del contiguous, inp
    _free(dev)
    return row


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def _fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _cell(res: PeerResult, text: str) -> str:
    return text if not res.status else res.status


def _speedup(row: Row, peer: str) -> str:
    p = row.peers.get(peer)
    if p is None or p.ms is None or row.ours.ms is None:
        return "-"
    return f"{p.ms / row.ours.ms:.2f}x"


def _tflops(row: Row, ms, useful: bool) -> str:
    if ms is None:
        return "-"
    return f"{row.work.flops(row.case.head_dim, useful) / (ms * 1e-3) / 1e12:.1f}"


def _pct_bytes(row: Row, ms, floors) -> str:
    if ms is None or not floors:
        return "-"
    return f"{100 * row.work.bytes / floors['bandwidth'] / (ms * 1e-3):.0f}%"


def _pct_flops(row: Row, ms, floors) -> str:
    if ms is None or not floors:
        return "-"
    return f"{100 * row.work.flops(row.case.head_dim, useful=False) / floors['tensor_rate'] / (ms * 1e-3):.0f}%"


def _err(row: Row) -> str:
    e = row.ours.err
    if e is None:
        return "-"
    return f"{e:.2g} (tol {row.tol:.2g})" + ("" if e <= row.tol else " WRONG")


def columns(device: str, suite: str, peer_names: List[str], floors) -> list:
    """(header, row -> cell) for the result table of one suite on one device.

    On CUDA, decode rows are read by the byte floor (memory-bound), prefill rows by TFLOP/s over
    the dense causal pairs and the FLOP floor (compute-bound); each peer gets the same metric.
    """
    decode = suite == "decode"

    def metric(r, ms):
        if decode:
            return _pct_bytes(r, ms, floors)
        return f"{_tflops(r, ms, False)}"

    cols = [("case", lambda r: r.case.name),
            ("check: max err", _err),
            ("ours ms", lambda r: _cell(r.ours, _fmt_ms(r.ours.ms)))]
    if device == "cuda" and decode:
        cols += [("byte floor ms", lambda r: f"{r.work.bytes / floors['bandwidth'] * 1e3:.4f}"),
                 ("ours % byte floor", lambda r: metric(r, r.ours.ms)),
                 ("ours TFLOP/s useful", lambda r: _tflops(r, r.ours.ms, True))]
    elif device == "cuda":
        cols += [("ours TFLOP/s dense (useful)",
                  lambda r: f"{_tflops(r, r.ours.ms, False)} ({_tflops(r, r.ours.ms, True)})"),
                 ("ours % FLOP floor", lambda r: _pct_flops(r, r.ours.ms, floors))]
    for name in peer_names:
        def peer_ms(r, name=name):
            p = r.peers.get(name)
            return "-" if p is None else _cell(p, _fmt_ms(p.ms))

        def peer_build(r, name=name):
            p = r.peers.get(name)
            if p is None or p.build_ms is None:
                return "-"
            s = _fmt_ms(p.build_ms)
            return s + (f" (+{p.compile_s:.0f} s compile)" if p.compile_s is not None and p.compile_s >= 1 else "")

        def peer_metric(r, name=name):
            p = r.peers.get(name)
            return "-" if p is None or p.ms is None else metric(r, p.ms)

        cols += [(f"{name} ms", peer_ms), (f"ours vs {name}", lambda r, name=name: _speedup(r, name))]
        if device == "cuda":
            cols += [(f"{name} " + ("% byte floor" if decode else "TFLOP/s dense"), peer_metric)]
        cols += [(f"{name} " + ("build ms" if name == "sdpa" else "block mask ms"), peer_build)]
    mem = [("ours", lambda r: r.ours.bytes)] + [(n, lambda r, n=n: r.peers[n].bytes if n in r.peers else None)
                                                 for n in peer_names]
    cols.append(("memory: " + " / ".join(m[0] for m in mem),
                 lambda r: " / ".join(_fmt_bytes(f(r)) for _, f in mem)))
    if device == "cuda":
        cols.append(("ours alloc/call", lambda r: _fmt_bytes(r.ours_alloc)))
    return cols


def _paged_ms(row: Row, page_size: int) -> str:
    p = row.paged.get(page_size)
    if p is None:
        return "-"
    if p.status:
        return p.status
    ratio = f" ({p.ms / row.ours.ms:.2f}x)" if row.ours.ms else ""
    return _fmt_ms(p.ms) + ratio


def _paged_diff(row: Row) -> str:
    diffs = [row.paged[ps].err for ps in PAGE_SIZES if ps in row.paged]
    if not any(d is not None for d in diffs):
        return "-"
    return (" / ".join("-" if d is None else f"{d:.2g}" for d in diffs)
            + f" (tol {PAGED_TOL[row.case.dtype]:.2g})")


def _paged_target(row: Row) -> str:
    """Issue 7's acceptance: every page size within its multiple of the contiguous time."""
    if row.ours.ms is None or any(row.paged.get(ps) is None or row.paged[ps].ms is None for ps in PAGE_SIZES):
        return "-"
    missed = [f"ps={ps} {row.paged[ps].ms / row.ours.ms:.2f}x > {PAGED_TARGET[ps]:.2f}x" for ps in PAGE_SIZES
              if row.paged[ps].ms / row.ours.ms > PAGED_TARGET[ps]]
    return "met" if not missed else "missed: " + ", ".join(missed)


def _paged_pct_bytes(row: Row, floors) -> str:
    cells = [_pct_bytes(row, row.ours.ms, floors)]
    for ps in PAGE_SIZES:
        p = row.paged.get(ps)
        if p is None or p.ms is None or not floors:
            cells.append("-")
        else:
            cells.append(f"{100 * p.floor_bytes / floors['bandwidth'] / (p.ms * 1e-3):.0f}%")
    return " / ".join(cells)


def paged_columns(device: str, floors) -> list:
    """(header, row -> cell) for the paged suite: ours on contiguous K/V and on each page size."""
    sizes = " / ".join(f"ps={ps}" for ps in PAGE_SIZES)
    cols = [("case", lambda r: r.case.name),
            ("check: max err", _err),
            (f"paged max diff vs contiguous ({sizes})", _paged_diff),
            ("contiguous ms", lambda r: _cell(r.ours, _fmt_ms(r.ours.ms)))]
    for ps in PAGE_SIZES:
        cols.append((f"paged ps={ps} ms (x contiguous)", lambda r, ps=ps: _paged_ms(r, ps)))
    cols.append(("issue 7 target (" + ", ".join(f"ps={ps} <= {PAGED_TARGET[ps]:.2f}x" for ps in PAGE_SIZES) + ")",
                 _paged_target))
    if device == "cuda":
        cols.append((f"% byte floor (contiguous / {sizes})", lambda r: _paged_pct_bytes(r, floors)))
    return cols


def markdown_table(rows: List[Row], cols) -> str:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(f(r)) for _, f in cols) + " |")
    return "\n".join(lines)


def header_lines(args, timer: Timer, floors) -> List[str]:
    dev = args.device
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        what = (f"{torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs, "
                f"{props.total_memory / 2 ** 30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        what = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        import triton
        tri = f", triton {triton.__version__}"
    except Exception:
        tri = ""
    lines = [f"flash_dmattn varlen benchmark: {what}; torch {torch.__version__}{tri}; "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
             f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}",
             f"timing: {timer.method}; check: "
             + ("max |out - ref| vs SDPA math reference in "
                + ("float64" if dev == "cpu" else "float32") + ", tol = rtol*max|ref| + atol"
                if args.check else "off")]
    if floors:
        lines.append(f"floors: copy bandwidth {floors['bandwidth'] / 1e12:.2f} TB/s (read + write), "
                     f"bf16 tensor rate {floors['tensor_rate'] / 1e12:.0f} TFLOP/s (8192^3 matmul)")
    return lines


def case_lines(row: Row, floors) -> List[str]:
    """Per-case detail: the problem, its floors and every contender's status."""
    c, w = row.case, row.work
    out = [f"{c.name}: {c.describe()}  [{row.seconds:.1f} s]"]
    if w is not None:
        s = (f"  work: {w.dense_pairs / 1e6:.4g} M dense pairs, {w.visible_pairs / 1e6:.4g} M visible, "
             f"{_fmt_bytes(w.bytes)}")
        if floors:
            s += (f"; floors: bytes {w.bytes / floors['bandwidth'] * 1e3:.4f} ms, "
                  f"dense FLOPs {w.flops(c.head_dim, False) / floors['tensor_rate'] * 1e3:.4f} ms")
        out.append(s)
    for name, res in [("ours", row.ours)] + list(row.peers.items()):
        bits = [f"{_fmt_ms(res.ms)} ms" if res.ms is not None else res.status]
        if res.err is not None:
            bits.append(f"err {res.err:.2g}")
        if res.build_ms is not None:
            bits.append(f"build {_fmt_ms(res.build_ms)} ms")
        if res.compile_s is not None:
            bits.append(f"first call {res.compile_s:.1f} s" + (f" ({res.compile_detail})" if res.compile_detail else ""))
        if res.bytes is not None:
            bits.append(f"mem {_fmt_bytes(res.bytes)}")
        out.append(f"  {name:5s} " + ", ".join(bits))
    for ps, res in row.paged.items():
        bits = [f"{_fmt_ms(res.ms)} ms" if res.ms is not None else res.status]
        if res.ms is not None and row.ours.ms:
            bits[0] += f" ({res.ms / row.ours.ms:.2f}x contiguous)"
        if res.err is not None:
            bits.append(f"max diff vs contiguous {res.err:.2g}")
        if res.detail:
            bits.append(res.detail)
        out.append(f"  paged ps={ps}: " + ", ".join(bits))
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def select_cases(args) -> List[Case]:
    if args.device == "cpu" and not args.smoke:
        if args.suite == "paged":
            cases = cpu_paged_cases()
        else:
            suites = {"decode": ["decode"], "prefill": ["prefill"], "all": ["decode", "prefill"]}[args.suite]
            cases = [c for c in cpu_cases() if c.suite in suites]
    else:
        cases = []
        if args.suite in ("decode", "all"):
            cases += cuda_decode_cases()
        if args.suite in ("prefill", "all"):
            cases += cuda_prefill_cases()
        if args.suite in ("paged", "all"):
            cases += cuda_paged_cases()
        if args.smoke:
            cases = [shrink(c, 32) for c in cases]
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.name)]
    return cases


def parse_args(argv=None):
    has_cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if has_cuda else "cpu")
    p.add_argument("--suite", choices=["decode", "prefill", "paged", "all"], default="all",
                   help='"all": decode and prefill, and paged on cuda')
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--markdown", metavar="PATH", help="append the result tables, as markdown, to PATH")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="check every output against the reference before timing it (default on)")
    p.add_argument("--peers", default=None,
                   help="comma-separated peers among sdpa,flex (default: sdpa,flex on cuda, sdpa on cpu)")
    p.add_argument("--only", metavar="REGEX", help="run only the cases whose name matches")
    p.add_argument("--sdpa-max-gb", type=float, default=None,
                   help="skip the sdpa peer when it needs more (default 40 on cuda, 6 on cpu)")
    p.add_argument("--flex-compile", action="store_true", help="on cpu, torch.compile flex too (slow)")
    p.add_argument("--smoke", action="store_true",
                   help="the CUDA suites' structure at tiny sizes (for testing this script, e.g. on a CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on cpu")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="first call our op once per case in a child process, so that a crash of the "
                        "library is reported instead of ending the run (default on)")
    p.add_argument("--probe-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not has_cuda:
        p.error("--device cuda: no CUDA device is visible")
    if args.peers is None:
        args.peers = "sdpa,flex" if args.device == "cuda" else "sdpa"
    args.peers = [x for x in args.peers.split(",") if x]
    for x in args.peers:
        if x not in ("sdpa", "flex"):
            p.error(f"--peers: unknown peer {x!r} (sdpa, flex)")
    if "flex" in args.peers and not peers.flex_importable():
        print("note: torch.nn.attention.flex_attention not importable; flex dropped")
        args.peers.remove("flex")
    if args.sdpa_max_gb is None:
        args.sdpa_max_gb = 40.0 if args.device == "cuda" else 6.0
    return args


def main(argv=None) -> int:
    faulthandler.enable()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_child:
        return probe_child(args)
    t_start = time.perf_counter()
    timer = Timer(args.device, args.quick)
    ours_ok = True
    try:
        import flash_dmattn  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the peers still run; every "ours" cell says why
        ours_ok = False
        print(f"note: flash_dmattn does not import ({_short_error(e)}); only the peers are timed")
    try:                                            # flex recompiles once per case: allow it
        import torch._dynamo
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    except Exception:  # noqa: BLE001
        pass
    floors = measure_floors(timer) if args.device == "cuda" else None
    head = header_lines(args, timer, floors)
    print("\n".join(head), flush=True)

    cases = select_cases(args)
    probe = probe_ours(args, cases) if (ours_ok and args.probe) else {}
    rows: List[Row] = []
    for case in cases:
        t_case = time.perf_counter()
        try:
            run = run_paged_case if case.suite == "paged" else run_case
            row = run(case, args, timer, probe.get(case.name, ""))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while drawing the inputs
            row = Row(case)
            row.ours.status = _short_error(e)
            traceback.print_exc()
            _free(args.device)
        row.seconds = time.perf_counter() - t_case
        rows.append(row)
        print("\n".join(case_lines(row, floors)), flush=True)

    sections = []
    for suite in ("decode", "prefill", "paged"):
        suite_rows = [r for r in rows if r.case.suite == suite]
        if suite_rows:
            problems = "\n".join(f"- `{r.case.name}`: {r.case.describe()}" for r in suite_rows)
            cols = (paged_columns(args.device, floors) if suite == "paged"
                    else columns(args.device, suite, args.peers, floors))
            if suite == "paged":
                problems += ("\n\nOurs only: contiguous K/V, then K/V copied into paged caches of page size "
                             + ", ".join(str(ps) for ps in PAGE_SIZES) + " (one page size in memory at a "
                             "time; a pool with 1/8 spare pages in random order, one block table for K and "
                             "V, unused slots NaN). Ratios are paged time / contiguous time.")
            sections.append(f"**{suite}**\n\n{problems}\n\n{markdown_table(suite_rows, cols)}")
    text = "\n".join(f"{line}  " for line in head) + "\n\n" + "\n\n".join(sections) + "\n"
    print("\n" + text)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n### {args.device} run, {datetime.date.today().isoformat()}\n\n" + text)
        print(f"appended to {args.markdown}")
    if any(r.wrong for r in rows):
        print("FAILED: some kernel gave a wrong result (see 'WRONG' above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
