"""Contiguous free ranges from SGLang's token allocators, and the KV copy between slots.

SGLang's ``TokenToKVPoolAllocator`` (``page_size == 1``) keeps free slot ids, and
``PagedTokenToKVPoolAllocator`` free page ids (page ``p`` = slots ``p * page_size + [0,
page_size)``), in two unsorted int64 tensors: ``free_pages`` (allocated from the front) and, when
``need_sort``, ``release_pages`` (frees land there until ``merge_and_sort_free`` moves them into
``free_pages``). Page 0 (slot 0) is SGLang's padding page and never free. Here a "page" is a slot
when ``page_size == 1``.

Ownership: :func:`claim_pages` (:func:`claim_page_ranges`) moves pages from free to the caller (available size drops by
``num_pages * page_size``); the caller returns them with the allocator's own ``free``.
"""

from __future__ import annotations

import numpy as np
import torch


def unsupported_reason(allocator, kv_pool) -> str | None:
    """Why compaction cannot run on this allocator/pool pair, or ``None`` if it can."""
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if type(allocator) not in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        return f"allocator {type(allocator).__name__} is not SGLang's token or paged allocator"
    if not isinstance(kv_pool, MHATokenToKVPool) or type(kv_pool).__name__ != "MHATokenToKVPool":
        return f"KV pool {type(kv_pool).__name__} is not SGLang's MHATokenToKVPool"
    if kv_pool.kv_cache_layout != "nhd" or kv_pool.is_quantized_kv_cache:
        return f"KV layout {kv_pool.kv_cache_layout!r} / quantized KV is not supported"
    return None


def _free_page_ids(allocator) -> torch.Tensor:
    release = allocator.release_pages
    free = allocator.free_pages
    return torch.cat((free, release)) if release is not None and len(release) else free


def free_page_runs(allocator, exclude: torch.Tensor | None = None) -> np.ndarray:
    """``[num_runs, 2]`` int64 ``(first_page, num_pages)`` of the allocator's free pages, ascending,
    leaving out pages marked in ``exclude`` (``[num_pages + 1]`` bool, e.g. placement's
    reservations). Reads the allocator (one device-to-host copy of its free list); changes nothing."""
    pages = _free_page_ids(allocator)
    if exclude is not None:
        pages = pages[~exclude.to(pages.device)[pages]]
    pages = torch.sort(pages).values.cpu().numpy()
    if len(pages) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.diff(pages, prepend=pages[0] - 2) != 1)
    lens = np.diff(np.append(starts, len(pages)))
    return np.stack([pages[starts], lens], axis=1).astype(np.int64)


def claim_pages(allocator, first_page: int, num_pages: int) -> torch.Tensor:
    """Takes free pages ``first_page : first_page + num_pages`` out of the allocator
    (:func:`claim_page_ranges` of one range).

    Returns:
        ``[num_pages]`` int64 page ids on the allocator's device.
    """
    claim_page_ranges(allocator, np.array([[first_page, num_pages]]))
    return torch.arange(first_page, first_page + num_pages, dtype=torch.int64, device=allocator.free_pages.device)


def claim_page_ranges(allocator, ranges: np.ndarray) -> None:
    """Takes the free pages of ``ranges`` (``[k, 2]`` int64 ``(first_page, num_pages)``, disjoint)
    out of the allocator, with one pass over its free list.

    With ``need_sort`` it first merges ``release_pages`` into ``free_pages`` as SGLang's own
    ``alloc`` does when short; the order of the remaining free pages is kept otherwise.

    Raises:
        RuntimeError: if any of those pages is not free (the plan is stale).
    """
    ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    if allocator.need_sort:
        allocator.merge_and_sort_free()
    free = allocator.free_pages
    # a difference array marks the ranges: +1 at each start, -1 after each end
    edges = np.zeros(int((ranges[:, 0] + ranges[:, 1]).max(initial=0)) + 1, dtype=np.int64)
    np.add.at(edges, ranges[:, 0], 1)
    np.add.at(edges, ranges[:, 0] + ranges[:, 1], -1)
    wanted = torch.from_numpy(np.cumsum(edges) > 0).to(free.device)  # its last entry is False
    mask = wanted[free.clamp(max=len(wanted) - 1)]
    got, num_pages = int(mask.sum()), int(ranges[:, 1].sum())
    if got != num_pages:
        first = int(ranges[0, 0]) if len(ranges) else 0
        where = f"pages {first}:{first + num_pages}" if len(ranges) == 1 else f"{len(ranges)} page ranges"
        raise RuntimeError(f"{where}: only {got} of {num_pages} are free")
    allocator.free_pages = free[~mask]


def move_kv(kv_pool, new_slots: torch.Tensor, old_slots: torch.Tensor) -> None:
    """Copies K and V of every layer: ``k_buffer[l][new_slots] = k_buffer[l][old_slots]`` (same for
    V), on the current stream. Uses the pool's fused all-layer copy when SGLang built it
    (``enable_kv_cache_copy``), else one indexed copy per layer and buffer
    (``move_kv_cache_native``). ``new_slots`` and ``old_slots`` must be disjoint."""
    from sglang.srt.mem_cache.memory_pool import move_kv_cache_native

    if new_slots.numel() == 0:
        return
    if kv_pool._kv_copy_config is not None or kv_pool.use_native_move_kv_cache:
        kv_pool.move_kv_cache(new_slots, old_slots)
    else:
        move_kv_cache_native(kv_pool.k_buffer, kv_pool.v_buffer, new_slots, old_slots)
