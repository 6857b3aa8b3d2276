"""The plan the packed kernel reads: :class:`PackedCascadePlan`, the host :class:`~.plan.WorkPlan`
copied next to the KV indices as one int32 table (:func:`make_plan`), or into fixed-address buffers
that CUDA graphs replay (:class:`PlanBuffers`); optionally with each item's base slot for the
kernel's contiguous path (:func:`.kv_indices.item_kv_bases`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .kv_indices import item_kv_bases
from .launch import PREFIX_BLOCK_M, suffix_block_m_for
from .plan import ITEM_FIELDS, WorkPlan


class PackedCascadePlan(NamedTuple):
    """Device-side plan shared by all layers of one decode step.

    ``kv_indices`` is ``cat(prefix_kv_indices, suffix_kv_indices)`` (int32); ``items``, ``counts``
    and ``merge_indptr`` are int32 on the same device; see :mod:`.plan`. A plan in
    :class:`PlanBuffers` (CUDA graphs) has capacity-sized tensors and a fixed grid of ``grid_items``
    items' programs per KV head, those past the plan's units exiting. With ``kv_base`` (:func:`.kv_indices.item_kv_bases` of ``kv_indices``) the kernel reads an
    item whose chunk is one run of consecutive slots at ``base + offset``, without its slot ids;
    ``None`` compiles that path out.
    """

    items: torch.Tensor  # [>= num_items, ITEM_FIELDS]: prefix items first, then suffix items
    counts: torch.Tensor  # [2]: num_items, num_prefix_items (read by the kernel)
    merge_indptr: torch.Tensor  # [>= num_tokens + 1]; rows past the batch have no partials
    kv_indices: torch.Tensor  # [total prefix + suffix slots]
    num_items: int  # host copy of counts[0]
    num_partials: int  # rows of the float32 partial buffers (a capacity in static plans)
    prefix_block_m: int
    suffix_block_m: int
    has_prefix: bool = True  # whether there are prefix items (graph plans: whether there may be)
    kv_base: torch.Tensor | None = None  # [>= num_items] int32: an item's first slot if one run, else -1
    # graph plans: a fixed grid of grid_items x num_kv_heads programs; plain_grid_items: the grid of
    # the pair's plain-decode launch (ROLE 2), None when the graph captures one launch
    grid_items: int | None = None
    plain_grid_items: int | None = None


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies a host tensor to ``device``, asynchronously through pinned memory when it is a GPU."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def copy_host_into(dst: torch.Tensor, host: torch.Tensor) -> None:
    """Copies a host tensor into the leading ``host.numel()`` elements of the contiguous 1-D device
    buffer ``dst``, asynchronously through pinned memory when ``dst`` is on a GPU."""
    if dst.device.type == "cuda":
        host = host.pin_memory()
    dst[: host.numel()].copy_(host, non_blocking=True)


def _host_table(work: WorkPlan, merge_len: int | None = None) -> np.ndarray:
    """``[num_items, num_prefix_items, *merge_indptr, *items]`` as one int32 array; ``merge_indptr``
    is padded with its last value to ``merge_len`` entries (rows without partials)."""
    both = np.concatenate([work.prefix_items, work.suffix_items]).reshape(-1)
    merge = work.merge_indptr
    if merge_len is not None:
        merge = np.concatenate([merge, np.full(merge_len - len(merge), merge[-1], dtype=merge.dtype)])
    counts = np.array([len(both) // ITEM_FIELDS, len(work.prefix_items)])
    return np.concatenate([counts, merge, both]).astype(np.int32)


def make_plan(
    work: WorkPlan, kv_indices: torch.Tensor, gqa_group_size: int, prefix_block_m: int = PREFIX_BLOCK_M,
    kv_base: bool = False,
) -> PackedCascadePlan:
    """Copies a host :class:`WorkPlan` next to ``kv_indices`` (its device) as a :class:`PackedCascadePlan`
    (one host-to-device copy); ``kv_base``: with the items' base slots (a few device ops)."""
    flat = host_to_device(torch.from_numpy(_host_table(work)), kv_indices.device)
    n_items, n_merge = len(work.prefix_items) + len(work.suffix_items), len(work.merge_indptr)
    items = flat[2 + n_merge :].view(n_items, ITEM_FIELDS)
    bases = None
    if kv_base:
        bases = item_kv_bases(kv_indices, items[:, 2], items[:, 3],
                              torch.empty(max(1, n_items), dtype=torch.int32, device=kv_indices.device))
    return PackedCascadePlan(
        items, flat[:2], flat[2 : 2 + n_merge], kv_indices, n_items, work.num_partials, prefix_block_m,
        suffix_block_m_for(gqa_group_size), has_prefix=len(work.prefix_items) > 0, kv_base=bases,
    )


