"""Group-contiguous KV compaction in SGLang's pool: applying a :mod:`.compaction_plan`.

:class:`Relocator` moves the chosen owners (tree nodes, request tails) of a decode group into the
contiguous page range the plan claimed, and rewrites every holder of a moved slot id through one
old→new lookup table (``lut``, identity outside the moved pages):

- ``req_to_token`` rows of every live request (running, chunked, in-flight prefill; positions
  ``< kv_allocated_len``), in place: ``row = lut[row]``;
- ``node.value`` of every moved tree node (SGLang keeps no other reference: ``match_prefix``
  concatenates copies, ``_split_node`` clones), so requests aliasing a node see it through
  their rewritten rows;
- ``req.prefix_indices`` of every live request (a copy of its row's head).

Slot ownership over one relocation of pages ``O`` (old) to ``N`` (new, contiguous):

=================  =========  =============================  ==========================
moment             ``O``      ``N``                          holders' ids
=================  =========  =============================  ==========================
before             owner      free (allocator)               ``O``
``relocate``       pending    owner (claimed), KV not yet    ``N``
``flush_copies``   pending    owner, copy queued on stream   ``N``
``free_deferred``  free       owner                          ``N``
=================  =========  =============================  ==========================

Ordering with SGLang's overlap scheduler (proposal in ``patches/compaction_hook.py``): at step
``k`` the scheduler prepares batch ``k+1`` while forward ``k`` runs on the forward stream.

1. ``relocate`` runs before ``ScheduleBatch.prepare_for_decode`` of batch ``k+1`` (schedule
   stream, after SGLang's WAR barrier, so forward ``k`` has read its ``req_to_token`` rows). It
   claims ``N``, rewrites rows, node values and prefix indices; ``prepare_for_decode`` then
   allocates batch ``k+1``'s tokens from the rewritten rows (paged: next to the new last slot).
2. ``flush_copies`` runs when forward ``k+1`` is being built (``ForwardBatch.init_new``, current
   stream = the forward stream): the copy ``O → N`` is ordered after forward ``k`` (which may still
   write the KV of the token at ``O`` that step ``k`` allocated) and before forward ``k+1`` reads
   ``N``. No SGLang code frees or allocates between 1 and 2.
3. ``free_deferred`` runs at the next step's planning point (forward ``k+1`` launched, so any
   later reuse of ``O`` is written by forward ``k+2`` or later, behind the copy on the stream).

Decisions use only deterministic inputs (node ids, request ids, slot ids, lengths), so every
tensor-parallel rank relocates identically; each rank copies its own heads.

Tokens decoded after a relocation are placed by :mod:`.placement` (when on): inside
``prepare_for_decode``, after step 1, the free list is reordered so that each request's next page
comes from a run reserved for it; a relocation forces those reservations to be re-planned.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .alloc import claim_page_ranges, free_page_runs, move_kv, unsupported_reason
from .plan import (
    CompactionPlan,
    CostModel,
    Fragmentation,
    GroupLayout,
    Owner,
    layout_fragmentation,
    plan_compaction,
)


def _path(node) -> list:
    out = []
    while node is not None and node.parent is not None:
        out.append(node)
        node = node.parent
    return out[::-1]


def _common(paths: list[list]) -> list:
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] is p[n]:
            n += 1
        common = common[:n]
    return common


class Layouts(NamedTuple):
    groups: list[GroupLayout]
    holders: dict  # owner key -> tree node or request (the objects relocate rewrites)


def collect_layouts(reqs, groups, req_to_token: torch.Tensor, remaining_steps) -> Layouts:
    """Where each decode group's KV lies, read from the tree and ``req_to_token``.

    Args:
        reqs: the decode batch's requests (rows of ``groups``), each with ``rid, req_pool_idx,
            cache_protected_len, kv.kv_allocated_len, last_node``.
        groups: :class:`~packinfer_sglang.grouping.DecodeGroups` of ``reqs``.
        req_to_token: SGLang's ``[num_rows, max_context_len]`` int32 table (one device-to-host copy
            of the batch's rows).
        remaining_steps: ``[len(reqs)]`` expected decode steps left per request.

    Returns:
        :class:`Layouts`. A group of two or more shares the nodes common to its members' paths;
        a group of one has no prefix (its nodes and tail are its suffix).
    """
    lens = [r.kv.kv_allocated_len for r in reqs]
    idx = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=req_to_token.device)
    rows = req_to_token[idx, : max(lens, default=0)].cpu().numpy().astype(np.int64)
    remaining = np.asarray(remaining_steps, dtype=np.int64)
    holders, out = {}, []
    gi = groups.group_indptr
    for g in range(groups.num_groups):
        members = [int(i) for i in groups.order[gi[g]:gi[g + 1]]]
        paths = [_path(reqs[i].last_node) for i in members]
        common = _common(paths) if len(members) > 1 and groups.prefix_lens[g] > 0 else []

        def node_owner(n):
            holders[("node", n.id)] = n
            return Owner(("node", n.id), n.value.cpu().numpy().astype(np.int64))

        suffixes = []
        for i, path in zip(members, paths):
            r = reqs[i]
            own = [node_owner(n) for n in path[len(common):]]
            if lens[i] > r.cache_protected_len:
                holders[("tail", r.rid)] = r
                own.append(Owner(("tail", r.rid), rows[i, r.cache_protected_len:lens[i]]))
            suffixes.append(own)
        out.append(GroupLayout([node_owner(n) for n in common], suffixes, remaining[members]))
    return Layouts(out, holders)


def pinned_nodes(holders: dict, live_reqs) -> frozenset:
    """Keys of tree nodes locked by someone outside ``live_reqs`` (a chunked prefill, a session):
    their rows cannot be rewritten, so the nodes stay. A node's ``lock_ref`` counts the lockers whose
    ``last_node`` lies in its subtree; it must equal the live requests on paths through it."""
    on_path: dict[int, int] = {}
    for r in live_reqs:
        for n in _path(r.last_node):
            on_path[id(n)] = on_path.get(id(n), 0) + 1
    return frozenset(k for k, n in holders.items() if k[0] == "node" and n.lock_ref != on_path.get(id(n), 0))


def measure_fragmentation(cache, reqs, groups=None) -> Fragmentation:
    """Runs per group prefix and per request suffix of a decode batch, for a benchmark's per-step
    log (``.summary()``). ``groups``: default ``cache.decode_groups`` (packinfer cache) or one group
    per request. One device-to-host copy of the batch's ``req_to_token`` rows."""
    if groups is None:
        from ..grouping import ungrouped

        lens = [r.kv.kv_allocated_len + 1 for r in reqs]
        groups = cache.decode_groups(reqs, lens) if hasattr(cache, "decode_groups") else ungrouped(len(reqs))
    rem = np.zeros(len(reqs), np.int64)
    return layout_fragmentation(collect_layouts(reqs, groups, cache.req_to_token_pool.req_to_token, rem).groups)


