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
  (:mod:`packinfer_sglang.placement`). It runs inside ``prepare_for_decode``, after the relocation
  above and after every other hook on it (``batch_order``'s reorder included), so the batch order
  it plans for is the one SGLang allocates in. It permutes ``free_pages`` on the schedule stream,
  where SGLang itself slices it, into a new tensor (never in place: slices of the old one can back
  the in-flight batch's ``out_cache_loc``); it claims nothing, so ownership is SGLang's. Refreshes
  read the device (free list, last slots), at most once every ``PACKINFER_COMPACT_PLACE_EVERY``
  steps and after each relocation; other steps are sync-free.

Ordering and ownership are :mod:`packinfer_sglang.compaction`'s docstring. Every TP rank runs the
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


class _State:
    relocator = None
    disabled: str | None = None
    placer = None
    place_disabled: str | None = None
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
        _state.relocator = Relocator(tree, cost, cfg.compact_max_tokens, headroom=cfg.place)
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
    from packinfer_sglang.radix_cache import batch_cache

    cfg = get_config()
    tree = batch_cache(batch)
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
    avoid = _state.placer.reserved_pages() if _state.placer is not None else None
    plan = relocator.compact(reqs, groups, _remaining_steps(reqs, cfg.compact_horizon), live_reqs=reqs, avoid=avoid)
    _state.moved_tokens += plan.tokens
    if plan.moves and _state.placer is not None:
        _state.placer.invalidate()  # tails moved: reservations after the old ones are stale
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


def _placer(batch, tree):
    """The process's placer, built on first use from the tree's pools."""
    if _state.placer is not None or _state.place_disabled:
        return _state.placer
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator

    from packinfer_sglang.config import get_config
    from packinfer_sglang.placement import Placer

    alloc = tree.token_to_kv_pool_allocator
    if type(alloc) not in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        _state.place_disabled = f"allocator {type(alloc).__name__} is not SGLang's token or paged allocator"
    elif alloc.page_size != tree.page_size or batch.model_config.is_encoder_decoder:
        _state.place_disabled = "decode context parallelism or an encoder-decoder model"
    else:
        _state.placer = Placer(alloc, tree.req_to_token_pool.req_to_token, get_config().compact_place_every)
    if _state.place_disabled:
        logger.warning("packinfer: placement off: %s", _state.place_disabled)
    return _state.placer


def place_decode_tokens(batch, token_per_req=1, *args, **kwargs):
    """``HookType.BEFORE`` hook on ``alloc_for_decode``: ``(batch, token_per_req)``; returns ``None``."""
    from packinfer_sglang.config import get_config
    from packinfer_sglang.placement import group_rows
    from packinfer_sglang.radix_cache import batch_cache

    tree = batch_cache(batch)
    if tree is None or token_per_req != 1 or not batch.reqs or batch.spec_info is not None:
        return
    placer = _placer(batch, tree)
    if placer is None:
        return
    reqs, lens = batch.reqs, batch.seq_lens_cpu

    def plan_inputs():
        groups = tree.decode_groups(reqs, lens)
        return group_rows(groups), _remaining_steps(reqs, get_config().compact_horizon)

    placer.place(reqs, lens.numpy(), plan_inputs)
