"""BEFORE hook on ``ScheduleBatch.prepare_for_decode``: logs the decode batch's KV fragmentation.

Issue 5 measures fragmentation over time with compaction on and off, so this hook does not depend
on ``PACKINFER_COMPACT``. The plugin registers it only with ``PACKINFER_FRAG_LOG_EVERY`` > 0; every
that many decode batches prepared by this scheduler (a server using the packinfer radix cache) it
logs one line::

    packinfer: fragmentation step 400: {"groups": 37, "requests": 120, "prefix_runs": 12, ...}

with :meth:`~packinfer_sglang.compaction_plan.Fragmentation.summary` of
:func:`~packinfer_sglang.compaction.measure_fragmentation` plus the fields of
:func:`fragmentation_record`. It reads the tree and one device-to-host copy of the batch's
``req_to_token`` rows (a synchronization) and changes nothing. The plugin registers it before
compaction's hook on the same target; ``HookRegistry`` runs later registrations first, so a step
that relocates is measured after the relocation.
"""

from __future__ import annotations

import json
import logging

import numpy as np

logger = logging.getLogger(__name__)
TARGET = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode"
LINE_PREFIX = "packinfer: fragmentation step"


def _mean_max(runs: np.ndarray) -> tuple[float | None, int | None]:
    return (float(runs.mean()), int(runs.max())) if len(runs) else (None, None)


def fragmentation_record(cache, reqs) -> dict:
    """One log line's fields for the decode batch ``reqs`` on ``cache`` (the packinfer radix cache
    with its pools): ``Fragmentation.summary()`` (runs, tokens, runs per 1000 tokens) plus ``batch``
    (requests), ``shared_groups`` (groups with a shared prefix), ``prefix_runs_mean``/``_max``
    (runs per shared group's prefix) and ``suffix_runs_mean``/``_max`` (runs per request's suffix;
    a request outside a group is all suffix). Means and maxima are None over an empty set.

    Groups are the cache's thresholds without the backend's cost gate (``form_groups`` with
    ``cost=None``), formed here rather than through the runtime's ``decode_groups``, whose memo the
    backend's next lookup of the same batch would otherwise take."""
    from packinfer_sglang.compaction.relocate import measure_fragmentation
    from packinfer_sglang.grouping import form_groups

    cfg = cache.runtime.config
    groups = form_groups([r.last_node for r in reqs], [r.kv.kv_allocated_len + 1 for r in reqs],
                         cfg.min_prefix_tokens, cfg.min_group_size)
    frag = measure_fragmentation(cache, reqs, groups)
    prefix_mean, prefix_max = _mean_max(frag.prefix_runs[frag.prefix_lens > 0])
    suffix_mean, suffix_max = _mean_max(frag.suffix_runs)
    return {**frag.summary(), "batch": len(reqs), "shared_groups": int((frag.prefix_lens > 0).sum()),
            "prefix_runs_mean": prefix_mean, "prefix_runs_max": prefix_max,
            "suffix_runs_mean": suffix_mean, "suffix_runs_max": suffix_max}


def log_fragmentation(batch, *args, **kwargs):
    """``HookType.BEFORE`` hook on ``prepare_for_decode``: ``(batch)``; returns ``None``. Without
    ``PACKINFER_FRAG_LOG_EVERY`` or the packinfer radix cache it returns at once."""
    from packinfer_sglang.serving.runtime import runtime_of

    runtime = runtime_of(batch)
    if runtime is None or not runtime.config.frag_log_every or not batch.reqs:
        return
    runtime.decode_batches += 1
    if runtime.decode_batches % runtime.config.frag_log_every == 0:
        record = fragmentation_record(batch.tree_cache, batch.reqs)
        logger.info("%s %d: %s", LINE_PREFIX, runtime.decode_batches, json.dumps(record))
