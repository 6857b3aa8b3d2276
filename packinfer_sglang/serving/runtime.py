"""The per-scheduler state of packinfer: one :class:`PackInferRuntime` per SGLang scheduler process.

SGLang runs one scheduler per (tensor-parallel) rank; each owns a radix cache, a model runner and
its attention backend. The packinfer radix cache's factory creates the runtime, which then lives as
``cache.runtime``, and binds it to the packinfer attention backend of the same scheduler's model
runner (``backend.runtime``). Everything that carries state from one scheduler hook to another, or
from the hooks to the backend, lives here and nowhere else (no module globals):

- the grouping of the decode batch (:meth:`decode_groups`), memoized per batch composition, with
  the model's cost gate (:class:`~packinfer_sglang.kernels.PackingCost`);
- the hand-over of a decode step's groups from the scheduler to the backend: the
  ``ForwardBatch.init_new`` hook calls :meth:`offer_step`, the backend's next
  ``init_forward_metadata`` calls :meth:`take_step` (SGLang's model runner copies the forward batch
  into static buffers, so attributes set on it would not arrive);
- the state of the optional hooks (compaction and placement, the fragmentation log).

Lifetime: created with the cache, before the first batch; lives as long as the scheduler.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import PackInferConfig
from ..grouping import DecodeGroups, form_groups
from ..kernels.cost_model import PackingCost

logger = logging.getLogger(__name__)


def packing_cost_of(model_runner) -> PackingCost:
    """The attention shape of this rank from an SGLang ``ModelRunner`` (heads split by tensor
    parallelism, the KV cache's dtype).

    Raises:
        AttributeError, ValueError: when the model config cannot be read as a GQA/MHA model.
    """
    mc = model_runner.model_config
    tp = getattr(getattr(model_runner, "ps", None), "tp_size", None) or model_runner.server_args.tp_size
    tp = max(1, int(tp))
    num_kv = max(1, mc.get_num_kv_heads(tp))
    num_qo = max(num_kv, mc.num_attention_heads // tp)
    dtype = getattr(model_runner, "kv_cache_dtype", None)
    return PackingCost(num_qo - num_qo % num_kv, num_kv, mc.head_dim, getattr(dtype, "itemsize", 2) or 2)


def packinfer_backends(backend) -> list:
    """The packinfer attention backends inside ``backend``: itself, or the parts of SGLang's
    composite backends (hybrid prefill/decode, two-batch overlap)."""
    from .backend import PackInferAttnBackend

    found, stack, seen = [], [backend], set()
    while stack:
        b = stack.pop()
        if b is None or id(b) in seen:
            continue
        seen.add(id(b))
        if isinstance(b, PackInferAttnBackend):
            found.append(b)
        stack.extend(getattr(b, name, None) for name in ("decode_backend", "prefill_backend", "primary"))
        stack.extend(getattr(b, "children", None) or ())
    return found


class PackInferRuntime:
    """Per-scheduler state (module docstring). ``config``: the process's settings; ``cost``: the
    grouping gate for this rank's attention shape (``None``: any shared prefix counts as saving)."""

    def __init__(self, config: PackInferConfig, cost: PackingCost | None = None):
        self.config = config
        self.cost = cost
        self._groups_key: tuple | None = None
        self._groups: DecodeGroups | None = None
        self._offered: tuple[torch.Tensor, DecodeGroups] | None = None
        self._no_group_logs = 0
        self._warned: set[str] = set()
        self.compaction: Any = None  # the compaction hook's state, created by it on first use
        self.prefill_dedup: Any = None  # the prefill dedup hook's state, created by it on first use
        self.decode_batches = 0  # decode batches prepared (the fragmentation log's step counter)

    def bind(self, model_runner) -> int:
        """Binds this runtime to the packinfer backends of ``model_runner`` and takes their cost
        gate; returns the number of backends bound (0: the server runs another attention backend)."""
        backends = packinfer_backends(getattr(model_runner, "attn_backend", None))
        for b in backends:
            b.runtime = self
        if self.cost is None:
            try:
                self.cost = packing_cost_of(model_runner)
            except (AttributeError, ValueError, TypeError) as e:
                self.warn_once(f"cost model unavailable ({e}); grouping by shared tokens alone")
        return len(backends)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("packinfer: %s", message)

    def decode_groups(self, reqs, seq_lens) -> DecodeGroups:
        """Groups of a decode batch (rows in ``reqs`` order; see :mod:`..grouping`), recomputed when
        the requests, their order or their tree nodes change (SGLang moves ``last_node`` from the
        admission-time match to the whole prompt once prefill results are processed, which the overlap
        scheduler does after the first decode step is planned). ``seq_lens``: per request, tokens
        including the one being decoded. Every caller gets the same gate (``self.cost``)."""
        key = (self.cost, tuple((r.rid, id(r.last_node)) for r in reqs))
        if key != self._groups_key:
            cfg = self.config
            self._groups = form_groups([r.last_node for r in reqs], seq_lens, cfg.min_prefix_tokens,
                                       cfg.min_group_size, self.cost)
            self._groups_key = key
            if self._groups.num_groups == len(reqs) > 1 and self._no_group_logs < 3:
                self._no_group_logs += 1
                self._log_no_group(reqs)
        return self._groups

    def _log_no_group(self, reqs) -> None:
        depths = sorted(_path_tokens(r.last_node) for r in reqs)
        logger.info("packinfer: no group among %d requests; tree node depths min %d, median %d, max %d tokens; "
                    "min_prefix_tokens %d", len(reqs), depths[0], depths[len(depths) // 2], depths[-1],
                    self.config.min_prefix_tokens)

    def offer_step(self, batch, batch_size: int) -> None:
        """Hands the groups of the decode ``ScheduleBatch`` about to run (``batch_size`` rows in its
        ``ForwardBatch``) to the backend's next ``init_forward_metadata``, keyed by its lengths."""
        self._offered = None
        if len(batch.reqs) != batch_size:
            self.warn_once(f"decode batch without groups: {len(batch.reqs)} requests for batch size {batch_size}")
            return
        self._offered = (batch.seq_lens_cpu, self.decode_groups(batch.reqs, batch.seq_lens_cpu))

    def take_step(self, seq_lens_cpu: torch.Tensor | None) -> DecodeGroups | None:
        """The groups offered for the batch with these lengths, once; ``None`` if none match."""
        offered, self._offered = self._offered, None
        if offered is None or seq_lens_cpu is None or offered[0] is None:
            return None
        lens, groups = offered
        n = len(groups.order)
        if len(seq_lens_cpu) < n or not torch.equal(lens[:n].cpu(), seq_lens_cpu[:n].cpu()):
            return None
        return groups


def runtime_of(batch, model_runner=None) -> PackInferRuntime | None:
    """The runtime of the scheduler running ``batch``: its packinfer radix cache's, else (a batch
    without ``tree_cache``) the one bound to ``model_runner``'s packinfer backend; ``None`` when the
    server runs neither."""
    runtime = getattr(getattr(batch, "tree_cache", None), "runtime", None)
    if isinstance(runtime, PackInferRuntime):
        return runtime
    if model_runner is not None:
        for backend in packinfer_backends(getattr(model_runner, "attn_backend", None)):
            if backend.runtime is not None:
                return backend.runtime
    return None


def _path_tokens(node) -> int:
    """Tokens on the path root→``node``."""
    n = 0
    while node is not None and node.parent is not None:
        n += len(node.key)
        node = node.parent
    return n
