"""Decode attention for one layer: packed cascade vs SGLang's Triton decode, FlashInfer and FA2.

Cases (:mod:`.kernel_cases`) are decode batches written out per group and request; K/V sit in an
SGLang token pool ``[num_slots, num_kv_heads, head_dim]`` (page size 1) at scattered or contiguous
slots. Each implementation (ours; the baselines of :mod:`.kernel_baselines`) first runs on NaN-poisoned
output and is compared with the fp32 oracle (relative L2 error); a wrong one is not timed. Copy
bandwidth and matmul rate for the floor are measured in the same run. Results (:mod:`.kernel_report`):
a line per case, then JSON, Markdown and a PNG under ``--out-dir``.

Run from the repository root:

    python -m scripts.bench_kernel --quick          # the six ANCHORS.md cases (< 3 min on an H100)
    python -m scripts.bench_kernel --full           # the whole grid (50 cases, < 8 min)
    python -m scripts.bench_kernel --full --cases zipf,het --list    # what would run, and its estimate
    python -m scripts.bench_kernel --device cpu --tiny   # ours vs the oracle only, Triton interpreter
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time
import timeit
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

from . import kernel_baselines as kb
from . import kernel_cases as kc
from . import kernel_report as kr

ROOT = Path(__file__).resolve().parents[1]

TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2}  # relative L2 error vs the fp32 oracle
REP_MS = {"quick": 20.0, "full": 10.0, "tiny": 20.0}  # ms of calls per timed CUDA graph, by grid
# --impls of the two calls the full grid takes on a fresh host (JIT compiles included), merged with
# `python -m scripts.kernel_report --merge FIRST.json SECOND.json --out ...`
FULL_SPLIT = (("ours", "sglang_triton", "flashinfer_decode", "flashinfer_cascade", "fa2_varlen", "fa2_cascade"),
              ("ours", "flashinfer_cascade_fa2", "flashinfer_prefix_prefill", "flashinfer_batch_attention"))
TIMING_METHOD = ("triton.testing.do_bench_cudagraph(return_mode='median'): a CUDA graph of n back-to-back "
                 "calls (about rep_ms of work), median over 10 replays of replay time / n")
L2_STATE = "warm (no flush between calls)"
FA2_NOTE = ("torch.ops.aten._flash_attention_forward (FlashAttention-2 varlen, non-causal) on K/V gathered "
            "dense per request (fa2) or per group prefix and request suffix (fa2_casc); the gathers are "
            "not timed (fa2's is reported as gather_us); fa2_casc's LSE merge is torch ops, timed")


def build_ours(inp: kc.CaseInputs, kern) -> kb.Impl:
    """Ours, the one place that knows our kernel's API: a plan made once per step
    (``plan_packed_cascade``, host; its median time with the host-to-device copy is ``plan_us``),
    then ``run_packed_cascade`` per layer, the timed call. The first call goes through the public
    ``packed_cascade_attention(..., plan=plan)`` so its input checks run once."""
    plan_args = (*inp[3:8], inp.q.shape[1], inp.k_buffer.shape[1])
    shape = {"head_dim": inp.q.shape[2], "dtype": inp.k_buffer.dtype}
    sync = torch.cuda.synchronize if inp.q.is_cuda else lambda: None
    plan_s = timeit.repeat(lambda: (kern.plan_packed_cascade(*plan_args, **shape), sync()), number=1, repeat=22)
    plan = kern.plan_packed_cascade(*plan_args, **shape)
    out = kern.packed_cascade_attention(*inp.cascade_args(), plan=plan)

    def run():
        kern.run_packed_cascade(inp.q, inp.k_buffer, inp.v_buffer, plan, inp.sm_scale, out)
        return out
    return kb.Impl(run, out, {"plan_us": statistics.median(plan_s[2:]) * 1e6})


def build(name: str, inp: kc.CaseInputs, kern) -> kb.Impl:
    """The implementation ``name`` (:data:`.kernel_report.IMPLS`) bound to ``inp``."""
    return build_ours(inp, kern) if name == "ours" else kb.BASELINE_BUILDERS[name](inp)


def check_impl(impl: kb.Impl, ref: torch.Tensor, tol: float, dtype: torch.dtype) -> dict:
    """One call on poisoned output (``out`` NaN-filled; for a library-allocated output, a NaN-filled
    block of its size freed to the caching allocator first). Wrong: a NaN left, or error > ``tol``."""
    if impl.out is not None:
        impl.out.fill_(float("nan"))
    else:
        torch.full(ref.shape, float("nan"), dtype=dtype, device=ref.device)  # freed at once, reused next
    out = impl.run().double()
    unwritten, err = int(torch.isnan(out).sum()), ((out - ref.double()).norm() / ref.double().norm()).item()
    status = "ok" if unwritten == 0 and err <= tol else "wrong"
    return {"status": status, "rel_err": err if math.isfinite(err) else None, "unwritten": unwritten}


def time_us(fn: Callable, rep_ms: float = 20.0) -> float:
    """Median microseconds per call of ``fn`` (:data:`TIMING_METHOD`; L2 warm)."""
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def measure_rates(device: torch.device, nbytes: int = 2 << 30, n: int = 8192) -> tuple[float, float, float]:
    """Bandwidth for the floor, bf16 matmul rate, and copy bandwidth, in B/s and FLOP/s.

    Decode attention only reads, so the floor's bandwidth is the larger of a read-only stream (``amax``
    over ``nbytes`` of bf16: bytes read) and a device-to-device copy of ``nbytes`` (bytes read plus
    written); FlashInfer's decode was seen above the copy figure. Matmul: ``torch.matmul`` of two
    random ``n x n`` bf16 matrices, ``2 n^3`` FLOP."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * nbytes / (time_us(lambda: dst.copy_(src)) * 1e-6)
    flat = src.view(torch.bfloat16)
    read = nbytes / (time_us(lambda: torch.amax(flat)) * 1e-6)
    src = dst = flat = None  # frees the 2 x nbytes before the matmul inputs
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return max(read, copy), 2 * n**3 / (time_us(lambda: torch.matmul(a, b)) * 1e-6), copy


