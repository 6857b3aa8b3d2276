#!/usr/bin/env python3
"""Decode attention for one layer: packed cascade vs SGLang's Triton decode and FlashInfer.

A case (ANCHORS.md) is ``B`` decode requests in ``G`` equal groups; a group shares a prefix of ``P``
KV tokens, a request owns ``S`` suffix tokens. K/V sit in an SGLang token pool
``[num_slots, num_kv_heads, head_dim]`` (page size 1) at a random permutation of its slots.
Each implementation first runs on NaN-poisoned output and is compared with the fp32 oracle
(relative L2 error); a wrong one is not timed. Rates for the floor are measured in the same run.

    python scripts/bench_kernel.py                  # the six ANCHORS.md cases (--quick)
    python scripts/bench_kernel.py --full           # plus groups, no sharing, Qwen2.5-7B and MHA
    TRITON_INTERPRET=1 python scripts/bench_kernel.py --device cpu --tiny   # correctness of ours only
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import timeit
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2}  # relative L2 error vs the fp32 oracle
ANCHOR_SHAPES = ((64, 4096, 256), (16, 2048, 512), (128, 1024, 128), (32, 8192, 1024), (8, 512, 64),
                 (256, 2048, 256))  # (B, P, S) of ANCHORS.md: Llama-3-8B heads, one group
ANCHOR_RATES = (4.24e12, 687e12)  # ANCHORS.md's H200: copy B/s (read + written), bf16 matmul FLOP/s
IMPLS = ("ours", "sglang_triton", "flashinfer_decode", "flashinfer_cascade")
BASELINES = IMPLS[1:]
SGLANG_MAX_KV_SPLITS = 8  # ServerArgs.triton_attention_num_kv_splits, its default on CUDA
FLASHINFER_WORKSPACE_BYTES = 256 << 20
TIMING_METHOD = ("triton.testing.do_bench_cudagraph(return_mode='median'): a CUDA graph of n back-to-back "
                 "calls (about rep ms of work), median over 10 replays of replay time / n")
L2_STATE = "warm (no flush between calls)"


@dataclass(frozen=True)
class Case:
    """``batch_size`` requests in ``num_groups`` equal groups; each group shares ``prefix_len`` KV
    tokens, each request owns ``suffix_len``; one query token per request."""
    batch_size: int
    prefix_len: int
    suffix_len: int
    num_groups: int = 1
    model: str = "llama3-8b"
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bf16"

    def __post_init__(self):
        if (self.batch_size % self.num_groups or self.num_qo_heads % self.num_kv_heads
                or self.dtype not in DTYPES or min(self.prefix_len, self.suffix_len) < 0
                or self.prefix_len + self.suffix_len == 0):
            raise ValueError(f"{self}: groups must divide batch_size and KV heads num_qo_heads, dtype be "
                             f"one of {list(DTYPES)}, lengths >= 0 with a KV token per request at least")

    @property
    def name(self) -> str:
        extra = ([f"G{self.num_groups}"] * (self.num_groups > 1) + [self.model] * (self.model != "llama3-8b")
                 + [self.dtype] * (self.dtype != "bf16"))
        return "_".join([f"B{self.batch_size}", f"P{self.prefix_len}", f"S{self.suffix_len}", *extra])


def case_grid(kind: str = "quick") -> list[Case]:
    """``quick``: the six ANCHORS.md cases; ``full``: those plus several groups, no sharing
    (``P = 0``), Qwen2.5-7B (28/4/128) and MHA (32/32/128); ``tiny``: small odd cases for the CPU."""
    if kind == "tiny":
        return [Case(5, 37, 17, 1, "h4-2-64", 4, 2, 64), Case(6, 70, 1, 2, "h4-1-64", 4, 1, 64, "fp16"),
                Case(3, 0, 33, 1, "h2-2-64", 2, 2, 64)]
    if kind not in ("quick", "full"):
        raise ValueError(f"unknown case grid {kind!r}")
    cases = [Case(*shape) for shape in ANCHOR_SHAPES]  # Llama-3-8B heads: the defaults
    qwen = dict(model="qwen2.5-7b", num_qo_heads=28, num_kv_heads=4)
    mha = dict(model="mha-32", num_kv_heads=32)
    if kind == "full":
        cases += [Case(256, 4096, 512, 8), Case(64, 2048, 256, 8), Case(64, 0, 4096), Case(256, 0, 1024),
                  Case(64, 4096, 256, **qwen), Case(256, 2048, 256, 8, **qwen), Case(64, 4096, 256, **mha),
                  Case(16, 2048, 512, **mha)]
    return cases


def filter_cases(cases: list[Case], patterns: str | None) -> list[Case]:
    """Cases whose name contains any of the comma-separated ``patterns`` (all when ``None``)."""
    wanted = [p for p in (patterns or "").split(",") if p]
    return [c for c in cases if not wanted or any(p in c.name for p in wanted)]


def min_bytes(case: Case) -> int:
    """Least bytes a layer moves: each group's prefix KV once, every suffix once, q read, o written:
    ``2 (K, V) * num_kv_heads * head_dim * elt * (G*P + B*S) + 2 * B * num_qo_heads * head_dim * elt``."""
    elt = torch.finfo(DTYPES[case.dtype]).bits // 8
    kv_tokens = case.num_groups * case.prefix_len + case.batch_size * case.suffix_len
    kv_bytes = 2 * case.num_kv_heads * case.head_dim * elt * kv_tokens
    return kv_bytes + 2 * case.batch_size * case.num_qo_heads * case.head_dim * elt


def attn_flops(case: Case) -> int:
    """``4 * num_qo_heads * head_dim * B * (P + S)``: q.k and p.v, a multiply-add each per head and token."""
    return 4 * case.num_qo_heads * case.head_dim * case.batch_size * (case.prefix_len + case.suffix_len)


def floor_us(case: Case, bandwidth: float, matmul_rate: float) -> float:
    """``max(bytes_min / bandwidth, flops / matmul_rate)`` in microseconds (rates in B/s and FLOP/s)."""
    return max(min_bytes(case) / bandwidth, attn_flops(case) / matmul_rate) * 1e6


def _us(res: dict | None) -> float | None:
    return res.get("us") if res and res["status"] == "ok" else None


def cell(res: dict | None) -> str:
    """One implementation's table cell: its microseconds, or its status."""
    if res and res["status"] == "ok":
        return f"{res['us']:.1f}" if res.get("us") is not None else f"ok ({res['rel_err']:.1e})"
    return {None: "-", "wrong": "wrong", "error": "error"}.get(res and res["status"], "n/a")


