"""AFTER hook on ``ForwardBatch.init_new``: offers each decode batch's groups to the backend.

The scheduler's ``ScheduleBatch`` knows its requests; the ``ForwardBatch`` that the attention
backend receives does not, and SGLang's model runner copies it into static buffers (so extra
attributes are lost). For decode batches of a server using the packinfer radix cache, this hook
hands the batch's :class:`~packinfer_sglang.grouping.DecodeGroups` (rows in batch order) to the
scheduler's :class:`~packinfer_sglang.serving.runtime.PackInferRuntime`, keyed by the batch's
lengths, for the backend's next ``init_forward_metadata``. It reads the schedule batch and changes
no SGLang state.
"""

from __future__ import annotations

TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"


def attach_decode_groups(forward_batch, *args, **kwargs):
    """``HookType.AFTER`` hook: ``(result, cls, batch, model_runner, ...)``; returns ``result``."""
    from packinfer_sglang.serving.runtime import runtime_of

    batch = args[1] if len(args) > 1 else kwargs.get("batch")
    model_runner = args[2] if len(args) > 2 else kwargs.get("model_runner")
    if batch is None or not batch.forward_mode.is_decode() or batch.spec_info is not None:
        return forward_batch
    runtime = runtime_of(batch, model_runner)
    if runtime is not None:  # else this server does not use --radix-cache-backend packinfer
        runtime.offer_step(batch, forward_batch.batch_size)
    return forward_batch
