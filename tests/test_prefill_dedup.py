"""``patches/prefill_dedup.py`` on a CPU stand-in of SGLang's scheduler: which waiting requests
are held back in a round, that they keep their places, and that nothing is lost."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from packinfer_sglang.patches import prefill_dedup as pd
from sglang.srt.managers.schedule_batch import NextBatchPlan

from packinfer_sglang.config import PackInferConfig
from packinfer_sglang.serving.runtime import PackInferRuntime

MIN_PREFIX = 128
RUNNING = SimpleNamespace(reqs=[])  # the running batch, passed through


def scheduler(waiting=(), dedup=True, policy="fcfs"):
    runtime = PackInferRuntime(PackInferConfig(min_prefix_tokens=MIN_PREFIX, prefill_dedup=dedup))
    args = SimpleNamespace(schedule_policy=policy, enable_priority_scheduling=False, disaggregation_mode="null",
                           pp_size=1)
    return SimpleNamespace(tree_cache=SimpleNamespace(runtime=runtime), waiting_queue=list(waiting),
                           server_args=args, chunked_req=None)


def req(rid, ids, extra_key=None):
    return SimpleNamespace(rid=rid, origin_input_ids=list(ids), extra_key=extra_key)


def admit_first(k):
    """A stand-in for SGLang's ``get_new_batch_prefill``: admits the first ``k`` waiting requests."""
    def original(s, running_batch):
        reqs, s.waiting_queue = s.waiting_queue[:k], s.waiting_queue[k:]
        return NextBatchPlan(batch_to_run=SimpleNamespace(reqs=reqs) if reqs else None, running_batch=running_batch)
    return original


def step(s, k, arrivals=()):
    """One round after ``arrivals`` join the queue; the admitted requests' ids."""
    s.waiting_queue += list(arrivals)
    plan = pd.hold_shared_prefills(admit_first(k), s, RUNNING)
    assert plan.running_batch is RUNNING
    return [r.rid for r in plan.batch_to_run.reqs] if plan.batch_to_run is not None else []


def burst(rng, groups=2, per_group=4, system=300, question=20):
    systems = [[g + 1] + [rng.randrange(1000, 50000) for _ in range(system - 1)] for g in range(groups)]
    return [req(f"g{g}-{i}", systems[g] + [rng.randrange(1000, 50000) for _ in range(question)])
            for g in range(groups) for i in range(per_group)], systems


