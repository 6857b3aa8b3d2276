"""The packed cascade partial kernel (PackInfer, Sec. 4): Triton only.

For request ``t`` of group ``g`` with query ``q_t``:

    attn(q_t, cat(P_g, S_t)) = merge(attn(q_t, P_g), attn(q_t, S_t))

where ``merge`` is the log-sum-exp combination of :mod:`.merge`. The prefix term is computed for
all requests of a group at once: the group's queries times the GQA ratio form the ``BLOCK_M`` rows
of one tile, so each prefix KV block is loaded once per tile and multiplied on tensor cores
(``tl.dot``) instead of being re-read by every request. Suffix terms run one request per tile.
Both run in one launch of :func:`_packed_attn_partial_kernel` over the work items of :mod:`.plan`
(prefix items first). An item whose request has no other item in the plan writes that request's
output rows directly; the others write float32 partial states, which :mod:`.merge` combines
(skipping the rows already written).

Row ``r`` of a tile is request ``qo_start + r // GQA`` and query head ``kv_head * GQA + r % GQA``.
Scores are carried in base 2 (``qk * sm_scale * log2(e)``); the partial ``lse`` is stored in natural
log. Launch choices (tile shapes, pipeline depth, grids) live in :mod:`.launch`; the public entry
points in :mod:`.packed_cascade`.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    DOT_FP32: tl.constexpr, CONTIGUOUS: tl.constexpr,
):
    """Online softmax of a tile's rows ``q`` over one KV chunk: whole blocks, then the partial last
    one; returns ``(m_i, l_i, acc)`` (``m_i`` in base 2, ``acc`` unnormalized). Index-list chunks
    (not ``CONTIGUOUS``) load the next block's slot ids into registers one iteration ahead: Triton
    3.6 then pipelines the K/V copies ``num_stages`` deep on sm_90 (``async_wait num = 2``), where
    through its own shared-memory copy of the slot ids it waits for every copy at each block
    (``num = 0``); on the H200 that was 6-17% faster on 13 of 14 prefix cases
    (``benchmarks/results/ab_prefix_gp_h200.json``)."""
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_full = kv_len // BLOCK_N * BLOCK_N
    if not CONTIGUOUS and BLOCK_D == HEAD_DIM:
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
    HAS_KV_BASE: tl.constexpr,
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
                                       HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_FP32, True)
        else:
            m_i, l_i, acc = _attend_kv(q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_base, kv_head,
                                       sm_scale_log2, stride_kt, stride_kh, stride_vt, stride_vh,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_FP32, False)
    else:
        m_i, l_i, acc = _attend_kv(q, K_Buffer, V_Buffer, KV_Indices, kv_start, kv_len, kv_start, kv_head,
                                   sm_scale_log2, stride_kt, stride_kh, stride_vt, stride_vh,
                                   HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_FP32, False)

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
    DOT_FP32: tl.constexpr, STORE_LSE: tl.constexpr, ROLE: tl.constexpr,
    HAS_KV_BASE: tl.constexpr, GUARD_UNITS: tl.constexpr,
):
    """Prefix items (``PREFIX_BLOCK_M`` rows: a group's requests x GQA) then suffix items
    (``SUFFIX_BLOCK_M`` rows: one request x GQA), all in one launch. ``Counts`` holds
    ``(num_items, num_prefix_items)`` in device memory. Program ``w`` runs item ``w // NUM_KV_HEADS``
    for KV head ``w % NUM_KV_HEADS`` (straight-line code): the heads of an item are adjacent, so
    blocks are issued in the plan's item order (longest first) across all heads. ``GUARD_UNITS``
    (CUDA graphs): the grid is fixed at the graph's capacity, and programs past the plan's
    ``num_items * NUM_KV_HEADS`` units exit at once. ``ROLE`` (with ``GUARD_UNITS``): 0 runs every
    plan; a graph captures a pair, 1 (compiled with 64-row prefix tiles) running plans with prefix
    items and 2 (compiled with suffix-height tiles: fewer registers, more resident programs) running
    plans without, the other one of the pair finding nothing to do."""
    num_prefix_items = tl.load(Counts + 1)
    unit = tl.program_id(0)
    live = True
    if GUARD_UNITS:  # a grid fixed at a CUDA graph's capacity: programs past the plan's units exit
        live = unit < _role_items(Counts, num_prefix_items, ROLE) * NUM_KV_HEADS
    if live:
        _attend_any(Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
                    unit // NUM_KV_HEADS, num_prefix_items, unit % NUM_KV_HEADS, sm_scale_log2, stride_qt, stride_qh,
                    stride_kt, stride_kh, stride_vt, stride_vh, stride_pr, stride_ph, stride_lr, stride_ot,
                    stride_oh, stride_lt, GQA, HEAD_DIM, BLOCK_D, PREFIX_BLOCK_M, SUFFIX_BLOCK_M, BLOCK_N,
                    DOT_FP32, STORE_LSE, HAS_KV_BASE)


@triton.jit
def _attend_any(
    Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
    item, num_prefix_items, kv_head, sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pr, stride_ph, stride_lr, stride_ot, stride_oh, stride_lt,
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PREFIX_BLOCK_M: tl.constexpr, SUFFIX_BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, STORE_LSE: tl.constexpr, HAS_KV_BASE: tl.constexpr,
):
    """A prefix item (``item < num_prefix_items``) or a suffix item, each with its tile height."""
    if item < num_prefix_items:
        _attend_item(Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
                     item, kv_head, sm_scale_log2, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_pr, stride_ph, stride_lr, stride_ot, stride_oh, stride_lt,
                     GQA, HEAD_DIM, BLOCK_D, PREFIX_BLOCK_M, BLOCK_N, DOT_FP32, STORE_LSE, HAS_KV_BASE)
    else:
        _attend_item(Q, K_Buffer, V_Buffer, KV_Indices, KV_Base, Items, Merge_Indptr, O_Partial, LSE_Partial, Out, LSE_Out,
                     item, kv_head, sm_scale_log2, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_pr, stride_ph, stride_lr, stride_ot, stride_oh, stride_lt,
                     GQA, HEAD_DIM, BLOCK_D, SUFFIX_BLOCK_M, BLOCK_N, DOT_FP32, STORE_LSE, HAS_KV_BASE)
