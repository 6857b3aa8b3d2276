"""Compaction (and placement) on SGLang's real RadixCache, allocators and MHATokenToKVPool (CPU tensors).

Correctness is stated against an oracle: every request's and tree node's KV equals the content a
model would have written for its tokens (``compaction_world``), after every operation, and every
relocation leaves each request's KV (read through ``req_to_token``) bit-identical.
"""

import random

import numpy as np
import pytest
import torch
from compaction_world import BASIC_OPS, World, apply_basic_op
from conftest import DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st
from packinfer_sglang.kernels.kv_indices import item_kv_bases

from packinfer_sglang.compaction.alloc import claim_page_ranges, claim_pages, free_page_runs
from packinfer_sglang.compaction.plan import (
    CostModel,
    GroupLayout,
    Owner,
    count_runs,
    gathered_tokens,
    plan_compaction,
)
from packinfer_sglang.compaction.relocate import collect_layouts

# --- the cost rule and planner (pure) -------------------------------------------------------------


@pytest.mark.parametrize("slots, runs", [([], 0), ([5], 1), ([5, 6, 7], 1), ([5, 7, 8], 2), ([9, 8, 7], 3)])
def test_count_runs(slots, runs):
    assert count_runs(np.array(slots)) == runs


def test_gathered_tokens_counts_chunks_broken_inside():
    slots = np.concatenate([np.arange(100, 104), np.arange(200, 204), np.arange(300, 303)])  # 11 tokens
    assert gathered_tokens(slots, 4) == 0  # breaks fall on chunk starts
    assert gathered_tokens(slots, 3) == 3 + 3  # chunks [3:6] and [6:9] hold a break; [9:11] does not
    assert gathered_tokens(slots, 64) == 11


def test_prefix_reads_follow_active_members():
    cost = CostModel(1, 2, 8, 2, gqa_group_size=4, prefix_block_m=8)  # 2 requests per prefix tile
    # 3 members with 10, 5, 3 steps left: 3 active for 3 steps (2 tiles), 2 for 2 (1), 1 for 5 (1)
    assert cost.prefix_reads(np.array([3, 10, 5])) == 2 * (3 * 2 + 2 * 1 + 5 * 1)
    assert cost.suffix_reads(7) == 14


def _layout(prefix_slots, suffix_slots, remaining, tag=0):
    prefix = [Owner(("node", tag), np.array(prefix_slots, dtype=np.int64))] if prefix_slots else []
    suffixes = [[Owner(("tail", f"r{tag}.{i}"), np.array(s, dtype=np.int64))] for i, s in enumerate(suffix_slots)]
    return GroupLayout(prefix, suffixes, np.array(remaining, dtype=np.int64))


def test_suffix_moves_exactly_at_break_even():
    # fp16, head_dim 8, 2 KV heads, 1 layer: a gathered suffix token saves 4 B per index read, 2 reads
    # a step; moving it reads and writes K and V, 2 * (2*1*2*8*2) = 128 B: break-even at 16 steps.
    cost = CostModel(1, 2, 8, 2, chunk_tokens=64)
    scattered = list(range(10, 40, 2))  # 15 tokens, all gathered
    free = np.array([[100, 50]])
    assert not plan_compaction([_layout([], [scattered], [15])], free, 1, cost, 1 << 20).moves
    plan = plan_compaction([_layout([], [scattered], [16])], free, 1, cost, 1 << 20)
    # the span holds the 15 moved tokens and 16 free pages of headroom for the 16 tokens still to come
    assert [(m.group, m.first_page, m.num_pages, m.headroom_pages, m.tokens) for m in plan.moves] == [
        (0, 100, 31, 16, 15)]
    assert [(o.new_first_page, len(o.old_pages)) for o in plan.moves[0].owners] == [(100, 15)]
    tight = plan_compaction([_layout([], [scattered], [16])], np.array([[100, 20]]), 1, cost, 1 << 20)
    assert [(m.num_pages, m.headroom_pages) for m in tight.moves] == [(15, 0)]  # no room: none left
    assert plan.moves[0].saved_bytes == plan.moves[0].copy_bytes


def test_contiguous_groups_do_not_move_and_placement_is_best_fit():
    cost = CostModel(1, 2, 8, 2, min_gain=1e-9)
    done = _layout(list(range(40, 60)), [[60, 61]], [100], tag=0)
    small = _layout([], [[3, 5, 7]], [100], tag=1)
    big = _layout([], [[2, 4, 6, 8, 10, 12]], [100], tag=2)
    free = np.array([[200, 10], [300, 3], [400, 6]])
    plan = plan_compaction([done, small, big], free, 1, cost, 1 << 20)
    assert sorted((m.group, m.first_page) for m in plan.moves) == [(1, 300), (2, 400)]
    plan = plan_compaction([small, big], np.array([[500, 8]]), 1, cost, 1 << 20)
    assert [m.group for m in plan.moves] == [1] and plan.skipped == ((0, "no free run of 3 pages"),)
    assert plan_compaction([small, big], free, 1, cost, max_tokens=5).skipped[0][1] == "over max_tokens"


