"""AROUND hook on ``Scheduler.get_new_batch_prefill``: one prefill per uncached shared prefix.

SGLang's radix cache shares a prefix only once its KV is in the tree, and a prefill's KV enters the
tree when the batch's result is processed, which the overlap scheduler does after the next batch is
formed. Requests of a group that arrive together (a burst behind one system prompt or document,
``n > 1`` sampling, RL rollouts) are therefore admitted side by side and each computes the shared
prefix again: in the fault benchmark's first prefill batch eight requests of one group computed
their 1024-token system prompt eight times (``#cached-token: 0``). SGLang's ``lpm`` policy defers
such requests ("in-batch prefix caching"), but only while at most 128 requests wait, and the
default ``fcfs`` policy never does.

With ``PACKINFER_PREFILL_DEDUP=1`` this hook holds back, for the round, each waiting request that
would recompute at least ``PACKINFER_MIN_PREFIX_TOKENS`` tokens of a prefix another request is
already computing: one admitted in the last two prefill rounds (in flight, not yet in the tree), the
chunked request, or a request ahead of it in the waiting queue that is not held. A held request
keeps its place in the queue and is admitted once the prefix is in the tree (it then matches it) or
after ``MAX_HOLD_ROUNDS`` rounds, whichever is first, so nothing waits for long. Only the order of
admission changes, never what is computed for a request.

Shared prefixes are found by block hashes: a request's prompt hashed in ``BLOCK_TOKENS``-token
blocks, each hash chained on the previous one and seeded with the request's ``extra_key``, so the
longest common prefix with any claimer is the longest run of the request's block hashes found in
the claimers' set (computed once per request; a round costs O(blocks) set lookups for the first
``SCAN_LIMIT`` waiting requests, plus one radix match for each request that may be held). A hash
collision can only hold a request back for a round.

Off unless the scheduler runs the ``fcfs`` policy without priority scheduling, with the packinfer
radix cache, outside disaggregated and pipeline-parallel serving.
"""

from __future__ import annotations

import logging
from collections import deque

logger = logging.getLogger(__name__)
TARGET = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"
BLOCK_TOKENS = 64
SCAN_LIMIT = 256  # waiting requests examined per round (a prefill batch admits far fewer)
MAX_HOLD_ROUNDS = 8  # a request is held back in at most this many rounds
INFLIGHT_ROUNDS = 2  # an admitted prefill is in flight until its result is processed (overlap: next round)


class DedupState:
    """Per-scheduler state of the hook (``runtime.prefill_dedup``)."""

    def __init__(self):
        self.inflight: deque[list[tuple]] = deque(maxlen=INFLIGHT_ROUNDS)  # block hashes per round
        self.rounds = 0
        self.held_requests = 0  # requests held at least once
        self.tokens_not_recomputed = 0  # at each request's first hold: shared tokens it would recompute
        self.logged_at = 0


def block_hashes(req) -> tuple:
    """Chained hashes of ``req``'s prompt per ``BLOCK_TOKENS`` tokens (whole blocks only), cached on it."""
    cached = getattr(req, "_packinfer_blocks", None)
    if cached is not None:
        return cached
    ids = req.origin_input_ids
    h = hash(("packinfer", getattr(req, "extra_key", None)))
    out = []
    for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h = hash((h, tuple(ids[start:start + BLOCK_TOKENS])))
        out.append(h)
    req._packinfer_blocks = out = tuple(out)
    return out


def shared_blocks(blocks: tuple, claimed: set) -> int:
    """Leading blocks of ``blocks`` found in ``claimed`` (chained hashes: a found block implies its
    predecessors matched too, so the first miss ends the run)."""
    n = 0
    for h in blocks:
        if h not in claimed:
            break
        n += 1
    return n


