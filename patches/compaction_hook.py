"""Proposal: KV compaction inside SGLang's scheduler loop (``PACKINFER_COMPACT=1``; off by default).

``HookRegistry`` hooks, registered by the plugin only when compaction is on:

- BEFORE ``ScheduleBatch.prepare_for_decode`` (:func:`plan_and_relocate`, schedule stream): first
  returns the slots retired by the previous relocation (their copy was launched before the last
  forward), then, every ``PACKINFER_COMPACT_EVERY`` decode steps, plans on the decode batch and
  relocates: claims page ranges (leaving headroom after each relocated suffix and avoiding pages
  promised to placement's reservations, when placement is on), rewrites ``req_to_token`` rows,
  tree node values and ``prefix_indices``. ``prepare_for_decode`` then allocates this step's tokens from the rewritten
  rows (paged: inside the request's new last page).
- AFTER ``ForwardBatch.init_new`` (:func:`launch_copies`): ``ForwardBatch.init_new`` runs inside
  ``Scheduler.run_batch``'s ``forward_stream_ctx`` (after ``forward_stream.wait_stream(
  schedule_stream)``), so the copy is queued on the forward stream after the previous forward
  (which may still write the KV of a token at an old slot) and before this forward reads.
- BEFORE ``sglang.srt.mem_cache.allocation.alloc_for_decode`` (:func:`place_decode_tokens`, with
  ``PACKINFER_COMPACT_PLACE``, default on): reorders the allocator's free list so that SGLang's own
  allocation hands each request the page its reservation offers, next to its tail
  (:mod:`packinfer_sglang.compaction.placement`). It runs inside ``prepare_for_decode``, after the relocation
  above and after every other hook on it (``batch_order``'s reorder included), so the batch order
  it plans for is the one SGLang allocates in. It permutes ``free_pages`` on the schedule stream,
  where SGLang itself slices it, into a new tensor (never in place: slices of the old one can back
  the in-flight batch's ``out_cache_loc``); it claims nothing, so ownership is SGLang's. Refreshes
  read the device (free list, last slots), at most once every ``PACKINFER_COMPACT_PLACE_EVERY``
  steps and after each relocation; other steps are sync-free.

Ordering and ownership are :mod:`packinfer_sglang.compaction.relocate`'s docstring. The hooks' state is
:class:`CompactionState`, held by the scheduler's runtime (``runtime.compaction``). Every TP rank runs the
same scheduler on the same requests, tree and allocator state, and the plan reads only those, so
the ranks relocate identically (each copies its own heads); no collective is needed. Requests held
outside the batch (the chunked prefill, sessions) lock their tree paths, which the relocator pins.
Skipped: speculative decoding, CUDA-graph capture, unsupported pools (one warning); placement also
skips encoder-decoder models and allocators whose page size differs from the tree's (decode context
parallelism).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)
BEFORE_TARGET = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode"
AFTER_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
PLACE_TARGET = "sglang.srt.mem_cache.allocation.alloc_for_decode"


class CompactionState:
    """The compaction hooks' state in one scheduler (``runtime.compaction``): the relocator and the
    placer, built on first use from the batch's pools (``None`` with the reason when unsupported),
    and the counters of the log line."""

    def __init__(self):
        self.relocator = None
        self.disabled: str | None = None
        self.placer = None
        self.place_disabled: str | None = None
        self.steps = 0
        self.moved_tokens = 0


def _state(runtime) -> CompactionState:
    if runtime.compaction is None:
        runtime.compaction = CompactionState()
    return runtime.compaction


def _relocator(state: CompactionState, runtime, tree):
    """The scheduler's relocator, built on first use from the tree's pools and the runtime's shape."""
    if state.relocator is not None or state.disabled:
        return state.relocator
    from packinfer_sglang.compaction.plan import CostModel
    from packinfer_sglang.compaction.relocate import Relocator

    cfg = runtime.config
    try:
        pool = tree.token_to_kv_pool_allocator.get_kvcache()
        gqa = runtime.cost.gqa if runtime.cost is not None else 1
        cost = CostModel(pool.layer_num, pool.head_num, pool.head_dim, pool.store_dtype.itemsize,
                         gqa_group_size=gqa, gather_penalty=cfg.compact_gather_penalty,
                         min_gain=cfg.compact_min_gain)
        state.relocator = Relocator(tree, cost, cfg.compact_max_tokens, headroom=cfg.place)
    except (ValueError, AttributeError) as e:
        state.disabled = str(e)
        logger.warning("packinfer: compaction off: %s", e)
    return state.relocator


