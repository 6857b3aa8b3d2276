"""BEFORE hook on ``ScheduleBatch.prepare_for_decode``: makes each group's requests adjacent.

PackInfer co-locates the requests of a group (Sec. 3) so the packed kernel reads contiguous query
rows. The permutation goes through SGLang's own ``ScheduleBatch.filter_batch(keep_indices=...)``,
which reindexes every per-request field (requests, pool indices, lengths, input ids, sampling and
penalizer state, logprob settings) in the order given; filtering with a full permutation is a
reorder. Batches with state that is not known to reorder safely are left alone; the backend then
permutes query rows itself, so correctness never depends on this hook.
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode"


def permute_batch(batch, order: list[int]) -> None:
    """Reorders ``batch``'s requests so new row ``i`` is old row ``order[i]`` (a permutation).

    ``filter_batch`` returns early when it keeps every request, so a placeholder request is
    appended for the call; the request list is rebuilt from ``order``, which drops it.
    """
    if sorted(order) != list(range(len(batch.reqs))):
        raise ValueError(f"not a permutation of {len(batch.reqs)} rows: {order[:16]}")
    batch.reqs.append(None)
    try:
        batch.filter_batch(keep_indices=order)
    finally:
        if batch.reqs and batch.reqs[-1] is None:
            batch.reqs.pop()


def _reorder_safe(batch) -> bool:
    info = batch.sampling_info
    return (
        len(batch.reqs) > 1
        and batch.spec_info is None
        and not batch.model_config.is_encoder_decoder
        and batch.multimodal_inputs is None
        and not getattr(info, "has_custom_logit_processor", False)
        and getattr(batch, "hisparse_coordinator", None) is None
    )


def group_adjacent(batch, *args, **kwargs):
    """``HookType.BEFORE`` hook: ``(batch)``; returns ``None`` (arguments unchanged). The groups come
    from the scheduler's runtime, with the same cost gate the backend's step uses."""
    from packinfer_sglang.serving.runtime import runtime_of

    runtime = runtime_of(batch)
    if runtime is None or not runtime.config.reorder_batch or not _reorder_safe(batch):
        return
    groups = runtime.decode_groups(batch.reqs, batch.seq_lens_cpu)
    if not groups.is_identity:
        permute_batch(batch, groups.order.tolist())
