"""Per-step decode metadata: from groups and SGLang's ``req_to_token`` to a kernel plan.

Built once per decode step on the host (plus two small launches) and shared by all layers:

- positions ``0:prefix_lens[g]`` of group ``g``'s first request give the group's prefix slots;
- positions ``prefix_lens[g]:seq_len`` of each request give its suffix slots;
- both are gathered by one :func:`gather_kv_indices` launch into
  ``kv_indices = cat(prefix_kv_indices, suffix_kv_indices)``, and the work plan of
  :mod:`packinfer_sglang.kernels.plan` is computed from the lengths alone (no device sync).

Index spaces: *positions* index a request's tokens (``0:seq_len``); *slots* index the KV pool.
Slots read here stay valid for the step: prefix slots are pinned by the members' tree locks and
suffix slots are owned by the running requests until they finish.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .grouping import DecodeGroups
from .kernels import (
    PackedCascadePlan,
    PlanBuffers,
    gather_kv_indices,
    make_plan,
    plan_work,
    run_packed_cascade,
)
from .kernels.launch import PREFIX_BLOCK_M, launch_config, programs_per_head
from .kernels.plan_tensors import copy_host_into, host_to_device


class DecodeStep(NamedTuple):
    """Everything a layer's packed decode needs for one step."""

    plan: PackedCascadePlan
    perm: torch.Tensor | None  # [num_tokens] int64 batch row of each packed row; None if identity
    groups: DecodeGroups


def _host_lengths(groups: DecodeGroups, seq_lens: np.ndarray):
    """Per group prefix lengths (clamped so every request keeps >= 1 suffix token) and per packed row
    suffix lengths, in tokens."""
    order, gi = groups.order, groups.group_indptr.astype(np.int64)
    seq = seq_lens[order].astype(np.int64)
    sizes = np.diff(gi)
    token_group = np.repeat(np.arange(len(sizes)), sizes)
    min_seq = np.full(len(sizes), np.iinfo(np.int64).max)
    np.minimum.at(min_seq, token_group, seq)
    prefix = np.minimum(groups.prefix_lens.astype(np.int64), np.maximum(min_seq - 1, 0))
    return prefix, seq - prefix[token_group], token_group