def _remaining_steps(reqs, horizon: int) -> np.ndarray:
    out = []
    for r in reqs:
        max_new = getattr(getattr(r, "sampling_params", None), "max_new_tokens", None)
        left = horizon if max_new is None else max_new - len(r.output_ids)
        out.append(min(max(left, 0), horizon))
    return np.array(out, dtype=np.int64)


def plan_and_relocate(batch, *args, **kwargs):
    """``HookType.BEFORE`` hook on ``prepare_for_decode``: ``(batch)``; returns ``None``."""
    from packinfer_sglang.serving.runtime import runtime_of

    runtime = runtime_of(batch)
    if runtime is None or not batch.reqs or batch.spec_info is not None or not batch.spec_algorithm.is_none():
        return
    cfg, state, tree = runtime.config, _state(runtime), batch.tree_cache
    relocator = _relocator(state, runtime, tree)
    if relocator is None:
        return
    relocator.free_deferred()  # copies launched before the previous forward
    state.steps += 1
    if state.steps % cfg.compact_every:
        return
    reqs = batch.reqs
    groups = runtime.decode_groups(reqs, batch.seq_lens_cpu)
    avoid = state.placer.reserved_pages() if state.placer is not None else None
    plan = relocator.compact(reqs, groups, _remaining_steps(reqs, cfg.compact_horizon), live_reqs=reqs, avoid=avoid)
    state.moved_tokens += plan.tokens
    if plan.moves and state.placer is not None:
        state.placer.invalidate()  # tails moved: reservations after the old ones are stale
    if plan.moves and cfg.log_every:
        logger.info("packinfer: compaction moved %d tokens of %d groups (%d skipped); %d tokens so far",
                    plan.tokens, len(plan.moves), len(plan.skipped), state.moved_tokens)


def launch_copies(forward_batch, *args, **kwargs):
    """``HookType.AFTER`` hook on ``ForwardBatch.init_new``: ``(result, cls, batch, model_runner,
    ...)``; queues pending KV copies on the current (forward) stream; returns ``result`` unchanged."""
    import torch

    from packinfer_sglang.serving.runtime import runtime_of

    batch = args[1] if len(args) > 1 else kwargs.get("batch")
    model_runner = args[2] if len(args) > 2 else kwargs.get("model_runner")
    runtime = runtime_of(batch, model_runner)
    relocator = runtime.compaction.relocator if runtime is not None and runtime.compaction is not None else None
    if relocator is None or not relocator.has_pending_copies:
        return forward_batch
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return forward_batch  # never record the copy into a CUDA graph
    relocator.flush_copies()
    return forward_batch


def _placer(state: CompactionState, runtime, batch, tree):
    """The scheduler's placer, built on first use from the tree's pools."""
    if state.placer is not None or state.place_disabled:
        return state.placer
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator

    from packinfer_sglang.compaction.placement import Placer

    alloc = tree.token_to_kv_pool_allocator
    if type(alloc) not in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        state.place_disabled = f"allocator {type(alloc).__name__} is not SGLang's token or paged allocator"
    elif alloc.page_size != tree.page_size or batch.model_config.is_encoder_decoder:
        state.place_disabled = "decode context parallelism or an encoder-decoder model"
    else:
        state.placer = Placer(alloc, tree.req_to_token_pool.req_to_token, runtime.config.compact_place_every)
    if state.place_disabled:
        logger.warning("packinfer: placement off: %s", state.place_disabled)
    return state.placer


def place_decode_tokens(batch, token_per_req=1, *args, **kwargs):
    """``HookType.BEFORE`` hook on ``alloc_for_decode``: ``(batch, token_per_req)``; returns ``None``."""
    from packinfer_sglang.compaction.placement import group_rows
    from packinfer_sglang.serving.runtime import runtime_of

    runtime = runtime_of(batch)
    if runtime is None or token_per_req != 1 or not batch.reqs or batch.spec_info is not None:
        return
    placer = _placer(_state(runtime), runtime, batch, batch.tree_cache)
    if placer is None:
        return
    reqs, lens = batch.reqs, batch.seq_lens_cpu

    def plan_inputs():
        groups = runtime.decode_groups(reqs, lens)
        return group_rows(groups), _remaining_steps(reqs, runtime.config.compact_horizon)

    placer.place(reqs, lens.numpy(), plan_inputs)
