"""One cost model of the packed kernel, in KV tokens of one head (PackInfer, Sec. 3-4).

Decode attention is memory-bound, so costs are HBM traffic, counted in *KV tokens* of one head
(``kv_token_bytes = 2 * head_dim * dtype_bytes``: its K and V). Three parts of the system read it:

- the planner (:mod:`.plan`) balances work items by :func:`item_cost_tokens`;
- grouping's gate (:meth:`PackingCost.net_saving_tokens`) packs a group only when the prefix reads
  it saves exceed the partial states and the item it adds;
- compaction (``packinfer_sglang.compaction.plan``) reads the tile shape of prefix items
  (:data:`~.launch.PREFIX_BLOCK_M` rows, :data:`~.launch.BLOCK_N`-token blocks) from here.

Per-item costs: a fixed cost (program start, query load, pipeline fill) of
:data:`ITEM_OVERHEAD_TOKENS`, and the float32 partial state of each query row, written by the item
and read back by the merge: ``8 * (head_dim + 1)`` bytes, which is :data:`PARTIAL_ROW_TOKENS` KV
tokens for 16-bit KV. The fixed cost was 32 tokens (not measured); on the H200, 16 to 256 changed
the plan of 2 of 16 cases and 256 was fastest on both (B16 P2048 S512 21.7 -> 20.5 us, B64 P256
S256 35.3 -> 34.3 us), no case more than 1% slower (``benchmarks/results/ab_planner_h200.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .launch import BLOCK_N, PREFIX_BLOCK_M, requests_per_tile

ITEM_OVERHEAD_TOKENS = 256
PARTIAL_ROW_TOKENS = 2


def item_cost_tokens(kv_len, rows):
    """Cost of a work item over ``kv_len`` KV tokens for ``rows`` query rows (numpy arrays or ints)."""
    return kv_len + ITEM_OVERHEAD_TOKENS + PARTIAL_ROW_TOKENS * rows


@dataclass(frozen=True)
class PackingCost:
    """The attention shape of one rank, and what packing a group costs and saves on it.

    For a candidate group of ``c`` running requests sharing ``d`` prefix tokens, with GQA ratio
    ``r`` and prefix tiles of ``m = requests_per_tile`` requests::

        saved  = (c - ceil(c / m)) * d                            prefix reads avoided (flat: c * d)
        added  = c * ceil(d / prefix_chunk) * r * partial_row     float32 partials (o, lse) written
                 + ITEM_OVERHEAD_TOKENS                           and read back; one more item
        pays  <=> saved - added > 0

    ``prefix_chunk`` is the planner's shortest prefix chunk (``2 * block_n``), so ``added`` is an
    upper bound. A group of one never pays, nor does a prefix much shorter than an item's fixed
    cost; with ``r >= prefix_block_m`` (one request per tile) nothing is saved.

    Raises:
        ValueError: when ``num_qo_heads`` is not a multiple of ``num_kv_heads >= 1``.
    """

    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    prefix_block_m: int = PREFIX_BLOCK_M
    block_n: int = BLOCK_N

    def __post_init__(self):
        if self.num_kv_heads < 1 or self.num_qo_heads % self.num_kv_heads:
            raise ValueError(f"num_qo_heads {self.num_qo_heads} must be a multiple of num_kv_heads "
                             f"{self.num_kv_heads} >= 1")

    @property
    def gqa(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def requests_per_tile(self) -> int:
        return requests_per_tile(self.gqa, self.prefix_block_m)

    @property
    def kv_token_bytes(self) -> int:
        """K and V of one token of one head, bytes."""
        return 2 * self.head_dim * self.dtype_bytes

    @property
    def partial_row_tokens(self) -> float:
        """A float32 partial state (``o`` and ``lse``) written and read back, in KV tokens."""
        return 8 * (self.head_dim + 1) / self.kv_token_bytes

    @property
    def prefix_chunk(self) -> int:
        return 2 * self.block_n

    def net_saving_tokens(self, count: int, depth: int) -> float:
        """Net KV tokens saved per KV head and layer by packing ``count`` requests over ``depth``
        shared tokens; <= 0 means packing does not pay."""
        if count < 2 or depth <= 0:
            return 0.0
        saved = (count - math.ceil(count / self.requests_per_tile)) * depth
        partials = count * math.ceil(depth / self.prefix_chunk) * self.gqa * self.partial_row_tokens
        return saved - partials - ITEM_OVERHEAD_TOKENS
