"""Radix tree → groups → kv_indices gather → packed kernel == flat decode over req_to_token rows."""

import random

import numpy as np
import pytest
import torch
from conftest import DEVICE, TOL, rel_err
from packinfer_sglang.kernels import gather_kv_indices
from packinfer_sglang.kernels.reference import flat_decode_attention_ref, gather_kv_indices_ref
from workload import admit, new_cache, shared_prefix_prompts

from packinfer_sglang.decode_step import GraphBuffers, build_decode_step, run_decode_step
from packinfer_sglang.grouping import ungrouped


def running_batch(seed, num_systems=3, per_system=4, system_len=70, question_len=9, max_decoded=5):
    """Admitted requests, each with a few decoded tokens at fresh slots, as SGLang's tables hold them."""
    rng = random.Random(seed)
    cache = new_cache(min_prefix_tokens=16)
    reqs, next_slot = admit(cache, shared_prefix_prompts(rng, num_systems, per_system, system_len, question_len), rng)
    rows, max_len = [], 0
    for r in reqs:
        decoded = torch.arange(next_slot, next_slot + rng.randrange(1, max_decoded + 1))
        next_slot += len(decoded)
        rows.append(torch.cat([r.slots, decoded]))
        max_len = max(max_len, len(rows[-1]))
    req_to_token = torch.zeros(len(reqs) + 3, max_len + 7, dtype=torch.int32)
    pool_rows = torch.randperm(len(reqs) + 3)[: len(reqs)]
    for row, slots in zip(pool_rows.tolist(), rows):
        req_to_token[row, : len(slots)] = slots.to(torch.int32)
    seq_lens = torch.tensor([len(s) for s in rows], dtype=torch.int64)
    return cache, reqs, req_to_token, pool_rows, seq_lens, next_slot


def flat_reference(q, k, v, req_to_token, pool_rows, seq_lens):
    kv_indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    kv_indptr[1:] = seq_lens.cumsum(0)
    flat = torch.cat([req_to_token[r, :n] for r, n in zip(pool_rows.tolist(), seq_lens.tolist())])
    return flat_decode_attention_ref(q, k, v, kv_indptr, flat.to(DEVICE), q.shape[-1] ** -0.5)[0]


def random_kv(num_slots, num_kv_heads, head_dim, dtype):
    return (torch.randn(num_slots, num_kv_heads, head_dim).to(dtype).to(DEVICE),
            torch.randn(num_slots, num_kv_heads, head_dim).to(dtype).to(DEVICE))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_step_equals_flat(seed, grouped, dtype):
    cache, reqs, req_to_token, pool_rows, seq_lens, num_slots = running_batch(seed)
    groups = cache.runtime.decode_groups(reqs, seq_lens.tolist()) if grouped else ungrouped(len(reqs))
    if grouped:
        assert groups.num_groups == 3 and not groups.is_identity  # shuffled batch: rows get permuted
    num_qo_heads, num_kv_heads, head_dim = 8, 2, 64
    k, v = random_kv(num_slots, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(reqs), num_qo_heads, head_dim).to(dtype).to(DEVICE)
    step = build_decode_step(groups, seq_lens, pool_rows.to(DEVICE), req_to_token.to(DEVICE),
                             num_qo_heads, num_kv_heads, num_sms=4)
    out = run_decode_step(step, q, k, v, head_dim ** -0.5)
    assert torch.isfinite(out).all()
    assert rel_err(out, flat_reference(q, k, v, req_to_token, pool_rows, seq_lens)) < TOL[dtype]


@pytest.mark.parametrize("padding", [0, 3])
@pytest.mark.parametrize("plain_programs_per_sm", [None, 3])
def test_graph_buffers_replay_any_plan(padding, plain_programs_per_sm):
    """One set of CUDA-graph buffers, a fixed grid (or the pair of launches with
    ``plain_programs_per_sm``), batches with and without prefix items written in turn (as capture then
    replays would): each equals flat attention, padded rows come out zero."""
    num_qo_heads, num_kv_heads, head_dim, dtype = 8, 2, 64, torch.float16
    graph = GraphBuffers(max_bs=16, max_context_len=128, num_kv_heads=num_kv_heads, num_sms=4, device=DEVICE,
                         plain_programs_per_sm=plain_programs_per_sm)
    for seed, grouped in [(4, False), (5, True), (6, False)]:
        cache, reqs, req_to_token, pool_rows, seq_lens, num_slots = running_batch(seed, num_systems=2, per_system=3)
        groups = cache.runtime.decode_groups(reqs, seq_lens.tolist()) if grouped else ungrouped(len(reqs))
        padded_bs = len(reqs) + padding
        rows = torch.cat([pool_rows, torch.zeros(padding, dtype=pool_rows.dtype)])
        k, v = random_kv(num_slots, num_kv_heads, head_dim, dtype)
        q = torch.randn(padded_bs, num_qo_heads, head_dim).to(dtype).to(DEVICE)
        step = build_decode_step(groups, seq_lens, rows.to(DEVICE), req_to_token.to(DEVICE), num_qo_heads,
                                 num_kv_heads, num_sms=4, graph=graph, padded_bs=padded_bs)
        assert step.plan.items is graph.plan.items
        assert step.plan.grid_items == graph.grid_items(padded_bs)
        assert step.plan.num_items <= step.plan.grid_items
        assert step.plan.plain_grid_items == (None if plain_programs_per_sm is None else step.plan.grid_items)
        out = run_decode_step(step, q, k, v, head_dim ** -0.5)
        ref = flat_reference(q[: len(reqs)], k, v, req_to_token, pool_rows, seq_lens)
        assert rel_err(out[: len(reqs)], ref) < TOL[dtype]
        assert (out[len(reqs):] == 0).all()