def render_table(rows: list[dict]) -> str:
    """Markdown table, a row per case: floor, ours, our host plan time, each baseline, ours/floor and
    the speedup of ours over each baseline (``baseline µs / ours µs``)."""
    head = ["case", "floor µs", "ours µs", "plan µs (host)", *[f"{b} µs" for b in BASELINES],
            "ours/floor", *[f"vs {b}" for b in BASELINES]]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        impls, ours = row["impls"], _us(row["impls"].get("ours"))
        plan = (impls.get("ours") or {}).get("plan_us")
        cells = [row["case"], f"{row['floor_us']:.1f}", cell(impls.get("ours")),
                 "-" if plan is None else f"{plan:.0f}", *[cell(impls.get(b)) for b in BASELINES],
                 f"{ours / row['floor_us']:.2f}" if ours else "-"]
        base = [_us(impls.get(b)) for b in BASELINES]
        cells += [f"{b / ours:.2f}x" if ours and b else "-" for b in base]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class CaseInputs(NamedTuple):
    """A case on a device: our two-level layout (``[:8]``), then the baselines' flat lists."""
    q: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    group_indptr: torch.Tensor
    prefix_kv_indptr: torch.Tensor
    prefix_kv_indices: torch.Tensor
    suffix_kv_indptr: torch.Tensor
    suffix_kv_indices: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    sm_scale: float

    def cascade_args(self) -> tuple:
        """Positional arguments of ``packed_cascade_attention`` and of its oracle."""
        return (*self[:8], self.sm_scale)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> CaseInputs:
    """Standard-normal q/K/V; the ``G*P + B*S`` KV tokens fill a pool of that many slots in random order."""
    torch.manual_seed(seed)
    B, P, S, G = case.batch_size, case.prefix_len, case.suffix_len, case.num_groups
    num_slots = G * P + B * S
    perm = torch.randperm(num_slots)
    prefix_slots, suffix_slots = perm[: G * P].view(G, P), perm[G * P :].view(B, S)
    flat = torch.cat([prefix_slots.repeat_interleave(B // G, 0), suffix_slots], 1)
    i32 = lambda t: t.reshape(-1).to(device=device, dtype=torch.int32)
    csr = lambda n, step: i32(torch.arange(n + 1) * step)
    rand = lambda n, h: torch.randn(n, h, case.head_dim, device=device).to(DTYPES[case.dtype])
    return CaseInputs(rand(B, case.num_qo_heads), rand(num_slots, case.num_kv_heads),
                      rand(num_slots, case.num_kv_heads), csr(G, B // G), csr(G, P), i32(prefix_slots),
                      csr(B, S), i32(suffix_slots), csr(B, P + S), i32(flat), case.head_dim ** -0.5)


class Skipped(Exception):
    """The implementation does not apply to the case."""


class Impl(NamedTuple):
    """A bound implementation: ``run()`` makes the timed call, returns ``out`` (``None``: library-made)."""
    run: Callable[[], torch.Tensor]
    out: torch.Tensor | None = None
    extra: dict | None = None


def build_ours(inp: CaseInputs, kern) -> Impl:
    """``run_packed_cascade`` with a precomputed plan (inputs validated once by the public entry point);
    ``plan_us``: median host time of ``plan_packed_cascade``, its host-to-device copy included."""
    plan_args = (*inp[3:8], inp.q.shape[1], inp.k_buffer.shape[1])
    sync = torch.cuda.synchronize if inp.q.is_cuda else lambda: None
    plan_s = timeit.repeat(lambda: (kern.plan_packed_cascade(*plan_args), sync()), number=1, repeat=22)
    plan = kern.plan_packed_cascade(*plan_args)
    out = kern.packed_cascade_attention(*inp.cascade_args(), plan=plan)
    def run():
        kern.run_packed_cascade(inp.q, inp.k_buffer, inp.v_buffer, plan, inp.sm_scale, out)
        return out
    return Impl(run, out, {"plan_us": statistics.median(plan_s[2:]) * 1e6})


def build_sglang_triton(inp: CaseInputs, kern=None) -> Impl:
    """``decode_attention_fwd`` as ``TritonAttnBackend.forward_decode`` calls it, its buffers and
    ``num_kv_splits`` made as ``init_forward_metadata`` makes them (once per step: untimed)."""
    import triton
    from sgl_kernel.utils import is_arch_support_pdl
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    (num_tokens, num_qo_heads, head_dim), dev, splits = inp.q.shape, inp.q.device, SGLANG_MAX_KV_SPLITS
    kv_indices = inp.kv_indices.long()  # the backend's kv_indices are int64
    num_kv_splits = torch.empty(num_tokens, dtype=torch.int32, device=dev)
    get_num_kv_splits_triton[(1,)](
        num_kv_splits, (inp.kv_indptr[1:] - inp.kv_indptr[:-1]).long(), num_tokens, 1, num_qo_heads,
        inp.k_buffer.shape[1], splits, torch.cuda.get_device_properties(dev).multi_processor_count,
        MAX_NUM_SEQ=max(256, triton.next_power_of_2(num_tokens)))
    attn_logits = torch.empty(num_tokens, num_qo_heads, splits, head_dim, dtype=torch.float32, device=dev)
    attn_lse = torch.empty(num_tokens, num_qo_heads, splits, dtype=torch.float32, device=dev)
    out, use_pdl = torch.empty_like(inp.q), is_arch_support_pdl()
    def run():
        decode_attention_fwd(inp.q, inp.k_buffer, inp.v_buffer, out, inp.kv_indptr, kv_indices, attn_logits,
                             attn_lse, num_kv_splits, splits, inp.sm_scale, 1.0, 1.0, logit_cap=0.0,
                             sinks=None, xai_temperature_len=-1, has_mla=False, use_pdl=use_pdl, page_size=1)
        return out
    return Impl(run, out, {"max_num_kv_splits": int(num_kv_splits.max()), "use_pdl": use_pdl})


def _flashinfer(inp: CaseInputs):
    """``flashinfer``, a zeroed workspace, and the pools as NHD pages of one token ``[num_slots, 1, ...]``."""
    import flashinfer
    workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=inp.q.device)
    return flashinfer, workspace, (inp.k_buffer.unsqueeze(1), inp.v_buffer.unsqueeze(1))


def build_flashinfer_decode(inp: CaseInputs, kern=None) -> Impl:
    """``BatchDecodeWithPagedKVCacheWrapper`` (tensor cores, NHD, page size 1) on the flat lists."""
    flashinfer, workspace, pages = _flashinfer(inp)
    (num_tokens, num_qo_heads, head_dim), q = inp.q.shape, inp.q
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    wrapper.plan(inp.kv_indptr, inp.kv_indices, torch.ones(num_tokens, dtype=torch.int32, device=q.device),
                 num_qo_heads, inp.k_buffer.shape[1], head_dim, 1, q_data_type=q.dtype, kv_data_type=q.dtype,
                 sm_scale=inp.sm_scale)
    out = torch.empty_like(q)
    return Impl(lambda: wrapper.run(q, pages, out=out), out)


def build_flashinfer_cascade(inp: CaseInputs, kern=None) -> Impl:
    """``MultiLevelCascadeAttentionWrapper``, 2 levels: group prefixes, then request suffixes."""
    if inp.prefix_kv_indices.numel() == 0 or inp.suffix_kv_indices.numel() == 0:
        raise Skipped("needs a shared prefix and a suffix")
    flashinfer, workspace, pages = _flashinfer(inp)
    (num_tokens, num_qo_heads, head_dim), q = inp.q.shape, inp.q
    ones = lambda n: torch.ones(n, dtype=torch.int32, device=q.device)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    wrapper.plan([inp.group_indptr, torch.arange(num_tokens + 1, dtype=torch.int32, device=q.device)],
                 [inp.prefix_kv_indptr, inp.suffix_kv_indptr], [inp.prefix_kv_indices, inp.suffix_kv_indices],
                 [ones(inp.group_indptr.numel() - 1), ones(num_tokens)], num_qo_heads, inp.k_buffer.shape[1],
                 head_dim, 1, sm_scale=inp.sm_scale, q_data_type=q.dtype, kv_data_type=q.dtype)
    return Impl(lambda: wrapper.run(q, pages), None, {"note": "allocates its output: poisoned via allocator"})


BUILDERS = {"ours": build_ours, "sglang_triton": build_sglang_triton,
            "flashinfer_decode": build_flashinfer_decode, "flashinfer_cascade": build_flashinfer_cascade}


def check_impl(impl: Impl, ref: torch.Tensor, tol: float, dtype: torch.dtype) -> dict:
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


def measure_rates(device: torch.device, nbytes: int = 2 << 30, n: int = 8192) -> tuple[float, float]:
    """Copy bandwidth in B/s (a device-to-device copy of ``nbytes``, bytes read plus written) and
    bf16 matmul rate in FLOP/s (``torch.matmul`` of two random ``n x n`` matrices, ``2 n^3`` FLOP)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * nbytes / (time_us(lambda: dst.copy_(src)) * 1e-6)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return bandwidth, 2 * n**3 / (time_us(lambda: torch.matmul(a, b)) * 1e-6)


def evaluate(name: str, inp: CaseInputs, ref: torch.Tensor, kern, tol: float, rep_ms: float | None) -> dict:
    """Builds, checks and (when correct and ``rep_ms`` is set) times one implementation; never raises."""
    if name != "ours" and rep_ms is None:
        return {"status": "skipped", "note": "baselines run on a GPU only"}
    try:
        impl = BUILDERS[name](inp, kern)
        res = {**check_impl(impl, ref, tol, inp.q.dtype), **(impl.extra or {})}
        if res["status"] == "wrong":
            res["note"] = f"not timed: rel err {res['rel_err']}, {res['unwritten']} unwritten; tol {tol}"
        elif rep_ms is not None:
            res["us"] = time_us(impl.run, rep_ms)
        return res
    except Skipped as e:
        return {"status": "skipped", "note": str(e)}
    except Exception as e:  # a missing library or a failing baseline is recorded, not fatal
        traceback.print_exc(file=sys.stderr)
        return {"status": "error", "note": f"{type(e).__name__}: {e}"[:400]}


def run_case(case: Case, kern, device: torch.device, rates: tuple[float, float], rep_ms: float | None,
             seed: int = 0) -> dict:
    """One result row: the case, its floor and every implementation's result (``impls``)."""
    inp = make_inputs(case, device, seed)
    ref = kern.reference.packed_cascade_attention_ref(*inp.cascade_args())[0]  # fp32, per request
    row = {"case": case.name, **asdict(case), "floor_us": floor_us(case, *rates),
           "min_bytes": min_bytes(case), "flops": attn_flops(case), "impls": {}}
    for name in IMPLS:
        row["impls"][name] = evaluate(name, inp, ref, kern, TOLERANCE[case.dtype], rep_ms)
    del inp, ref
    torch.cuda.empty_cache()  # a no-op without CUDA
    return row


def import_kernels():
    """``packinfer_sglang.kernels`` and its oracle module; if not installed, this checkout's ``kernels/``."""
    try:
        kern = importlib.import_module("packinfer_sglang.kernels")
    except ImportError:
        sys.path.insert(0, str(ROOT))
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
            "timing": TIMING_METHOD if cuda else "not timed", "l2": L2_STATE, "tolerance": TOLERANCE}


def report_header(meta: dict) -> str:
    return (f"GPU {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, sglang {meta['sglang']}, "
            f"flashinfer {meta['flashinfer']}; {meta['date']}\n"
            f"copy bandwidth {meta['bandwidth'] / 1e12:.2f} TB/s (read + written), bf16 matmul "
            f"{meta['matmul_rate'] / 1e12:.0f} TFLOP/s ({meta['rates_source']})\n"
            f"timing: {meta['timing']}; L2 {meta['l2']}; outputs checked against the fp32 oracle, "
            f"rel L2 tolerance {meta['tolerance']}\n"
            "floor = max(bytes_min / bandwidth, flops / matmul_rate); speedup = baseline µs / ours µs")


def write_plot(path: Path, meta: dict, rows: list[dict]) -> None:
    """Grouped bars per case (the floor and every implementation), log-scale microseconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series, width = ("floor", *IMPLS), 0.8 / (len(IMPLS) + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows)), 4.5))
    for i, name in enumerate(series):
        ys = [r["floor_us"] if name == "floor" else (_us(r["impls"][name]) or math.nan) for r in rows]
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))], ys, width, label=name)
    ax.set(yscale="log", ylabel="µs per layer (CUDA-graph replay median)",
           title=f"Decode attention, one layer, {meta['gpu']}")
    ax.set_xticks(range(len(rows)), [r["case"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(path: Path, meta: dict, rows: list[dict], table: str) -> None:
    """JSON to ``path``; the Markdown report (``.md``) and the plot (``.png``) alongside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    path.with_suffix(".md").write_text(f"# Decode attention, one layer\n\n{report_header(meta)}\n\n{table}\n")
    try:
        write_plot(path.with_suffix(".png"), meta, rows)
    except Exception as e:  # no matplotlib on the GPU host is not worth a failed run
        print(f"plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"wrote {path} and its .md/.png", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="the six ANCHORS.md cases only (the default)")
    grid.add_argument("--full", action="store_true", help="add grouped, no-sharing, Qwen2.5-7B and MHA cases")
    grid.add_argument("--tiny", action="store_true", help="small odd cases (cpu, GPU smoke test)")
    p.add_argument("--cases", help="comma-separated substrings of case names to keep, e.g. 'B64_,G8'")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: check ours only, untimed, in the Triton interpreter; needs --tiny")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/kernel_<gpu>.json, with "
                   ".md and .png alongside); on cpu, files are written only when given")
    p.add_argument("--rep-ms", type=float, default=20.0, help="ms of calls per timed CUDA graph")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, timed = torch.device(args.device), args.device == "cuda"
    if not timed and not args.tiny or timed and not torch.cuda.is_available():
        sys.exit("--device cpu runs the Triton interpreter: use it with --tiny; a GPU run needs CUDA")
    if not timed:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    grid = case_grid("tiny" if args.tiny else "full" if args.full else "quick")
    cases = filter_cases(grid, args.cases) or sys.exit(f"no case matches --cases {args.cases!r}")
    kern = import_kernels()
    torch.set_float32_matmul_precision("highest")  # an fp32 oracle: no TF32
    rates = measure_rates(device) if timed else ANCHOR_RATES
    meta = {**environment(device), "bandwidth": rates[0], "matmul_rate": rates[1],
            "rates_source": "measured in this run" if timed else "ANCHORS.md's, not measured"}
    print(f"{report_header(meta)}\n\n{render_table([])}", flush=True)  # then a row per case as it finishes
    rows = []
    for case in cases:
        rows.append(run_case(case, kern, device, rates, args.rep_ms if timed else None, args.seed))
        print(render_table(rows[-1:]).splitlines()[-1], flush=True)
        for name, res in rows[-1]["impls"].items():
            if res["status"] in ("wrong", "error"):
                print(f"    {name} {res['status']}: {res.get('note')}", flush=True)
    table = render_table(rows)
    if timed or args.out:
        slug = "".join(ch if ch.isalnum() else "_" for ch in meta["gpu"].lower()).strip("_")
        write_outputs(args.out or ROOT / "benchmarks" / "results" / f"kernel_{slug}.json", meta, rows, table)
    print(f"\n{report_header(meta)}\n\n{table}")
    return 0 if all(r["impls"]["ours"]["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
