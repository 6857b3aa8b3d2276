"""``--radix-cache-backend packinfer``: SGLang's ``RadixCache`` that also forms decode groups.

It changes nothing in how SGLang matches, inserts, locks or evicts; it adds

- :meth:`PackInferRadixCache.decode_groups`: the groups of a running decode batch, found from each
  request's ``last_node`` (see :mod:`.grouping`), cached per batch composition;
- :meth:`PackInferRadixCache.check_integrity`: the tree's invariants, raising with the numbers.

Slot ownership (unchanged from SGLang): a tree node's ``value`` holds the pool slots of its key's
tokens; the tree owns one reference to each; running requests pin their path by ``lock_ref``, so
the prefix slots a group reads stay valid (not evicted, not moved) while any member runs.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.radix_cache import RadixCache

from .config import get_config
from .cost_model import PackingCost
from .grouping import DecodeGroups, form_groups

logger = logging.getLogger(__name__)
_current: PackInferRadixCache | None = None  # the scheduler process's cache (one per process)


def current_cache() -> PackInferRadixCache | None:
    """The packinfer radix cache of this process, if one was built (batches copied for the overlap
    scheduler do not always carry ``tree_cache``)."""
    return _current


def batch_cache(batch) -> PackInferRadixCache | None:
    """The packinfer radix cache of a ``ScheduleBatch``: its ``tree_cache`` when it is one, else
    :func:`current_cache`; ``None`` when the server runs another cache."""
    tree = getattr(batch, "tree_cache", None)
    return tree if isinstance(tree, PackInferRadixCache) else current_cache()


class PackInferRadixCache(RadixCache):
    """SGLang's ``RadixCache`` plus decode grouping. Constructed like it, from ``CacheInitParams``."""

    def __init__(self, params, config=None):
        global _current
        super().__init__(params)
        _current = self
        self.packinfer_config = config or get_config()
        self._groups_key: tuple | None = None
        self._groups: DecodeGroups | None = None
        self._no_group_logs = 0
        self._offered = None

    def decode_groups(self, reqs, seq_lens, cost: PackingCost | None = None) -> DecodeGroups:
        """Groups of a decode batch (rows in ``reqs`` order); recomputed when the requests, their
        order or their tree nodes change (SGLang moves ``last_node`` from the admission-time match to
        the whole prompt once prefill results are processed, which the overlap scheduler does after
        the first decode step is planned). ``seq_lens``: per request, tokens incl. the decoded one;
        ``cost``: the model's :class:`PackingCost` gate (see :mod:`.cost_model`)."""
        key = tuple((r.rid, id(r.last_node)) for r in reqs)
        if key != self._groups_key:
            cfg = self.packinfer_config
            self._groups = form_groups([r.last_node for r in reqs], seq_lens, cfg.min_prefix_tokens,
                                       cfg.min_group_size, cost)
            self._groups_key = key
            if self._groups.num_groups == len(reqs) > 1 and self._no_group_logs < 3:
                self._no_group_logs += 1
                depths = sorted(len(slots_of_path(r.last_node)) for r in reqs)
                logger.info("packinfer: no group among %d requests; tree node depths min %d, median %d, max %d "
                            "tokens; min_prefix_tokens %d", len(reqs), depths[0], depths[len(depths) // 2],
                            depths[-1], cfg.min_prefix_tokens)
        return self._groups

    def offer_decode_groups(self, seq_lens_cpu, groups: DecodeGroups) -> None:
        """Hands a decode batch's groups to the attention backend (called from ``ForwardBatch.init_new``;
        SGLang's model runner copies the forward batch, so attributes set on it do not arrive)."""
        self._offered = (seq_lens_cpu, groups)

    def take_decode_groups(self, seq_lens_cpu) -> DecodeGroups | None:
        """The groups offered for the batch with these lengths, once; ``None`` if none match."""
        offered, self._offered = self._offered, None
        if offered is None or seq_lens_cpu is None or offered[0] is None:
            return None
        lens, groups = offered
        n = len(groups.order)
        if len(seq_lens_cpu) < n or not torch.equal(lens[:n].cpu(), seq_lens_cpu[:n].cpu()):
            return None
        return groups

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
    """Factory for ``register_radix_cache_backend``: a :class:`PackInferRadixCache`, or SGLang's
    default chain (with a one-line warning) for configurations grouping does not support yet."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    reason = _unsupported_reason(ctx)
    if reason:
        logger.warning("packinfer radix cache: %s; using SGLang's default cache (no grouping)", reason)
        return default_radix_cache_factory(ctx)
    return PackInferRadixCache(ctx.params)


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


def slots_of_path(node) -> torch.Tensor:
    """Pool slots of the path root→``node`` (for tests and debugging), int64."""
    parts = []
    while node is not None and node.parent is not None:
        parts.append(node.value)
        node = node.parent
    return torch.cat(parts[::-1]) if parts else torch.empty(0, dtype=torch.int64)
