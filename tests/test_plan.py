"""The host work plan: every KV token of every request in exactly one item, partial rows distinct,
capacities respected, and chunk lengths that balance the items over the concurrent programs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packinfer_sglang.kernels.cost_model import ITEM_OVERHEAD_TOKENS, PARTIAL_ROW_TOKENS
from packinfer_sglang.kernels.plan import ITEM_FIELDS, _balanced_chunks, plan_work


def _coverage(work, group_indptr, prefix_indptr, suffix_indptr):
    """Per request: the sorted combined-KV positions its items cover, and its partial rows."""
    num_tokens = len(suffix_indptr) - 1
    covered = [[] for _ in range(num_tokens)]
    rows = [[] for _ in range(num_tokens)]
    for qo_start, qo_len, kv_start, kv_len, partial_offset in np.concatenate([work.prefix_items, work.suffix_items]):
        for t in range(qo_start, qo_start + qo_len):
            covered[t].extend(range(kv_start, kv_start + kv_len))
            rows[t].append(work.merge_indptr[t] + partial_offset)
    return covered, rows


@st.composite
def batches(draw):
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=6))
    prefix = draw(st.lists(st.integers(0, 700), min_size=len(sizes), max_size=len(sizes)))
    suffix = [draw(st.integers(0 if p else 1, 300)) for p, n in zip(prefix, sizes) for _ in range(n)]
    gqa = draw(st.sampled_from([1, 4, 8]))
    return np.cumsum([0, *sizes]), np.cumsum([0, *prefix]), np.cumsum([0, *suffix]), gqa


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(1, 8), st.integers(1, 4))
def test_every_token_once_and_partials_distinct(batch, num_kv_heads, programs_per_sm):
    gi, pi, si, gqa = batch
    work = plan_work(gi, pi, si, gqa_group_size=gqa, num_kv_heads=num_kv_heads, prefix_block_m=64,
                     num_sms=8, programs_per_sm=programs_per_sm, kv_align=16)
    covered, rows = _coverage(work, gi, pi, si)
    group_of = np.repeat(np.arange(len(gi) - 1), np.diff(gi))
    for t, g in enumerate(group_of):
        want = list(range(pi[g], pi[g + 1])) + list(range(pi[-1] + si[t], pi[-1] + si[t + 1]))
        assert sorted(covered[t]) == want, f"request {t}"
        assert sorted(rows[t]) == list(range(work.merge_indptr[t], work.merge_indptr[t + 1]))
    items = np.concatenate([work.prefix_items, work.suffix_items])
    assert items.shape[1] == ITEM_FIELDS and (items[:, 3] > 0).all()
    assert work.prefix_chunk % 16 == 0 and work.suffix_chunk % 16 == 0


def test_equal_spans_are_cut_to_fill_whole_rounds():
    """64 requests x 4096 tokens on 49 programs per head: whole requests take two rounds of 4096 (the
    second a third full); thirds (1408 tokens) take four rounds of a third: 5.6k vs 8.2k tokens."""
    gi, pi, si = np.array([0, 64]), np.array([0, 0]), np.arange(65) * 4096
    work = plan_work(gi, pi, si, gqa_group_size=4, num_kv_heads=8, prefix_block_m=64, num_sms=132, programs_per_sm=3,
                     kv_align=64)
    assert work.suffix_chunk == 1408 and len(work.suffix_items) == 192


def _pieces(span_lens, chunk) -> list[int]:
    return [min(chunk, n - start) for n in span_lens for start in range(0, n, chunk)]


def _round_robin_time(pieces, programs) -> float:
    """Makespan of items dealt round-robin, longest first, to ``programs`` programs (the
    kernel's order), plus a fixed cost per item."""
    lens = np.sort(np.asarray(pieces, dtype=np.int64))[::-1]
    return float(lens[::programs].sum() + 32 * -(-len(lens) // programs))


def test_balanced_never_worse_than_one_item_per_span():
    rng = np.random.default_rng(7)
    for _ in range(50):
        suffix = rng.integers(1, 5000, size=rng.integers(1, 300))
        prefix = rng.integers(64, 9000, size=rng.integers(0, 8))
        programs = int(rng.integers(1, 200))
        cp, cs = _balanced_chunks(prefix, np.full(len(prefix), 64), suffix, np.full(len(suffix), 4), programs, 64)
        chosen = _round_robin_time(_pieces(prefix, cp) + _pieces(suffix, cs), programs)
        whole = _round_robin_time([*prefix, *suffix], programs)
        assert chosen <= 1.15 * whole


def test_capacity_coarsens_chunks():
    gi, pi, si = np.array([0, 8]), np.array([0, 4096]), np.arange(9) * 1000
    work = plan_work(gi, pi, si, gqa_group_size=4, num_kv_heads=8, prefix_block_m=64, num_sms=132, programs_per_sm=4,
                     kv_align=64, max_items=10, max_partials=24)
    assert len(work.prefix_items) + len(work.suffix_items) <= 10 and work.num_partials <= 24
    with pytest.raises(ValueError, match="no plan fits"):
        plan_work(gi, pi, si, gqa_group_size=4, num_kv_heads=8, prefix_block_m=64, max_items=3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=80), st.integers(1, 8), st.integers(1, 300))
def test_plain_decode_fast_path_matches_general_choice(suffix, gqa, programs):
    """Batches without prefixes take a shorter host path; it must cover every token once and pick
    the candidate chunk with the smallest estimate."""
    si = np.cumsum([0, *suffix])
    gi, pi = np.arange(len(suffix) + 1), np.zeros(len(suffix) + 1, dtype=np.int64)
    work = plan_work(gi, pi, si, gqa_group_size=gqa, num_kv_heads=1, prefix_block_m=64, num_sms=programs, programs_per_sm=1,
                     kv_align=64)
    def estimate(chunk):  # the planner's rule, written out: whole rounds of mean items, or the largest
        items = [min(chunk, n - s) for n in suffix for s in range(0, n, chunk)]
        costs = [x + ITEM_OVERHEAD_TOKENS + PARTIAL_ROW_TOKENS * gqa for x in items]
        return max(max(costs), -(-len(costs) // programs) * sum(costs) / len(costs))
    pieces = [-(-max(suffix) // k) for k in range(1, 17)]  # the longest suffix in 1..16 pieces
    candidates = {max(64, -(-p // 64) * 64) for p in pieces}
    assert work.suffix_chunk in candidates
    assert estimate(work.suffix_chunk) <= min(map(estimate, candidates)) * (1 + 1e-9)
    covered, rows = _coverage(work, gi, pi, si)
    for t in range(len(suffix)):
        assert sorted(covered[t]) == list(range(si[t], si[t + 1]))
        assert sorted(rows[t]) == list(range(work.merge_indptr[t], work.merge_indptr[t + 1]))


def test_prefix_items_are_chunk_major_within_a_group():
    """The row blocks of one prefix chunk are adjacent items (they then share the chunk through L2)."""
    sizes, prefix = [40, 9], [1000, 300]  # gqa 4: 16 requests per row block -> 3 and 1 row blocks
    work = plan_work(np.cumsum([0, *sizes]), np.cumsum([0, *prefix]), np.arange(sum(sizes) + 1) * 5,
                     gqa_group_size=4, num_kv_heads=8, prefix_block_m=64, prefix_chunk=256, suffix_chunk=64)
    key = [(qo_start >= 40, kv_start, qo_start) for qo_start, _, kv_start, _, _ in work.prefix_items]
    assert key == sorted(key) and len(key) == 3 * 4 + 2
