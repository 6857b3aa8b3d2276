"""Placement of decode tokens next to their request's tail (``packinfer_sglang/placement.py``).

The free-list reorder is checked against a list oracle; the reservation planner against hand
cases; the whole policy on SGLang's real RadixCache, allocators and ``alloc_for_decode`` (CPU)
against SGLang's default allocation on the same workload, with pool integrity and every request's
KV checked after every step.
"""

import random

import numpy as np
import pytest
import torch
from compaction_world import World
from hypothesis import given, settings
from hypothesis import strategies as st

from packinfer_sglang.compaction.placement import order_free_pages, plan_reservations

# --- the free-list reorder ------------------------------------------------------------------------


def _order_oracle(free, want, reserved):
    """Allocation ``j`` gets ``want[j]`` if free and not taken by an earlier ``j``, else the next of the
    others (unreserved first, each class in free-list order); the others follow."""
    taken, head = set(), []
    for p in want:
        ok = p in free and p not in taken
        head.append(p if ok else None)
        taken.update([p] if ok else [])
    others = [p for p in free if p not in taken]
    rest = [p for p in others if not reserved[p]] + [p for p in others if reserved[p]]
    fill = iter(rest)
    head = [p if p is not None else next(fill) for p in head]
    return head + list(fill)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), num_pages=st.integers(1, 40))
def test_order_free_pages_matches_the_oracle(data, num_pages):
    free = data.draw(st.permutations(range(1, num_pages + 1)))[: data.draw(st.integers(0, num_pages))]
    n = data.draw(st.integers(0, len(free)))
    want = data.draw(st.lists(st.integers(-1, num_pages + 2), min_size=n, max_size=n))
    reserved = data.draw(st.lists(st.booleans(), min_size=num_pages + 1, max_size=num_pages + 1))
    out = order_free_pages(torch.tensor(free, dtype=torch.int64), torch.tensor(want, dtype=torch.int64),
                           torch.tensor(reserved))
    assert out.tolist() == _order_oracle(free, want, reserved)
    assert sorted(out.tolist()) == sorted(free)  # the same free set: nothing claimed, nothing lost


def test_order_free_pages_leaves_its_input_alone():
    free = torch.tensor([5, 3, 9, 10, 11, 2, 7])
    view = free[2:]  # a slice SGLang handed out as an in-flight batch's out_cache_loc
    reserved = torch.zeros(13, dtype=torch.bool)
    reserved[[10, 11]] = True
    out = order_free_pages(free, torch.tensor([10, -1, 4, 9, 10]), reserved)
    assert out.tolist() == [10, 5, 3, 9, 2, 7, 11]
    assert free.tolist() == [5, 3, 9, 10, 11, 2, 7] and view.tolist() == [9, 10, 11, 2, 7]
    with pytest.raises(ValueError, match="3 allocations from 2 free pages"):
        order_free_pages(free[:2], torch.tensor([1, 2, 3]), reserved)


# --- the reservation planner ----------------------------------------------------------------------


def _plan(last, need, free, groups=None, held=None, num_pages=60):
    n = len(last)
    held = np.zeros((n, 3), np.int64) if held is None else np.array(held, np.int64)
    groups = [np.array([i]) for i in range(n)] if groups is None else [np.array(g) for g in groups]
    return plan_reservations(np.array(last), np.array(need), held, groups, np.array(free), num_pages).tolist()


def test_in_place_then_best_fit_then_largest_partial():
    # r0: pages 5-7 follow its last page; r1: 21 is free but 22 is not, so a fresh run; r2 needs
    # more than any run holds: the largest (lowest start on ties) partly; r3 needs nothing.
    free = [5, 6, 7, 8, 9, 21, 30, 31, 32, 33]
    assert _plan([4, 20, 40, 50], [3, 2, 9, 0], free) == [[5, 5, 8], [8, 8, 10], [30, 30, 34], [0, 0, 0]]


def test_kept_reservations_continue_the_tail_or_are_unused():
    free = [6, 7, 10, 11, 31, 32, 33, 34]
    held = [[5, 6, 8], [10, 10, 13], [15, 16, 18], [31, 31, 34]]
    # r0 continues its tail (last page 5): kept; r1 is unused: kept, cut where page 12 is taken;
    # r2 was used but its tail moved (last page 40): re-planned (in place after 40 is not free);
    # r3 is unused but cut at its need of 2 pages.
    out = _plan([5, 40, 40, 50], [5, 5, 1, 2], free, held=held)
    assert out == [[5, 6, 8], [10, 10, 12], [33, 33, 34], [31, 31, 33]]


