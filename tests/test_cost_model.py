"""The packing gate: byte counts by hand, its limits, and its effect on the radix-tree grouping."""

import math

import pytest
from packinfer_sglang.kernels.packed_cascade import BLOCK_N, PREFIX_BLOCK_M
from workload import admit, new_cache, shared_prefix_prompts

from packinfer_sglang.cost_model import PackingCost
from packinfer_sglang.grouping import form_groups


@pytest.mark.parametrize("count, depth", [(2, 300), (17, 1000), (37, 4096), (256, 2048)])
@pytest.mark.parametrize("heads", [(32, 8), (28, 4), (8, 1), (32, 32)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_net_saving_by_hand(count, depth, heads):
    cost = PackingCost(*heads, head_dim=128, dtype_bytes=2)
    gqa = heads[0] // heads[1]
    per_tile = max(1, PREFIX_BLOCK_M // gqa)
    saved_bytes = (count - math.ceil(count / per_tile)) * depth * 2 * 128 * 2
    added_bytes = count * math.ceil(depth / (2 * BLOCK_N)) * gqa * 129 * 4 * 2
    expect = (saved_bytes - added_bytes) / (2 * 128 * 2) - BLOCK_N
    assert cost.net_saving_tokens(count, depth) == pytest.approx(expect)


def test_limits():
    cost = PackingCost(32, 8, 128)
    assert cost.net_saving_tokens(1, 10_000) == 0  # a group of one saves nothing
    assert cost.net_saving_tokens(2, 32) < 0  # a prefix shorter than a tile does not pay
    assert cost.net_saving_tokens(64, 4096) > 60 * 4096 * 0.9  # large groups save nearly everything
    assert PackingCost(128, 1, 128).net_saving_tokens(100, 4096) < 0  # GQA >= tile rows: one request per tile
    with pytest.raises(ValueError, match="multiple"):
        PackingCost(30, 8, 128)


def test_gate_changes_grouping_where_packing_does_not_pay():
    """Pairs sharing 100 tokens group by shared tokens alone, not under the cost model at GQA 64."""
    import random

    rng = random.Random(0)
    cache = new_cache(min_prefix_tokens=16)
    reqs, _ = admit(cache, shared_prefix_prompts(rng, 2, 2, 100, 5), rng)
    nodes, lens = [r.last_node for r in reqs], [110] * len(reqs)
    plain = form_groups(nodes, lens, 16, 2)
    gated = form_groups(nodes, lens, 16, 2, PackingCost(64, 1, 128))
    kept = form_groups(nodes, lens, 16, 2, PackingCost(32, 8, 128))
    assert plain.num_groups == 2 and kept.num_groups == 2
    assert gated.num_groups == len(reqs)