def test_graph_plan_is_coarsened_to_capacity(monkeypatch):
    """A batch whose natural plan needs more partials than the buffers hold still fits, exactly."""
    from packinfer_sglang.kernels import plan as planner

    from packinfer_sglang import decode_step
    # free items and 32-token chunks (the H200's plain launch aligns to 128, longer than these
    # requests): the natural plan splits every request
    monkeypatch.setattr(planner, "item_cost_tokens", lambda kv_len, rows: kv_len)
    monkeypatch.setattr(decode_step, "launch_config", lambda device, plain: (32, 3))
    _, reqs, req_to_token, pool_rows, seq_lens, num_slots = running_batch(6)
    graph = GraphBuffers(max_bs=len(reqs), max_context_len=128, num_kv_heads=2, num_sms=64, device=DEVICE)
    graph.PARTIALS_PER_REQUEST = 1
    natural = build_decode_step(ungrouped(len(reqs)), seq_lens, pool_rows.to(DEVICE), req_to_token.to(DEVICE),
                                8, 2, num_sms=64)
    assert natural.plan.num_partials > len(reqs)
    step = build_decode_step(ungrouped(len(reqs)), seq_lens, pool_rows.to(DEVICE), req_to_token.to(DEVICE),
                             8, 2, num_sms=64, graph=graph, padded_bs=len(reqs))
    assert int(step.plan.merge_indptr[len(reqs)]) == len(reqs)
    k, v = random_kv(num_slots, 2, 64, torch.float16)
    q = torch.randn(len(reqs), 8, 64).to(torch.float16).to(DEVICE)
    out = run_decode_step(step, q, k, v, 64 ** -0.5)
    assert rel_err(out, flat_reference(q, k, v, req_to_token, pool_rows, seq_lens)) < TOL[torch.float16]


def test_flat_graph_plan_is_capped_at_its_grid(monkeypatch):
    """Graph launches: a batch whose natural plan has more items than the grid captured for its
    batch size gets coarser chunks that fit, and still equals flat attention."""
    from packinfer_sglang.kernels import plan as planner

    from packinfer_sglang import decode_step
    monkeypatch.setattr(planner, "item_cost_tokens", lambda kv_len, rows: kv_len)
    monkeypatch.setattr(decode_step, "launch_config", lambda device, plain: (32, 3))
    _, reqs, req_to_token, pool_rows, seq_lens, num_slots = running_batch(6)
    graph = GraphBuffers(max_bs=len(reqs), max_context_len=128, num_kv_heads=2, num_sms=64, device=DEVICE)
    monkeypatch.setattr(decode_step, "GRID_ITEMS_PER_PROGRAM", 0)  # the grid: 2 items per request
    natural = build_decode_step(ungrouped(len(reqs)), seq_lens, pool_rows.to(DEVICE), req_to_token.to(DEVICE),
                                8, 2, num_sms=64)
    assert natural.plan.num_items > graph.grid_items(len(reqs)) == 2 * len(reqs)
    step = build_decode_step(ungrouped(len(reqs)), seq_lens, pool_rows.to(DEVICE), req_to_token.to(DEVICE),
                             8, 2, num_sms=64, graph=graph, padded_bs=len(reqs))
    assert step.plan.num_items <= step.plan.grid_items == 2 * len(reqs)
    k, v = random_kv(num_slots, 2, 64, torch.float16)
    q = torch.randn(len(reqs), 8, 64).to(torch.float16).to(DEVICE)
    out = run_decode_step(step, q, k, v, 64 ** -0.5)
    assert rel_err(out, flat_reference(q, k, v, req_to_token, pool_rows, seq_lens)) < TOL[torch.float16]


def test_gather_kv_indices_matches_reference():
    g = torch.Generator().manual_seed(7)
    req_to_token = torch.randint(0, 10_000, (6, 1300), generator=g, dtype=torch.int32)
    rows = torch.tensor([3, 0, 5, 3], dtype=torch.int32)
    starts = torch.tensor([0, 17, 1, 600], dtype=torch.int32)
    ends = torch.tensor([1100, 18, 1, 1299], dtype=torch.int32)
    indptr, ref = gather_kv_indices_ref(req_to_token, rows, starts, ends)
    out = torch.full((int(indptr[-1]),), -1, dtype=torch.int32, device=DEVICE)
    gather_kv_indices(req_to_token.to(DEVICE), rows.to(DEVICE), starts.to(DEVICE), indptr.to(DEVICE), out)
    assert torch.equal(out.cpu(), ref)


def test_prefix_is_read_from_one_row_per_group():
    cache, reqs, req_to_token, pool_rows, seq_lens, _ = running_batch(3)
    groups = cache.runtime.decode_groups(reqs, seq_lens.tolist())
    step = build_decode_step(groups, seq_lens, pool_rows.to(DEVICE), req_to_token.to(DEVICE), 8, 2, num_sms=4)
    prefix_total = int(groups.prefix_lens.sum())
    suffix_total = int(seq_lens.sum()) - int((np.diff(groups.group_indptr) * groups.prefix_lens).sum())
    assert step.plan.kv_indices.numel() == prefix_total + suffix_total
