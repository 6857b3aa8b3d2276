"""Packed cascade attention for decode (PackInfer, Sec. 4).

Requests sharing a prefix form a group. For request ``t`` of group ``g`` with query ``q_t``:

    attn(q_t, cat(P_g, S_t)) = merge(attn(q_t, P_g), attn(q_t, S_t))

where ``merge`` is the log-sum-exp combination of :mod:`.merge`. The prefix term is computed for
all requests of a group at once: the group's queries times the GQA ratio form the ``BLOCK_M`` rows
of one tile, so each prefix KV block is loaded once per tile and multiplied on tensor cores
(``tl.dot``) instead of being re-read by every request. Suffix terms run one request per tile.
Both run in one launch of ``_packed_attn_partial_kernel`` over the work items of :mod:`.plan`
(prefix items first). An item whose request has no other item in the plan writes that request's
output rows directly; the others write float32 partial states, which a merge kernel combines
(skipping the rows already written).

Row ``r`` of a tile is request ``qo_start + r // GQA`` and query head ``kv_head * GQA + r % GQA``.
Scores are carried in base 2 (``qk * sm_scale * log2(e)``); the partial ``lse`` is stored in natural
log.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .checks import check_cascade_inputs
from .merge import MERGE_BLOCK_P, merge_partials
from .plan import plan_work
from .plan_tensors import (  # noqa: F401 -- re-exported: the plan types belong to this kernel's API
    PREFIX_BLOCK_M,
    PackedCascadePlan,
    StaticPlanBuffers,
    copy_host_into,
    host_to_device,
    make_plan,
    suffix_block_m_for,
)

BLOCK_N = 64
NUM_STAGES = 3  # software-pipelined KV loads; 2 ran 25-30% slower on H100 (benchmarks/NOTES.md)
# Plain-decode launches (suffix-height tiles, plans without prefix items): (BLOCK_N, num_stages) by
# GPU name. On the H200, 128-token blocks in 2 stages ran 2-13% faster than 64 in 3 on five plain
# cases, flat and persistent, in one run (benchmarks/results/ab_tiles_plain_h200.json); not
# measured on other GPUs, which keep the prefix launch's.
PLAIN_LAUNCH_BY_GPU = {"H200": (128, 2)}


@functools.cache
def plain_launch(device: torch.device) -> tuple[int, int]:
    """``(block_n, num_stages)`` of plain-decode launches on ``device`` (:data:`PLAIN_LAUNCH_BY_GPU`;
    ``(BLOCK_N, NUM_STAGES)`` for other GPUs and off CUDA)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, launch in PLAIN_LAUNCH_BY_GPU.items():
            if key in name:
                return launch
    return BLOCK_N, NUM_STAGES


def launch_config(device: torch.device, plain: bool) -> tuple[int, int]:
    """``(block_n, num_stages)`` of a launch on ``device``: :func:`plain_launch`'s for the plain-decode
    launch (plans without prefix items), else :data:`BLOCK_N`, :data:`NUM_STAGES`. Chunk lengths of
    a plan align to the ``block_n`` of the launch that runs it."""
    return plain_launch(device) if plain else (BLOCK_N, NUM_STAGES)


