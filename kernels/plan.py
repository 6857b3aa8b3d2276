"""Host-side work plan for packed cascade decode attention (PackInfer, Sec. 4).

A decode batch is described two-level, as in FlashInfer's cascade: requests (one query token each)
are grouped, group ``g`` owning rows ``group_indptr[g]:group_indptr[g+1]`` and a shared prefix,
each request owning a suffix. The plan cuts that into *work items*, each one a tile of
``(query rows) x (KV chunk)``:

- prefix items: up to ``requests_per_tile`` requests of one group (times the GQA ratio: the rows
  of a tensor-core tile) against one chunk of the group's prefix, so the prefix is read once per
  row block instead of once per request;
- suffix items: one request against one chunk of its suffix.

Every item writes one partial attention state (``o``, ``lse``) per request row; request ``t``'s
partials sit at rows ``merge_indptr[t]:merge_indptr[t+1]`` of the partial buffers and are merged
by log-sum-exp. An item's partial for request ``t`` is row ``merge_indptr[t] + partial_offset``.

Items are stored as an int32 ``[num_items, ITEM_FIELDS]`` table (one host-to-device copy), with
columns ``qo_start, qo_len, kv_start, kv_len, partial_offset``; ``kv_start`` indexes the combined
``kv_indices = cat(prefix_kv_indices, suffix_kv_indices)`` (positions in that list, not pool slots).
The host plan (:class:`WorkPlan`) becomes the device plan the kernel reads
(:class:`~.plan_tensors.PackedCascadePlan`) in :mod:`.plan_tensors`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .cost_model import item_cost_tokens
from .launch import requests_per_tile

ITEM_FIELDS = 5  # qo_start, qo_len, kv_start, kv_len, partial_offset


class WorkPlan(NamedTuple):
    """Host (numpy, int32) result of :func:`plan_work`."""

    prefix_items: np.ndarray  # [num_prefix_items, ITEM_FIELDS]
    suffix_items: np.ndarray  # [num_suffix_items, ITEM_FIELDS]
    merge_indptr: np.ndarray  # [num_tokens + 1]
    prefix_chunk: int  # KV tokens per prefix item (the last chunk of a prefix may be shorter)
    suffix_chunk: int  # KV tokens per suffix item

    @property
    def num_partials(self) -> int:
        return int(self.merge_indptr[-1])


def _ceil_div(a, b):
    return -(-a // b)


_MAX_SPLITS = 16  # candidate chunk lengths per item kind: the longest span cut into 1..16 pieces


def _chunk_candidates(span_lens: np.ndarray, lo: int, align: int) -> np.ndarray:
    """Chunk lengths worth trying: the longest span cut into ``1.._MAX_SPLITS`` equal pieces,
    rounded up to ``align``, at least ``lo``."""
    longest = int(span_lens.max()) if len(span_lens) else align
    pieces = _ceil_div(longest, np.arange(1, _MAX_SPLITS + 1))
    return np.unique(np.maximum(lo, _ceil_div(pieces, align) * align))[::-1]  # longest first


def _kind_costs(span_lens: np.ndarray, chunks: np.ndarray, rows: np.ndarray):
    """For each candidate chunk: number of items, their total cost and the largest item's cost."""
    n = _ceil_div(span_lens[:, None], chunks[None, :])  # [spans, candidates]
    fixed = item_cost_tokens(0, rows[:, None])  # per item, beside its KV (:mod:`.cost_model`)
    total = (span_lens[:, None] + n * fixed).sum(0)
    largest = (np.minimum(chunks[None, :], span_lens[:, None]) + fixed).max(0, initial=0)
    return n.sum(0), total, largest


def _balanced_chunks(prefix_lens, prefix_rows, suffix_lens, suffix_rows, programs: int, align: int):
    """Prefix and suffix chunk lengths minimizing the estimated time of one launch.

    Every KV head runs the same items on ``programs`` concurrent programs (``num_sms *
    programs_per_sm / num_kv_heads``, :func:`~.launch.programs_per_head`). For a pair of chunk
    lengths the estimate is ``max(largest item, ceil(items / programs) * mean item)``: whole rounds
    of items, so 64 equal items on 49 programs cost two rounds
    where 192 thirds of them cost four rounds of a third (FlashInfer's split-KV scheduler makes the
    same trade with a binary search over chunk sizes)."""
    cs = _chunk_candidates(suffix_lens, align, align)
    if not len(prefix_lens):  # plain decode, every step of unshared batches: one kind, half the work
        n, total, largest = _kind_costs(suffix_lens, cs, suffix_rows)
        return 2 * align, int(cs[np.argmin(np.maximum(largest, _ceil_div(n, programs) * total / np.maximum(n, 1)))])
    cp = _chunk_candidates(prefix_lens, 2 * align, align)
    np_, tp, mp = _kind_costs(prefix_lens, cp, prefix_rows)
    ns, ts, ms = _kind_costs(suffix_lens, cs, suffix_rows)
    n = np_[:, None] + ns[None, :]
    total = tp[:, None] + ts[None, :]
    est = np.maximum(np.maximum(mp[:, None], ms[None, :]), _ceil_div(n, programs) * total / np.maximum(n, 1))
    i, j = np.unravel_index(np.argmin(est), est.shape)  # first minimum: the longest chunks among ties
    return int(cp[i]), int(cs[j])


