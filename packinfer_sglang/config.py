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
| ``PACKINFER_PREFILL_BACKEND`` | auto | extend (prefill) and mixed batches: ``flashinfer`` (SGLang's FlashInfer backend), ``triton`` (SGLang's Triton backend), ``auto`` (flashinfer where it imports, else triton) |
| ``PACKINFER_PREFILL_DEDUP`` | 0 | hold back a waiting request while another computes the prefix it shares (one prefill per uncached shared prefix; off until measured) |
| ``PACKINFER_GRAPH_MAX_BS`` | 512 | capture decode CUDA graphs up to this batch size when ``--cuda-graph-max-bs`` is not given and SGLang's default is lower (0: SGLang's default) |

Every variable is validated when the process starts (:func:`validate_environment`): a bad value, or
a ``PACKINFER_*`` name that is none of these, raises :class:`ConfigError` with one line naming the
variable, the value and what is allowed (``packinfer serve`` and the plugin exit with code 2).

The compaction cost rule is :mod:`packinfer_sglang.compaction.plan`'s docstring; the placement
policy is :mod:`packinfer_sglang.compaction.placement`'s. Placement follows ``PACKINFER_COMPACT``: it runs only
when compaction is on, unless ``PACKINFER_COMPACT_PLACE=0`` turns it off there. The fragmentation
log (:mod:`packinfer_sglang.patches.fragmentation_log`) reads the device once per line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from functools import lru_cache

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
PREFIX = "PACKINFER_"
PREFILL_BACKENDS = ("auto", "flashinfer", "triton")


class ConfigError(ValueError):
    """A bad packinfer setting; the message is one line naming the variable, its value and what
    is allowed."""


def env_name(field: str) -> str:
    """The environment variable of a config field: ``min_prefix_tokens`` -> ``PACKINFER_MIN_PREFIX_TOKENS``."""
    return PREFIX + field.upper()


@dataclass(frozen=True)
class PackInferConfig:
    """Grouping thresholds and debug switches (see module docstring for the variables).

    Raises:
        ConfigError: on a value outside its range, naming the field's environment variable.
    """

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
    prefill_backend: str = "auto"
    graph_max_bs: int = 512
    prefill_dedup: bool = False

    def __post_init__(self):
        at_least = {"min_prefix_tokens": 1, "min_group_size": 2, "verify_every": 1, "log_every": 0,
                    "frag_log_every": 0, "compact_every": 1, "compact_horizon": 1, "compact_max_tokens": 1,
                    "compact_place_every": 1, "compact_gather_penalty": 0, "graph_max_bs": 0}
        for name, low in at_least.items():
            if not getattr(self, name) >= low:
                _fail(name, getattr(self, name), f"must be >= {low}")
        if not 0 < self.verify_rtol < 1:
            _fail("verify_rtol", self.verify_rtol, "must be in (0, 1)")
        if not self.compact_min_gain > 0:
            _fail("compact_min_gain", self.compact_min_gain, "must be > 0")
        if self.prefill_backend not in PREFILL_BACKENDS:
            _fail("prefill_backend", self.prefill_backend, f"expected one of {'/'.join(PREFILL_BACKENDS)}")

    @property
    def place(self) -> bool:
        """Whether decode tokens are placed next to their request's tail (compaction on and placement on)."""
        return self.compact and self.compact_place


def _fail(name: str, value, allowed: str):
    raise ConfigError(f"{env_name(name)}={value!r}: {allowed}")


def _parse(name: str, raw: str, typ):
    if typ is bool:
        low = raw.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        _fail(name, raw, "expected one of 0/1/true/false/yes/no/on/off")
    try:
        value = typ(raw)
    except ValueError:
        value = None
    if value is None:
        _fail(name, raw, f"expected {'an integer' if typ is int else 'a number'}")
    if typ is float and not math.isfinite(value):
        _fail(name, raw, "expected a finite number")
    return value


def config_from_env(environ=None) -> PackInferConfig:
    """Builds the config from ``PACKINFER_<FIELD>`` variables.

    Raises:
        ConfigError: on a bad value or an unknown ``PACKINFER_*`` variable.
    """
    environ = os.environ if environ is None else environ
    known = {env_name(f.name): f for f in fields(PackInferConfig)}
    unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise ConfigError(f"{unknown[0]}={environ[unknown[0]]!r}: not a packinfer setting (known: "
                          f"{', '.join(sorted(known))})")
    kwargs = {}
    for name, f in known.items():
        raw = environ.get(name)
        if raw is not None:
            kwargs[f.name] = _parse(f.name, raw, {"int": int, "float": float, "bool": bool, "str": str}[f.type])
    return PackInferConfig(**kwargs)


@lru_cache(maxsize=1)
def get_config() -> PackInferConfig:
    """The process-wide config, read once.

    Raises:
        ConfigError: see :func:`config_from_env`.
    """
    return config_from_env()


def validate_environment(environ=None) -> PackInferConfig:
    """Reads and checks every ``PACKINFER_*`` variable (the start-up check of ``packinfer serve``,
    ``packinfer demo`` and the plugin); raises :class:`ConfigError`."""
    return config_from_env(environ)