def _cached_tokens(tree, req, num_tokens: int) -> int:
    """Tokens of ``req``'s first ``num_tokens`` prompt tokens that the radix tree holds now."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(token_ids=list(req.origin_input_ids[:num_tokens]), extra_key=getattr(req, "extra_key", None))
    return len(tree.match_prefix(MatchPrefixParams(key=key)).device_indices)


def _applies(scheduler) -> bool:
    args = scheduler.server_args
    return (getattr(args, "schedule_policy", None) == "fcfs" and not getattr(args, "enable_priority_scheduling", False)
            and getattr(args, "disaggregation_mode", "null") == "null" and getattr(args, "pp_size", 1) == 1)


def select_held(waiting: list, inflight: list[tuple], tree, min_tokens: int) -> tuple[list, int]:
    """Which of ``waiting`` (queue order) to hold this round (module docstring); returns them and the
    shared tokens they would have recomputed. ``inflight``: block hashes of requests in flight."""
    claimed = {h for blocks in inflight for h in blocks}
    held, saved = [], 0
    for i, req in enumerate(waiting):
        if i >= SCAN_LIMIT:
            break
        blocks = block_hashes(req)
        shared = shared_blocks(blocks, claimed) * BLOCK_TOKENS
        if shared >= min_tokens and getattr(req, "_packinfer_holds", 0) < MAX_HOLD_ROUNDS:
            missing = shared - _cached_tokens(tree, req, shared)
            if missing >= min_tokens:
                req._packinfer_holds = getattr(req, "_packinfer_holds", 0) + 1
                if req._packinfer_holds == 1:
                    saved += missing
                held.append(req)
                continue
        claimed.update(blocks)
    return held, saved


def hold_shared_prefills(original, scheduler, *args, **kwargs):
    """``HookType.AROUND`` hook: ``(original, scheduler, running_batch)``; returns ``original``'s
    ``NextBatchPlan``. Held requests are out of ``scheduler.waiting_queue`` only while ``original`` runs, and
    are put back at their places whatever it does."""
    runtime = getattr(getattr(scheduler, "tree_cache", None), "runtime", None)
    waiting = getattr(scheduler, "waiting_queue", None)
    if runtime is None or not runtime.config.prefill_dedup or not waiting or not _applies(scheduler):
        return original(scheduler, *args, **kwargs)
    state = getattr(runtime, "prefill_dedup", None)
    if state is None:
        state = runtime.prefill_dedup = DedupState()
    inflight = [blocks for round_blocks in state.inflight for blocks in round_blocks]
    chunked = getattr(scheduler, "chunked_req", None)
    if chunked is not None:
        inflight.append(block_hashes(chunked))
    held, saved = select_held(waiting, inflight, scheduler.tree_cache, runtime.config.min_prefix_tokens)
    if held:
        position = {id(r): i for i, r in enumerate(waiting)}
        held_ids = {id(r) for r in held}
        scheduler.waiting_queue = [r for r in waiting if id(r) not in held_ids]
    plan = None
    try:
        plan = original(scheduler, *args, **kwargs)
    finally:
        if held:  # back at their places; requests the call added (none expected) go last
            rest = list(scheduler.waiting_queue)
            scheduler.waiting_queue = sorted(rest + held, key=lambda r: position.get(id(r), len(position)))
        state.rounds += 1
        state.inflight.append([block_hashes(r) for r in getattr(_new_batch(plan), "reqs", None) or ()])
        state.held_requests += sum(1 for r in held if r._packinfer_holds == 1)
        state.tokens_not_recomputed += saved
    every = runtime.config.log_every
    if every and state.held_requests and state.rounds - state.logged_at >= every:
        state.logged_at = state.rounds
        logger.info("packinfer: prefill dedup held %d requests so far while their shared prefix was computed once "
                    "(%d prefix tokens not recomputed)", state.held_requests, state.tokens_not_recomputed)
    return plan


def _new_batch(plan):
    """The prefill ``ScheduleBatch`` of ``get_new_batch_prefill``'s ``NextBatchPlan`` (or
    ``(batch, running_batch)`` tuple), ``None`` when it formed none."""
    if plan is None:
        return None
    if hasattr(plan, "batch_to_run"):
        return plan.batch_to_run
    return plan[0] if isinstance(plan, tuple) and plan else None