@triton.jit
def _block_slots(KV_Indices, kv_start, kv_base, start_n, BLOCK_N: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """Pool slots (int64) of the whole block at positions ``start_n + [0, BLOCK_N)`` of a chunk: ``kv_base
    + offset`` when ``CONTIGUOUS``, else from the index list ``KV_Indices[kv_start:]``."""
    offs_n = tl.arange(0, BLOCK_N)
    if CONTIGUOUS:
        return kv_base.to(tl.int64) + start_n + offs_n
    else:
        return tl.load(KV_Indices + kv_start + start_n + offs_n).to(tl.int64)


@triton.jit
def _load_rows(Buffer, slots, kv_head, stride_t, stride_h, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """K or V rows of ``kv_head`` at ``slots`` (head dimensions past ``HEAD_DIM`` read as 0)."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = Buffer + slots[:, None] * stride_t + kv_head * stride_h + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _attend_block(
    q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_base, start_n, kv_head, sm_scale_log2, m_i, l_i, acc,
    stride_kt, stride_kh, stride_vt, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    TAIL: tl.constexpr, CONTIGUOUS: tl.constexpr,
):
    """One online-softmax step of a tile over KV positions ``start_n + [0, BLOCK_N)`` of its chunk;
    returns the updated ``(m_i, l_i, acc)`` (``m_i`` in base 2). ``TAIL``: the last, partial block
    (positions past ``kv_len`` masked); whole blocks load unmasked (``BLOCK_D == HEAD_DIM``).
    ``CONTIGUOUS``: the chunk is slots ``kv_base + [0, kv_len)``, addressed without loading slot ids;
    else its slots are ``KV_Indices[kv_start:][:kv_len]``."""
    if TAIL:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = start_n + offs_n < kv_len
        if CONTIGUOUS:
            slots = kv_base.to(tl.int64) + start_n + offs_n
        else:
            slots = tl.load(KV_Indices + kv_start + start_n + offs_n, mask=mask_n, other=0).to(tl.int64)
        mask_kv = mask_n[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(K_Buffer + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=mask_kv, other=0.0)
        v = tl.load(V_Buffer + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=mask_kv, other=0.0)
    else:
        slots = _block_slots(KV_Indices, kv_start, kv_base, start_n, BLOCK_N, CONTIGUOUS)
        k = _load_rows(K_Buffer, slots, kv_head, stride_kt, stride_kh, HEAD_DIM, BLOCK_D)
        v = _load_rows(V_Buffer, slots, kv_head, stride_vt, stride_vh, HEAD_DIM, BLOCK_D)
    qk = _scores(q, k, sm_scale_log2, DOT_FP32)
    if TAIL:
        qk = tl.where(mask_n[None, :], qk, -float("inf"))
    return _softmax_pv(qk, v, m_i, l_i, acc, DOT_FP32)


@triton.jit
def _scores(q, k, sm_scale_log2, DOT_FP32: tl.constexpr):
    """``q k^T`` scaled to base 2 (``DOT_FP32``: in float32, as Triton 3.6's CPU interpreter
    multiplies bf16 wrongly)."""
    if DOT_FP32:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * sm_scale_log2
    else:
        return tl.dot(q, tl.trans(k)) * sm_scale_log2


@triton.jit
def _softmax_pv(qk, v, m_i, l_i, acc, DOT_FP32: tl.constexpr):
    """The online-softmax update of ``(m_i, l_i, acc)`` by one block's base-2 scores and values."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_FP32:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_kv(
    q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_base, kv_head, sm_scale_log2,
    stride_kt, stride_kh, stride_vt, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, CONTIGUOUS: tl.constexpr, PREFETCH_SLOTS: tl.constexpr = False,
):
    """Online softmax of a tile's rows ``q`` over one KV chunk: whole blocks, then the partial last
    one; returns ``(m_i, l_i, acc)`` (``m_i`` in base 2, ``acc`` unnormalized). ``PREFETCH_SLOTS`` (the
    default of :func:`run_packed_cascade`, index-list chunks): the next block's slot ids are loaded
    into registers one iteration ahead. Triton 3.6 then pipelines the K/V copies 3 deep on sm_90
    (``async_wait num = 2``); through its own shared-memory copy of the slot ids it waits for every
    copy at each block (``num = 0``)."""
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_full = kv_len // BLOCK_N * BLOCK_N
    if PREFETCH_SLOTS and not CONTIGUOUS and BLOCK_D == HEAD_DIM:
        offs_n = tl.arange(0, BLOCK_N)
        slots_next = tl.load(KV_Indices + kv_start + offs_n, mask=offs_n < kv_full, other=0)
        for start_n in range(0, kv_full, BLOCK_N):
            slots = slots_next.to(tl.int64)
            nxt = start_n + BLOCK_N + offs_n
            slots_next = tl.load(KV_Indices + kv_start + nxt, mask=nxt < kv_full, other=0)
            k = _load_rows(K_Buffer, slots, kv_head, stride_kt, stride_kh, HEAD_DIM, BLOCK_D)
            v = _load_rows(V_Buffer, slots, kv_head, stride_vt, stride_vh, HEAD_DIM, BLOCK_D)
            qk = _scores(q, k, sm_scale_log2, DOT_FP32)
            m_i, l_i, acc = _softmax_pv(qk, v, m_i, l_i, acc, DOT_FP32)
    else:
        for start_n in range(0, kv_full, BLOCK_N):  # whole blocks: no masks, so the loads pipeline freely
            m_i, l_i, acc = _attend_block(q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_base, start_n,
                                          kv_head, sm_scale_log2, m_i, l_i, acc, stride_kt, stride_kh, stride_vt,
                                          stride_vh, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32, False, CONTIGUOUS)
    if kv_full < kv_len:
        m_i, l_i, acc = _attend_block(q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_base, kv_full,
                                      kv_head, sm_scale_log2, m_i, l_i, acc, stride_kt, stride_kh, stride_vt,
                                      stride_vh, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32, True, CONTIGUOUS)
    return m_i, l_i, acc


@triton.jit
def _attend_item(
    Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
    item, kv_head, sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pr, stride_ph, stride_lr, stride_ot, stride_oh, stride_lt,
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, STORE_LSE: tl.constexpr,
    HAS_KV_BASE: tl.constexpr, PREFETCH_SLOTS: tl.constexpr = False,
):
    """One work item (a tile of query rows against one KV chunk) for one KV head. Rows of a
    request with one partial in the plan are final: written to ``Out`` (and ``LSE_Out``) here.
    ``HAS_KV_BASE``: ``KV_Base[item]`` (a slot, or -1) selects the contiguous fast path."""
    qo_start = tl.load(Items + item * 5 + 0)
    qo_len = tl.load(Items + item * 5 + 1)
    kv_start = tl.load(Items + item * 5 + 2)
    kv_len = tl.load(Items + item * 5 + 3)
    slot = tl.load(Items + item * 5 + 4)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < qo_len * GQA
    mask_d = offs_d < HEAD_DIM
    tok = qo_start + offs_m // GQA
    head = kv_head * GQA + offs_m % GQA
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    if HAS_KV_BASE:
        kv_base = tl.load(KV_Base + item)
        if kv_base >= 0:  # one run of consecutive slots (a compacted prefix, a placed suffix)
            m_i, l_i, acc = _attend_kv(q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_base, kv_head,
                                       sm_scale_log2, stride_kt, stride_kh, stride_vt, stride_vh,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_FP32, True, PREFETCH_SLOTS)
        else:
            m_i, l_i, acc = _attend_kv(q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_base, kv_head,
                                       sm_scale_log2, stride_kt, stride_kh, stride_vt, stride_vh,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_FP32, False, PREFETCH_SLOTS)
    else:
        m_i, l_i, acc = _attend_kv(q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_start, kv_head,
                                   sm_scale_log2, stride_kt, stride_kh, stride_vt, stride_vh,
                                   HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_FP32, False, PREFETCH_SLOTS)

    first = tl.load(Merge_Indptr + tok, mask=mask_m, other=0)
    final = mask_m & (tl.load(Merge_Indptr + tok + 1, mask=mask_m, other=0) - first == 1)
    split = mask_m & ~final
    o = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(Out.dtype.element_ty), mask=final[:, None] & mask_d[None, :])
    if STORE_LSE:
        tl.store(LSE_Out + tok * stride_lt + head, lse, mask=final)
    row = first + slot
    tl.store(O_Partial + row[:, None] * stride_pr + head[:, None] * stride_ph + offs_d[None, :], o,
             mask=split[:, None] & mask_d[None, :])
    tl.store(LSE_Partial + row * stride_lr + head, lse, mask=split)


