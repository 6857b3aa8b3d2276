"""Group formation and decode plans under the faults of production traffic (issue 20), on the CPU
world of :mod:`compaction_world` (SGLang's real ``RadixCache`` subclass, allocators and pools):
random sequences of admit / decode / finish / abort / retract / re-admit / evict / compact /
``/flush_cache``. After every operation:

- the pools and tree pass :func:`check_pool_integrity` and every request's KV equals the oracle's;
- the step's groups are a partition of the batch whose prefixes every member really holds: the
  packed kernel reads a group's prefix from its first member's ``req_to_token`` row only, so each
  member's row must name the same slots for those positions;
and at the end of each sequence the packed decode step (Triton interpreter) equals flat attention
over each request's own row.

Retraction is SGLang's ``retract_decode``: the request releases its KV without inserting its
decoded tokens into the tree (``cache_finished_req(is_insert=False)``) and is re-admitted later with
prompt + output as its new prompt, matching whatever of it the tree still holds.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from compaction_world import BASIC_OPS, MAX_RUNNING, World, apply_basic_op
from conftest import DEVICE, TOL, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decode_step import flat_reference

from packinfer_sglang.decode_step import build_decode_step, run_decode_step

MIN_PREFIX = 8

_OPS = st.one_of(
    *BASIC_OPS,
    st.tuples(st.just("abort_group"), st.integers(0, 30)),
    st.tuples(st.just("retract"), st.integers(0, 30)),
    st.tuples(st.just("readmit"),),
    st.tuples(st.just("compact"), st.booleans()),
    st.tuples(st.just("drain_and_flush"),),
)


def flush(w: World) -> None:
    """SGLang's ``flush_cache`` when idle: tree reset, then both pools cleared."""
    assert not w.running
    w.cache.reset()
    w.rtp.clear()
    w.alloc.clear()


def check_groups(w: World) -> None:
    """The step's groups partition the batch, and each member's row names its group's prefix slots."""
    reqs = w.running
    if not reqs:
        return
    lens = [r.kv.kv_allocated_len + 1 for r in reqs]
    groups = w.cache.runtime.decode_groups(reqs, lens)
    n = len(reqs)
    assert sorted(groups.order.tolist()) == list(range(n)), "order is not a permutation of the batch"
    gi = groups.group_indptr
    assert gi[0] == 0 and gi[-1] == n and (np.diff(gi) >= 1).all()
    for g, p in enumerate(groups.prefix_lens.tolist()):
        rows = groups.order[gi[g]:gi[g + 1]].tolist()
        if p == 0:
            continue
        assert len(rows) >= 2, f"group {g}: a prefix for a single request"
        assert p <= min(lens[i] for i in rows) - 1, f"group {g}: prefix {p} leaves a member no suffix"
        first = w.rtp.req_to_token[reqs[rows[0]].req_pool_idx, :p]
        for i in rows[1:]:
            mine = w.rtp.req_to_token[reqs[i].req_pool_idx, :p]
            assert torch.equal(mine, first), f"group {g}: {reqs[i].rid} holds other slots for the shared prefix"
            assert reqs[i].tokens[:p] == reqs[rows[0]].tokens[:p]


def check_step_attention(w: World, seed: int) -> None:
    """The packed decode step over the world's batch equals flat attention over each request's row."""
    reqs = w.running
    if not reqs:
        return
    seq_lens = torch.tensor([r.kv.kv_allocated_len for r in reqs], dtype=torch.int64)
    groups = w.cache.runtime.decode_groups(reqs, seq_lens.tolist())
    rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    num_slots, num_qo_heads, num_kv_heads, head_dim = w.alloc.size + w.ps, 4, 2, 64
    k = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).half().to(DEVICE)
    v = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).half().to(DEVICE)
    q = torch.randn(len(reqs), num_qo_heads, head_dim, generator=gen).half().to(DEVICE)
    r2t = w.rtp.req_to_token.to(DEVICE)
    step = build_decode_step(groups, seq_lens, rows.to(DEVICE), r2t, num_qo_heads, num_kv_heads, num_sms=4)
    out = run_decode_step(step, q, k, v, head_dim ** -0.5)
    ref = flat_reference(q, k, v, w.rtp.req_to_token, rows, seq_lens)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("page_size, num_pages", [(1, 700), (16, 48)])
