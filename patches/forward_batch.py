"""AFTER hook on ``ForwardBatch.init_new``: offers each decode batch's groups to the backend.

The scheduler's ``ScheduleBatch`` knows its requests; the ``ForwardBatch`` that the attention
backend receives does not, and SGLang's model runner copies it into static buffers (so extra
attributes are lost). For decode batches of a server using the packinfer radix cache, this hook
computes the cache's :class:`~packinfer_sglang.grouping.DecodeGroups` (rows in batch order) and
offers them, keyed by the batch's lengths, to the backend's next ``init_forward_metadata``. It
reads the schedule batch and changes no SGLang state.
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


def _packing_cost(model_runner):
    """The gate's attention shape, computed once per model runner (``None`` if it cannot be read)."""
    from packinfer_sglang.cost_model import PackingCost

    if model_runner is None:
        return None
    cost = getattr(model_runner, "_packinfer_cost", False)
    if cost is False:
        try:
            cost = PackingCost.of_model_runner(model_runner)
        except Exception as e:  # noqa: BLE001 -- an unusual model config: fall back to the plain saving
            logger.warning("packinfer: cost model unavailable (%s); grouping by shared tokens alone", e)
            cost = None
        model_runner._packinfer_cost = cost
    return cost


def attach_decode_groups(forward_batch, *args, **kwargs):
    """``HookType.AFTER`` hook: ``(result, cls, batch, model_runner, ...)``."""
    from packinfer_sglang.radix_cache import batch_cache

    batch = args[1] if len(args) > 1 else kwargs.get("batch")
    model_runner = args[2] if len(args) > 2 else kwargs.get("model_runner")
    if batch is None or not batch.forward_mode.is_decode() or batch.spec_info is not None:
        return forward_batch
    tree = batch_cache(batch)
    if tree is None:
        return forward_batch  # this server does not use --radix-cache-backend packinfer
    if len(batch.reqs) != forward_batch.batch_size:
        _warn_once(f"{len(batch.reqs)} requests for batch size {forward_batch.batch_size}")
    else:
        tree.offer_decode_groups(batch.seq_lens_cpu,
                                 tree.decode_groups(batch.reqs, batch.seq_lens_cpu, _packing_cost(model_runner)))
    return forward_batch
