"""Cases of the kernel benchmark: explicit batches, the grids, the floor, inputs on a device.

A :class:`Case` is a decode batch written out in full: per-group request counts (``group_sizes``),
per-group shared-prefix lengths (``prefix_lens``, KV tokens) and per-request suffix lengths
(``suffix_lens``), one query token per request. :func:`make_case` generates them deterministically
from a few named parameters, so every implementation gets the same inputs:

- ``structure``: ``one`` group; ``equal``: ``num_groups`` groups of ``B / G`` requests; ``zipf``:
  ``num_groups`` groups of Zipf(``zipf_a``)-distributed sizes (seeded, each at least 1); ``none``: no
  sharing (every request its own prefix-less group: flat decode; ``P`` must be 0).
- ``hetero``: per-group prefix lengths uniform in ``[P/2, 3P/2]`` and per-request suffix lengths
  uniform in ``[S/4, 7S/4]`` (seeded; ``P`` and ``S`` are then the means), else all equal.
- ``heads`` (:data:`HEADS`), ``dtype`` (bf16/fp16), ``layout``: KV at ``scattered`` pool slots (a
  random permutation) or ``contiguous`` ones (each prefix, then each suffix, in order).

Names read ``B{B}_P{P}_S{S}`` then ``G{G}`` / ``zipf{G}``, ``het``, the heads, dtype and layout
where not the defaults (``P0``: no sharing); ``--cases`` filters on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

HEADS = {  # name -> (num_qo_heads, num_kv_heads, head_dim); the h* shapes are small ones for the CPU
    "llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "llama3-70b-tp8": (8, 1, 128),
    "mha-32": (32, 32, 128), "h4-2-64": (4, 2, 64), "h4-1-64": (4, 1, 64), "h2-2-64": (2, 2, 64),
    "h6-2-64": (6, 2, 64),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STRUCTURES = ("one", "equal", "zipf", "none")
LAYOUTS = ("scattered", "contiguous")
ANCHOR_SHAPES = ((64, 4096, 256), (16, 2048, 512), (128, 1024, 128), (32, 8192, 1024), (8, 512, 64),
                 (256, 2048, 256))  # (B, P, S) of ANCHORS.md: Llama-3-8B heads, one group
ANCHOR_RATES = (4.24e12, 687e12)  # ANCHORS.md's H200: copy B/s (read + written), bf16 matmul FLOP/s


@dataclass(frozen=True)
class Case:
    """A decode batch for one layer. ``batch_size``, ``prefix_len``, ``suffix_len``, ``num_groups``,
    ``hetero``, ``zipf_a`` and ``seed`` are the named parameters it was made from (:func:`make_case`);
    the tuples are the batch itself: ``group_sizes`` and ``prefix_lens`` ``[num_groups]`` (requests,
    KV tokens), ``suffix_lens`` ``[batch_size]`` (KV tokens), requests of a group adjacent."""
    name: str
    batch_size: int
    prefix_len: int
    suffix_len: int
    structure: str
    num_groups: int
    group_sizes: tuple[int, ...]
    prefix_lens: tuple[int, ...]
    suffix_lens: tuple[int, ...]
    heads: str = "llama3-8b"
    dtype: str = "bf16"
    layout: str = "scattered"
    hetero: bool = False
    zipf_a: float = 1.2
    seed: int = 0
    num_qo_heads: int = field(init=False)
    num_kv_heads: int = field(init=False)
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.heads not in HEADS or self.dtype not in DTYPES or self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: heads {self.heads!r} not in {list(HEADS)}, dtype {self.dtype!r} "
                             f"not in {list(DTYPES)} or layout {self.layout!r} not in {LAYOUTS}")
        for name, value in zip(("num_qo_heads", "num_kv_heads", "head_dim"), HEADS[self.heads], strict=True):
            object.__setattr__(self, name, value)
        sizes, prefixes, suffixes = self.group_sizes, self.prefix_lens, self.suffix_lens
        if (len(sizes) != self.num_groups or len(prefixes) != self.num_groups or sum(sizes) != self.batch_size
                or len(suffixes) != self.batch_size or min(sizes, default=0) < 1
                or min(prefixes + suffixes, default=0) < 0):
            raise ValueError(f"{self.name}: {self.num_groups} groups of sizes {sizes[:8]}... "
                             f"(sum {sum(sizes)}), "
                             f"{len(prefixes)} prefix and {len(suffixes)} suffix lengths for batch "
                             f"{self.batch_size}: need one per group / request, sizes >= 1, lengths >= 0")
        if min(p + s for p, s in zip(self.request_prefix_lens, suffixes, strict=True)) < 1:
            raise ValueError(f"{self.name}: every request needs a KV token (prefix + suffix >= 1)")

    @property
    def request_prefix_lens(self) -> tuple[int, ...]:
        """``[batch_size]``: the prefix length each request sees (its group's)."""
        return tuple(p for p, n in zip(self.prefix_lens, self.group_sizes, strict=True) for _ in range(n))

    @property
    def shares(self) -> bool:
        """Some group of two or more requests shares a non-empty prefix."""
        return any(n >= 2 and p > 0 for n, p in zip(self.group_sizes, self.prefix_lens, strict=True))


def _zipf_sizes(batch_size: int, num_groups: int, a: float, seed: int) -> list[int]:
    """``num_groups`` sizes summing to ``batch_size``, each >= 1; the other ``B - G`` requests go to
    group ``g`` (0-based) with probability proportional to ``(g + 1) ** -a`` (seeded multinomial)."""
    weights = np.arange(1, num_groups + 1, dtype=np.float64) ** -a
    extra = np.random.default_rng((seed, 0)).multinomial(batch_size - num_groups, weights / weights.sum())
    return (1 + extra).tolist()


def _lengths(mean: int, n: int, lo: int, seed: int, stream: int, hetero: bool) -> list[int]:
    """``n`` lengths: ``mean`` each, or (``hetero``) uniform integers in ``[lo, 2 * mean - lo]``."""
    if not hetero or mean == 0:
        return [mean] * n
    return np.random.default_rng((seed, stream)).integers(lo, 2 * mean - lo, size=n, endpoint=True).tolist()


def case_name(batch_size, prefix_len, suffix_len, structure, num_groups, heads, dtype, layout, hetero,
              seed) -> str:
    """``B{B}_P{P}_S{S}`` plus the non-default parameters (see the module docstring)."""
    parts = [f"B{batch_size}", f"P{prefix_len}", f"S{suffix_len}"]
    parts += {"equal": [f"G{num_groups}"], "zipf": [f"zipf{num_groups}"]}.get(structure, [])
    parts += ["het"] * hetero + [heads] * (heads != "llama3-8b") + [dtype] * (dtype != "bf16")
    parts += ["contig"] * (layout == "contiguous") + [f"seed{seed}"] * (seed != 0)
    return "_".join(parts)


def make_case(batch_size: int, prefix_len: int, suffix_len: int, structure: str = "one", num_groups: int = 1,
              *, hetero: bool = False, heads: str = "llama3-8b", dtype: str = "bf16",
              layout: str = "scattered", zipf_a: float = 1.2, seed: int = 0) -> Case:
    """The :class:`Case` of these named parameters (module docstring); same arguments, same case.

    Raises:
        ValueError: unknown ``structure``; ``num_groups`` not 1 for ``one``, not dividing ``batch_size``
            for ``equal``, above it for ``zipf``; ``prefix_len`` not 0 for ``none`` or 0 for a sharing
            structure; a suffix length below 1; or what :class:`Case` rejects.
    """
    B, P, S, G = batch_size, prefix_len, suffix_len, num_groups
    if structure == "none":
        G = B
    bad = {"one": G != 1, "equal": G < 1 or B % G != 0, "zipf": not 1 <= G <= B, "none": P != 0}
    if structure not in bad or bad[structure] or (structure != "none" and P < 1) or S < 1:
        raise ValueError(f"structure {structure!r} (one of {STRUCTURES}) with B={B}, G={num_groups}, P={P}, "
                         f"S={S}: one needs G=1, equal G | B, zipf 1 <= G <= B, none P=0, sharing P>=1, S>=1")
    sizes = _zipf_sizes(B, G, zipf_a, seed) if structure == "zipf" else [B // G] * G
    prefixes = _lengths(P, G, max(1, P // 2), seed, 1, hetero)
    suffixes = _lengths(S, B, max(1, S // 4), seed, 2, hetero)
    name = case_name(B, P, S, structure, G, heads, dtype, layout, hetero, seed)
    return Case(name, B, P, S, structure, G, tuple(sizes), tuple(prefixes), tuple(suffixes), heads, dtype,
                layout, hetero, zipf_a, seed)


def quick_grid() -> list[Case]:
    """The six ANCHORS.md cases: Llama-3-8B heads, bf16, one group, scattered slots."""
    return [make_case(*shape) for shape in ANCHOR_SHAPES]


def full_grid() -> list[Case]:
    """The quick cases, then sweeps of B, P and S around B64_P4096_S256; group structures (equal,
    Zipf, none, heterogeneous); the other head configurations; fp16; contiguous slots (50 cases)."""
    L = make_case
    cases = quick_grid()
    cases += [L(b, 4096, 256) for b in (8, 16, 32, 128, 256)] + [L(512, 1024, 128)]
    cases += [L(64, p, 256) for p in (256, 1024, 16384)] + [L(64, 4096, s) for s in (32, 1024, 4096)]
    cases += [L(256, 2048, 256, "equal", g) for g in (4, 16, 64)]
    cases += [L(256, 2048, 256, "zipf", 16), L(64, 4096, 256, "zipf", 8)]
    cases += [L(b, 0, s, "none") for b, s in ((16, 8192), (64, 4096), (256, 1024))]
    cases += [L(64, 4096, 256, hetero=True), L(256, 2048, 256, "zipf", 16, hetero=True),
              L(128, 0, 2048, "none", hetero=True)]
    for heads in ("qwen2.5-7b", "llama3-70b-tp8", "mha-32"):
        cases += [L(64, 4096, 256, heads=heads), L(16, 2048, 512, heads=heads),
                  L(256, 2048, 256, "equal", 8, heads=heads), L(64, 0, 4096, "none", heads=heads)]
    cases += [L(64, 4096, 256, dtype="fp16"), L(256, 2048, 256, dtype="fp16"), L(8, 512, 64, dtype="fp16"),
              L(64, 0, 4096, "none", dtype="fp16")]
    contig = {"layout": "contiguous"}
    cases += [L(64, 4096, 256, **contig), L(256, 2048, 256, **contig), L(8, 512, 64, **contig),
              L(64, 0, 4096, "none", **contig), L(256, 2048, 256, "zipf", 16, **contig)]
    return cases


def tiny_grid() -> list[Case]:
    """Small odd cases, one of each structure, for the Triton interpreter (CPU) or a GPU smoke test."""
    return [make_case(5, 37, 17, heads="h4-2-64"),
            make_case(6, 70, 1, "equal", 2, heads="h4-1-64", dtype="fp16"),
            make_case(9, 40, 9, "zipf", 3, heads="h6-2-64", seed=1),
            make_case(3, 0, 33, "none", heads="h2-2-64"),
            make_case(8, 30, 12, "equal", 2, hetero=True, heads="h4-2-64", layout="contiguous"),
            make_case(4, 0, 20, "none", hetero=True, heads="h4-1-64", dtype="fp16")]


GRIDS = {"quick": quick_grid, "full": full_grid, "tiny": tiny_grid}


def filter_cases(cases: list[Case], patterns: str | None) -> list[Case]:
    """Cases whose name contains any of the comma-separated ``patterns`` (all when ``None``)."""
    wanted = [p for p in (patterns or "").split(",") if p]
    return [c for c in cases if not wanted or any(p in c.name for p in wanted)]


def elt_bytes(case: Case) -> int:
    return torch.finfo(DTYPES[case.dtype]).bits // 8


def min_bytes(case: Case) -> int:
    """Least bytes a layer moves: each group's prefix KV once, every suffix once, q read, o written:
    ``2 (K, V) * num_kv_heads * head_dim * elt * (sum_g P_g + sum_t S_t) + 2 * B * num_qo_heads * head_dim
    * elt``."""
    kv_tokens = sum(case.prefix_lens) + sum(case.suffix_lens)
    qo_bytes = 2 * case.batch_size * case.num_qo_heads * case.head_dim * elt_bytes(case)
    return 2 * case.num_kv_heads * case.head_dim * elt_bytes(case) * kv_tokens + qo_bytes


def attn_flops(case: Case) -> int:
    """``4 * num_qo_heads * head_dim * sum_t (P_g(t) + S_t)``: q.k and p.v, a multiply-add each per
    head and KV token of every request."""
    context = sum(case.request_prefix_lens) + sum(case.suffix_lens)
    return 4 * case.num_qo_heads * case.head_dim * context


def floor_from(nbytes: float, flops: float, bandwidth: float, matmul_rate: float) -> float:
    """``max(nbytes / bandwidth, flops / matmul_rate)`` in microseconds (rates in B/s and FLOP/s)."""
    return max(nbytes / bandwidth, flops / matmul_rate) * 1e6


def floor_us(case: Case, bandwidth: float, matmul_rate: float) -> float:
    """:func:`floor_from` of the case's ``bytes_min`` and FLOPs."""
    return floor_from(min_bytes(case), attn_flops(case), bandwidth, matmul_rate)


class CaseInputs(NamedTuple):
    """A case on a device: our two-level layout (``[:8]``), then the baselines' flat lists (request
    ``t``'s KV = its group's prefix slots, then its suffix slots). Index arrays int32, q/K/V in the
    case's dtype; K/V pools ``[num_slots, num_kv_heads, head_dim]`` with ``num_slots`` =
    ``sum(prefix_lens) + sum(suffix_lens)``."""
    q: torch.Tensor  # [batch_size, num_qo_heads, head_dim]
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    group_indptr: torch.Tensor  # [num_groups + 1]
    prefix_kv_indptr: torch.Tensor  # [num_groups + 1]
    prefix_kv_indices: torch.Tensor
    suffix_kv_indptr: torch.Tensor  # [batch_size + 1]
    suffix_kv_indices: torch.Tensor
    kv_indptr: torch.Tensor  # [batch_size + 1]
    kv_indices: torch.Tensor
    sm_scale: float

    def cascade_args(self) -> tuple:
        """Positional arguments of ``packed_cascade_attention`` and of its oracle."""
        return (*self[:8], self.sm_scale)


def _indptr(lens) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lens, dtype=np.int64).tolist()], dtype=torch.int32)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> CaseInputs:
    """Standard-normal q/K/V (``torch.manual_seed(seed)``); slots a seeded random permutation of the pool
    (``scattered``) or in order (``contiguous``: prefixes by group, then suffixes by request)."""
    torch.manual_seed(seed)
    num_prefix, num_suffix = sum(case.prefix_lens), sum(case.suffix_lens)
    num_slots = num_prefix + num_suffix
    gen = torch.Generator().manual_seed(seed)
    scattered = case.layout == "scattered"
    order = torch.randperm(num_slots, generator=gen) if scattered else torch.arange(num_slots)
    slots = order.to(torch.int32)
    prefix_slots, suffix_slots = slots[:num_prefix], slots[num_prefix:]
    prefix_indptr, suffix_indptr = _indptr(case.prefix_lens), _indptr(case.suffix_lens)
    pieces, s_ptr = [], suffix_indptr.tolist()
    for t, g in enumerate(np.repeat(np.arange(case.num_groups), case.group_sizes).tolist()):
        pieces += [prefix_slots[prefix_indptr[g]:prefix_indptr[g + 1]], suffix_slots[s_ptr[t]:s_ptr[t + 1]]]
    flat_lens = [p + s for p, s in zip(case.request_prefix_lens, case.suffix_lens, strict=True)]
    rand = lambda n, h: torch.randn(n, h, case.head_dim, device=device).to(DTYPES[case.dtype])
    dev = lambda t: t.to(device)
    return CaseInputs(rand(case.batch_size, case.num_qo_heads), rand(num_slots, case.num_kv_heads),
                      rand(num_slots, case.num_kv_heads), dev(_indptr(case.group_sizes)), dev(prefix_indptr),
                      dev(prefix_slots), dev(suffix_indptr), dev(suffix_slots), dev(_indptr(flat_lens)),
                      dev(torch.cat(pieces)), case.head_dim ** -0.5)


COST_S = {  # estimate of a GPU run (H100), seconds; calibrate from a run's "wall_s" and "setup_s"
    "startup": 25.0,  # imports (SGLang, FlashInfer) and the two rate measurements
    "case": 0.3, "per_request": 1.5e-3,  # inputs, the fp32 oracle, our host-plan timing
    "timing": 0.15,  # a do_bench_cudagraph call besides its 11 x rep_ms of work (capture, warmup)
    "jit_triton": 10.0,  # per Triton implementation and new (heads, dtype): its kernels' specializations
}
# per FlashInfer JIT module and dtype on a fresh host, from the H200 full run's setup_s (decode 26-32 s,
# the cascade's prefill 65-95 s); BatchAttention assumed like a prefill module
JIT_FLASHINFER_S = {"decode": 30.0, "prefill_auto": 80.0, "prefill_fa2": 80.0, "batch_attention": 80.0}


# FlashInfer's JIT modules each baseline compiles (shared ones compile once)
FLASHINFER_MODULES = {"flashinfer_decode": {"decode"}, "flashinfer_cascade": {"prefill_auto"},
                      "flashinfer_cascade_fa2": {"prefill_fa2"}, "flashinfer_prefix_prefill": {"prefill_fa2", "decode"},
                      "flashinfer_batch_attention": {"batch_attention"}}


def estimate_seconds(cases: list[Case], rep_ms: float, impls: tuple[str, ...]) -> tuple[float, float]:
    """``(total, jit)`` seconds a timed GPU run of ``cases`` should take by :data:`COST_S`, counting
    one timing per implementation and case plus FA2 varlen's gather, and each JIT module once."""
    timings = len(impls) + ("fa2_varlen" in impls)
    per_timing = COST_S["timing"] + 11 * rep_ms / 1e3
    run = sum(COST_S["case"] + COST_S["per_request"] * c.batch_size + timings * per_timing for c in cases)
    num_triton = sum(name in ("ours", "sglang_triton") for name in impls)
    modules = set().union(*(FLASHINFER_MODULES.get(name, set()) for name in impls))
    jit = (num_triton * COST_S["jit_triton"] * len({(c.heads, c.dtype) for c in cases})
           + sum(JIT_FLASHINFER_S[m] for m in modules) * len({c.dtype for c in cases}))
    return COST_S["startup"] + run + jit, jit
