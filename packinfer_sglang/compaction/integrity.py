"""``check_pool_integrity``: SGLang's KV pool invariant plus single ownership of every page.

Every page (a slot when ``page_size == 1``) except SGLang's padding page 0 has exactly one holder:

- the allocator's free lists (``free_pages`` and ``release_pages``),
- a radix-tree node (``node.value``, not evicted),
- a live request's tail ``req_to_token[req, cache_protected_len:kv_allocated_len]`` (with
  ``page_size > 1`` the tail's last page, partly filled, is the request's),
- or slots a relocation retired and has not yet returned (``pending``; see :mod:`.relocate`).

Counting tokens this is SGLang's own busy-time check (``SchedulerInvariantChecker``:
``available + evictable + protected + uncached == total``, uncached per request
``ceil_align(kv_allocated_len, page_size) - cache_protected_len``) with ``pending`` added.
A live request's row must also alias the tree: ``row[:cache_protected_len]`` equals the slots
of the path root→``req.last_node``, and ``req.prefix_indices == row[:len(prefix_indices)]``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..grouping import slots_of_path


def _tree_nodes(cache):
    stack = list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.value is not None:
            yield node


def _fail(msg: str):
    raise AssertionError(msg)


def _pages(slots: np.ndarray, ps: int, what: str) -> np.ndarray:
    """Page ids of slots laid out from a page boundary (position ``i`` at offset ``i % ps``)."""
    if ps == 1:
        return slots
    padded = np.full(-(-len(slots) // ps) * ps, -1, dtype=np.int64)
    padded[: len(slots)] = slots
    pages = padded.reshape(-1, ps)
    expect = pages[:, :1] + np.arange(ps)
    if (pages[:, 0] % ps).any() or ((pages != expect) & (pages >= 0)).any():
        _fail(f"{what}: slots are not whole pages in position order (page_size {ps})")
    return pages[:, 0] // ps


def _check_row(req, row: np.ndarray, ps: int, num_slots: int) -> None:
    cpl, n = req.cache_protected_len, req.kv.kv_allocated_len
    if cpl % ps or cpl > n:
        _fail(f"req {req.rid}: cache_protected_len {cpl} not page-aligned (page_size {ps}) or > allocated {n}")
    used = row[:n]
    if len(used) and (used.min() < ps or used.max() >= num_slots):
        _fail(f"req {req.rid}: req_to_token entries outside [{ps}, {num_slots}): min {used.min()}, max {used.max()}")
    path = slots_of_path(req.last_node).numpy()
    if len(path) != cpl or not np.array_equal(path, used[:cpl]):
        _fail(f"req {req.rid}: row[:{cpl}] does not alias its tree path of {len(path)} tokens")
    pre = req.prefix_indices.cpu().numpy()
    if not np.array_equal(pre, used[:len(pre)]):
        _fail(f"req {req.rid}: prefix_indices ({len(pre)} tokens) differ from its req_to_token row")


def check_pool_integrity(cache, live_reqs, pending: torch.Tensor | None = None) -> None:
    """Checks the module docstring's invariants on SGLang's real pools and tree.

    Args:
        cache: a ``RadixCache`` built with ``req_to_token_pool`` and ``token_to_kv_pool_allocator``.
        live_reqs: every request holding a ``req_to_token`` row (running, chunked, in-flight
            prefill); each needs ``rid, req_pool_idx, cache_protected_len, kv.kv_allocated_len,
            last_node, prefix_indices``.
        pending: slots retired by relocations and not yet freed (``Relocator.pending_free_slots``).

    Raises:
        AssertionError: naming the broken invariant with its numbers (pages, tokens, request ids).
    """
    alloc, rtt = cache.token_to_kv_pool_allocator, cache.req_to_token_pool.req_to_token
    ps = alloc.page_size
    num_pages = alloc.num_pages if ps > 1 else alloc.size
    num_slots = (num_pages + 1) * ps
    if hasattr(cache, "check_integrity"):
        cache.check_integrity()  # tree counters, lock refs, value lengths
    holders = {"free": torch.cat((alloc.free_pages, alloc.release_pages)).cpu().numpy()}
    tree = []
    for node in _tree_nodes(cache):
        value = node.value.cpu().numpy()
        if len(value) % ps:
            _fail(f"node {node.id}: {len(value)} slots, not whole pages (page_size {ps})")
        tree.append(_pages(value, ps, f"node {node.id}"))
    holders["tree"] = np.concatenate(tree) if tree else np.zeros(0, np.int64)
    tails, uncached = [], 0
    for req in live_reqs:
        row = rtt[req.req_pool_idx].cpu().numpy().astype(np.int64)
        _check_row(req, row, ps, num_slots)
        cpl, n = req.cache_protected_len, req.kv.kv_allocated_len
        tails.append(_pages(row[cpl:n], ps, f"req {req.rid} tail"))
        uncached += -(-n // ps) * ps - cpl
    holders["tails"] = np.concatenate(tails) if tails else np.zeros(0, np.int64)
    pend = np.zeros(0, np.int64) if pending is None else np.unique(pending.cpu().numpy() // ps)
    holders["pending"] = pend
    counts = {k: np.bincount(v.astype(np.int64), minlength=num_pages + 1)[: num_pages + 1] for k, v in holders.items()}
    if any(len(v) and (v.min() < 1 or v.max() > num_pages) for v in holders.values()):
        _fail(f"a page id outside [1, {num_pages}]: " + ", ".join(
            f"{k} {v.min()}..{v.max()}" for k, v in holders.items() if len(v)))
    total = sum(counts.values())
    bad = np.flatnonzero(total[1:] != 1) + 1
    if len(bad):
        who = {k: int(c[bad[0]]) for k, c in counts.items()}
        _fail(f"{len(bad)} pages not held exactly once (page_size {ps}); first {bad[:8].tolist()}, "
              f"holders of page {bad[0]}: {who}")
    avail, ev, prot = alloc.available_size(), cache.evictable_size_, cache.protected_size_
    if avail + ev + prot + uncached + len(pend) * ps != num_pages * ps:
        _fail(f"available {avail} + evictable {ev} + protected {prot} + uncached {uncached} + "
              f"pending {len(pend) * ps} != total {num_pages * ps} tokens")