class Relocator:
    """Plans and applies compaction on one scheduler's pools (see module docstring).

    Args:
        cache: SGLang ``RadixCache`` (ours or the base class) with its pools.
        cost: the cost model; max_tokens: tokens copied per plan at most.
        headroom: leave free pages for each relocated suffix's remaining tokens right after it
            (``plan_compaction``); useful with :mod:`.placement` on, which continues suffixes there.

    Raises:
        ValueError: for allocators or KV pools compaction does not support.
    """

    def __init__(self, cache, cost: CostModel, max_tokens: int = 65536, headroom: bool = True):
        self.cache = cache
        self.allocator = cache.token_to_kv_pool_allocator
        self.req_to_token = cache.req_to_token_pool.req_to_token
        self.kv_pool = self.allocator.get_kvcache()
        reason = unsupported_reason(self.allocator, self.kv_pool)
        if reason:
            raise ValueError(f"compaction unsupported: {reason}")
        self.page_size = self.allocator.page_size
        self.cost, self.max_tokens, self.headroom = cost, max_tokens, headroom
        rows = self.kv_pool.k_buffer[0].shape[0]
        self._lut = torch.arange(rows, dtype=torch.int64, device=self.req_to_token.device)
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (new, old) not yet launched
        self._unflushed: list[torch.Tensor] = []  # old slots whose copy is not launched
        self._retired: list[torch.Tensor] = []  # old slots whose copy is launched

    def measure(self, reqs, groups) -> Fragmentation:
        """Fragmentation of a decode batch (runs per group prefix and request suffix)."""
        return measure_fragmentation(self.cache, reqs, groups)

    def compact(self, reqs, groups, remaining_steps, live_reqs=None, avoid=None) -> CompactionPlan:
        """Plans for the batch ``reqs`` (grouped as ``groups``) and relocates (without copying;
        call :meth:`flush_copies`). ``live_reqs``: every request holding a ``req_to_token`` row
        (default ``reqs``); all of them are rewritten. ``avoid``: ``[num_pages + 1]`` bool, free
        pages not to relocate into (placement's reservations: taking them breaks other suffixes)."""
        live = reqs if live_reqs is None else live_reqs
        layouts = collect_layouts(reqs, groups, self.req_to_token, remaining_steps)
        free = free_page_runs(self.allocator, avoid)
        plan = plan_compaction(layouts.groups, free, self.page_size, self.cost,
                               self.max_tokens, pinned_nodes(layouts.holders, live), self.headroom)
        self.relocate(plan, layouts.holders, live)
        return plan

    def relocate(self, plan: CompactionPlan, holders: dict, live_reqs) -> None:
        """Claims the plan's pages and rewrites every holder of a moved slot id (module docstring);
        queues the KV copy. Raises ``RuntimeError`` if a planned page is no longer free."""
        if not plan.moves:
            return
        ps, dev = self.page_size, self.req_to_token.device
        owners = [o for m in plan.moves for o in m.owners]
        claim_page_ranges(self.allocator, np.array([(o.new_first_page, len(o.old_pages)) for o in owners]))
        old_pages = np.concatenate([o.old_pages for o in owners])
        new_pages = np.concatenate([o.new_first_page + np.arange(len(o.old_pages)) for o in owners])
        offs = np.arange(ps)
        old_all = torch.from_numpy((old_pages[:, None] * ps + offs).ravel()).to(dev)
        new_all = torch.from_numpy((new_pages[:, None] * ps + offs).ravel()).to(dev)
        old_used = torch.cat([self._owner_slots(holders[o.key]) for o in owners])
        self._lut[old_all] = new_all
        try:
            new_used = self._lut[old_used]
            for o in owners:
                if o.key[0] == "node":
                    node = holders[o.key]
                    node.value = self._lut[node.value]
            self._rewrite_requests(live_reqs)
        finally:
            self._lut[old_all] = old_all
        self._copies.append((new_used, old_used))
        self._unflushed.append(old_used)

    def _owner_slots(self, holder) -> torch.Tensor:
        if hasattr(holder, "children"):  # a tree node
            return holder.value.to(torch.int64)
        row = self.req_to_token[holder.req_pool_idx]
        return row[holder.cache_protected_len:holder.kv.kv_allocated_len].to(torch.int64)

    def _rewrite_requests(self, live_reqs) -> None:
        live = [r for r in live_reqs if r.req_pool_idx is not None and r.kv is not None]
        if not live:
            return
        dev = self.req_to_token.device
        idx = torch.tensor([r.req_pool_idx for r in live], dtype=torch.int64, device=dev)
        lens = torch.tensor([r.kv.kv_allocated_len for r in live], dtype=torch.int64, device=dev)
        width = int(lens.max())
        rows = self.req_to_token[idx, :width].to(torch.int64)
        mask = torch.arange(width, device=dev)[None, :] < lens[:, None]
        mapped = self._lut[rows.clamp(0, len(self._lut) - 1)]
        self.req_to_token[idx, :width] = torch.where(mask, mapped, rows).to(self.req_to_token.dtype)
        for r in live:
            if r.prefix_indices is not None and r.prefix_indices.numel():
                r.prefix_indices = self._lut[r.prefix_indices.to(dev)].to(r.prefix_indices.device)

    @property
    def has_pending_copies(self) -> bool:
        """Whether relocations wait for :meth:`flush_copies`."""
        return bool(self._copies)

    def flush_copies(self) -> int:
        """Launches the queued KV copies, oldest first, on the current stream; returns tokens."""
        n = 0
        for new, old in self._copies:
            move_kv(self.kv_pool, new, old)
            n += new.numel()
        self._copies.clear()
        self._retired.extend(self._unflushed)
        self._unflushed.clear()
        return n

    def free_deferred(self) -> int:
        """Returns retired slots whose copy has been launched to the allocator; returns slots."""
        if not self._retired:
            return 0
        slots = torch.cat(self._retired)
        self._retired.clear()
        self.allocator.free(slots)
        return slots.numel()

    def forget_retired(self) -> int:
        """Drops the queued copies and every retired slot without freeing them: for a pool about to be
        cleared whole (SGLang's ``/flush_cache`` when idle), which frees them with all others; freeing
        them afterwards would put them on the free list twice. Returns the slots dropped."""
        n = sum(t.numel() for t in self._unflushed + self._retired)
        self._copies.clear()
        self._unflushed.clear()
        self._retired.clear()
        return n

    def pending_free_slots(self) -> torch.Tensor:
        """Retired slots not yet returned to the allocator (for ``check_pool_integrity``)."""
        parts = self._unflushed + self._retired
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