@triton.jit
def _role_items(Counts, num_prefix_items, ROLE: tl.constexpr):
    """Items the launch of ``ROLE`` runs (kernel docstring): all of ``Counts[0]`` for 0; for 1 only
    a plan with prefix items, for 2 only one without, else none."""
    num_items = tl.load(Counts)
    if ROLE == 1:
        num_items = tl.where(num_prefix_items > 0, num_items, 0)
    elif ROLE == 2:
        num_items = tl.where(num_prefix_items == 0, num_items, 0)
    return num_items


@triton.jit
def _packed_attn_partial_kernel(
    Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Counts, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
    sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pr, stride_ph, stride_lr, stride_ot, stride_oh, stride_lt,
    GQA: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PREFIX_BLOCK_M: tl.constexpr, SUFFIX_BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PERSISTENT: tl.constexpr, STORE_LSE: tl.constexpr, ROLE: tl.constexpr,
    HAS_KV_BASE: tl.constexpr, GATHER_PREFETCH: tl.constexpr, GUARD_UNITS: tl.constexpr,
):
    """Prefix items (``PREFIX_BLOCK_M`` rows: a group's requests x GQA) then suffix items
    (``SUFFIX_BLOCK_M`` rows: one request x GQA), all in one launch. ``Counts`` holds
    ``(num_items, num_prefix_items)`` in device memory. Without ``PERSISTENT`` program ``w`` runs
    item ``w // NUM_KV_HEADS`` for KV head ``w % NUM_KV_HEADS`` (straight-line code): the heads of an
    item are adjacent, so blocks are issued in the plan's item order (longest first) across all
    heads. ``GUARD_UNITS`` (CUDA graphs' default launch): the flat grid is fixed at the graph's
    capacity, and programs past the plan's ``num_items * NUM_KV_HEADS`` units exit at once.
    ``PERSISTENT``: a fixed grid ``(num_programs, NUM_KV_HEADS)`` (CUDA graphs) replays any
    plan, program ``(p, h)`` running items ``p, p + num_programs, ...`` of head ``h`` (striding over
    all heads' units instead was up to 7% slower on heterogeneous plain decode, H100). ``ROLE``
    (graphs: persistent or ``GUARD_UNITS``): 0 runs every plan; a graph captures a pair, 1 (compiled
    with 64-row prefix tiles) running plans with prefix items and 2 (compiled with suffix-height
    tiles: fewer registers, more resident programs) running plans without, the other one of the
    pair finding nothing to do."""
    num_prefix_items = tl.load(Counts + 1)
    if PERSISTENT:
        num_items = _role_items(Counts, num_prefix_items, ROLE)
        for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
            _attend_any(Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out,
                        LSE_Out, item, num_prefix_items, tl.program_id(1), sm_scale_log2, stride_qt, stride_qh,
                        stride_kt, stride_kh, stride_vt, stride_vh, stride_pr, stride_ph, stride_lr, stride_ot, stride_oh,
                        stride_lt, GQA, HEAD_DIM, BLOCK_D, PREFIX_BLOCK_M, SUFFIX_BLOCK_M, BLOCK_N, DOT_FP32,
                        STORE_LSE, HAS_KV_BASE, GATHER_PREFETCH)
    else:
        unit = tl.program_id(0)
        live = True
        if GUARD_UNITS:  # a flat grid fixed at a CUDA graph's capacity: programs past the plan's units exit
            live = unit < _role_items(Counts, num_prefix_items, ROLE) * NUM_KV_HEADS
        if live:
            _attend_any(Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
                        unit // NUM_KV_HEADS, num_prefix_items, unit % NUM_KV_HEADS, sm_scale_log2, stride_qt, stride_qh,
                        stride_kt, stride_kh, stride_vt, stride_vh, stride_pr, stride_ph, stride_lr, stride_ot,
                        stride_oh, stride_lt, GQA, HEAD_DIM, BLOCK_D, PREFIX_BLOCK_M, SUFFIX_BLOCK_M, BLOCK_N,
                        DOT_FP32, STORE_LSE, HAS_KV_BASE, GATHER_PREFETCH)


