"""AFTER hook on ``ForwardBatch.init_new``: attaches ``packinfer_groups`` to decode batches.

The scheduler's ``ScheduleBatch`` knows its requests; the ``ForwardBatch`` that the attention
backend receives does not. For decode batches of a server using the packinfer radix cache, this
hook stores the cache's :class:`~packinfer_sglang.grouping.DecodeGroups` on the forward batch (rows in
the batch's order). It reads the schedule batch and mutates only the new forward batch.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
_warned = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("packinfer: decode batch without groups: %s", reason)


def attach_decode_groups(forward_batch, *args, **kwargs):
    """``HookType.AFTER`` hook: ``(result, cls, batch, model_runner, ...)``."""
    from packinfer_sglang.radix_cache import PackInferRadixCache, current_cache

    batch = args[1] if len(args) > 1 else kwargs.get("batch")
    if batch is None or not batch.forward_mode.is_decode() or batch.spec_info is not None:
        return forward_batch
    tree = getattr(batch, "tree_cache", None)
    if not isinstance(tree, PackInferRadixCache):
        tree = current_cache()
    if tree is None:
        _warn_once("no packinfer radix cache in this process (add --radix-cache-backend packinfer)")
    elif len(batch.reqs) != forward_batch.batch_size:
        _warn_once(f"{len(batch.reqs)} requests for batch size {forward_batch.batch_size}")
    else:
        forward_batch.packinfer_groups = tree.decode_groups(batch.reqs, batch.seq_lens_cpu)
    return forward_batch