def evaluate(name: str, inp: kc.CaseInputs, ref: torch.Tensor, kern, tol: float,
             rep_ms: float | None) -> dict:
    """Builds, checks and (when correct and ``rep_ms`` is set) times one implementation and its side
    calls; ``setup_s``: wall seconds of build and check (JIT compiles land here). Never raises."""
    if name != "ours" and rep_ms is None:
        return {"status": "skipped", "note": "baselines run on a GPU only"}
    start = time.perf_counter()
    try:
        impl = build(name, inp, kern)
        res = {**check_impl(impl, ref, tol, inp.q.dtype), **(impl.extra or {})}
        res["setup_s"] = round(time.perf_counter() - start, 3)
        if res["status"] == "wrong":
            res["note"] = f"not timed: rel err {res['rel_err']}, {res['unwritten']} unwritten; tol {tol}"
        elif rep_ms is not None:
            res["us"] = time_us(impl.run, rep_ms)
            res.update({f"{key}_us": time_us(fn, rep_ms) for key, fn in (impl.side or {}).items()})
        return res
    except kb.Skipped as e:
        return {"status": "skipped", "note": str(e)}
    except Exception as e:  # noqa: BLE001 -- a missing library or a failing baseline is recorded, not fatal
        traceback.print_exc(file=sys.stderr)
        return {"status": "error", "note": f"{type(e).__name__}: {e}"[:400],
                "setup_s": round(time.perf_counter() - start, 3)}


def run_case(case: kc.Case, kern, device: torch.device, rates: tuple[float, float], rep_ms: float | None,
             impls: tuple[str, ...] = kr.IMPLS, seed: int = 0) -> dict:
    """One summarized result row (:mod:`.kernel_report`): the case, its floor, each implementation's result."""
    start = time.perf_counter()
    inp = kc.make_inputs(case, device, seed)
    ref = kern.reference.packed_cascade_attention_ref(*inp.cascade_args())[0]  # fp32, per request
    params = {k: v for k, v in asdict(case).items() if k != "name"}
    row = {"case": case.name, **params, "shares": case.shares, "floor_us": kc.floor_us(case, *rates),
           "min_bytes": kc.min_bytes(case), "flops": kc.attn_flops(case), "impls": {}}
    for name in impls:
        row["impls"][name] = evaluate(name, inp, ref, kern, TOLERANCE[case.dtype], rep_ms)
    del inp, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - start, 3)
    return kr.summarize_row(row)


def import_kernels():
    """``packinfer_sglang.kernels`` and its oracle module; if not installed, this checkout's ``kernels/``
    (importable as ``kernels`` when run from the repository root)."""
    try:
        kern = importlib.import_module("packinfer_sglang.kernels")
    except ImportError:
        kern = importlib.import_module("kernels")
    importlib.import_module(kern.__name__ + ".reference")
    return kern