@triton.jit
def _attend_any(
    Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
    item, num_prefix_items, kv_head, sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pr, stride_ph, stride_lr, stride_ot, stride_oh, stride_lt,
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PREFIX_BLOCK_M: tl.constexpr, SUFFIX_BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, STORE_LSE: tl.constexpr, HAS_KV_BASE: tl.constexpr, GATHER_PREFETCH: tl.constexpr,
):
    """A prefix item (``item < num_prefix_items``) or a suffix item, each with its tile height
    (``GATHER_PREFETCH``: both with :func:`_attend_kv`'s ``PREFETCH_SLOTS``)."""
    if item < num_prefix_items:
        _attend_item(Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
                     item, kv_head, sm_scale_log2, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_pr, stride_ph, stride_lr, stride_ot, stride_oh, stride_lt,
                     GQA, HEAD_DIM, BLOCK_D, PREFIX_BLOCK_M, BLOCK_N, DOT_FP32, STORE_LSE, HAS_KV_BASE, GATHER_PREFETCH)
    else:
        _attend_item(Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
                     item, kv_head, sm_scale_log2, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_pr, stride_ph, stride_lr, stride_ot, stride_oh, stride_lt,
                     GQA, HEAD_DIM, BLOCK_D, SUFFIX_BLOCK_M, BLOCK_N, DOT_FP32, STORE_LSE, HAS_KV_BASE,
                     GATHER_PREFETCH)


