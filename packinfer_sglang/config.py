"""Configuration: one frozen dataclass, read from ``PACKINFER_*`` environment variables only here.

SGLang's scheduler processes are spawned from the server process and inherit its environment, so
environment variables reach every rank; ``packinfer serve`` sets them from its flags.

| variable | default | meaning |
|---|---|---|
| ``PACKINFER_MIN_PREFIX_TOKENS`` | 256 | a group must share at least this many prefix tokens |
| ``PACKINFER_MIN_GROUP_SIZE`` | 2 | and hold at least this many running requests |
| ``PACKINFER_REORDER_BATCH`` | 1 | make each group's requests adjacent in the running batch |
| ``PACKINFER_VERIFY`` | 0 | compute SGLang's Triton decode beside ours for every layer and step |
| ``PACKINFER_VERIFY_EVERY`` | 1 | with verification on, check one decode step in this many |
| ``PACKINFER_VERIFY_RTOL`` | 2e-2 | verification fails above this relative L2 error (bf16 outputs) |
| ``PACKINFER_LOG_EVERY`` | 500 | decode steps between grouping/verification log lines (0: never) |
| ``PACKINFER_COMPACT`` | 0 | relocate scattered groups into contiguous KV slot ranges (off until measured) |
| ``PACKINFER_COMPACT_EVERY`` | 32 | decode steps between compaction plans |
| ``PACKINFER_COMPACT_HORIZON`` | 256 | cap on a request's expected remaining decode steps (cost rule) |
| ``PACKINFER_COMPACT_MIN_GAIN`` | 1.0 | relocate only if bytes saved >= this × bytes copied |
| ``PACKINFER_COMPACT_GATHER_PENALTY`` | 0.0 | extra fraction of a token's K/V bytes an index gather costs |
| ``PACKINFER_COMPACT_MAX_TOKENS`` | 65536 | tokens copied per plan at most (bounds the stall) |
| ``PACKINFER_COMPACT_PLACE`` | 1 | with compaction on, put decode tokens next to their request's tail |
| ``PACKINFER_COMPACT_PLACE_EVERY`` | 8 | decode steps between placement refreshes (host reads) at most |
| ``PACKINFER_KV_BASE`` | 0 | the kernel reads KV chunks that are one run of slots by base + offset |
| ``PACKINFER_FRAG_LOG_EVERY`` | 0 | decode steps between KV fragmentation log lines, compaction on or off (0: never) |
| ``PACKINFER_GRAPH_LAUNCH`` | flat | decode CUDA graphs launch the kernel ``flat`` (a grid per captured batch size, idle programs exit) or ``persistent`` |

The compaction cost rule is :mod:`packinfer_sglang.compaction_plan`'s docstring; the placement
policy is :mod:`packinfer_sglang.placement`'s. Placement follows ``PACKINFER_COMPACT``: it runs only
when compaction is on, unless ``PACKINFER_COMPACT_PLACE=0`` turns it off there. The fragmentation
log (:mod:`packinfer_sglang.patches.fragmentation_log`) reads the device once per line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import lru_cache

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class PackInferConfig:
    """Grouping thresholds and debug switches (see module docstring for the variables)."""

    min_prefix_tokens: int = 256
    min_group_size: int = 2
    reorder_batch: bool = True
    verify: bool = False
    verify_every: int = 1
    verify_rtol: float = 2e-2
    log_every: int = 500
    compact: bool = False
    compact_every: int = 32
    compact_horizon: int = 256
    compact_min_gain: float = 1.0
    compact_gather_penalty: float = 0.0
    compact_max_tokens: int = 65536
    compact_place: bool = True
    compact_place_every: int = 8
    kv_base: bool = False
    frag_log_every: int = 0
    graph_launch: str = "flat"

    def __post_init__(self):
        if self.min_prefix_tokens < 1:
            raise ValueError(f"min_prefix_tokens must be >= 1, got {self.min_prefix_tokens}")
        if self.min_group_size < 2:
            raise ValueError(f"min_group_size must be >= 2, got {self.min_group_size}")
        if not 0 < self.verify_rtol < 1:
            raise ValueError(f"verify_rtol must be in (0, 1), got {self.verify_rtol}")
        if self.verify_every < 1:
            raise ValueError(f"verify_every must be >= 1, got {self.verify_every}")
        for name in ("log_every", "frag_log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("compact_every", "compact_horizon", "compact_max_tokens", "compact_place_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.graph_launch not in ("flat", "persistent"):
            raise ValueError(f"graph_launch must be 'flat' or 'persistent', got {self.graph_launch!r}")
        if self.compact_min_gain <= 0 or self.compact_gather_penalty < 0:
            raise ValueError(f"compact_min_gain must be > 0 and compact_gather_penalty >= 0, got "
                             f"{self.compact_min_gain}, {self.compact_gather_penalty}")

    @property
    def place(self) -> bool:
        """Whether decode tokens are placed next to their request's tail (compaction on and placement on)."""
        return self.compact and self.compact_place


def _parse(name: str, raw: str, typ):
    if typ is bool:
        low = raw.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError(f"PACKINFER_{name.upper()}={raw!r}: expected one of 0/1/true/false/yes/no/on/off")
    try:
        return typ(raw)
    except ValueError:
        raise ValueError(f"PACKINFER_{name.upper()}={raw!r}: expected {typ.__name__}") from None


def config_from_env(environ=None) -> PackInferConfig:
    """Builds the config from ``PACKINFER_<FIELD>`` variables; raises ``ValueError`` on bad values."""
    environ = os.environ if environ is None else environ
    kwargs = {}
    for f in fields(PackInferConfig):
        raw = environ.get(f"PACKINFER_{f.name.upper()}")
        if raw is not None:
            kwargs[f.name] = _parse(f.name, raw, {"int": int, "float": float, "bool": bool, "str": str}[f.type])
    return PackInferConfig(**kwargs)


@lru_cache(maxsize=1)
def get_config() -> PackInferConfig:
    """The process-wide config, read once."""
    return config_from_env()