@settings(max_examples=12, deadline=None)
@given(initial=st.integers(2, 12), ops=st.lists(_OPS, min_size=8, max_size=28), seed=st.integers(0, 2**16),
       compact=st.booleans())
def test_groups_and_plans_survive_faults(page_size, num_pages, initial, ops, seed, compact):
    rng = random.Random(seed)
    w = World(page_size, num_pages, min_prefix_tokens=MIN_PREFIX, place=compact)
    w.cache.runtime.compaction = _CompactionView(w) if compact else None  # what reset() sees in a server
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(rng.randrange(8, 48))] for s in range(4)]
    retracted: list[tuple[list[int], int]] = []  # (prompt + output, tokens still to decode)
    start = [op for i in range(initial) for op in [("admit", rng.randrange(4), rng.randrange(1, 14), 60),
                                                   ("decode", 1)]]
    for op in start + ops + [("decode", 1)]:
        kind = op[0]
        if apply_basic_op(w, op, rng, systems):
            pass
        elif kind == "abort_group" and w.running:  # every request sharing the victim's system prompt
            victim = w.running[op[1] % len(w.running)]
            for r in [r for r in w.running if r.tokens[0] == victim.tokens[0]]:
                w.finish(r, abort=True)
        elif kind == "retract" and w.running:
            r = w.running[op[1] % len(w.running)]
            retracted.append((list(r.tokens), max(r.max_new - len(r.output_ids), 1)))
            w.finish(r, abort=True)
        elif kind == "readmit" and retracted and len(w.running) < MAX_RUNNING:
            prompt, remaining = retracted.pop(0)
            if len(prompt) + remaining < 300 and w.admit(prompt, remaining) is None:
                retracted.insert(0, (prompt, remaining))  # no room yet: stays queued, as in SGLang
        elif kind == "compact" and compact:
            w.compact()
            if op[1]:  # the relocation's old slots are freed after the next forward, if there is one
                w.decode_step()
        elif kind == "drain_and_flush":
            if compact and w.running:  # a relocation in the last step, then every client goes away
                w.compact()
            for r in list(w.running):
                w.finish(r, abort=True)
            flush(w)  # slots a relocation retired are forgotten by PackInferRadixCache.reset
            w.check()
        w.check()
        w.check_content()
        check_groups(w)
    check_step_attention(w, seed)


class _CompactionView:
    """The fields of the compaction hooks' state that ``PackInferRadixCache.reset`` reads."""

    def __init__(self, w: World):
        self.relocator, self.placer = w.relocator, w.placer


def test_flush_forgets_slots_compaction_retired():
    """``/flush_cache`` right after a relocation: the retired slots are freed by the allocator's clear,
    never a second time (they would sit on the free list twice and be handed to two requests)."""
    w = World(1, 700, min_prefix_tokens=MIN_PREFIX, chunk_tokens=4096)
    w.cache.runtime.compaction = _CompactionView(w)
    rng = random.Random(0)
    system = [1] + [rng.randrange(1000, 50000) for _ in range(40)]
    for i in range(6):
        w.admit(system + [rng.randrange(1000, 50000) for _ in range(5)], 40)
        for _ in range(3):  # interleaved decode scatters the suffixes: compaction has work to do
            w.decode_step()
    plan = w.compact()
    assert plan is not None and plan.moves, "the setup should make compaction move KV"
    assert w.relocator.pending_free_slots().numel() > 0
    for r in list(w.running):
        w.finish(r, abort=True)
    flush(w)  # PackInferRadixCache.reset forgets them
    assert w.relocator.pending_free_slots().numel() == 0
    assert w.relocator.free_deferred() == 0
    free = w.alloc.free_pages if w.ps == 1 else None
    assert free is not None and free.numel() == torch.unique(free).numel() == w.alloc.size