def num_sms_of(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (4 elsewhere, e.g. under ``TRITON_INTERPRET=1``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def persistent_programs(num_sms: int, waves: int, num_kv_heads: int) -> int:
    """Programs per KV head of a persistent launch (its grid is ``(programs, num_kv_heads)``):
    ``num_sms * waves`` resident programs shared by the heads, at least 1."""
    return max(1, num_sms * waves // num_kv_heads)


def default_num_warps(prefix_block_m: int, head_dim: int) -> int:
    """Warps of the partial kernel: 4 for prefix tiles up to 64 x 128, else 8."""
    return 4 if prefix_block_m * head_dim <= 64 * 128 else 8


@functools.cache
def kernel_occupancy(
    device: torch.device, dtype: torch.dtype, head_dim: int, gqa_group_size: int, *,
    prefix_block_m: int = PREFIX_BLOCK_M, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, persistent: bool = False, has_kv_base: bool = False, plain: bool = False,
    maxnreg: int | None = None, gather_prefetch: bool = True,
) -> int:
    """Programs of the partial kernel resident at once on one multiprocessor (registers, shared
    memory, threads), from the compiled kernel for this configuration (compiled here if needed);
    2 off CUDA. The planner balances items over ``num_sms * occupancy`` program slots. ``plain``:
    the plain-decode launch (suffix-height tiles and :func:`plain_launch`'s defaults)."""
    if device.type != "cuda":
        return 2
    if plain:
        prefix_block_m = suffix_block_m_for(gqa_group_size)
    default_n, default_stages = launch_config(device, plain)
    block_n, num_stages = block_n or default_n, num_stages or default_stages
    num_warps = num_warps or default_num_warps(prefix_block_m, head_dim)
    q = torch.zeros(16, gqa_group_size, head_dim, dtype=dtype, device=device)
    kv = torch.zeros(16, 1, head_dim, dtype=dtype, device=device)
    i32 = torch.zeros(16, dtype=torch.int32, device=device)
    f32 = torch.zeros(16, gqa_group_size, head_dim, dtype=torch.float32, device=device)
    compiled = _packed_attn_partial_kernel.warmup(
        q, kv, kv, i32, i32, i32, i32, i32, f32, f32[:, :, 0], q, f32[:, :, 0], 1.0, q.stride(0), q.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(0), kv.stride(1), f32.stride(0), f32.stride(1), gqa_group_size,
        q.stride(0), q.stride(1), gqa_group_size,
        GQA=gqa_group_size, NUM_KV_HEADS=1, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        PREFIX_BLOCK_M=prefix_block_m, SUFFIX_BLOCK_M=suffix_block_m_for(gqa_group_size), BLOCK_N=block_n,
        DOT_FP32=False, PERSISTENT=persistent, STORE_LSE=False, ROLE=0, HAS_KV_BASE=has_kv_base,
        GATHER_PREFETCH=gather_prefetch, GUARD_UNITS=False,
        num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
        grid=(1, 1) if persistent else (1,),
    )
    compiled._init_handles()
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256
    by_regs = props["max_num_regs"] // (regs_per_warp * num_warps)
    by_smem = (props["max_shared_mem"] + 1024) // (compiled.metadata.shared + 1024)
    by_threads = 2048 // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, 32))


def plan_packed_cascade(
    group_indptr: torch.Tensor,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    num_qo_heads: int,
    num_kv_heads: int,
    *,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    prefix_block_m: int = PREFIX_BLOCK_M,
    kv_base: bool = False,
    **plan_kwargs,
) -> PackedCascadePlan:
    """Plans one decode step (host work; copies the indptr arrays to the host if they are on a GPU,
    which synchronizes). ``plan_kwargs`` go to :func:`.plan.plan_work`; its ``waves`` defaults to
    :func:`kernel_occupancy` of the default launch when ``head_dim`` and ``dtype`` (of the KV) are
    given, else 2. ``kv_base``: also compute the items' base slots (contiguous fast path)."""
    gqa = num_qo_heads // num_kv_heads
    device = prefix_kv_indices.device
    plan_kwargs.setdefault("num_sms", num_sms_of(device))
    group_host, prefix_host, suffix_host = (a.cpu().numpy() for a in (group_indptr, prefix_kv_indptr, suffix_kv_indptr))
    plain = int(prefix_host[-1]) == 0  # launched with the plain-decode tiles
    if "waves" not in plan_kwargs and head_dim is not None and dtype is not None:
        plan_kwargs["waves"] = kernel_occupancy(device, dtype, head_dim, gqa, prefix_block_m=prefix_block_m,
                                                has_kv_base=kv_base, plain=plain)
    plan_kwargs.setdefault("kv_align", launch_config(device, plain)[0])
    work = plan_work(group_host, prefix_host, suffix_host, gqa_group_size=gqa, num_kv_heads=num_kv_heads,
                     prefix_block_m=prefix_block_m, **plan_kwargs)
    kv_indices = torch.cat([prefix_kv_indices[: int(prefix_host[-1])],
                            suffix_kv_indices[: int(suffix_host[-1])]]).to(torch.int32)
    return make_plan(work, kv_indices, gqa, prefix_block_m, kv_base=kv_base)


def run_packed_cascade(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: PackedCascadePlan,
    sm_scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    merge_block_p: int = MERGE_BLOCK_P,
    maxnreg: int | None = None,
    gather_prefetch: bool = True,
) -> None:
    """Runs a planned step for one layer, writing ``out`` (and ``lse``) in place. Inputs unchecked:
    :func:`packed_cascade_attention` validates them. Rows of ``out`` past the plan's requests (padding
    of a CUDA-graph batch) are written with zeros. Allocates no host memory and never synchronizes,
    so it can be captured in a CUDA graph. ``block_n`` (KV tokens per inner step; default
    :data:`BLOCK_N`, and :func:`plain_launch`'s for the plain-decode launch), ``num_warps`` (default:
    4 for tiles up to 64 x 128, else 8), ``num_stages`` (default as ``block_n``) and
    ``merge_block_p`` (partials a merge program loads at once) are launch tuning only.
    ``gather_prefetch`` (on): index-list chunks load the next block's slot ids into registers a
    block ahead, so the K/V copies pipeline ``num_stages`` deep (H200, ``ab_prefix_gp_h200.json``:
    flat 6-17% faster on 13 of 14 prefix cases; persistent 7-13% faster on the large ones, 7-12%
    slower on the smallest). Plans launch per their fields: eager (one program per item and head),
    a static plan's fixed flat grid (``grid_items``, the CUDA graphs' default) or its persistent
    grid (``num_programs``)."""
    _, num_qo_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    gqa = num_qo_heads // num_kv_heads
    o_partial = torch.empty(plan.num_partials, num_qo_heads, head_dim, dtype=torch.float32, device=q.device)
    lse_partial = torch.empty(plan.num_partials, num_qo_heads, dtype=torch.float32, device=q.device)
    lse_arg = lse if lse is not None else lse_partial
    kv_base = plan.kv_indices if plan.kv_base is None else plan.kv_base
    args = (q, k_buffer, v_buffer, plan.kv_indices, kv_base, plan.items, plan.counts, plan.merge_indptr,
            o_partial, lse_partial, out, lse_arg, sm_scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
            v_buffer.stride(0), v_buffer.stride(1), o_partial.stride(0), o_partial.stride(1),
            lse_partial.stride(0), out.stride(0), out.stride(1), lse_arg.stride(0))

    def launch(grid: int, prefix_block_m: int, persistent: bool, role: int, plain: bool, guard: bool = False):
        default_n, default_stages = launch_config(q.device, plain)
        _packed_attn_partial_kernel[(grid, num_kv_heads) if persistent else (grid * num_kv_heads,)](
            *args, GQA=gqa, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            PREFIX_BLOCK_M=prefix_block_m, SUFFIX_BLOCK_M=plan.suffix_block_m,
            BLOCK_N=block_n or default_n,
            DOT_FP32=q.device.type == "cpu" and q.dtype == torch.bfloat16, PERSISTENT=persistent,
            STORE_LSE=lse is not None, ROLE=role, HAS_KV_BASE=plan.kv_base is not None,
            GATHER_PREFETCH=gather_prefetch, GUARD_UNITS=guard, num_warps=num_warps or default_num_warps(prefix_block_m, head_dim),
            num_stages=num_stages or default_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
        )

    persistent = plan.num_programs is not None
    static = persistent or plan.grid_items is not None  # a CUDA graph's plan: fixed grids
    if static:  # flat grids whose programs past the plan's units exit, or persistent ones
        grid, plain_grid = ((plan.num_programs, plan.plain_num_programs) if persistent
                            else (plan.grid_items, plan.plain_grid_items))
        if plain_grid is None:
            launch(grid, plan.prefix_block_m, persistent, 0, False, guard=not persistent)
        else:  # the pair, one of which finds the plan's items (ROLE in the kernel's docstring)
            launch(grid, plan.prefix_block_m, persistent, 1, False, guard=not persistent)
            launch(plain_grid, plan.suffix_block_m, persistent, 2, True, guard=not persistent)
    elif plan.num_items:  # eager: one program per item; plain decode gets the lighter tiles
        if plan.has_prefix:
            launch(plan.num_items, plan.prefix_block_m, False, 0, False)
        else:
            launch(plan.num_items, plan.suffix_block_m, False, 0, True)
    if static or plan.num_partials > plan.merge_indptr.numel() - 1:
        # graphs: any plan may split, and padding rows are zeroed here; eager: only if a request split
        merge_partials(o_partial, lse_partial, plan.merge_indptr, out, lse, skip_single=True, block_p=merge_block_p)


def packed_cascade_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    group_indptr: torch.Tensor,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    plan: PackedCascadePlan | None = None,
    kv_base: bool = False,
):
    """Decode attention over ``cat(group prefix, request suffix)`` for every request, reading each
    group's prefix once per tile of its requests (PackInfer, Sec. 4).

    Args:
        q: ``[num_tokens, num_qo_heads, head_dim]`` fp16/bf16, one decode token per request;
            requests of a group are adjacent rows.
        k_buffer, v_buffer: ``[num_slots, num_kv_heads, head_dim]``, same dtype: SGLang's token KV
            pool for one layer (``page_size`` 1 slot indexing).
        group_indptr: ``[num_groups + 1]`` int32; group ``g`` owns rows ``group_indptr[g]:[g+1]``.
        prefix_kv_indptr: ``[num_groups + 1]`` int32.
        prefix_kv_indices: ``[prefix_kv_indptr[-1]]`` int32 pool slots of each group's shared prefix.
        suffix_kv_indptr: ``[num_tokens + 1]`` int32.
        suffix_kv_indices: ``[suffix_kv_indptr[-1]]`` int32 pool slots of each request's own tokens.
        sm_scale: softmax scale (usually ``head_dim ** -0.5``).
        out: optional ``[num_tokens, num_qo_heads, head_dim]`` output, written in place.
        return_lse: also return ``lse`` ``[num_tokens, num_qo_heads]`` float32, natural log.
        plan: a :class:`PackedCascadePlan` from :func:`plan_packed_cascade` for these indptr arrays,
            reused across layers; planned here when ``None``.
        kv_base: when planning here, let chunks that are one run of consecutive slots be read by
            base + offset (issue 5's contiguous fast path).

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``.

    Raises:
        ValueError: on mismatched shapes, dtypes, devices, GQA ratio, malformed indptr arrays, or a
            request with neither prefix nor suffix.

    Example::

        >>> out = packed_cascade_attention(q, k_buf, v_buf, torch.tensor([0, 3], dtype=torch.int32),
        ...     torch.tensor([0, 100], dtype=torch.int32), prefix_slots,
        ...     torch.tensor([0, 5, 9, 12], dtype=torch.int32), suffix_slots, 128 ** -0.5)
    """
    check_cascade_inputs(q, k_buffer, v_buffer, group_indptr, prefix_kv_indptr, prefix_kv_indices,
                         suffix_kv_indptr, suffix_kv_indices, out)
    num_tokens, num_qo_heads, head_dim = q.shape
    if plan is None:
        plan = plan_packed_cascade(group_indptr, prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr,
                                   suffix_kv_indices, num_qo_heads, k_buffer.shape[1], head_dim=head_dim,
                                   dtype=k_buffer.dtype, kv_base=kv_base)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(num_tokens, num_qo_heads, dtype=torch.float32, device=q.device) if return_lse else None
    run_packed_cascade(q, k_buffer, v_buffer, plan, sm_scale, out, lse)
    return (out, lse) if return_lse else out