def test_plan_is_deterministic_and_ignores_object_identity():
    cost = CostModel(2, 2, 8, 2, min_gain=1e-9)
    rng = np.random.default_rng(0)
    layouts = [_layout(rng.permutation(50)[:8].tolist(), [rng.permutation(50)[:5].tolist()] * 2, [9, 4], tag=t)
               for t in range(4)]
    copies = [GroupLayout([Owner(o.key, o.slots.copy()) for o in g.prefix],
                          [[Owner(o.key, o.slots.copy()) for o in s] for s in g.suffixes], g.remaining_steps.copy())
              for g in layouts]
    free = np.array([[100, 40], [200, 30]])
    a, b = plan_compaction(layouts, free, 1, cost, 1 << 20), plan_compaction(copies, free, 1, cost, 1 << 20)
    assert repr(a) == repr(b)


def test_item_kv_bases_mark_single_run_items():
    kv = torch.tensor([7, 8, 9, 3, 4, 20, 21, 22, 23, 5], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 0, 3, 5, 4, 9, 2], device=DEVICE)
    lens = torch.tensor([3, 4, 2, 4, 2, 1, 1], device=DEVICE)
    assert item_kv_bases(kv, starts, lens).tolist() == [7, -1, 3, 20, -1, 5, 9]


# --- allocator helper -----------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("need_sort", [False, True])
def test_free_runs_and_claim(page_size, need_sort):
    w = World(page_size, 40, need_sort=need_sort)
    taken = w.alloc.alloc(10 * page_size)
    w.alloc.free(taken[3 * page_size:5 * page_size])  # pages 4, 5 back (release list when need_sort)
    runs = free_page_runs(w.alloc)
    assert runs.tolist() == [[4, 2], [11, 30]]
    before = w.alloc.available_size()
    assert claim_pages(w.alloc, 12, 5).tolist() == list(range(12, 17))
    assert w.alloc.available_size() == before - 5 * page_size
    assert free_page_runs(w.alloc).tolist() == [[4, 2], [11, 1], [17, 24]]
    with pytest.raises(RuntimeError, match="only 1 of 2 are free"):
        claim_pages(w.alloc, 16, 2)
    claim_page_ranges(w.alloc, np.array([[11, 1], [20, 3], [40, 1]]))  # ranges with free pages between
    assert free_page_runs(w.alloc).tolist() == [[4, 2], [17, 3], [23, 17]]
    assert w.alloc.available_size() == before - 10 * page_size
    with pytest.raises(RuntimeError, match="2 page ranges: only 1 of 2 are free"):
        claim_page_ranges(w.alloc, np.array([[4, 1], [11, 1]]))
    exclude = torch.zeros(42, dtype=torch.bool)
    exclude[[5, 18]] = True
    assert free_page_runs(w.alloc, exclude).tolist() == [[4, 1], [17, 1], [19, 1], [23, 17]]


# --- relocation on SGLang's pools -----------------------------------------------------------------


def _populate(w, rng, systems=3, per_system=3, system_len=40, check=True):
    prompts = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(system_len - 1)] for s in range(systems)]
    for i in range(systems * per_system):
        w.admit(prompts[i % systems] + [rng.randrange(1000, 50000) for _ in range(rng.randrange(1, 12))], 60)
        w.decode_step()  # interleaved decode scatters every request's tokens
    for _ in range(6):
        w.decode_step()
    if check:
        w.check()
        w.check_content()


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (16, 64)])
def test_relocation_makes_groups_contiguous_and_keeps_kv(page_size, num_pages):
    w = World(page_size, num_pages, chunk_tokens=4096)  # every broken part counts as gathered
    _populate(w, random.Random(1))
    groups = lambda: w.cache.runtime.decode_groups(w.running, [r.kv.kv_allocated_len + 1 for r in w.running])
    frag = w.relocator.measure(w.running, groups())
    plan = w.compact()
    assert plan.moves and not plan.skipped
    w.check()
    w.check_content()
    after = w.relocator.measure(w.running, groups())
    assert after.suffix_runs.sum() < frag.suffix_runs.sum()
    assert (after.prefix_runs <= 1).all() and (after.suffix_runs == 1).all()
    pending = w.relocator.pending_free_slots().numel()
    available = w.alloc.available_size()
    w.decode_step()  # frees the retired slots after "the next forward"
    assert w.relocator.pending_free_slots().numel() == 0 and w.alloc.available_size() >= available
    assert pending > 0
    w.check()
    w.check_content()


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (16, 64)])
@pytest.mark.parametrize("copy_after_forward", [True, False])
def test_overlap_order_copy_after_the_inflight_forward(page_size, num_pages, copy_after_forward):
    # Overlap scheduler: step k's tokens got slots (prepare) and forward k is in flight when the
    # relocation runs; forward k still writes its KV at the old slot. Copying after forward k (on the
    # forward stream, before forward k+1) keeps it; copying before loses the new token's KV.
    w = World(page_size, num_pages, chunk_tokens=4096)
    _populate(w, random.Random(4))
    inflight = w.prepare_decode()
    plan = w.compact(flush=False)
    moved = {o.key[1] for m in plan.moves for o in m.owners if o.key[0] == "tail"}
    assert moved
    if copy_after_forward:
        w.forward(inflight)  # writes at the slots captured before the relocation
        w.relocator.flush_copies()
        w.check_content()
    else:
        w.relocator.flush_copies()
        w.forward(inflight)
        with pytest.raises(AssertionError, match="K of layer"):
            w.check_content()
    w.decode_step()
    w.check()


