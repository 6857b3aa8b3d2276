"""AROUND hook on ``Scheduler.get_new_batch_prefill``: one prefill per uncached shared prefix.

SGLang's radix cache shares a prefix only once its KV is in the tree, and a prefill's KV enters the
tree when the batch's result is processed, which the overlap scheduler does after it has formed
the next batch. Requests of a group that arrive together (a burst behind one system prompt or
document, agents' parallel calls, RL rollouts) are therefore admitted side by side and each computes
the shared prefix again: in the fault benchmark's first prefill batch eight requests of one group
computed their 1024-token system prompt eight times (``#cached-token: 0``). SGLang's ``lpm``
policy defers such requests ("in-batch prefix caching"), but only while at most 128 requests wait;
the default ``fcfs`` policy never does.

With ``PACKINFER_PREFILL_DEDUP=1`` this hook holds back, for the round (one call of
``get_new_batch_prefill``, once per scheduler iteration), each waiting request that would
recompute at least ``PACKINFER_MIN_PREFIX_TOKENS`` tokens of a prefix another request is computing:
one admitted in the last ``INFLIGHT_ROUNDS`` rounds (its KV not yet in the tree), the chunked
request, or a request ahead of it in the waiting queue that is not held. A held request keeps its
place in the queue; it is admitted once the prefix is computed, or after ``MAX_HOLD_ROUNDS``
rounds, whichever is first. Only the order of admission changes, never what a request computes.

Prompts are compared by block hashes: a prompt hashed in ``BLOCK_TOKENS``-token blocks, each hash
chained on the previous one and seeded with the request's ``extra_key`` (once per request). The
hook keeps the hashes of prompts it saw admitted whose results are processed (``computed``; the
tree holds them unless evicted since, in which case a request is not held and computes as it would
without the hook); a request's computed and claimed parts are the leading runs of its hashes in
those sets, found by binary search. A round costs O(log blocks) set lookups per waiting request
examined (at most ``SCAN_LIMIT``), the insertion of the uncached hashes of those not held, and no
radix-tree walk. Without the overlap scheduler a prefill's result is in the tree one round earlier,
and its group's other requests wait that round for nothing. A hash collision can only hold a request
back for a round.

Off unless the scheduler runs the ``fcfs`` policy without priority scheduling, with the packinfer
radix cache, outside disaggregated and pipeline-parallel serving.
"""

from __future__ import annotations

import logging
from collections import deque

logger = logging.getLogger(__name__)
TARGET = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"
BLOCK_TOKENS = 64
SCAN_LIMIT = 128  # waiting requests examined per round (a prefill batch of 8192 tokens admits <= 32 of 256)
MAX_HOLD_ROUNDS = 8  # a request is held back in at most this many rounds
INFLIGHT_ROUNDS = 1  # rounds an admitted prefill is in flight: the overlap loop processes its result after
# forming the next batch, so the round after its admission is the only one that cannot see it in the tree
COMPUTED_CAP = 1 << 20  # block hashes remembered at most (then forgotten at once)


class DedupState:
    """Per-scheduler state of the hook (``runtime.prefill_dedup``)."""

    def __init__(self):
        self.inflight: deque[list[tuple]] = deque()  # block hashes of the last INFLIGHT_ROUNDS rounds' admissions
        self.computed: set[int] = set()  # block hashes of prompts whose prefill results were processed
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


def leading_run(blocks: tuple, found: set, start: int = 0) -> int:
    """The largest ``k >= start`` with ``blocks[start:k]`` all in ``found``, by binary search: the sets
    hold whole chains (a prompt's hashes from some block on), and a chained hash is found only when
    its predecessors were, so membership is a prefix property."""
    lo, hi = start, len(blocks)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blocks[mid - 1] in found:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _applies(scheduler) -> bool:
    args = scheduler.server_args
    return (getattr(args, "schedule_policy", None) == "fcfs" and not getattr(args, "enable_priority_scheduling", False)
            and getattr(args, "disaggregation_mode", "null") == "null" and getattr(args, "pp_size", 1) == 1)


def select_held(waiting: list, inflight: list[tuple], computed: set, min_tokens: int) -> tuple[list, int]:
    """Which of ``waiting`` (queue order) to hold this round (module docstring); returns them and the
    prefix tokens they would have recomputed. ``inflight``: block hashes of the prompts in flight;
    ``computed``: block hashes of computed prompts."""
    claimed: set[int] = set()
    for blocks in inflight:
        claimed.update(blocks)
    held, saved = [], 0
    for req in waiting[:SCAN_LIMIT]:
        blocks = block_hashes(req)
        cached = leading_run(blocks, computed)
        missing = (leading_run(blocks, claimed, cached) - cached) * BLOCK_TOKENS
        holds = getattr(req, "_packinfer_holds", 0)
        if missing >= min_tokens and holds < MAX_HOLD_ROUNDS:
            req._packinfer_holds = holds + 1
            saved += missing if holds == 0 else 0
            held.append(req)
        else:
            claimed.update(blocks[cached:])  # its uncached part is computed in this round, if admitted
    return held, saved


def hold_shared_prefills(original, scheduler, *args, **kwargs):
    """``HookType.AROUND`` hook: ``(original, scheduler, running_batch)``; returns ``original``'s
    ``NextBatchPlan``. Held requests are out of ``scheduler.waiting_queue`` only while ``original``
    runs, and are put back at their places whatever it does."""
    runtime = getattr(getattr(scheduler, "tree_cache", None), "runtime", None)
    if runtime is None or not runtime.config.prefill_dedup or not _applies(scheduler):
        return original(scheduler, *args, **kwargs)
    state = runtime.prefill_dedup
    if state is None:
        state = runtime.prefill_dedup = DedupState()
    waiting = scheduler.waiting_queue
    held, saved = [], 0
    if waiting:
        inflight = [blocks for round_blocks in state.inflight for blocks in round_blocks]
        chunked = getattr(scheduler, "chunked_req", None)
        if chunked is not None:
            inflight.append(block_hashes(chunked))
        held, saved = select_held(waiting, inflight, state.computed, runtime.config.min_prefix_tokens)
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
        record_round(state, getattr(_new_batch(plan), "reqs", None) or (), getattr(scheduler, "chunked_req", None))
        state.held_requests += sum(1 for r in held if r._packinfer_holds == 1)
        state.tokens_not_recomputed += saved
    every = runtime.config.log_every
    if every and state.held_requests and state.rounds - state.logged_at >= every:
        state.logged_at = state.rounds
        logger.info("packinfer: prefill dedup held %d requests so far while their shared prefix was computed once "
                    "(%d prefix tokens not recomputed, estimated)", state.held_requests, state.tokens_not_recomputed)
    return plan


def record_round(state: DedupState, reqs, chunked) -> None:
    """Records a round's admitted prompts as in flight (the chunked one claims through
    ``scheduler.chunked_req`` until its last chunk) and moves those of older rounds to ``computed``."""
    state.inflight.append([block_hashes(r) for r in reqs if r is not chunked])
    while len(state.inflight) > INFLIGHT_ROUNDS:
        if len(state.computed) > COMPUTED_CAP:
            state.computed.clear()
        for blocks in state.inflight.popleft():
            state.computed.update(blocks)


def _new_batch(plan):
    """The prefill ``ScheduleBatch`` of ``get_new_batch_prefill``'s ``NextBatchPlan`` (or
    ``(batch, running_batch)`` tuple), ``None`` when it formed none."""
    if plan is None:
        return None
    if hasattr(plan, "batch_to_run"):
        return plan.batch_to_run
    return plan[0] if isinstance(plan, tuple) and plan else None
