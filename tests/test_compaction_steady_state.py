"""Compaction reaches a steady state: once a group is relocated, later plans leave it alone.

The H100 server run (``benchmarks/results/compaction_verify_h100_log.txt``: 8 groups x 32 requests,
relocation every 8 decode steps, placement on) moved every suffix of every group again at every
plan, 17665 tokens growing to 43660. Cause: a relocation packed a group's suffixes back to back, so
no request could continue its suffix in place; placement gave each a fresh reservation elsewhere,
the suffix became two runs with a break inside a kernel chunk, and the next plan moved the whole
suffix (prompt tail included) again. The fix leaves headroom after each relocated suffix (its
remaining tokens, ``plan_compaction(headroom=True)``), placement prefers that in-place room over an
older unused reservation, and relocations do not claim pages promised to reservations.

The workload here is the server's, scaled down, with SGLang's real allocators and
``alloc_for_decode`` on CPU (``compaction_world``): groups decoding side by side, one relocation
every few steps, pool integrity checked every step and KV bit-identical over every relocation.
"""

import random

import pytest
from compaction_world import World

GROUPS, PER_GROUP, SYSTEM_LEN, MAX_NEW, EVERY, STEPS = 4, 5, 96, 60, 4, 48


def _run(page_size, num_pages):
    """Tokens moved per plan, moves per owner, and the most runs any group held on any step after its
    first relocation."""
    rng = random.Random(0)
    w = World(page_size, num_pages, chunk_tokens=64, place=True, place_every=8, max_reqs=GROUPS * PER_GROUP + 2,
              max_context=SYSTEM_LEN + 20 + MAX_NEW + 8, min_prefix_tokens=32)
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(SYSTEM_LEN - 1)] for s in range(GROUPS)]
    for i in range(GROUPS * PER_GROUP):  # questions of 8-18 tokens: members cross pages at different steps
        w.admit(systems[i % GROUPS] + [rng.randrange(1000, 50000) for _ in range(8 + i % 11)], MAX_NEW)
    moved, per_owner, group_runs = [], {}, []
    for step in range(1, STEPS + 1):
        if step % EVERY == 0:
            plan = w.compact()  # checks integrity between relocate and copy, and KV after the copy
            moved.append(plan.tokens)
            for o in (o for m in plan.moves for o in m.owners):
                per_owner[o.key] = per_owner.get(o.key, 0) + 1
        w.decode_step()
        w.check()
        if moved:
            groups = w.cache.runtime.decode_groups(w.running, [r.kv.kv_allocated_len + 1 for r in w.running])
            frag, gi = w.relocator.measure(w.running, groups), groups.group_indptr
            group_runs.append(max(int(frag.prefix_runs[g] + frag.suffix_runs[gi[g]:gi[g + 1]].sum())
                                  for g in range(groups.num_groups)))
    w.check_content()
    return moved, per_owner, max(group_runs)


@pytest.mark.parametrize("page_size, num_pages", [(1, 8192), (16, 512)])
def test_relocated_groups_stay_contiguous(page_size, num_pages):
    moved, per_owner, max_group_runs = _run(page_size, num_pages)
    # Measured, tokens moved per plan (12 plans), most moves of one owner, most runs of a group
    # (1 prefix + 5 suffixes) on any step after the first relocation:
    #   before the fix: page size 1: 292, 349, 429, 501, 532, 569, 633, 653, 714, 775, 725, 719
    #                   (every suffix, whole, every plan); 12 moves; 11 runs.
    #                   page size 16: 89, 148, 78, 33, 207, 276, 142, 49, 303, 354, 155, 0; 3 moves; 8 runs.
    #   after:          page size 1: 292, then 0 x 11; 1 move; 6 runs.
    #                   page size 16: 89, 148, 78, 33, 36, then 0 x 7; 1 move; 8 runs. Each member moves
    #                   once, at its first page break after prefill (a different step per member, as
    #                   question lengths differ); breaks on 64-token chunk starts cost the kernel nothing
    #                   and stay, hence 8 runs before and after.
    assert moved[0] > 0
    assert max(per_owner.values()) == 1, f"owners moved more than once: {per_owner}"
    assert sum(moved[len(moved) // 2:]) == 0, f"tokens moved per plan: {moved}"
    if page_size == 1:
        assert sum(moved[1:]) == 0, f"tokens moved per plan: {moved}"
    assert max_group_runs <= (1 + PER_GROUP if page_size == 1 else 8)