def test_in_place_beats_an_unused_reservation_elsewhere():
    # r0's tail was relocated to end at page 19 with free headroom 20-23 after it; its unused
    # reservation 40-42 from before is dropped (cut pages stay free for others). r1 has no room in
    # place (page 31 is not free), so it keeps its unused reservation.
    free = [20, 21, 22, 23, 40, 41, 42, 50, 51]
    assert _plan([19, 30], [3, 2], free, held=[[40, 40, 43], [50, 50, 52]]) == [[20, 20, 23], [50, 50, 52]]


def test_a_groups_fresh_runs_lie_side_by_side_in_group_order():
    free = list(range(10, 14)) + list(range(20, 26)) + list(range(40, 50))
    # one group, rows in group order 2, 0, 1, needing 1 + 2 + 3 = 6 pages: the 6-page run fits best
    assert _plan([1, 2, 3], [2, 3, 1], free, groups=[[2, 0, 1]]) == [[21, 21, 23], [23, 23, 26], [20, 20, 21]]
    # 8 + 3 pages fit no run together: each member gets its own best fit (the second: 3 of the 4
    # pages at 10, not the 2 left after the first at 48)
    assert _plan([1, 2], [8, 3], free, groups=[[0, 1]]) == [[40, 40, 48], [10, 10, 13]]


# --- the policy on SGLang's pools and alloc_for_decode --------------------------------------------


def _interleaved_groups(w, rng, steps):
    """Three groups of three requests (48-token system prompts), admitted one by one and decoding
    side by side; pool integrity, oracle KV and each request's earlier KV checked every step."""
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(47)] for s in range(3)]
    for i in range(9 + steps):
        if i < 9:
            w.admit(systems[i % 3] + [rng.randrange(1000, 50000) for _ in range(rng.randrange(1, 12))], 200)
        before = w.request_kv()
        w.decode_step()
        after = w.request_kv()
        for rid, kv in before.items():
            assert all(torch.equal(a, b[: len(a)]) for a, b in zip(kv, after[rid])), f"{rid}: KV changed"
        w.check()
        w.check_content()
    groups = w.cache.runtime.decode_groups(w.running, [r.kv.kv_allocated_len + 1 for r in w.running])
    frag = w.relocator.measure(w.running, groups)
    gi = groups.group_indptr
    per_group = [int(frag.prefix_runs[g] + frag.suffix_runs[gi[g]:gi[g + 1]].sum())
                 for g in range(groups.num_groups)]
    return frag, per_group


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (1, 4096), (16, 96)])
def test_placement_keeps_each_suffix_in_at_most_two_runs(page_size, num_pages):
    steps = 40
    default, default_groups = _interleaved_groups(World(page_size, num_pages), random.Random(11), steps)
    w = World(page_size, num_pages, place=True)
    placed, placed_groups = _interleaved_groups(w, random.Random(11), steps)
    assert (placed.suffix_lens == default.suffix_lens).all()
    assert len(placed_groups) == len(default_groups) == 3
    assert (placed.prefix_runs == 1).all() and (default.prefix_runs == 1).all()
    # With placement a suffix is its prompt tail plus reservations (page size 1: the first decode
    # token follows the prompt in place). Measured (runs in all / per group of 3): page size 1,
    # 1024 slots: 12 / 5, 5, 5 (three reservations cut short at half the free pool); 4096 slots:
    # 9 / 4, 4, 4; page size 16: 16 / 7, 6, 6.
    assert placed.suffix_runs.max() <= 2 and max(placed_groups) <= 1 + 2 * 3
    if page_size == 1:
        # SGLang's default hands the 9 requests consecutive slots every step, so each of the last 40
        # steps breaks every suffix. Measured: 413 / 141, 139, 136.
        assert default.suffix_runs.min() >= steps and min(default_groups) >= 3 * steps
        assert placed.suffix_runs.sum() * 30 <= default.suffix_runs.sum()
    else:
        # a new page every 16 tokens from the shared front: 45-58 tokens over 3-4 pages, one run
        # each. Measured: 35 / 13, 12, 13.
        assert default.suffix_runs.sum() >= 33 and placed.suffix_runs.sum() <= 18
    assert w.placer.refreshes >= 1 and w.placer.offered_pages > 0