def test_nodes_locked_outside_the_batch_stay():
    # A request the relocator is not told about (SGLang's chunked prefill, a session) locks its path:
    # the nodes on it must not move (its row could not be rewritten); everything else may.
    w = World(1, 1024, chunk_tokens=4096)
    taken = w.alloc.alloc(1024)
    w.alloc.free(taken[:600:2])  # a scattered free list: prompts land on every other slot
    _populate(w, random.Random(5), systems=2, per_system=3, check=False)
    w.alloc.free(torch.cat([taken[1:600:2], taken[600:]]))
    hidden, visible = w.running[0], w.running[1:]
    path_before = [n.value.clone() for n in _nodes_of(hidden)]
    groups = w.cache.runtime.decode_groups(visible, [r.kv.kv_allocated_len + 1 for r in visible])
    layouts = collect_layouts(visible, groups, w.rtp.req_to_token, [100] * len(visible))
    unpinned = plan_compaction(layouts.groups, free_page_runs(w.alloc), 1, w.relocator.cost, 1 << 20)
    hidden_keys = {("node", n.id) for n in _nodes_of(hidden)}
    assert hidden_keys & {o.key for m in unpinned.moves for o in m.owners}  # would move without the pin
    plan = w.relocator.compact(visible, groups, [100] * len(visible))
    w.relocator.flush_copies()
    assert plan.moves and not hidden_keys & {o.key for m in plan.moves for o in m.owners}
    assert all(torch.equal(n.value, v) for n, v in zip(_nodes_of(hidden), path_before))
    w.check()
    w.check_content()


def _nodes_of(req):
    node, out = req.last_node, []
    while node.parent is not None:
        out.append(node)
        node = node.parent
    return out


def test_integrity_catches_double_ownership_leaks_and_stale_rows():
    w = World(1, 512)
    _populate(w, random.Random(2), systems=2, per_system=2)
    req = w.running[0]
    row = w.rtp.req_to_token[req.req_pool_idx]
    n = req.kv.kv_allocated_len
    saved = int(row[n - 1])
    row[n - 1] = int(w.alloc.free_pages[0])  # a tail slot that is also free
    with pytest.raises(AssertionError, match="not held exactly once"):
        w.check()
    row[n - 1] = saved
    w.alloc.free_pages = w.alloc.free_pages[1:]  # a leaked slot
    with pytest.raises(AssertionError, match="not held exactly once"):
        w.check()
    w.alloc.free_pages = torch.cat([w.alloc.free_pages, torch.tensor([saved])])  # owned and free
    with pytest.raises(AssertionError, match="holders of page"):
        w.check()


def test_integrity_catches_a_row_that_no_longer_aliases_the_tree():
    w = World(1, 512)
    _populate(w, random.Random(3), systems=1, per_system=2)
    req = w.running[0]
    req.prefix_indices = req.prefix_indices.clone()
    w.rtp.req_to_token[req.req_pool_idx, 0] += 1
    with pytest.raises(AssertionError, match="does not alias its tree path"):
        w.check()


_OPS = st.one_of(*BASIC_OPS, st.tuples(st.just("compact")))


@pytest.mark.parametrize("page_size, num_pages", [(1, 700), (16, 48)])
@settings(max_examples=16, deadline=None)
@given(initial=st.integers(1, 12), ops=st.lists(_OPS, min_size=8, max_size=24), seed=st.integers(0, 2**16),
       need_sort=st.booleans(), min_gain=st.sampled_from([1e-9, 1e-9, 1.0]), place=st.booleans(),
       place_every=st.sampled_from([1, 4]))
def test_random_workloads_keep_every_request_kv(page_size, num_pages, initial, ops, seed, need_sort, min_gain,
                                                place, place_every):
    # place: decode tokens go through the placement policy (free-list reorder) before SGLang's
    # alloc_for_decode; ownership and every request's KV must be unaffected by it.
    rng = random.Random(seed)
    w = World(page_size, num_pages, need_sort=need_sort, min_gain=min_gain, place=place,
              place_every=place_every)
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(rng.randrange(8, 48))] for s in range(4)]
    start = [op for i in range(initial) for op in [("admit", rng.randrange(4), rng.randrange(1, 14), 60),
                                                   ("decode", 1)]]
    for op in start + ops + [("compact",), ("decode", 1)]:
        if not apply_basic_op(w, op, rng, systems) and op[0] == "compact":
            w.compact()  # asserts bit-identical KV per request
        w.check()
        w.check_content()