def _items(qo_start, qo_len, kv_start, kv_len, chunk, partial_base):
    """Cuts each ``(qo, kv)`` span into KV chunks of ``chunk`` tokens; returns the item table."""
    n_chunks = _ceil_div(kv_len, chunk)
    rep = lambda a: np.repeat(a, n_chunks)
    first = np.cumsum(n_chunks) - n_chunks
    c = np.arange(int(n_chunks.sum()), dtype=np.int64) - rep(first)  # chunk index within its span
    kv_off = c * chunk
    table = np.stack(
        [rep(qo_start), rep(qo_len), rep(kv_start) + kv_off, np.minimum(chunk, rep(kv_len) - kv_off),
         rep(partial_base) + c], axis=1,
    )
    return table.astype(np.int32).reshape(-1, ITEM_FIELDS)


def _chunk_major(prefix_items: np.ndarray, item_group: np.ndarray) -> np.ndarray:
    """Prefix items ordered by group, then chunk, then row block: the row blocks of one prefix chunk
    are adjacent, so they run at about the same time and all but the first find the chunk in L2."""
    return prefix_items[np.lexsort((prefix_items[:, 0], prefix_items[:, 4], item_group))]


def _longest_first(items: np.ndarray) -> np.ndarray:
    """Items by decreasing KV length (stable): the GPU hands programs out in launch order, and
    longest-first list scheduling bounds the makespan of uneven items (a request's last, short
    chunk, heterogeneous lengths) by 4/3 of the best order's."""
    return items[np.argsort(-items[:, 3], kind="stable")]


def plan_work(
    group_indptr: np.ndarray,
    prefix_kv_indptr: np.ndarray,
    suffix_kv_indptr: np.ndarray,
    *,
    gqa_group_size: int,
    num_kv_heads: int,
    prefix_block_m: int,
    num_sms: int = 132,
    programs_per_sm: int = 2,
    prefix_chunk: int | None = None,
    suffix_chunk: int | None = None,
    kv_align: int = 64,
    max_items: int | None = None,
    max_partials: int | None = None,
) -> WorkPlan:
    """Splits a grouped decode batch into prefix and suffix work items (see module docstring).

    Args:
        group_indptr: ``[num_groups + 1]`` CSR offsets of requests per group (requests of a group
            are adjacent rows of ``q``).
        prefix_kv_indptr: ``[num_groups + 1]`` CSR offsets of each group's prefix KV slots.
        suffix_kv_indptr: ``[num_tokens + 1]`` CSR offsets of each request's suffix KV slots.
        gqa_group_size: ``num_qo_heads // num_kv_heads``.
        num_kv_heads: KV heads; each item runs once per KV head (the grid's second axis).
        prefix_block_m: query rows of a prefix tile; a prefix item holds
            :func:`~.launch.requests_per_tile` requests.
        num_sms, programs_per_sm: ``num_sms * programs_per_sm`` programs run at once
            (``programs_per_sm``: the launch's :func:`~.launch.kernel_occupancy`); chunk lengths
            balance the items over them.
        prefix_chunk, suffix_chunk: fixed KV chunk lengths in tokens (``None``: chosen as above).
        kv_align: chunk lengths are multiples of this (the kernel's ``BLOCK_N``).
        max_items, max_partials: capacities (CUDA-graph buffers); chunks are doubled until the
            plan fits. Every request needs at least one partial and one item per row block.

    Returns:
        A :class:`WorkPlan` of int32 numpy arrays.

    Raises:
        ValueError: on malformed CSR arrays, a request with no KV at all (empty prefix and suffix),
            or capacities too small for one chunk per span.
    """
    args = (group_indptr, prefix_kv_indptr, suffix_kv_indptr, gqa_group_size, num_kv_heads, prefix_block_m,
            num_sms * programs_per_sm, kv_align)
    work = _plan_once(*args, prefix_chunk, suffix_chunk)
    while (max_items is not None and len(work.prefix_items) + len(work.suffix_items) > max_items) or (
            max_partials is not None and work.num_partials > max_partials):
        if work.prefix_chunk >= _MAX_CHUNK and work.suffix_chunk >= _MAX_CHUNK:
            raise ValueError(f"no plan fits {max_items} items and {max_partials} partials "
                             f"({len(work.merge_indptr) - 1} requests)")
        work = _plan_once(*args, min(2 * work.prefix_chunk, _MAX_CHUNK), min(2 * work.suffix_chunk, _MAX_CHUNK))
    return work


_MAX_CHUNK = 1 << 30