def test_a_burst_admits_one_request_per_uncomputed_prefix_then_the_rest():
    rng = random.Random(0)
    reqs, _ = burst(rng)
    lone = req("lone", [rng.randrange(1000, 50000) for _ in range(200)])
    s = scheduler()
    assert step(s, 8, reqs + [lone]) == ["g0-0", "g1-0", "lone"]  # one per group; the others held
    assert [r.rid for r in s.waiting_queue] == [f"g{g}-{i}" for g in range(2) for i in range(1, 4)]
    assert step(s, 8) == []  # the leaders' results are not in the tree yet (overlap): held again
    assert step(s, 8) == [f"g{g}-{i}" for g in range(2) for i in range(1, 4)]
    state = s.tree_cache.runtime.prefill_dedup
    assert state.held_requests == 6 and state.tokens_not_recomputed == 6 * (300 // 64) * 64


def test_computed_prefixes_short_prompts_and_other_extra_keys_are_not_held():
    rng = random.Random(1)
    reqs, systems = burst(rng, groups=1, per_group=3)
    s = scheduler()
    assert step(s, 8, [req("first", systems[0] + [7, 8, 9])]) == ["first"]
    assert step(s, 8) == []  # its result is processed during this round
    short = [req(f"s{i}", systems[0][:100] + [i]) for i in range(3)]  # share < MIN_PREFIX tokens
    salted = [req(f"salted{i}", reqs[0].origin_input_ids, extra_key="other") for i in range(2)]  # new namespace
    assert len(step(s, 20, reqs + short + salted[:1])) == 7 and not s.waiting_queue
    assert step(s, 20, salted[1:]) == []  # ... which the first salted request is computing


def test_a_request_is_held_in_at_most_max_hold_rounds():
    rng = random.Random(2)
    reqs, _ = burst(rng, groups=1, per_group=2)
    s = scheduler(reqs[1:])
    s.chunked_req = reqs[0]  # a prompt chunked over many rounds
    for _ in range(pd.MAX_HOLD_ROUNDS):
        assert step(s, 1) == []
    assert step(s, 1) == ["g0-1"]


def test_an_admitted_prefill_claims_only_while_in_flight():
    rng = random.Random(6)
    reqs, _ = burst(rng, groups=1, per_group=2)
    s = scheduler(reqs)
    assert step(s, 1) == ["g0-0"]
    for _ in range(pd.INFLIGHT_ROUNDS):
        assert step(s, 1) == []
    assert step(s, 1) == ["g0-1"]


def test_a_chunked_prompt_counts_as_computed_only_after_its_last_chunk():
    rng = random.Random(7)
    reqs, _ = burst(rng, groups=1, per_group=2)
    s = scheduler([reqs[0]])

    def first_chunk(sched, running_batch):  # admits the prompt's first chunk; it stays chunked
        sched.chunked_req, sched.waiting_queue = sched.waiting_queue[0], sched.waiting_queue[1:]
        return NextBatchPlan(batch_to_run=SimpleNamespace(reqs=[sched.chunked_req]), running_batch=running_batch)

    pd.hold_shared_prefills(first_chunk, s, RUNNING)
    for _ in range(3):
        assert step(s, 1, [reqs[1]] if _ == 0 else ()) == []  # claimed by the chunked request

    def last_chunk(sched, running_batch):  # the prompt's last chunk; the member is still held
        done, sched.chunked_req = sched.chunked_req, None
        return NextBatchPlan(batch_to_run=SimpleNamespace(reqs=[done]), running_batch=running_batch)

    pd.hold_shared_prefills(last_chunk, s, RUNNING)
    assert [r.rid for r in s.waiting_queue] == ["g0-1"]
    assert step(s, 1) == []  # the last chunk is in flight for one round
    assert step(s, 1) == ["g0-1"]


def test_held_requests_go_back_to_their_places_even_when_the_round_raises():
    rng = random.Random(3)
    reqs, _ = burst(rng, groups=2, per_group=3)
    s = scheduler(reqs)

    def boom(sched, running_batch):
        assert [r.rid for r in sched.waiting_queue] == ["g0-0", "g1-0"]
        raise RuntimeError("scheduler failure")

    with pytest.raises(RuntimeError):
        pd.hold_shared_prefills(boom, s, RUNNING)
    assert [r.rid for r in s.waiting_queue] == [r.rid for r in reqs]


@pytest.mark.parametrize("dedup, policy", [(False, "fcfs"), (True, "lpm")])
def test_off_or_other_policies_leave_the_round_alone(dedup, policy):
    reqs, _ = burst(random.Random(5))
    assert len(step(scheduler(dedup=dedup, policy=policy), 8, reqs)) == 8


def test_leading_runs_find_the_longest_common_prefix():
    a = req("a", list(range(1000, 1300)))
    b = req("b", list(range(1000, 1200)) + list(range(5000, 5100)))
    found = set(pd.block_hashes(a))
    assert pd.leading_run(pd.block_hashes(b), found) == 200 // pd.BLOCK_TOKENS
    assert pd.leading_run(pd.block_hashes(req("c", list(range(7, 307)))), found) == 0
    assert pd.leading_run(pd.block_hashes(a), found) == len(pd.block_hashes(a)) == 300 // pd.BLOCK_TOKENS
    tail = set(pd.block_hashes(a)[2:])  # a chain from block 2 on
    assert pd.leading_run(pd.block_hashes(b), tail, 2) == 3 and pd.leading_run(pd.block_hashes(b), tail) == 0
