"""When packing a group pays: bytes a decode step saves against bytes it adds (PackInfer, Sec. 3-4).

Decode attention is memory-bound, so the model counts HBM bytes per KV head and layer. For a
candidate group of ``c`` running requests sharing ``d`` prefix tokens, with GQA ratio ``r`` and
prefix tiles of ``m = max(1, PREFIX_BLOCK_M // r)`` requests:

    saved  = (c - ceil(c / m)) * d * kv_token_bytes          prefix reads avoided (flat: c * d)
    added  = c * ceil(d / chunk) * r * (head_dim + 1) * 4 * 2  float32 partial (o, lse) written
                                                              and read back by the merge
    pays   <=> saved - added > fixed_bytes

with ``kv_token_bytes = 2 * head_dim * dtype_bytes`` (K and V) and ``chunk`` the prefix chunk of the
work plan (at least ``2 * BLOCK_N`` tokens). ``fixed_bytes`` stands for the per-group cost that is
not traffic (one more tile in the launch's tail): one tile of KV, ``BLOCK_N`` tokens. So a group
of one never pays (``saved == 0``), and neither does a prefix shorter than a tile; with
``r >= PREFIX_BLOCK_M`` (one request per tile) nothing is saved and packing is off.

The radix-tree dynamic program (:mod:`.grouping`) maximizes the total net saving in tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .kernels.packed_cascade import BLOCK_N, PREFIX_BLOCK_M


@dataclass(frozen=True)
class PackingCost:
    """Attention shape of one rank: ``num_qo_heads // num_kv_heads`` is the GQA ratio ``r``."""

    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    prefix_chunk: int = 2 * BLOCK_N

    def __post_init__(self):
        if self.num_kv_heads < 1 or self.num_qo_heads % self.num_kv_heads:
            raise ValueError(f"num_qo_heads {self.num_qo_heads} must be a multiple of num_kv_heads "
                             f"{self.num_kv_heads} >= 1")

    @property
    def gqa(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def requests_per_tile(self) -> int:
        return max(1, PREFIX_BLOCK_M // self.gqa)

    @property
    def kv_token_bytes(self) -> int:
        return 2 * self.head_dim * self.dtype_bytes

    def net_saving_tokens(self, count: int, depth: int) -> float:
        """Net bytes saved per KV head and layer by packing ``count`` requests over ``depth`` shared
        tokens, in KV tokens (bytes / ``kv_token_bytes``); <= 0 means packing does not pay."""
        if count < 2 or depth <= 0:
            return 0.0
        saved = (count - math.ceil(count / self.requests_per_tile)) * depth
        partial_bytes = count * math.ceil(depth / self.prefix_chunk) * self.gqa * (self.head_dim + 1) * 4 * 2
        return saved - partial_bytes / self.kv_token_bytes - BLOCK_N

    @classmethod
    def of_model_runner(cls, model_runner) -> PackingCost:
        """The shape of this rank's attention from an SGLang ``ModelRunner``."""
        mc = model_runner.model_config
        tp = getattr(getattr(model_runner, "ps", None), "tp_size", None) or model_runner.server_args.tp_size
        tp = max(1, int(tp))
        num_kv = max(1, mc.get_num_kv_heads(tp))
        num_qo = max(num_kv, mc.num_attention_heads // tp)
        dtype = getattr(model_runner, "kv_cache_dtype", None)
        return cls(num_qo - num_qo % num_kv, num_kv, mc.head_dim, getattr(dtype, "itemsize", 2) or 2)