def _to_device(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    return host_to_device(torch.from_numpy(np.ascontiguousarray(a)), dev)


def _indptr(lens: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


GRID_ITEMS_PER_REQUEST, GRID_ITEMS_PER_PROGRAM = 2, 4


def graph_grid_items(padded_bs: int, num_sms: int, programs_per_sm: int, num_kv_heads: int) -> int:
    """Items per KV head of a CUDA graph's fixed grid for ``padded_bs`` requests:
    ``GRID_ITEMS_PER_REQUEST`` per request plus ``GRID_ITEMS_PER_PROGRAM`` per concurrent program of a
    head (:func:`~.kernels.launch.programs_per_head`). Every plan of the kernel grid on an
    H200-sized GPU needs at most about half of that (one item per request for its suffix, the
    prefix row blocks, and the splits that fill the programs; ``tests/test_scripts.py``)."""
    return (GRID_ITEMS_PER_REQUEST * padded_bs
            + GRID_ITEMS_PER_PROGRAM * programs_per_head(num_sms, programs_per_sm, num_kv_heads))


class GraphBuffers:
    """Fixed-address metadata for packed decode inside SGLang's decode CUDA graphs.

    One set serves every captured batch size (one graph replays at a time): the plan tables and
    ``kv_indices`` (:class:`~.kernels.PlanBuffers`), the row permutation, and a fixed grid of
    ``grid_items(padded_bs)`` x ``num_kv_heads`` programs per captured batch size, those past a
    step's units exiting at once; plans are capped at that many items. On the H200 this flat grid,
    even at 8 times the plan's units, was 1-35% faster than a persistent grid on 11 sharing and
    no-sharing cases (``benchmarks/results/ab_grid_h200.json``). Partial states get
    ``PARTIALS_PER_REQUEST`` rows per (padded) request; plans are coarsened to fit.
    ``programs_per_sm``: the occupancy of the prefix launch; ``plain_programs_per_sm``: that of the
    plain-decode launch (suffix-height tiles). When given, graphs capture both launches and steps
    without prefix items run on the plain one.
    """

    PARTIALS_PER_REQUEST = 16

    def __init__(self, max_bs: int, max_context_len: int, num_kv_heads: int, num_sms: int,
                 device: torch.device, programs_per_sm: int = 2, plain_programs_per_sm: int | None = None):
        self.max_bs, self.num_kv_heads, self.num_sms = max_bs, num_kv_heads, num_sms
        self.programs_per_sm, self.plain_programs_per_sm = programs_per_sm, plain_programs_per_sm
        most = max(programs_per_sm, plain_programs_per_sm or 0)
        self.plan = PlanBuffers(max_bs, 8 * (max_bs + num_sms * most), max_bs * max_context_len, device)
        self.perm = torch.arange(max_bs, dtype=torch.int64, device=device)

    def num_partials(self, padded_bs: int) -> int:
        return padded_bs * self.PARTIALS_PER_REQUEST

    def grid_items(self, padded_bs: int) -> int:
        """Items (per KV head) of the grid captured for ``padded_bs``: the cap of its plans."""
        most = max(self.programs_per_sm, self.plain_programs_per_sm or 0)
        return min(self.plan.max_items, graph_grid_items(padded_bs, self.num_sms, most, self.num_kv_heads))

    def write(self, work, gqa: int, padded_bs: int, num_kv_tokens: int | None):
        """The plan of ``work`` in these buffers, with this launch's fixed grid for ``padded_bs``."""
        grid = self.grid_items(padded_bs)
        return self.plan.write(work, gqa, self.num_partials(padded_bs), grid,
                               plain_grid_items=None if self.plain_programs_per_sm is None else grid,
                               num_kv_tokens=num_kv_tokens)


def _segments(groups: DecodeGroups, prefix: np.ndarray, suffix: np.ndarray):
    """Host table of the gather's segments: ``[pool row positions in the batch | position starts |
    kv_indptr]`` (one per group prefix, then one per request suffix), int32; and the prefix/suffix
    CSR offsets."""
    order, gi = groups.order, groups.group_indptr
    prefix_indptr, suffix_indptr = _indptr(prefix), _indptr(suffix)
    first = order[gi[:-1].astype(np.int64)]
    num_groups = len(prefix)
    seg = np.concatenate([
        np.concatenate([first, order]),  # batch rows
        np.concatenate([np.zeros(num_groups, np.int64), prefix[np.repeat(np.arange(num_groups), np.diff(gi))]]),
        np.concatenate([prefix_indptr, prefix_indptr[-1] + suffix_indptr[1:]]),
    ]).astype(np.int32)
    return seg, prefix_indptr, suffix_indptr


def build_decode_step(
    groups: DecodeGroups,
    seq_lens_cpu: torch.Tensor,
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    num_qo_heads: int,
    num_kv_heads: int,
    num_sms: int,
    graph: GraphBuffers | None = None,
    padded_bs: int | None = None,
    programs_per_sm: int = 2,
    plain_programs_per_sm: int | None = None,
    kv_base: bool = False,
) -> DecodeStep:
    """Builds a step's plan.

    Args:
        groups: grouping of the batch (rows in batch order), see :mod:`.grouping`.
        seq_lens_cpu: ``[num_tokens]`` request lengths in tokens, including the decoded token (host).
        req_pool_indices: ``[>= num_tokens]`` rows of ``req_to_token`` (device).
        req_to_token: ``[num_req_slots, max_context_len]`` int32 position→slot table (device).
        num_qo_heads, num_kv_heads: attention heads of this rank.
        num_sms: multiprocessors, for the chunk sizes of the work plan.
        programs_per_sm: resident programs per multiprocessor of the prefix launch
            (:func:`~.kernels.launch.kernel_occupancy`) for eager steps; graph steps use the graph's.
            ``plain_programs_per_sm``: the same for steps without prefix items, which run the
            plain-decode tiles (default ``programs_per_sm``).
        graph: write the plan into these CUDA-graph buffers instead of fresh tensors; then
            ``padded_bs`` (>= ``num_tokens``) is the captured batch size whose extra rows are padding.
        kv_base: mark the items whose KV chunk is one run of consecutive slots, which the kernel then
            reads by base + offset (:func:`~.kernels.kv_indices.item_kv_bases`; a few device ops after
            the gather). Graph buffers must be written with the same setting every step.

    Raises:
        ValueError: when the batch exceeds the graph buffers' capacity.
    """
    dev = req_pool_indices.device
    num_tokens = len(groups.order)
    prefix, suffix, _ = _host_lengths(groups, seq_lens_cpu[:num_tokens].numpy())
    seg, prefix_indptr, suffix_indptr = _segments(groups, prefix, suffix)
    seg_dev = _to_device(seg, dev)
    n_seg = len(prefix) + num_tokens
    pool_rows = req_pool_indices.index_select(0, seg_dev[:n_seg].long())
    if graph is None:
        kv_indices = torch.empty(max(int(seg[-1]), 1), dtype=torch.int32, device=dev)
    elif int(seg[-1]) > graph.plan.kv_indices.numel():
        raise ValueError(f"{int(seg[-1])} KV slots exceed the graph buffer's {graph.plan.kv_indices.numel()}")
    else:
        kv_indices = graph.plan.kv_indices
    gather_kv_indices(req_to_token, pool_rows, seg_dev[n_seg : 2 * n_seg], seg_dev[2 * n_seg :], kv_indices)

    gqa = num_qo_heads // num_kv_heads
    limits = {} if graph is None else {"max_items": graph.grid_items(padded_bs),
                                       "max_partials": graph.num_partials(padded_bs)}
    if graph is not None:
        programs_per_sm, plain_programs_per_sm = graph.programs_per_sm, graph.plain_programs_per_sm
    plain = prefix_indptr[-1] == 0 and plain_programs_per_sm is not None
    # the launch that runs it: eager steps without prefix items always take the plain-decode one
    plain_launched = prefix_indptr[-1] == 0 and (graph is None or plain_programs_per_sm is not None)
    work = plan_work(groups.group_indptr, prefix_indptr, suffix_indptr, gqa_group_size=gqa,
                     num_kv_heads=num_kv_heads, prefix_block_m=PREFIX_BLOCK_M, num_sms=num_sms,
                     programs_per_sm=plain_programs_per_sm if plain else programs_per_sm,
                     kv_align=launch_config(dev, plain_launched)[0], **limits)
    if graph is None:
        perm = None if groups.is_identity else _to_device(groups.order, dev)
        return DecodeStep(make_plan(work, kv_indices, gqa, kv_base=kv_base), perm, groups)
    plan = graph.write(work, gqa, padded_bs, int(seg[-1]) if kv_base else None)
    perm = np.arange(padded_bs, dtype=np.int64)
    perm[:num_tokens] = groups.order
    copy_host_into(graph.perm, torch.from_numpy(perm))
    return DecodeStep(plan, graph.perm[:padded_bs], groups)


def run_decode_step(step: DecodeStep, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                    sm_scale: float) -> torch.Tensor:
    """Packed decode attention of one layer for a planned step.

    Args:
        q: ``[num_tokens, num_qo_heads, head_dim]`` in batch order.
        k_buffer, v_buffer: ``[num_slots, num_kv_heads, head_dim]``, the layer's KV pool.

    Returns:
        ``[num_tokens, num_qo_heads, head_dim]`` in batch order, ``q``'s dtype. Rows are gathered
        into group order for the kernel and scattered back when the batch is not group-adjacent.
    """
    q_packed = q if step.perm is None else q.index_select(0, step.perm)
    out = torch.empty_like(q_packed)
    run_packed_cascade(q_packed, k_buffer, v_buffer, step.plan, sm_scale, out)
    return out if step.perm is None else torch.empty_like(out).index_copy_(0, step.perm, out)