class PlanBuffers:
    """Fixed-address plan tensors for CUDA graphs: a graph captured over them replays any plan
    written later by :meth:`write` (nothing is planned inside capture).

    Args:
        max_tokens: most decode requests of a batch (``merge_indptr`` holds ``max_tokens + 1``).
        max_items: capacity of the item table; plans must respect it (``plan_work(max_items=...)``).
        max_kv_tokens: capacity of ``kv_indices`` in slots.
        device: where the buffers live.
    """

    def __init__(self, max_tokens: int, max_items: int, max_kv_tokens: int, device: torch.device):
        self.max_tokens, self.max_items = max_tokens, max_items
        self.flat = torch.zeros(2 + max_tokens + 1 + max_items * ITEM_FIELDS, dtype=torch.int32, device=device)
        self.counts = self.flat[:2]
        self.merge_indptr = self.flat[2 : 3 + max_tokens]
        self.items = self.flat[3 + max_tokens :].view(max_items, ITEM_FIELDS)
        self.kv_indices = torch.zeros(max(1, max_kv_tokens), dtype=torch.int32, device=device)
        self.kv_base = torch.full((max(1, max_items),), -1, dtype=torch.int32, device=device)

    def write(self, work: WorkPlan, gqa_group_size: int, num_partials: int, grid_items: int,
              plain_grid_items: int | None = None, num_kv_tokens: int | None = None,
              prefix_block_m: int = PREFIX_BLOCK_M) -> PackedCascadePlan:
        """Copies ``work`` into the buffers (asynchronously on the current stream) and returns the plan
        that reads them, launched on a fixed grid of ``grid_items`` items' programs per KV head (at
        least the plan's items), or with ``plain_grid_items`` as a pair of launches (``ROLE`` of the
        kernel) whose plain-decode one has that grid. With ``num_kv_tokens`` (the step's slots,
        already gathered into ``kv_indices[:num_kv_tokens]``) the items' base slots are computed too
        (contiguous fast path; a graph captured with them must always get them).

        Raises:
            ValueError: when ``work`` exceeds a capacity or the grid.
        """
        n_items = len(work.prefix_items) + len(work.suffix_items)
        n_tokens = len(work.merge_indptr) - 1
        cap = min(self.max_items, grid_items, plain_grid_items or grid_items)
        if n_items > cap or n_tokens > self.max_tokens or work.num_partials > num_partials:
            raise ValueError(f"plan of {n_items} items, {n_tokens} tokens, {work.num_partials} partials "
                             f"exceeds capacity {cap} items, {self.max_tokens} tokens, {num_partials} partials")
        copy_host_into(self.flat, torch.from_numpy(_host_table(work, self.max_tokens + 1)))
        bases = None
        if num_kv_tokens is not None:
            bases = self.kv_base
            item_kv_bases(self.kv_indices[: max(1, num_kv_tokens)], self.items[:n_items, 2],
                          self.items[:n_items, 3], bases)
        return PackedCascadePlan(self.items, self.counts, self.merge_indptr, self.kv_indices, n_items,
                                 num_partials, prefix_block_m, suffix_block_m_for(gqa_group_size), kv_base=bases,
                                 grid_items=grid_items, plain_grid_items=plain_grid_items)
