"""Proposal: KV compaction inside SGLang's scheduler loop (``PACKINFER_COMPACT=1``; off by default).

Two ``HookRegistry`` hooks, registered by the plugin only when compaction is on:

- BEFORE ``ScheduleBatch.prepare_for_decode`` (:func:`plan_and_relocate`, schedule stream): first
  returns the slots retired by the previous relocation (their copy was launched before the last
  forward), then, every ``PACKINFER_COMPACT_EVERY`` decode steps, plans on the decode batch and
  relocates: claims page ranges, rewrites ``req_to_token`` rows, tree node values and
  ``prefix_indices``. ``prepare_for_decode`` then allocates this step's tokens from the rewritten
  rows (paged: inside the request's new last page).
- AFTER ``ForwardBatch.init_new`` (:func:`launch_copies`): ``ForwardBatch.init_new`` runs inside
  ``Scheduler.run_batch``'s ``forward_stream_ctx`` (after ``forward_stream.wait_stream(
  schedule_stream)``), so the copy is queued on the forward stream after the previous forward
  (which may still write the KV of a token at an old slot) and before this forward reads.

Ordering and ownership are :mod:`packinfer_sglang.compaction`'s docstring. Every TP rank runs the
same scheduler on the same requests, tree and allocator state, and the plan reads only those, so
the ranks relocate identically (each copies its own heads); no collective is needed. Requests held
outside the batch (the chunked prefill, sessions) lock their tree paths, which the relocator pins.
Skipped: speculative decoding, CUDA-graph capture, unsupported pools (one warning).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)
BEFORE_TARGET = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode"
AFTER_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"


class _State:
    relocator = None
    disabled: str | None = None
    steps = 0
    moved_tokens = 0


_state = _State()


def _relocator(batch, tree):
    """The process's relocator, built on first use from the batch's pools and model config."""
    if _state.relocator is not None or _state.disabled:
        return _state.relocator
    from packinfer_sglang.compaction import Relocator
    from packinfer_sglang.compaction_plan import CostModel
    from packinfer_sglang.config import get_config

    cfg = get_config()
    try:
        pool = tree.token_to_kv_pool_allocator.get_kvcache()
        mc = batch.model_config
        gqa = max(1, mc.num_attention_heads // max(1, getattr(mc, "num_key_value_heads", 0) or mc.num_attention_heads))
        cost = CostModel(pool.layer_num, pool.head_num, pool.head_dim, pool.store_dtype.itemsize,
                         gqa_group_size=gqa, gather_penalty=cfg.compact_gather_penalty,
                         min_gain=cfg.compact_min_gain)
        _state.relocator = Relocator(tree, cost, cfg.compact_max_tokens)
    except (ValueError, AttributeError) as e:
        _state.disabled = str(e)
        logger.warning("packinfer: compaction off: %s", e)
    return _state.relocator


def _remaining_steps(reqs, horizon: int) -> np.ndarray:
    out = []
    for r in reqs:
        max_new = getattr(getattr(r, "sampling_params", None), "max_new_tokens", None)
        left = horizon if max_new is None else max_new - len(r.output_ids)
        out.append(min(max(left, 0), horizon))
    return np.array(out, dtype=np.int64)


def plan_and_relocate(batch, *args, **kwargs):
    """``HookType.BEFORE`` hook on ``prepare_for_decode``: ``(batch)``; returns ``None``."""
    from packinfer_sglang.config import get_config
    from packinfer_sglang.radix_cache import PackInferRadixCache, current_cache

    cfg = get_config()
    tree = getattr(batch, "tree_cache", None)
    tree = tree if isinstance(tree, PackInferRadixCache) else current_cache()
    if tree is None or not batch.reqs or batch.spec_info is not None or not batch.spec_algorithm.is_none():
        return
    relocator = _relocator(batch, tree)
    if relocator is None:
        return
    relocator.free_deferred()  # copies launched before the previous forward
    _state.steps += 1
    if _state.steps % cfg.compact_every:
        return
    reqs = batch.reqs
    groups = tree.decode_groups(reqs, batch.seq_lens_cpu)
    plan = relocator.compact(reqs, groups, _remaining_steps(reqs, cfg.compact_horizon), live_reqs=reqs)
    _state.moved_tokens += plan.tokens
    if plan.moves and cfg.log_every:
        logger.info("packinfer: compaction moved %d tokens of %d groups (%d skipped); %d tokens so far",
                    plan.tokens, len(plan.moves), len(plan.skipped), _state.moved_tokens)


def launch_copies(forward_batch, *args, **kwargs):
    """``HookType.AFTER`` hook on ``ForwardBatch.init_new``: queues pending KV copies on the current
    (forward) stream; returns ``forward_batch`` unchanged."""
    import torch

    relocator = _state.relocator
    if relocator is None or not relocator._copies:
        return forward_batch
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return forward_batch  # never record the copy into a CUDA graph
    relocator.flush_copies()
    return forward_batch
