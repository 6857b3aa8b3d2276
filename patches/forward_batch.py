"""AFTER hook on ``ForwardBatch.init_new``: attaches ``packinfer_groups`` to decode batches.

The scheduler's ``ScheduleBatch`` knows its requests and tree cache; the ``ForwardBatch`` that the
attention backend receives does not. For decode batches served by the packinfer radix cache, this
hook stores the cache's :class:`~packinfer_sglang.grouping.DecodeGroups` on the forward batch (rows in
the batch's order). It reads the schedule batch and mutates only the new forward batch.
"""

from __future__ import annotations

TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"


def attach_decode_groups(forward_batch, *args, **kwargs):
    """``HookType.AFTER`` hook: ``(result, cls, batch, model_runner, ...)``."""
    from packinfer_sglang.radix_cache import PackInferRadixCache

    batch = args[1] if len(args) > 1 else kwargs.get("batch")
    tree = getattr(batch, "tree_cache", None)
    if (
        isinstance(tree, PackInferRadixCache)
        and batch.forward_mode.is_decode()
        and batch.spec_info is None
        and len(batch.reqs) == forward_batch.batch_size
    ):
        forward_batch.packinfer_groups = tree.decode_groups(batch.reqs, batch.seq_lens_cpu)
    return forward_batch