def environment(device: torch.device) -> dict:
    """GPU, library versions, date and method statements for the report header."""
    cuda = device.type == "cuda"
    version = lambda dist: next((d.version for d in metadata.distributions(name=dist)), None)
    return {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": version("triton"), "sglang": version("sglang"),
            "flashinfer": version("flashinfer-python"),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "timing": TIMING_METHOD if cuda else "not timed", "l2": L2_STATE, "tolerance": TOLERANCE,
            "fa2_note": FA2_NOTE, "fa2_gather_timed": False}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="the six ANCHORS.md cases (the default)")
    grid.add_argument("--full", action="store_true", help="the whole grid: B/P/S sweeps, group structures, "
                      "head configurations, fp16, contiguous slots")
    grid.add_argument("--tiny", action="store_true",
                      help="small odd cases of every structure (cpu, GPU smoke test)")
    p.add_argument("--cases", help="comma-separated substrings of case names to keep, e.g. 'zipf,het,B64_'")
    p.add_argument("--impls", default=",".join(kr.IMPLS),
                   help=f"comma-separated implementations to run (default all: {','.join(kr.IMPLS)})")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: check ours only, untimed, in the Triton interpreter; needs --tiny")
    p.add_argument("--out-dir", type=Path, default=ROOT / "out" / "kernel",
                   help="where kernel_<gpu>_<grid>.{json,md,png} go (default out/kernel, git-ignored; "
                   "benchmarks/results when publishing)")
    p.add_argument("--rep-ms", type=float,
                   help="ms of calls per timed CUDA graph (default 20; 10 with --full)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random q/K/V and slot permutation")
    p.add_argument("--list", action="store_true", help="print the cases and the time estimate, run nothing")
    return p.parse_args(argv)


def _progress(cases: list, timed: bool):
    """``(iterable, write)``: tqdm over the cases on stderr when installed, else the plain list and print."""
    try:
        from tqdm import tqdm
    except ImportError:
        return cases, lambda line: print(line, flush=True)
    bar = tqdm(cases, unit="case", file=sys.stderr, dynamic_ncols=True, disable=not timed and len(cases) < 10)
    return bar, lambda line: tqdm.write(line, file=sys.stdout)


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "tiny" if args.tiny else "full" if args.full else "quick"
    wanted = [n for n in args.impls.split(",") if n]
    if not wanted or set(wanted) - set(kr.IMPLS):
        sys.exit(f"--impls {args.impls!r}: choose from {','.join(kr.IMPLS)}")
    impls = tuple(n for n in kr.IMPLS if n in wanted)
    cases = kc.filter_cases(kc.GRIDS[mode](), args.cases)
    if not cases:
        sys.exit(f"no case matches --cases {args.cases!r}")
    rep_ms = args.rep_ms or REP_MS[mode]
    device, timed = torch.device(args.device), args.device == "cuda"
    estimate_s, jit_s = kc.estimate_seconds(cases, rep_ms, impls)
    print(f"{len(cases)} {mode} cases x {len(impls)} implementations; a timed GPU run: estimated "
          f"{estimate_s / 60:.1f} min on an H100 ({jit_s / 60:.1f} of it JIT compiles on a fresh host)",
          flush=True)
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not timed and not args.tiny or timed and not torch.cuda.is_available():
        sys.exit("--device cpu runs the Triton interpreter: use it with --tiny; a GPU run needs CUDA")
    if not timed:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    start, kern = time.perf_counter(), import_kernels()
    torch.set_float32_matmul_precision("highest")  # an fp32 oracle: no TF32
    *rates, copy_bw = measure_rates(device) if timed else (*kc.ANCHOR_RATES, kc.ANCHOR_RATES[0])
    meta = {**environment(device), "bandwidth": rates[0], "matmul_rate": rates[1], "copy_bandwidth": copy_bw,
            "rates_source": "measured in this run" if timed else "ANCHORS.md's, not measured",
            "grid": mode, "cases_filter": args.cases, "rep_ms": rep_ms, "impls": impls,
            "estimate_s": round(estimate_s)}
    print(kr.report_header(meta), flush=True)
    cases_tag = "".join(c if c.isalnum() or c in ".-" else "-" for c in args.cases or "")
    tag = f"{mode}_{cases_tag.strip('-')}" if cases_tag else mode  # a filtered run keeps its own files
    stem = kr.output_stem(meta["gpu"], tag)
    rows, (cases_iter, write) = [], _progress(cases, timed)
    for case in cases_iter:
        rows.append(run_case(case, kern, device, rates, rep_ms if timed else None, impls, args.seed))
        write(kr.console_line(rows[-1]))
        for name, res in rows[-1]["impls"].items():
            if res["status"] in ("wrong", "error"):
                write(f"    {name} {res['status']}: {res.get('note')}")
        if timed:  # a run cut short keeps what it measured, against the floor of what it measured
            partial = {**meta, "partial": True}
            kr.raise_floor_to_achieved(partial, rows)
            kr.write_outputs(args.out_dir, stem, partial, rows, plot=False)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    if timed:
        kr.raise_floor_to_achieved(meta, rows)
    kr.write_outputs(args.out_dir, stem, meta, rows)
    print(f"\n{kr.report_header(meta)}\n\n{kr.render_table(rows)}\n\n{kr.render_targets(rows)}\n"
          f"wall {meta['wall_s'] / 60:.1f} min" + (f" (estimated {estimate_s / 60:.1f})" if timed else ""))
    return 0 if all(r["impls"]["ours"]["status"] == "ok" for r in rows if "ours" in r["impls"]) else 1


if __name__ == "__main__":
    sys.exit(main())
