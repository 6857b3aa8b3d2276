"""The packing gate: byte counts by hand, its limits, and its effect on the radix-tree grouping."""

import math

import pytest
from packinfer_sglang.kernels.cost_model import ITEM_OVERHEAD_TOKENS, PARTIAL_ROW_TOKENS, PackingCost
from packinfer_sglang.kernels.launch import BLOCK_N, PREFIX_BLOCK_M
from workload import admit, new_cache, shared_prefix_prompts

from packinfer_sglang.grouping import form_groups


@pytest.mark.parametrize("count, depth", [(2, 300), (17, 1000), (37, 4096), (256, 2048)])
@pytest.mark.parametrize("heads", [(32, 8), (28, 4), (8, 1), (32, 32)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_net_saving_by_hand(count, depth, heads):
    cost = PackingCost(*heads, head_dim=128, dtype_bytes=2)
    gqa = heads[0] // heads[1]
    per_tile = max(1, PREFIX_BLOCK_M // gqa)
    saved_bytes = (count - math.ceil(count / per_tile)) * depth * 2 * 128 * 2
    added_bytes = count * math.ceil(depth / (2 * BLOCK_N)) * gqa * 129 * 4 * 2
    expect = (saved_bytes - added_bytes) / (2 * 128 * 2) - ITEM_OVERHEAD_TOKENS
    assert cost.net_saving_tokens(count, depth) == pytest.approx(expect)


def test_one_cost_model_for_gate_and_planner():
    """The gate's partial row in KV tokens is the planner's PARTIAL_ROW_TOKENS (16-bit KV, up to the
    lse's 4 bytes), and its fixed cost is the planner's per-item overhead."""
    cost = PackingCost(32, 8, 128, 2)
    assert cost.partial_row_tokens == pytest.approx(PARTIAL_ROW_TOKENS, rel=0.01)
    assert cost.net_saving_tokens(2, 10**6) - cost.net_saving_tokens(2, 10**6 - 1) == pytest.approx(1, abs=0.1)
    assert cost.net_saving_tokens(2 * cost.requests_per_tile, cost.prefix_chunk) == pytest.approx(
        (2 * cost.requests_per_tile - 2) * cost.prefix_chunk
        - 2 * cost.requests_per_tile * cost.gqa * cost.partial_row_tokens - ITEM_OVERHEAD_TOKENS)


def test_limits():
    cost = PackingCost(32, 8, 128)
    assert cost.net_saving_tokens(1, 10_000) == 0  # a group of one saves nothing
    assert cost.net_saving_tokens(2, 32) < 0  # a prefix shorter than a tile does not pay
    assert cost.net_saving_tokens(64, 4096) > 60 * 4096 * 0.9  # large groups save nearly everything
    assert PackingCost(128, 1, 128).net_saving_tokens(100, 4096) < 0  # GQA >= tile rows: one request per tile
    with pytest.raises(ValueError, match="multiple"):
        PackingCost(30, 8, 128)


def test_gate_changes_grouping_where_packing_does_not_pay():
    """Pairs sharing 400 tokens group by shared tokens alone, and under the cost model at GQA 4, not at
    GQA 64 (one request per tile: nothing saved); pairs sharing 100 tokens save less than an item
    costs."""
    import random

    rng = random.Random(0)
    cache = new_cache(min_prefix_tokens=16)
    reqs, _ = admit(cache, shared_prefix_prompts(rng, 2, 2, 400, 5), rng)
    nodes, lens = [r.last_node for r in reqs], [410] * len(reqs)
    plain = form_groups(nodes, lens, 16, 2)
    gated = form_groups(nodes, lens, 16, 2, PackingCost(64, 1, 128))
    kept = form_groups(nodes, lens, 16, 2, PackingCost(32, 8, 128))
    assert plain.num_groups == 2 and kept.num_groups == 2
    assert gated.num_groups == len(reqs)
    reqs, _ = admit(new_cache(min_prefix_tokens=16), shared_prefix_prompts(rng, 2, 2, 100, 5), rng)
    assert form_groups([r.last_node for r in reqs], [110] * 4, 16, 2, PackingCost(32, 8, 128)).num_groups == 4
