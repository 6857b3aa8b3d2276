"""Hooks on ``Scheduler.on_idle``: nothing held back at idle, and the pools checked there.

SGLang calls ``Scheduler.on_idle`` on every pass of its event loop that finds no batch to run; when
the scheduler is fully idle (no running, waiting or in-flight batch, the overlap scheduler's result
queue drained, so every launched forward has completed) it checks its pool equation
``available + evictable + protected == total`` and, strict by default
(``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE``), raises on a leak. Two hooks, registered by the
plugin:

- BEFORE (:func:`release_at_idle`, with ``PACKINFER_COMPACT=1``): returns to the allocator the slots
  a relocation retired whose copy was launched before the last forward. During decode the next
  step's ``prepare_for_decode`` returns them; a relocation in the last decode step of the last
  batch has no next step, and SGLang's check would count its old slots as leaked.
- AFTER (:func:`check_at_idle`, with ``PACKINFER_VERIFY=1``): once per idle period (the scheduler's
  ``forward_ct`` moved since the last check), :func:`~packinfer_sglang.compaction.integrity.check_pool_integrity`
  on the tree and pools with no live request (every page owned once: free, tree, or retired by a
  relocation; tree counters and lock references) and one log line (``leaked slots``: tree slots
  still locked with no request running, which SGLang's equation counts as protected)::

      packinfer: idle check 3 passed after forward 1234: pool 60000 = available 51200 + evictable 8800 + locked 0, leaked slots 0

  A failed check raises ``AssertionError`` naming the invariant, as verification does.

Both read the scheduler's ``tree_cache`` and return at once without the packinfer radix cache.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
TARGET = "sglang.srt.managers.scheduler.Scheduler.on_idle"
LINE_PREFIX = "packinfer: idle check"


def _idle_runtime(scheduler):
    """The packinfer runtime of ``scheduler`` when it is fully idle, else ``None``."""
    runtime = getattr(getattr(scheduler, "tree_cache", None), "runtime", None)
    if runtime is None or not scheduler.is_fully_idle():
        return None
    return runtime


def _relocator(runtime):
    state = runtime.compaction
    return getattr(state, "relocator", None) if state is not None else None


def release_at_idle(scheduler, *args, **kwargs):
    """``HookType.BEFORE`` hook on ``Scheduler.on_idle``: ``(scheduler)``; returns ``None``. Frees the
    slots of relocations whose copies have been launched (:meth:`Relocator.free_deferred`)."""
    runtime = _idle_runtime(scheduler)
    relocator = _relocator(runtime) if runtime is not None else None
    if relocator is None or relocator.has_pending_copies:
        return  # copies not launched yet: their old slots still hold the only KV
    freed = relocator.free_deferred()
    if freed and runtime.config.log_every:
        logger.info("packinfer: returned %d slots retired by compaction at idle", freed)


def check_at_idle(result, scheduler, *args, **kwargs):
    """``HookType.AFTER`` hook on ``Scheduler.on_idle``: ``(result, scheduler)``; returns ``None``.

    Raises:
        AssertionError: the tree or the pools break an invariant (message names it and its numbers).
    """
    runtime = _idle_runtime(scheduler)
    if runtime is None or not runtime.config.verify:
        return
    forward_ct = getattr(scheduler, "forward_ct", None)
    if forward_ct == getattr(runtime, "idle_checked_at", None):
        return  # nothing ran since the last check
    from packinfer_sglang.compaction.integrity import check_pool_integrity

    cache, relocator = scheduler.tree_cache, _relocator(runtime)
    pending = relocator.pending_free_slots() if relocator is not None else None
    check_pool_integrity(cache, [], pending)
    available, evictable = cache.token_to_kv_pool_allocator.available_size(), cache.evictable_size()
    ps = cache.token_to_kv_pool_allocator.page_size  # the allocator frees whole pages
    held = 0 if pending is None else int((pending // ps).unique().numel()) * ps
    total = scheduler.max_total_num_tokens
    leaked = total - available - evictable - cache.protected_size() - held
    runtime.idle_checked_at = forward_ct
    runtime.idle_checks = getattr(runtime, "idle_checks", 0) + 1
    if leaked:
        raise AssertionError(f"idle: pool {total} != available {available} + evictable {evictable} + protected "
                             f"{cache.protected_size()} + retired {held}: {leaked} slots leaked")
    locked = cache.protected_size()  # held by no request at idle: a lock reference never released
    logger.info("%s %d passed after forward %s: pool %d = available %d + evictable %d + locked %d%s, leaked slots %d",
                LINE_PREFIX, runtime.idle_checks, forward_ct, total, available, evictable, locked,
                f" + retired {held}" if held else "", locked)
    return
