"""Placement: a decoding request's next KV pages go right after its last one (issue 5).

Where SGLang puts decode tokens. ``alloc_for_decode`` (inside ``ScheduleBatch.prepare_for_decode``)
hands slots out from the front of the allocator's ``free_pages``, in batch order: with
``page_size == 1`` request ``j`` gets ``free_pages[j]`` (``alloc_token_slots``); with
``page_size > 1`` a request writes into its last page until it is full, and the ``k``-th request
of the batch that needs a new page gets page ``free_pages[k]`` (``alloc_decode_kernel``). With
several requests decoding side by side, each request's suffix therefore ends up interleaved with
the others', one run per token (or per page).

Policy. Each running request holds a *reservation*: a range ``[next, end)`` of free pages where its
next pages go. A reservation is planned (:func:`plan_reservations`, host numpy) in this order:

1. kept: an existing one that continues the request's tail (``next == last_page + 1``), cut at the
   first page that is no longer free and at ``need``;
2. in place: the ``need`` free pages right after the request's last page, when all are free (a
   relocated suffix's headroom, :func:`~packinfer_sglang.compaction_plan.plan_compaction`);
3. kept: an existing one not yet used, cut as in 1;
4. fresh, a group's members side by side: the smallest free run that holds the whole group's
   need (ties: lowest start), members laid out in group order; else per member the smallest run
   that holds its need, else the largest run (partly);
5. none: the request gets SGLang's default page.

``need`` is the pages a request's expected remaining tokens fill (``PACKINFER_COMPACT_HORIZON``
caps the tokens), at most an equal share of half the free pages, so that reservations never hold
more than half of them and a newcomer finds room at the next refresh.

Before each decode allocation, :meth:`Placer.place` reorders ``free_pages`` so that the page each
request's reservation offers comes where SGLang's allocator takes that request's page from
(:func:`order_free_pages`), and reserved pages go to the back so that other allocations (prefill)
take unreserved pages first. Reservations are re-planned (:meth:`Placer.refresh`, one
device-to-host read of the free list and the batch's last slots) when a request that needs a page
has none left, at most once every ``PACKINFER_COMPACT_PLACE_EVERY`` steps, and after every
relocation. A relocation leaves free headroom after each relocated suffix
(:func:`~packinfer_sglang.compaction_plan.plan_compaction`), which step 2 reserves, so the suffix
stays one run and the next plan leaves it; a relocation does not claim reserved pages
(:meth:`Placer.reserved_pages`). Steps with no page to allocate (``page_size > 1``, most
steps) and steps where SGLang would evict or merge its free lists first are left to SGLang.

Ownership. Placement never claims a page: it permutes ``free_pages`` into a new tensor.

==========================  =====================================  ==========================
moment                      free pages (set)                       ``free_pages`` order
==========================  =====================================  ==========================
before :meth:`place`        ``F``                                  SGLang's
after :meth:`place`         ``F`` (same set)                       wanted pages first, reserved last
after SGLang's allocation   ``F`` minus the pages it handed out    SGLang's slicing
==========================  =====================================  ==========================

A reservation is a preference, not a claim: a page another allocation took is seen as not free on
the device and that request gets the next unreserved page instead (SGLang's behaviour). The
reorder never writes the old ``free_pages`` tensor in place: slices of it may be the
``out_cache_loc`` of a batch still in flight under the overlap scheduler.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def order_free_pages(free_pages: torch.Tensor, want: torch.Tensor, reserved: torch.Tensor) -> torch.Tensor:
    """A permutation of ``free_pages`` whose first ``n`` entries serve ``n`` allocations in order.

    Entry ``j < n`` is ``want[j]`` when that page is in ``free_pages`` (and no earlier ``j`` wants it),
    else the next page of the others. The others follow in their old order, unreserved pages before
    reserved ones. Fixed shapes, no host synchronization (safe on the scheduler's stream).

    Args:
        free_pages: ``[num_free]`` int64 page ids (slots when ``page_size == 1``), each in
            ``[1, num_pages]``, distinct (SGLang's ``allocator.free_pages``); read only.
        want: ``[n]`` int64 wanted page per allocation, ``-1`` for none; ``n <= num_free``.
        reserved: ``[num_pages + 1]`` bool, pages held for later allocations.

    Returns:
        ``[num_free]`` int64, a new tensor holding the same pages.
    """
    num_free, n, size = free_pages.numel(), want.numel(), reserved.numel()
    if n > num_free:
        raise ValueError(f"{n} allocations from {num_free} free pages")
    dev = free_pages.device
    j = torch.arange(n, dtype=torch.int64, device=dev)
    is_free = torch.zeros(size + 1, dtype=torch.bool, device=dev)
    is_free[free_pages] = True
    valid = (want >= 1) & (want < size)
    ok = valid & is_free[torch.where(valid, want, size)]
    head_of = torch.full((size + 1,), -1, dtype=torch.int64, device=dev)  # index ``size``: a sink
    head_of.scatter_reduce_(0, torch.where(ok, want, size), j, "amin", include_self=False)
    ok &= head_of[torch.where(ok, want, size)] == j  # a page wanted twice: the first j gets it
    chosen_pos = head_of[free_pages]
    other = chosen_pos < 0
    fail = ~ok
    n_fail = fail.sum()
    fail_pos = torch.zeros(n + 1, dtype=torch.int64, device=dev)  # q-th failed allocation -> its j
    fail_pos.scatter_(0, torch.where(fail, torch.cumsum(fail, 0) - 1, n), j)
    res = reserved[free_pages] & other
    unres = other & ~res
    q = torch.where(unres, torch.cumsum(unres, 0) - 1, unres.sum() + torch.cumsum(res, 0) - 1)
    other_pos = torch.where(q < n_fail, fail_pos[q.clamp(0, n)], n + q - n_fail)
    out = torch.empty_like(free_pages)
    out[torch.where(other, other_pos, chosen_pos)] = free_pages
    return out


def group_rows(groups) -> list[np.ndarray]:
    """Batch rows of each group of a :class:`~packinfer_sglang.grouping.DecodeGroups`, group order."""
    gi = groups.group_indptr
    return [groups.order[gi[g]:gi[g + 1]] for g in range(groups.num_groups)]


def _free_stretch(free: np.ndarray, start: int, limit: int) -> int:
    """Free pages from ``start`` on, up to ``limit``."""
    window = free[start:start + limit]
    stop = np.flatnonzero(~window)
    return int(stop[0]) if len(stop) else len(window)


def _runs(free: np.ndarray) -> np.ndarray:
    """``[num_runs, 2]`` int64 ``(first_page, num_pages)`` of the ``True`` stretches, ascending."""
    pages = np.flatnonzero(free)
    if len(pages) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.diff(pages, prepend=pages[0] - 2) != 1)
    return np.stack([pages[starts], np.diff(np.append(starts, len(pages)))], axis=1).astype(np.int64)


def _take(runs: np.ndarray, need: int, partial: bool) -> tuple[int, int] | None:
    """Carves ``need`` pages from the front of the smallest run that holds them (ties: lowest start);
    with ``partial``, from the largest run when none does. Updates ``runs`` in place; returns
    ``(first_page, num_pages)`` or ``None``."""
    lens = runs[:, 1]
    fits = np.flatnonzero(lens >= need)
    if len(fits):
        k = int(fits[np.argmin(lens[fits])])
    elif partial and len(lens) and lens.max() > 0:
        k = int(np.argmax(lens))
    else:
        return None
    first, count = int(runs[k, 0]), min(need, int(lens[k]))
    runs[k] += (count, -count)
    return first, count


def plan_reservations(last_pages: np.ndarray, need_pages: np.ndarray, held: np.ndarray,
                      groups: list[np.ndarray], free_pages: np.ndarray, num_pages: int) -> np.ndarray:
    """Reservations for a decode batch (module docstring, steps 1-5); pure, deterministic.

    Args:
        last_pages: ``[n]`` int64 page of each request's last token (batch order).
        need_pages: ``[n]`` int64 pages each request is expected to need (0: none).
        held: ``[n, 3]`` int64 current ``(start, next, end)`` per request; ``next >= end``: none.
        groups: batch rows of each decode group, in group order (every row in exactly one).
        free_pages: ``[m]`` int64 free page ids, any order; num_pages: largest page id.

    Returns:
        ``[n, 3]`` int64 ``(start, next, end)``: the request's next pages are ``next:end``; pages
        ``start:end`` are its reservation; ``next == end`` when it has none.
    """
    n = len(last_pages)
    free = np.zeros(num_pages + 2, dtype=bool)
    free[np.asarray(free_pages, dtype=np.int64)] = True
    out = np.zeros((n, 3), dtype=np.int64)
    held = np.asarray(held, dtype=np.int64).reshape(n, 3)

    def keep(i, continuing):
        start, nxt, end = (int(x) for x in held[i])
        if out[i, 1] == out[i, 2] and nxt < end and nxt == (last_pages[i] + 1 if continuing else start):
            span = _free_stretch(free, nxt, min(end - nxt, int(need_pages[i])))
            if span:
                out[i] = (start, nxt, nxt + span)
                free[nxt:nxt + span] = False

    for i in range(n):
        keep(i, continuing=True)
    for i in range(n):  # in place beats an unused reservation elsewhere (a relocated tail's headroom)
        s, need = int(last_pages[i]) + 1, int(need_pages[i])
        if out[i, 1] == out[i, 2] and need > 0 and _free_stretch(free, s, need) == need:
            out[i] = (s, s, s + need)
            free[s:s + need] = False
    for i in range(n):
        keep(i, continuing=False)
    runs = _runs(free)
    for rows in groups:
        rows = [int(i) for i in rows if out[i, 1] == out[i, 2] and need_pages[i] > 0]
        whole = _take(runs, int(need_pages[rows].sum()), partial=False) if len(rows) > 1 else None
        first = whole[0] if whole else 0
        for i in rows:
            got = (first, int(need_pages[i])) if whole else _take(runs, int(need_pages[i]), partial=True)
            if got:
                out[i] = (got[0], got[0], got[0] + got[1])
                first += got[1]
    return out


class Placer:
    """Reservations of one scheduler's running requests, and the per-step free-list reorder.

    Args:
        allocator: SGLang's ``TokenToKVPoolAllocator`` or ``PagedTokenToKVPoolAllocator``.
        req_to_token: SGLang's ``[num_rows, max_context_len]`` int32 table.
        refresh_every: decode steps between reservation refreshes at most (forced ones aside).
    """

    def __init__(self, allocator, req_to_token: torch.Tensor, refresh_every: int = 8):
        self.allocator, self.req_to_token = allocator, req_to_token
        self.page_size = allocator.page_size
        self.num_pages = allocator.num_pages if self.page_size > 1 else allocator.size
        self.refresh_every = refresh_every
        self._held: dict[str, list[int]] = {}  # rid -> [start, next, end] pages
        self._reserved = torch.zeros(self.num_pages + 1, dtype=torch.bool, device=allocator.free_pages.device)
        self._since_refresh = refresh_every
        self._forced = False
        self.refreshes = 0
        self.offered_pages = 0  # pages offered from reservations (taken unless another allocation won)

    def reserved_pages(self) -> torch.Tensor:
        """``[num_pages + 1]`` bool on the allocator's device: pages promised to reservations at the
        last refresh (free or since taken); a relocation should not claim them."""
        return self._reserved

    def invalidate(self) -> None:
        """Forces a refresh at the next :meth:`place` (call after relocating KV)."""
        self._forced = True

    def place(self, reqs, seq_lens: np.ndarray,
              plan_inputs: Callable[[], tuple[list[np.ndarray], np.ndarray]]) -> int:
        """Reorders ``allocator.free_pages`` for this step's decode allocation (rebinds it to a new
        tensor holding the same pages); returns the pages offered from reservations.

        Call right before SGLang's ``alloc_for_decode`` (one token per request), batch in its final
        order. ``seq_lens``: ``[n]`` tokens each request holds before this step (the position of its
        new token). ``plan_inputs()``: ``(groups, remaining_steps)`` as :func:`plan_reservations`
        and the caller's horizon want them, called only on a refresh.
        """
        ps, alloc = self.page_size, self.allocator
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        needy = np.flatnonzero(seq_lens % ps == 0)
        self._since_refresh += 1
        # SGLang evicts (paged: frees to the front) or merges the free lists when short: leave it be.
        if len(needy) == 0 or len(alloc.free_pages) < len(reqs) or alloc.available_size() < len(reqs) * ps:
            return 0
        lacking = any(self._left(reqs[i].rid) == 0 for i in needy)
        if self._forced or (lacking and self._since_refresh >= self.refresh_every):
            self.refresh(reqs, seq_lens, *plan_inputs())
        want = np.full(len(needy), -1, dtype=np.int64)
        for k, i in enumerate(needy):
            held = self._held.get(reqs[i].rid)
            if held is not None and held[1] < held[2]:
                want[k] = held[1]
                held[1] += 1
        if (want < 0).all():
            return 0
        dev = alloc.free_pages.device
        want_dev = torch.from_numpy(want)
        if dev.type == "cuda":  # no host sync: the scheduler must not wait for the forward in flight
            want_dev = want_dev.pin_memory().to(dev, non_blocking=True)
        want_dev = want_dev.to(dev)
        alloc.free_pages = order_free_pages(alloc.free_pages, want_dev, self._reserved)
        offered = int((want >= 0).sum())
        self.offered_pages += offered
        return offered

    def _left(self, rid) -> int:
        held = self._held.get(rid)
        return 0 if held is None else max(held[2] - held[1], 0)

    def refresh(self, reqs, seq_lens: np.ndarray, groups: list[np.ndarray],
                remaining_steps: np.ndarray) -> None:
        """Re-plans every request's reservation (one device-to-host read); drops those of requests
        not in ``reqs``. ``seq_lens``: as in :meth:`place` (every entry >= 1)."""
        ps, alloc = self.page_size, self.allocator
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        dev = self.req_to_token.device
        rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=dev)
        cols = torch.from_numpy(seq_lens - 1).to(dev)
        last_pages = (self.req_to_token[rows, cols].to(torch.int64) // ps).cpu().numpy()
        free = torch.cat((alloc.free_pages, alloc.release_pages)).cpu().numpy()
        ahead = np.asarray(remaining_steps, dtype=np.int64)
        need = -(-(seq_lens + ahead) // ps) - (-(-seq_lens // ps))  # pages the next tokens start
        need = np.minimum(need, max(1, len(free) // (2 * max(len(reqs), 1))))  # half the free pages at most
        need = np.maximum(need, (seq_lens % ps == 0).astype(np.int64))
        held = np.array([self._held.get(r.rid, [0, 0, 0]) for r in reqs], dtype=np.int64).reshape(-1, 3)
        plan = plan_reservations(last_pages, need, held, groups, free, self.num_pages)
        self._held = {r.rid: [int(x) for x in p] for r, p in zip(reqs, plan)}
        mask = np.zeros(self.num_pages + 1, dtype=bool)
        for start, nxt, end in plan:
            mask[nxt:end] = True
        self._reserved = torch.from_numpy(mask).to(self._reserved.device)
        self._since_refresh, self._forced = 0, False
        self.refreshes += 1
