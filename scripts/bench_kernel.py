#!/usr/bin/env python3
"""Decode attention for one layer: packed cascade vs SGLang's Triton decode and FlashInfer.

A case is a shared-prefix decode batch (ANCHORS.md): ``B`` requests in ``G`` equal groups, each
group sharing a prefix of ``P`` KV tokens, each request owning ``S`` suffix tokens, one query token
per request. K and V sit in an SGLang-style token pool ``[num_slots, num_kv_heads, head_dim]``
(page size 1) at a random permutation of its slots.

Every implementation first runs once on NaN-poisoned output and is compared with an fp32
reference by relative L2 error; a wrong one is reported and not timed. Timing is a CUDA graph of
``n`` back-to-back calls, the median over replays of ``replay time / n``; the L2 cache stays warm
across calls. The floor is ``max(bytes_min / copy_bandwidth, flops / matmul_rate)`` with both
rates measured in the same run (formulas in :func:`min_bytes` and :func:`attn_flops`).

Usage::

    python scripts/bench_kernel.py                  # the six ANCHORS.md cases
    python scripts/bench_kernel.py --full           # plus groups, no sharing, Qwen2.5-7B and MHA shapes
    TRITON_INTERPRET=1 python scripts/bench_kernel.py --device cpu --tiny   # correctness only
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "mha-32": (32, 32, 128)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2}  # relative L2 error vs the fp32 reference
ANCHOR_SHAPES = ((64, 4096, 256), (16, 2048, 512), (128, 1024, 128), (32, 8192, 1024), (8, 512, 64),
                 (256, 2048, 256))  # (B, P, S) of ANCHORS.md, Llama-3-8B heads, one group
ANCHOR_RATES = (4.24e12, 687e12)  # ANCHORS.md's H200: copy B/s, bf16 matmul FLOP/s
IMPLS = ("ours", "sglang_triton", "flashinfer_decode", "flashinfer_cascade")
BASELINES = IMPLS[1:]
SGLANG_MAX_KV_SPLITS = 8  # ServerArgs.triton_attention_num_kv_splits default on CUDA
FLASHINFER_WORKSPACE_BYTES = 256 << 20
TIMING_METHOD = ("triton.testing.do_bench_cudagraph(return_mode='median'): one CUDA graph of n back-to-back "
                 "calls (n: about rep ms of work), median over 10 replays of replay time / n")
L2_STATE = "warm: no L2 flush between calls"


# ---------------------------------------------------------------- cases and floor (pure, CPU-testable)

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
        if self.batch_size % self.num_groups or self.num_qo_heads % self.num_kv_heads:
            raise ValueError(f"{self}: batch_size must split into num_groups, num_qo_heads into num_kv_heads")
        if min(self.prefix_len, self.suffix_len) < 0 or self.prefix_len + self.suffix_len == 0:
            raise ValueError(f"{self}: lengths must be >= 0 with at least one KV token per request")
        if self.dtype not in DTYPES:
            raise ValueError(f"{self}: dtype must be one of {list(DTYPES)}")

    @property
    def name(self) -> str:
        extra = ([f"G{self.num_groups}"] * (self.num_groups > 1) + [self.model] * (self.model != "llama3-8b")
                 + [self.dtype] * (self.dtype != "bf16"))
        return "_".join([f"B{self.batch_size}", f"P{self.prefix_len}", f"S{self.suffix_len}", *extra])


def model_case(model: str, batch_size: int, prefix_len: int, suffix_len: int, num_groups: int = 1) -> Case:
    """A bf16 case with the attention heads of ``model`` (a key of :data:`MODELS`)."""
    return Case(batch_size, prefix_len, suffix_len, num_groups, model, *MODELS[model])


def case_grid(kind: str = "quick") -> list[Case]:
    """``quick``: the six ANCHORS.md cases; ``full``: those plus several groups, no sharing
    (``P = 0``), Qwen2.5-7B (28/4/128) and MHA (32/32/128); ``tiny``: small odd cases for the CPU."""
    if kind == "tiny":
        return [Case(5, 37, 17, 1, "h4-2-64", 4, 2, 64), Case(6, 70, 1, 2, "h4-1-64", 4, 1, 64, "fp16"),
                Case(3, 0, 33, 1, "h2-2-64", 2, 2, 64)]
    if kind not in ("quick", "full"):
        raise ValueError(f"unknown case grid {kind!r}")
    cases = [model_case("llama3-8b", *shape) for shape in ANCHOR_SHAPES]
    if kind == "full":
        cases += [model_case("llama3-8b", 256, 4096, 512, 8), model_case("llama3-8b", 64, 2048, 256, 8),
                  model_case("llama3-8b", 64, 0, 4096), model_case("llama3-8b", 256, 0, 1024),
                  model_case("qwen2.5-7b", 64, 4096, 256), model_case("qwen2.5-7b", 256, 2048, 256, 8),
                  model_case("mha-32", 64, 4096, 256), model_case("mha-32", 16, 2048, 512)]
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
    return (2 * case.num_kv_heads * case.head_dim * elt * kv_tokens
            + 2 * case.batch_size * case.num_qo_heads * case.head_dim * elt)


def attn_flops(case: Case) -> int:
    """``4 * num_qo_heads * head_dim * B * (P + S)``: q.k and p.v, one multiply-add each per query
    head and KV token."""
    return 4 * case.num_qo_heads * case.head_dim * case.batch_size * (case.prefix_len + case.suffix_len)


def floor_us(case: Case, bandwidth: float, matmul_rate: float) -> float:
    """``max(bytes_min / bandwidth, flops / matmul_rate)`` in microseconds (rates in B/s, FLOP/s)."""
    return max(min_bytes(case) / bandwidth, attn_flops(case) / matmul_rate) * 1e6


def cell(res: dict | None) -> str:
    """One implementation's table cell: microseconds, or its status."""
    if not res:
        return "-"
    if res["status"] == "ok":
        return f"{res['us']:.1f}" if res.get("us") is not None else f"ok ({res['rel_err']:.1e})"
    return {"wrong": "wrong", "error": "error"}.get(res["status"], "n/a")