def _plan_suffix_only(suffix_lens, si, gqa_group_size, programs, kv_align, suffix_chunk) -> WorkPlan:
    """:func:`_plan_once` for a batch without prefixes (every request its own group): the same
    items, with a fraction of the host work (it runs every decode step of unshared batches)."""
    if suffix_chunk is None:
        none = np.zeros(0, np.int64)
        suffix_chunk = _balanced_chunks(none, none, suffix_lens, np.full(len(suffix_lens), gqa_group_size),
                                        programs, kv_align)[1]
    n_chunks = _ceil_div(suffix_lens, suffix_chunk)
    tok = np.arange(len(suffix_lens))
    items = _longest_first(_items(tok, np.ones_like(tok), si[:-1], suffix_lens, suffix_chunk, np.zeros_like(tok)))
    merge_indptr = np.zeros(len(suffix_lens) + 1, dtype=np.int32)
    np.cumsum(n_chunks, out=merge_indptr[1:])
    return WorkPlan(np.zeros((0, ITEM_FIELDS), np.int32), items, merge_indptr, 2 * kv_align, int(suffix_chunk))


def _plan_once(group_indptr, prefix_kv_indptr, suffix_kv_indptr, gqa_group_size, num_kv_heads, prefix_block_m,
               target_ctas, kv_align, prefix_chunk, suffix_chunk) -> WorkPlan:
    """:func:`plan_work` for given (or automatic, ``None``) chunk lengths."""
    gi = np.asarray(group_indptr, dtype=np.int64)
    pi = np.asarray(prefix_kv_indptr, dtype=np.int64)
    si = np.asarray(suffix_kv_indptr, dtype=np.int64)
    num_groups, num_tokens = len(gi) - 1, len(si) - 1
    if len(pi) != num_groups + 1 or gi[0] != 0 or gi[-1] != num_tokens or pi[0] != 0 or si[0] != 0:
        raise ValueError(
            f"malformed indptr: group_indptr {gi.tolist()[:8]}... (len {len(gi)}), prefix_kv_indptr len "
            f"{len(pi)}, suffix_kv_indptr len {len(si)}; need first element 0, "
            f"group_indptr[-1] == num_tokens == {num_tokens}"
        )
    group_sizes, prefix_lens, suffix_lens = np.diff(gi), np.diff(pi), np.diff(si)
    if pi[-1] == 0 and num_tokens and suffix_lens.min() > 0 and group_sizes.min() >= 0:  # plain decode
        return _plan_suffix_only(suffix_lens, si, gqa_group_size, max(1, target_ctas // max(1, num_kv_heads)),
                                 kv_align, suffix_chunk)
    if (group_sizes < 0).any() or (prefix_lens < 0).any() or (suffix_lens < 0).any():
        raise ValueError("indptr arrays must be non-decreasing")
    token_group = np.repeat(np.arange(num_groups), group_sizes)
    if ((prefix_lens[token_group] + suffix_lens) == 0).any():
        bad = np.flatnonzero(prefix_lens[token_group] + suffix_lens == 0)[:8].tolist()
        raise ValueError(f"requests {bad} have no KV tokens (empty prefix and suffix)")

    # Prefix spans: (group, row block) pairs; a row block holds requests_per_tile requests.
    per_tile = requests_per_tile(gqa_group_size, prefix_block_m)
    has_prefix = (prefix_lens > 0) & (group_sizes > 0)
    blocks = np.where(has_prefix, _ceil_div(group_sizes, per_tile), 0)
    span_group = np.repeat(np.arange(num_groups), blocks)
    span_block = np.arange(int(blocks.sum())) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    span_qo_start = gi[span_group] + span_block * per_tile
    span_qo_len = np.minimum(per_tile, gi[span_group + 1] - span_qo_start)
    suffix_tok = np.flatnonzero(suffix_lens > 0)
    if prefix_chunk is None or suffix_chunk is None:
        auto_p, auto_s = _balanced_chunks(prefix_lens[span_group], span_qo_len * gqa_group_size,
                                          suffix_lens[suffix_tok], np.full(len(suffix_tok), gqa_group_size),
                                          max(1, target_ctas // max(1, num_kv_heads)), kv_align)
        prefix_chunk = auto_p if prefix_chunk is None else prefix_chunk
        suffix_chunk = auto_s if suffix_chunk is None else suffix_chunk
    prefix_items = _items(span_qo_start, span_qo_len, pi[span_group], prefix_lens[span_group],
                          prefix_chunk, np.zeros_like(span_group))
    prefix_items = _chunk_major(prefix_items, np.repeat(span_group, _ceil_div(prefix_lens[span_group], prefix_chunk)))

    # Suffix spans: one per request with a non-empty suffix; its partials follow its group's prefix chunks.
    n_prefix_chunks = np.where(has_prefix, _ceil_div(prefix_lens, prefix_chunk), 0)[token_group]
    tok = suffix_tok
    suffix_items = _longest_first(_items(tok, np.ones_like(tok), int(pi[-1]) + si[tok], suffix_lens[tok],
                                         suffix_chunk, n_prefix_chunks[tok]))

    partials = n_prefix_chunks + _ceil_div(suffix_lens, suffix_chunk)
    merge_indptr = np.zeros(num_tokens + 1, dtype=np.int32)
    merge_indptr[1:] = np.cumsum(partials)
    return WorkPlan(prefix_items, suffix_items, merge_indptr, int(prefix_chunk), int(suffix_chunk))
