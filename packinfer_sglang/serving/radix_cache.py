"""``--radix-cache-backend packinfer``: SGLang's ``RadixCache`` that owns packinfer's per-scheduler state.

It changes nothing in how SGLang matches, inserts, locks or evicts; it adds

- ``cache.runtime``: the scheduler's :class:`~.runtime.PackInferRuntime` (decode grouping, the
  hand-over of a step's groups to the attention backend, the optional hooks' state), bound by
  :func:`create_packinfer_radix_cache` to the packinfer attention backend of the same scheduler;
- :meth:`PackInferRadixCache.check_integrity`: the tree's invariants, raising with the numbers.

Slot ownership (unchanged from SGLang): a tree node's ``value`` holds the pool slots of its key's
tokens; the tree owns one reference to each; running requests pin their path by ``lock_ref``, so
the prefix slots a group reads stay valid (not evicted, not moved) while any member runs.
"""

from __future__ import annotations

import logging

from sglang.srt.mem_cache.radix_cache import RadixCache

from ..config import get_config
from .runtime import PackInferRuntime

logger = logging.getLogger(__name__)


class PackInferRadixCache(RadixCache):
    """SGLang's ``RadixCache`` plus ``runtime`` (module docstring). Constructed like it, from
    ``CacheInitParams``; ``config``: packinfer's settings (default: the process's)."""

    def __init__(self, params, config=None):
        super().__init__(params)
        self.runtime = PackInferRuntime(config or get_config())

    def reset(self) -> None:
        """SGLang's ``reset`` (``/flush_cache`` calls it when idle, then clears the pools): the tree
        emptied, and the slots compaction retired forgotten, since clearing the allocator frees them
        (:meth:`~packinfer_sglang.compaction.relocate.Relocator.forget_retired`); placement reservations
        refreshed at the next step."""
        state = getattr(getattr(self, "runtime", None), "compaction", None)  # None inside __init__
        if state is not None:
            if state.relocator is not None:
                state.relocator.forget_retired()
            if state.placer is not None:
                state.placer.invalidate()
        super().reset()

    def check_integrity(self, running_tokens: int | None = None) -> None:
        """Checks the tree and, when ``running_tokens`` (slots held by running requests outside the
        tree) is given, SGLang's pool equation ``available + evictable + protected + running == total``.

        Raises:
            AssertionError: naming the violated invariant and its numbers.
        """
        seen, evictable, protected, stack = set(), 0, 0, [self.root_node]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is self.root_node:
                continue
            if node.lock_ref < 0:
                raise AssertionError(f"node {node.id} has lock_ref {node.lock_ref} < 0")
            if node.value is None:
                continue  # evicted to host; owns no device slots
            if len(node.value) != len(node.key):
                raise AssertionError(f"node {node.id}: {len(node.value)} slots for {len(node.key)} tokens")
            slots = node.value.tolist()
            if seen.intersection(slots):
                raise AssertionError(f"node {node.id} shares slots with another node: {sorted(seen & set(slots))[:8]}")
            seen.update(slots)
            if node.lock_ref > 0:
                protected += len(slots)
            else:
                evictable += len(slots)
        if (evictable, protected) != (self.evictable_size_, self.protected_size_):
            raise AssertionError(f"tree holds evictable {evictable}, protected {protected} tokens; "
                                 f"counters say {self.evictable_size_}, {self.protected_size_}")
        if running_tokens is not None and self.token_to_kv_pool_allocator is not None:
            alloc = self.token_to_kv_pool_allocator
            total = alloc.size
            avail = alloc.available_size()
            if avail + evictable + protected + running_tokens != total:
                raise AssertionError(f"available {avail} + evictable {evictable} + protected {protected} + "
                                     f"running {running_tokens} != total {total}")


def create_packinfer_radix_cache(ctx):
    """Factory for ``register_radix_cache_backend``: a :class:`PackInferRadixCache` whose runtime is
    bound to this scheduler's packinfer attention backend, or SGLang's default chain (with a one-line
    warning) for configurations grouping does not support yet."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    reason = _unsupported_reason(ctx)
    if reason:
        logger.warning("packinfer radix cache: %s; using SGLang's default cache (no grouping)", reason)
        return default_radix_cache_factory(ctx)
    cache = PackInferRadixCache(ctx.params)
    model_runner = getattr(ctx.tp_worker, "model_runner", None)
    if model_runner is not None and not cache.runtime.bind(model_runner):
        logger.warning("packinfer radix cache: the attention backend is not packinfer, so decode groups are "
                       "formed but not used; add --attention-backend packinfer")
    return cache


def _unsupported_reason(ctx) -> str | None:
    sa = ctx.server_args
    checks = [
        (ctx.disable_radix_cache, "--disable-radix-cache is set"),
        (ctx.is_hybrid_swa or ctx.is_hybrid_ssm, "hybrid (SWA/SSM) models are not supported"),
        (ctx.enable_hierarchical_cache, "--enable-hierarchical-cache is not supported"),
        (getattr(sa, "enable_lmcache", False) or getattr(sa, "enable_flexkv", False), "external KV stores are not supported"),
        (getattr(ctx, "is_dsa", False), "DSA models are not supported"),
    ]
    return next((msg for bad, msg in checks if bad), None)