def _us(res: dict | None) -> float | None:
    return res.get("us") if res and res["status"] == "ok" else None


def render_table(rows: list[dict]) -> str:
    """Markdown table, one row per case: floor, ours, host plan time, baselines, ours/floor and the
    speedup of ours over each baseline (``baseline us / ours us``)."""
    head = (["case", "floor µs", "ours µs", "plan µs (host)", *[f"{b} µs" for b in BASELINES], "ours/floor",
             *[f"vs {b}" for b in BASELINES]])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        impls, ours = row["impls"], _us(row["impls"].get("ours"))
        plan = (impls.get("ours") or {}).get("plan_us")
        ratio = f"{ours / row['floor_us']:.2f}" if ours else "-"
        speedups = [f"{_us(impls.get(b)) / ours:.2f}x" if ours and _us(impls.get(b)) else "-" for b in BASELINES]
        cells = [row["case"], f"{row['floor_us']:.1f}", cell(impls.get("ours")),
                 f"{plan:.0f}" if plan is not None else "-", *[cell(impls.get(b)) for b in BASELINES],
                 ratio, *speedups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- inputs and reference (torch, any device)

class CaseInputs(NamedTuple):
    """One case on a device: the two-level (group prefix, request suffix) layout our kernel takes
    and the flat per-request lists (``cat(prefix, suffix)``) the baselines take; indices int32."""

    q: torch.Tensor  # [num_tokens, num_qo_heads, head_dim]
    k_buffer: torch.Tensor  # [num_slots, num_kv_heads, head_dim]
    v_buffer: torch.Tensor
    group_indptr: torch.Tensor  # [num_groups + 1]
    prefix_kv_indptr: torch.Tensor  # [num_groups + 1]
    prefix_kv_indices: torch.Tensor  # [G * P] pool slots
    suffix_kv_indptr: torch.Tensor  # [num_tokens + 1]
    suffix_kv_indices: torch.Tensor  # [B * S] pool slots
    kv_indptr: torch.Tensor  # [num_tokens + 1], flat
    kv_indices: torch.Tensor  # [B * (P + S)] pool slots, flat
    sm_scale: float

    def cascade_args(self) -> tuple:
        """Positional arguments of ``packed_cascade_attention`` and its oracle."""
        return (*self[:8], self.sm_scale)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> CaseInputs:
    """Random q/K/V (standard normal); the ``G*P + B*S`` KV tokens fill a pool of exactly that many
    slots in a random order."""
    torch.manual_seed(seed)
    B, P, S, G = case.batch_size, case.prefix_len, case.suffix_len, case.num_groups
    num_slots, dtype = G * P + B * S, DTYPES[case.dtype]
    perm = torch.randperm(num_slots)
    prefix_slots, suffix_slots = perm[: G * P].view(G, P), perm[G * P :].view(B, S)
    flat = torch.cat([prefix_slots.repeat_interleave(B // G, 0), suffix_slots], 1)
    i32 = lambda t: t.to(device=device, dtype=torch.int32)  # noqa: E731
    csr = lambda n, step: i32(torch.arange(n + 1) * step)  # noqa: E731
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    return CaseInputs(
        rand(B, case.num_qo_heads, case.head_dim), rand(num_slots, case.num_kv_heads, case.head_dim),
        rand(num_slots, case.num_kv_heads, case.head_dim), csr(G, B // G), csr(G, P), i32(prefix_slots.reshape(-1)),
        csr(B, S), i32(suffix_slots.reshape(-1)), csr(B, P + S), i32(flat.reshape(-1)), case.head_dim ** -0.5,
    )


def reference_attention(inp: CaseInputs, budget_bytes: int = 1 << 30) -> torch.Tensor:
    """fp32 attention of each request over its flat ``kv_indices`` list, batched over requests
    padded to the longest list (about ``budget_bytes`` of gathered K/V at a time).

    Returns ``[num_tokens, num_qo_heads, head_dim]`` float32.
    """
    q, k_buffer, v_buffer = inp.q, inp.k_buffer, inp.v_buffer
    num_tokens, num_qo_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    indptr = inp.kv_indptr.long()
    lens = indptr[1:] - indptr[:-1]
    max_len = max(int(lens.max()), 1)
    chunk = max(1, budget_bytes // (max_len * num_kv_heads * head_dim * 4 * 2))
    positions = torch.arange(max_len, device=q.device)
    out = torch.empty(num_tokens, num_qo_heads, head_dim, dtype=torch.float32, device=q.device)
    for t0 in range(0, num_tokens, chunk):
        t1 = min(t0 + chunk, num_tokens)
        valid = positions[None, :] < lens[t0:t1, None]  # [b, max_len]
        where = (indptr[t0:t1, None] + positions[None, :]).clamp(max=max(inp.kv_indices.numel() - 1, 0))
        slots = torch.where(valid, inp.kv_indices.long()[where], 0)
        k, v = k_buffer[slots].float(), v_buffer[slots].float()  # [b, max_len, num_kv_heads, head_dim]
        q_g = q[t0:t1].float().view(t1 - t0, num_kv_heads, -1, head_dim)
        scores = torch.einsum("bhgd,blhd->bhgl", q_g, k) * inp.sm_scale
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        o = torch.einsum("bhgl,blhd->bhgd", scores.softmax(-1), v)
        out[t0:t1] = o.reshape(t1 - t0, num_qo_heads, head_dim)
    return out


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN when ``out`` holds NaN)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------- implementations

class Skipped(Exception):
    """An implementation that does not apply to a case."""


class Impl(NamedTuple):
    """One implementation bound to a case's inputs: ``run()`` launches one call and returns its
    output; ``out`` is the buffer it writes (``None``: the library allocates it); ``check_run``
    replaces ``run`` for the checked call; ``extra`` goes into the results."""

    run: Callable[[], torch.Tensor]
    out: torch.Tensor | None = None
    check_run: Callable[[], torch.Tensor] | None = None
    extra: dict | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_time_us(fn: Callable, device: torch.device, n: int = 20) -> float:
    """Median wall time of ``fn()`` plus a device synchronize, in microseconds."""
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e6


def build_ours(inp: CaseInputs, kern) -> Impl:
    """Timed: ``run_packed_cascade`` with a precomputed plan; checked: the validating entry point."""
    plan_args = (*inp.cascade_args()[3:8], inp.q.shape[1], inp.k_buffer.shape[1])
    plan_us = host_time_us(lambda: kern.plan_packed_cascade(*plan_args), inp.q.device)
    plan = kern.plan_packed_cascade(*plan_args)
    out = torch.empty_like(inp.q)

    def run():
        kern.run_packed_cascade(inp.q, inp.k_buffer, inp.v_buffer, plan, inp.sm_scale, out)
        return out

    check_run = lambda: kern.packed_cascade_attention(*inp.cascade_args(), out=out, plan=plan)  # noqa: E731
    return Impl(run, out, check_run, {"plan_us": plan_us, "num_partials": plan.num_partials})


def build_sglang_triton(inp: CaseInputs, kern=None) -> Impl:
    """``decode_attention_fwd`` as ``TritonAttnBackend.forward_decode`` calls it, with buffers sized
    as its ``init_forward_metadata`` does (per step, untimed)."""
    import triton
    from sgl_kernel.utils import is_arch_support_pdl
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    q, dev = inp.q, inp.q.device
    num_tokens, num_qo_heads, head_dim = q.shape
    max_splits = SGLANG_MAX_KV_SPLITS
    kv_indices = inp.kv_indices.long()  # the backend's kv_indices are int64
    seq_lens = (inp.kv_indptr[1:] - inp.kv_indptr[:-1]).long()
    num_kv_splits = torch.empty(num_tokens, dtype=torch.int32, device=dev)
    get_num_kv_splits_triton[(1,)](
        num_kv_splits, seq_lens, num_tokens, 1, num_qo_heads, inp.k_buffer.shape[1], max_splits,
        torch.cuda.get_device_properties(dev).multi_processor_count,
        MAX_NUM_SEQ=max(256, triton.next_power_of_2(num_tokens)),
    )
    attn_logits = torch.empty(num_tokens, num_qo_heads, max_splits, head_dim, dtype=torch.float32, device=dev)
    attn_lse = torch.empty(num_tokens, num_qo_heads, max_splits, dtype=torch.float32, device=dev)
    out, use_pdl = torch.empty_like(q), is_arch_support_pdl()

    def run():
        decode_attention_fwd(q, inp.k_buffer, inp.v_buffer, out, inp.kv_indptr, kv_indices, attn_logits, attn_lse,
                             num_kv_splits, max_splits, inp.sm_scale, 1.0, 1.0, logit_cap=0.0, sinks=None,
                             xai_temperature_len=-1, has_mla=False, use_pdl=use_pdl, page_size=1)
        return out

    return Impl(run, out, extra={"max_num_kv_splits": int(num_kv_splits.max()), "use_pdl": use_pdl})


def _paged(inp: CaseInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The token pool as FlashInfer NHD pages of one token: ``[num_slots, 1, num_kv_heads, head_dim]``."""
    return inp.k_buffer.unsqueeze(1), inp.v_buffer.unsqueeze(1)


def build_flashinfer_decode(inp: CaseInputs, kern=None) -> Impl:
    """``BatchDecodeWithPagedKVCacheWrapper`` (tensor cores, NHD, page size 1) on the flat lists."""
    import flashinfer

    q, dev = inp.q, inp.q.device
    num_tokens, num_qo_heads, head_dim = q.shape
    workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    wrapper.plan(inp.kv_indptr, inp.kv_indices, torch.ones(num_tokens, dtype=torch.int32, device=dev),
                 num_qo_heads, inp.k_buffer.shape[1], head_dim, 1, q_data_type=q.dtype, kv_data_type=q.dtype,
                 sm_scale=inp.sm_scale)
    out, pages = torch.empty_like(q), _paged(inp)
    return Impl(lambda: wrapper.run(q, pages, out=out), out)


def build_flashinfer_cascade(inp: CaseInputs, kern=None) -> Impl:
    """``MultiLevelCascadeAttentionWrapper`` with 2 levels: group prefixes, then request suffixes."""
    if inp.prefix_kv_indices.numel() == 0 or inp.suffix_kv_indices.numel() == 0:
        raise Skipped("needs a shared prefix and a suffix")
    import flashinfer

    q, dev = inp.q, inp.q.device
    num_tokens, num_qo_heads, head_dim = q.shape
    num_groups = inp.group_indptr.numel() - 1
    ones = lambda n: torch.ones(n, dtype=torch.int32, device=dev)  # noqa: E731
    workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    wrapper.plan([inp.group_indptr, torch.arange(num_tokens + 1, dtype=torch.int32, device=dev)],
                 [inp.prefix_kv_indptr, inp.suffix_kv_indptr], [inp.prefix_kv_indices, inp.suffix_kv_indices],
                 [ones(num_groups), ones(num_tokens)], num_qo_heads, inp.k_buffer.shape[1], head_dim, 1,
                 sm_scale=inp.sm_scale, q_data_type=q.dtype, kv_data_type=q.dtype)
    pages = _paged(inp)
    return Impl(lambda: wrapper.run(q, pages), None, extra={"note": "allocates its output: NaN-check only"})


BUILDERS = {"ours": build_ours, "sglang_triton": build_sglang_triton,
            "flashinfer_decode": build_flashinfer_decode, "flashinfer_cascade": build_flashinfer_cascade}


# ---------------------------------------------------------------- checking and timing

def check_impl(impl: Impl, ref: torch.Tensor, tol: float, dtype: torch.dtype) -> dict:
    """Runs once on poisoned output: ``out`` filled with NaN, or (library-allocated output) a
    NaN-filled block freed to the caching allocator first. Wrong: any NaN left or error > ``tol``."""
    if impl.out is not None:
        impl.out.fill_(float("nan"))
    else:
        del_me = torch.full(ref.shape, float("nan"), dtype=dtype, device=ref.device)
        del del_me
    out = (impl.check_run or impl.run)()
    sync(ref.device)
    unwritten, err = int(torch.isnan(out).sum()), rel_l2(out, ref)
    ok = unwritten == 0 and err <= tol
    return {"status": "ok" if ok else "wrong", "rel_err": err if math.isfinite(err) else None,
            "unwritten": unwritten}


def time_us(fn: Callable, rep_ms: float = 20.0) -> float:
    """Median microseconds per call: ``triton.testing.do_bench_cudagraph`` (see :data:`TIMING_METHOD`)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in B/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_us(lambda: dst.copy_(src)) * 1e-6)


def measure_matmul_rate(device: torch.device, n: int = 8192) -> float:
    """bf16 ``torch.matmul`` of two random ``n x n`` matrices, in FLOP/s (``2 n^3`` per product)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (time_us(lambda: torch.matmul(a, b)) * 1e-6)


def evaluate(name: str, inp: CaseInputs, ref: torch.Tensor, kern, tol: float, timed: bool, replays: int) -> dict:
    """Builds, checks and (when correct and ``timed``) times one implementation; never raises."""
    if name != "ours" and not timed:
        return {"status": "skipped", "note": "baselines run on a GPU only"}
    try:
        impl = BUILDERS[name](inp, kern)
        res = {**check_impl(impl, ref, tol, inp.q.dtype), **(impl.extra or {})}
        if res["status"] == "ok" and timed:
            res["us"] = time_us(impl.run, rep_ms)
        elif res["status"] == "wrong":
            res["note"] = f"not timed: rel err {res['rel_err']}, {res['unwritten']} unwritten > tol {tol}"
        return res
    except Skipped as e:
        return {"status": "skipped", "note": str(e)}
    except Exception as e:  # a missing library or a failing baseline is recorded, not fatal
        traceback.print_exc(file=sys.stderr)
        return {"status": "error", "note": f"{type(e).__name__}: {e}"[:400]}


def run_case(case: Case, kern, device: torch.device, rates: tuple[float, float], timed: bool, replays: int,
             seed: int) -> dict:
    """Results of every implementation on one case (see :func:`render_table` for the row format)."""
    inp = make_inputs(case, device, seed)
    ref = reference_attention(inp)
    row = {"case": case.name, **asdict(case), "floor_us": floor_us(case, *rates), "min_bytes": min_bytes(case),
           "flops": attn_flops(case), "impls": {}}
    if case.batch_size <= 32:  # cross-check the batched reference with the per-request oracle
        oracle, _ = kern.reference.packed_cascade_attention_ref(*inp.cascade_args())
        row["ref_vs_oracle"] = rel_l2(ref, oracle)
    for name in IMPLS:
        row["impls"][name] = evaluate(name, inp, ref, kern, TOLERANCE[case.dtype], timed, replays)
    del inp, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- environment and output

def import_kernels():
    """``packinfer_sglang.kernels`` (with ``.reference``), installed or straight from ``kernels/``."""
    try:
        importlib.import_module("packinfer_sglang.kernels")
    except ImportError:
        if "packinfer_sglang" not in sys.modules:
            sys.modules["packinfer_sglang"] = types.ModuleType("packinfer_sglang")
            sys.modules["packinfer_sglang"].__path__ = []
        spec = importlib.util.spec_from_file_location("packinfer_sglang.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    importlib.import_module("packinfer_sglang.kernels.reference")
    return sys.modules["packinfer_sglang.kernels"]


def environment(device: torch.device) -> dict:
    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cuda = device.type == "cuda"
    return {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)",
            "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if cuda else None,
            "torch": torch.__version__, "triton": version("triton"), "sglang": version("sglang"),
            "flashinfer": version("flashinfer-python"), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "timing": TIMING_METHOD if cuda else "not timed", "l2": L2_STATE, "tolerance": TOLERANCE}


def report_header(meta: dict) -> str:
    return "\n".join([
        f"GPU {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, sglang {meta['sglang']}, "
        f"flashinfer {meta['flashinfer']}; {meta['date']}",
        f"copy bandwidth {meta['bandwidth'] / 1e12:.2f} TB/s (read + written), bf16 matmul "
        f"{meta['matmul_rate'] / 1e12:.0f} TFLOP/s ({meta['rates_source']})",
        f"timing: {meta['timing']}; L2 {meta['l2']}; checked vs fp32 reference, rel L2 tol {meta['tolerance']}",
        "floor = max(bytes_min / bandwidth, flops / matmul_rate); speedup = baseline µs / ours µs",
    ])


def progress_line(i: int, n: int, row: dict) -> str:
    parts = []
    for name, res in row["impls"].items():
        detail = f" (err {res['rel_err']:.1e})" if res.get("rel_err") is not None else ""
        detail += f" [{res['note']}]" if res["status"] != "ok" and res.get("note") else ""
        parts.append(f"{name} {cell(res)}{detail}")
    plan = row["impls"]["ours"].get("plan_us")
    plan = f" plan {plan:.0f} µs |" if plan is not None else ""
    return f"[{i + 1}/{n}] {row['case']}: floor {row['floor_us']:.1f} µs |{plan} " + " | ".join(parts)


def write_plot(path: Path, meta: dict, rows: list[dict]) -> None:
    """Grouped bars per case (floor and every implementation), log-scale microseconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, width = ("floor", *IMPLS), 0.8 / (len(IMPLS) + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows)), 4.5))
    for i, name in enumerate(series):
        ys = [r["floor_us"] if name == "floor" else (_us(r["impls"][name]) or math.nan) for r in rows]
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))], ys, width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("µs per layer (CUDA-graph replay median)")
    ax.set_xticks(range(len(rows)), [r["case"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_title(f"Decode attention, one layer: {meta['gpu']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(path: Path, meta: dict, rows: list[dict], table: str) -> None:
    """JSON to ``path``; Markdown (``.md``) and plot (``.png``) alongside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    path.with_suffix(".md").write_text(f"# Decode attention, one layer\n\n{report_header(meta)}\n\n{table}\n")
    try:
        write_plot(path.with_suffix(".png"), meta, rows)
    except Exception as e:  # matplotlib missing on the GPU host is not worth a failed run
        print(f"plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"wrote {path} (+ .md, .png)", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="the six ANCHORS.md cases only (the default)")
    grid.add_argument("--full", action="store_true", help="add grouped, no-sharing, Qwen2.5-7B and MHA cases")
    grid.add_argument("--tiny", action="store_true", help="small odd cases (for --device cpu or a smoke test)")
    p.add_argument("--cases", help="comma-separated substrings of case names to keep, e.g. B64_,G8")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: correctness of ours only, under TRITON_INTERPRET=1; needs --tiny")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/kernel_<gpu>.json; "
                   "no files on cpu unless given)")
    p.add_argument("--replays", type=int, default=30, help="graph replays per timing (median taken)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        if not args.tiny:
            sys.exit("--device cpu runs in the Triton interpreter: use it with --tiny")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny for a correctness run")
    cases = filter_cases(case_grid("tiny" if args.tiny else "full" if args.full else "quick"), args.cases)
    if not cases:
        sys.exit(f"no case matches --cases {args.cases!r}")
    kern = import_kernels()
    torch.set_float32_matmul_precision("highest")  # an fp32 reference, no TF32
    timed, meta = device.type == "cuda", environment(device)
    if timed:
        meta.update(bandwidth=measure_copy_bandwidth(device), matmul_rate=measure_matmul_rate(device),
                    rates_source="measured in this run")
    else:
        meta.update(bandwidth=ANCHOR_RATES[0], matmul_rate=ANCHOR_RATES[1], rates_source="ANCHORS.md's H200, not measured")
    print(f"{meta['gpu']}: copy {meta['bandwidth'] / 1e12:.2f} TB/s, matmul {meta['matmul_rate'] / 1e12:.0f} TFLOP/s",
          flush=True)
    rows = []
    for i, case in enumerate(cases):
        rows.append(run_case(case, kern, device, (meta["bandwidth"], meta["matmul_rate"]), timed, args.replays,
                             args.seed))
        print(progress_line(i, len(cases), rows[-1]), flush=True)
    table = render_table(rows)
    if timed or args.out:
        slug = "".join(ch if ch.isalnum() else "_" for ch in meta["gpu"].lower()).strip("_")
        write_outputs(args.out or ROOT / "benchmarks" / "results" / f"kernel_{slug}.json", meta, rows, table)
    print(f"\n{report_header(meta)}\n\n{table}")
    return 0 if all(r["impls"]["ours"]["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
