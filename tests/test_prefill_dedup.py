"""``patches/prefill_dedup.py`` on a CPU scheduler stand-in with SGLang's real radix cache (ours):
which waiting requests are held back, that they keep their places, and that nothing is lost."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
from compaction_world import World
from packinfer_sglang.patches import prefill_dedup as pd
from sglang.srt.managers.schedule_batch import NextBatchPlan

MIN_PREFIX = 128
RUNNING = SimpleNamespace(reqs=[])  # the running batch, passed through


def make_world(dedup=True):
    w = World(1, 4000, min_prefix_tokens=MIN_PREFIX, max_context=700)
    w.cache.runtime.config = dataclasses.replace(w.cache.runtime.config, prefill_dedup=dedup)
    return w


def scheduler(w, waiting, policy="fcfs"):
    args = SimpleNamespace(schedule_policy=policy, enable_priority_scheduling=False, disaggregation_mode="null",
                           pp_size=1)
    return SimpleNamespace(tree_cache=w.cache, waiting_queue=list(waiting), server_args=args, chunked_req=None)


def req(rid, ids, extra_key=None):
    return SimpleNamespace(rid=rid, origin_input_ids=list(ids), extra_key=extra_key)


def admit_first(k):
    """A stand-in for SGLang's ``get_new_batch_prefill``: admits the first ``k`` waiting requests."""
    def original(s, running_batch):
        reqs, s.waiting_queue = s.waiting_queue[:k], s.waiting_queue[k:]
        return NextBatchPlan(batch_to_run=SimpleNamespace(reqs=reqs) if reqs else None, running_batch=running_batch)
    return original


def step(s, k):
    """One round; the admitted requests' ids (empty when none was admitted)."""
    plan = pd.hold_shared_prefills(admit_first(k), s, RUNNING)
    assert plan.running_batch is RUNNING
    return [r.rid for r in plan.batch_to_run.reqs] if plan.batch_to_run is not None else []


def burst(rng, groups=2, per_group=4, system=300, question=20):
    systems = [[g + 1] + [rng.randrange(1000, 50000) for _ in range(system - 1)] for g in range(groups)]
    return [req(f"g{g}-{i}", systems[g] + [rng.randrange(1000, 50000) for _ in range(question)])
            for g in range(groups) for i in range(per_group)], systems


def test_a_burst_admits_one_request_per_uncached_prefix_then_the_rest_with_it_cached():
    rng = random.Random(0)
    w = make_world()
    reqs, _ = burst(rng)
    lone = req("lone", [rng.randrange(1000, 50000) for _ in range(200)])
    s = scheduler(w, reqs + [lone])
    assert step(s, 8) == ["g0-0", "g1-0", "lone"]  # one per group; the others held
    assert [r.rid for r in s.waiting_queue] == [f"g{g}-{i}" for g in range(2) for i in range(1, 4)]
    assert step(s, 8) == []  # the leaders are in flight (their KV not in the tree yet): held again
    for r in reqs[0], reqs[4]:  # the leaders' prefills land in the tree (SGLang's cache_unfinished_req)
        w.admit(r.origin_input_ids, 4)
    assert step(s, 8) == [f"g{g}-{i}" for g in range(2) for i in range(1, 4)]
    state = w.cache.runtime.prefill_dedup
    assert state.held_requests == 6 and state.tokens_not_recomputed >= 6 * 256


def test_cached_prefixes_short_prompts_and_other_extra_keys_are_not_held():
    rng = random.Random(1)
    w = make_world()
    reqs, systems = burst(rng, groups=1, per_group=3)
    w.admit(systems[0] + [7, 8, 9], 4)  # the system prompt is in the tree already
    short = [req(f"s{i}", systems[0][:100] + [i]) for i in range(3)]  # share < MIN_PREFIX tokens
    salted = req("salted", reqs[0].origin_input_ids, extra_key="other")  # another cache namespace
    s = scheduler(w, reqs + short + [salted])
    assert len(step(s, 20)) == 7 and not s.waiting_queue


def test_a_request_is_held_in_at_most_max_hold_rounds():
    rng = random.Random(2)
    w = make_world()
    reqs, _ = burst(rng, groups=1, per_group=2)
    s = scheduler(w, reqs[1:])
    s.chunked_req = reqs[0]  # a prompt chunked over many rounds whose KV never reaches the tree here
    for _ in range(pd.MAX_HOLD_ROUNDS):
        assert step(s, 1) == []
    assert step(s, 1) == ["g0-1"]


def test_an_admitted_prefill_stops_claiming_after_the_in_flight_rounds():
    rng = random.Random(6)
    w = make_world()
    reqs, _ = burst(rng, groups=1, per_group=2)
    s = scheduler(w, reqs)
    assert step(s, 1) == ["g0-0"]  # its result is never inserted here
    for _ in range(pd.INFLIGHT_ROUNDS):
        assert step(s, 1) == []
    assert step(s, 1) == ["g0-1"]


def test_held_requests_go_back_to_their_places_even_when_the_round_raises():
    rng = random.Random(3)
    w = make_world()
    reqs, _ = burst(rng, groups=2, per_group=3)
    s = scheduler(w, reqs)

    def boom(sched, running_batch):
        assert [r.rid for r in sched.waiting_queue] == ["g0-0", "g1-0"]
        raise RuntimeError("scheduler failure")

    with pytest.raises(RuntimeError):
        pd.hold_shared_prefills(boom, s, RUNNING)
    assert [r.rid for r in s.waiting_queue] == [r.rid for r in reqs]


def test_the_chunked_request_claims_its_prefix():
    rng = random.Random(4)
    w = make_world()
    reqs, _ = burst(rng, groups=1, per_group=3)
    s = scheduler(w, reqs[1:])
    s.chunked_req = reqs[0]  # a long prompt continued over rounds
    assert step(s, 8) == [] and len(s.waiting_queue) == 2


@pytest.mark.parametrize("dedup, policy", [(False, "fcfs"), (True, "lpm")])
def test_off_or_other_policies_leave_the_round_alone(dedup, policy):
    rng = random.Random(5)
    w = make_world(dedup)
    reqs, _ = burst(rng)
    assert len(step(scheduler(w, reqs, policy), 8)) == 8


def test_block_hashes_find_the_longest_common_prefix():
    a = req("a", list(range(1000, 1300)))
    b = req("b", list(range(1000, 1200)) + list(range(5000, 5100)))
    claimed = set(pd.block_hashes(a))
    assert pd.shared_blocks(pd.block_hashes(b), claimed) == 200 // pd.BLOCK_TOKENS
    assert pd.shared_blocks(pd.block_hashes(req("c", list(range(7, 307)))), claimed) == 0
