"""``--attention-backend packinfer``: SGLang's Triton backend with packed cascade decode.

Decode batches whose groups arrive through the scheduler's :class:`~.runtime.PackInferRuntime`
(``self.runtime``, bound by the packinfer radix cache; offered by
:mod:`packinfer_sglang.patches.forward_batch`) run the packed kernel; a decode batch without groups
still runs it, every request its own group. Everything else — extend, mixed, speculative, layers
with logit capping, sliding windows, sinks or score mods — is SGLang's ``TritonAttnBackend``, which
this class extends.

Decode CUDA graphs: the graphs capture the packed kernels over fixed-address buffers
(:class:`~packinfer_sglang.decode_step.GraphBuffers`) and a fixed grid per captured batch size
(programs past a step's work exit at once); before every replay,
``init_forward_metadata_out_graph`` plans the step on the host and writes the buffers (nothing is
planned inside capture). Padded rows of a graph batch get no work and come out zero.

Verification mode (``PACKINFER_VERIFY=1``) also runs SGLang's Triton decode for every layer of
a packed step and raises ``RuntimeError`` when the two differ by more than ``PACKINFER_VERIFY_RTOL``
(relative L2). Eager steps are checked at once (one in ``PACKINFER_VERIFY_EVERY``); graph replays
are all checked, the errors written on the device and read before the next step.
"""

from __future__ import annotations

import logging
import time

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from ..config import get_config
from ..decode_step import DecodeStep, GraphBuffers, build_decode_step, run_decode_step
from ..grouping import ungrouped
from ..kernels import packed_cascade_attention
from ..kernels.checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from ..kernels.launch import kernel_occupancy, num_sms_of

logger = logging.getLogger(__name__)


class PackInferAttnBackend(TritonAttnBackend):
    """Triton backend whose decode runs :func:`packinfer_sglang.kernels.run_packed_cascade`."""

    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.config = get_config()
        self.num_sms = num_sms_of(torch.device(self.device))
        self.runtime = None  # the scheduler's PackInferRuntime, bound by the packinfer radix cache
        self._occupancies: dict[bool, int] = {}  # programs per SM of the launch, by plain tiles
        self._step: DecodeStep | None = None
        self._triton_ready = True  # whether TritonAttnBackend's metadata matches this batch
        self._batch = None
        self._num_steps = 0
        self._grouped_by_tree = False
        self._warned_no_cache = False
        self._max_err = 0.0
        self._checked = 0
        self._graph: GraphBuffers | None = None
        self._graph_errs = self._graph_rows = None  # verification inside graphs
        self._in_graph = False  # whether self._step writes the graph buffers
        self._errs_pending = False  # a replay wrote errors not yet checked
        self._graph_layers: set[int] = set()  # layers whose errors the captured graphs write
        self._graph_fallback = False  # a captured layer ran Triton's decode (needs its metadata)
        self._host_us = 0.0  # host time of decode metadata, summed over steps
        self._replays = self._replays_gpu_busy = 0  # graph steps; those planned while the GPU still ran
        if torch.device(self.device).type == "cuda":
            self._warm_up()

    def _warm_up(self):
        """Compiles the eager (one program per item) kernel now: its first use comes with the first
        batch larger than the captured graphs, and a Triton JIT compile there stalls serving for
        seconds (seen on the H100: no log line for 2-3 s in the prefill-heavy run)."""
        pool, dev = self.token_to_kv_pool, torch.device(self.device)
        k_buffer = getattr(pool, "k_buffer", None)
        v_buffer = getattr(pool, "v_buffer", None)
        if not k_buffer or not v_buffer:
            return
        self._occupancy(plain=False), self._occupancy(plain=True)
        i32 = lambda *a: torch.tensor(a, dtype=torch.int32, device=dev)
        q = torch.zeros(2, self.num_head, k_buffer[0].shape[-1], dtype=k_buffer[0].dtype, device=dev)
        for group_indptr, prefix_kv_indptr in ((i32(0, 1, 2), i32(0, 0, 0)), (i32(0, 2), i32(0, 1))):  # plain, shared
            packed_cascade_attention(q, k_buffer[0], v_buffer[0], group_indptr, prefix_kv_indptr, i32(0),
                                     i32(0, 1, 2), i32(1, 2), 1.0, kv_base=self.config.kv_base)
        torch.cuda.synchronize(dev)

    # -- metadata -------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        self._check_graph_errors()
        self._step, self._batch, self._triton_ready, self._in_graph = None, forward_batch, True, False
        mode = forward_batch.forward_mode
        if (mode.is_decode() and forward_batch.spec_info is None and forward_batch.batch_size > 0
                and forward_batch.seq_lens_cpu is not None):  # host lengths plan the step without a sync
            start = time.perf_counter()
            groups = self._take_groups(forward_batch.seq_lens_cpu, forward_batch.batch_size)
            groups = groups or ungrouped(forward_batch.batch_size)
            self._step = build_decode_step(
                groups, forward_batch.seq_lens_cpu, forward_batch.req_pool_indices, self.req_to_token,
                self.num_head, self.num_kv_head, self.num_sms, programs_per_sm=self._occupancy(plain=False),
                plain_programs_per_sm=self._occupancy(plain=True), kv_base=self.config.kv_base,
            )
            self._host_us += (time.perf_counter() - start) * 1e6
            self._log_step(forward_batch.batch_size)
            if not self._verify_this_step():
                self._triton_ready = False  # built lazily if a layer falls back
                return
        super().init_forward_metadata(forward_batch)

    def init_cuda_graph_state(self, max_bs, max_num_tokens, *args, **kwargs):
        super().init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        dev = torch.device(self.device)
        self._graph = GraphBuffers(max_num_tokens, self.max_context_len, self.num_kv_head, self.num_sms, dev,
                                   programs_per_sm=self._occupancy(plain=False),
                                   plain_programs_per_sm=self._occupancy(plain=True))
        logger.info("packinfer: decode CUDA graphs launch the kernel on up to %d items per KV head",
                    self._graph.grid_items(max_num_tokens))
        if self.config.verify:
            self._graph_errs = torch.zeros(_MAX_LAYERS, dtype=torch.float32, device=dev)
            self._graph_rows = torch.zeros(max_num_tokens, 1, dtype=torch.float32, device=dev)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Capture: plans the capture batch into the graph buffers, so the graph records packed decode.
        Replay: plans this step's groups into the same buffers."""
        start = time.perf_counter()
        mode = forward_batch.forward_mode
        packed = self._graph is not None and mode.is_decode() and forward_batch.spec_info is None
        mark = None
        if packed and not in_capture and self.config.log_every:  # is the GPU still on earlier work?
            mark = torch.cuda.Event()
            mark.record()
        if not packed or in_capture or self._graph_fallback or self.config.verify:
            # Triton's buffers: read by fallback layers and verification only (layers seen at capture)
            super().init_forward_metadata_out_graph(forward_batch, in_capture)
        self._check_graph_errors()
        self._step, self._triton_ready, self._in_graph = None, True, False
        if not packed:
            return
        bs = forward_batch.batch_size
        raw_bs = bs - (getattr(forward_batch, "num_padding", 0) or 0)
        seq_lens_cpu = forward_batch.seq_lens_cpu
        if seq_lens_cpu is None:
            seq_lens_cpu = forward_batch.seq_lens[:bs].cpu()
        groups = None if in_capture else self._take_groups(seq_lens_cpu, raw_bs)
        self._step = build_decode_step(
            groups or ungrouped(raw_bs), seq_lens_cpu, forward_batch.req_pool_indices, self.req_to_token,
            self.num_head, self.num_kv_head, self.num_sms, graph=self._graph, padded_bs=bs,
            kv_base=self.config.kv_base,
        )
        self._in_graph = True
        if self._graph_rows is not None:
            self._graph_rows[:bs].copy_((torch.arange(bs) < raw_bs).float()[:, None], non_blocking=True)
            self._errs_pending = not in_capture
        if not in_capture:
            self._host_us += (time.perf_counter() - start) * 1e6
            if mark is not None:
                self._replays += 1
                self._replays_gpu_busy += not mark.query()
            self._log_step(raw_bs)

    def _occupancy(self, plain: bool) -> int:
        """Resident programs per multiprocessor of the packed kernel for this model (compiled once):
        the launch with 64-row prefix tiles, or (``plain``) the plain-decode one with suffix tiles."""
        if plain not in self._occupancies:
            pool, gqa = self.token_to_kv_pool, self.num_head // self.num_kv_head
            self._occupancies[plain] = kernel_occupancy(
                torch.device(self.device), pool.dtype, getattr(pool, "head_dim", self.v_head_dim), gqa,
                has_kv_base=self.config.kv_base, plain=plain)
            logger.info("packinfer: kernel occupancy %d programs per SM (%s tiles)", self._occupancies[plain],
                        "plain-decode" if plain else "prefix")
        return self._occupancies[plain]

    def _take_groups(self, seq_lens_cpu, batch_size):
        if self.runtime is None:
            if not self._warned_no_cache:
                self._warned_no_cache = True
                logger.warning("packinfer: no packinfer radix cache, so decode runs ungrouped; "
                               "add --radix-cache-backend packinfer")
            return None
        groups = self.runtime.take_step(seq_lens_cpu[:batch_size])
        self._grouped_by_tree = groups is not None and len(groups.order) == batch_size
        return groups if self._grouped_by_tree else None

    # -- decode ---------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self._step is None or not _layer_supported(layer, kwargs):
            self._graph_fallback |= self._in_graph
            if not self._triton_ready:
                super().init_forward_metadata(self._batch)
                self._triton_ready = True
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        out = self._packed_decode(q, layer)
        if self._in_graph and self._graph_errs is not None:
            ref = super().forward_decode(q, k, v, layer, forward_batch, False, **kwargs)
            self._record_graph_err(out, ref, layer)
        elif not self._in_graph and self._verify_this_step():
            ref = super().forward_decode(q, k, v, layer, forward_batch, False, **kwargs)
            self._check(out, ref, layer)
        return out

    def _packed_decode(self, q, layer):
        num_heads, head_dim = layer.tp_q_head_num, layer.qk_head_dim
        out = run_decode_step(self._step, q.reshape(-1, num_heads, head_dim),
                              self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                              self.token_to_kv_pool.get_value_buffer(layer.layer_id), layer.scaling)
        return out.view(-1, num_heads * head_dim)

    # -- verification and logging ---------------------------------------------------------
    def _verify_this_step(self) -> bool:
        return self.config.verify and self._num_steps % self.config.verify_every == 0

    def _check(self, out, ref, layer):
        ref32 = ref.float()
        self._count_err(((out.float() - ref32).norm() / ref32.norm().clamp_min(1e-30)).item(), layer.layer_id)

    def _count_err(self, err: float, layer_id: int):
        self._checked += 1
        self._max_err = max(self._max_err, err)
        if not err <= self.config.verify_rtol:  # NaN fails too
            g = self._step.groups if self._step is not None else None
            where = f"batch {len(g.order)}, {g.num_groups} groups, prefix lens {g.prefix_lens[:8].tolist()}" if g else ""
            raise RuntimeError(
                f"packinfer verify failed: layer {layer_id}, decode step {self._num_steps}"
                f"{' (CUDA graph)' if self._graph_errs is not None else ''}: relative error {err:.3e} > "
                f"{self.config.verify_rtol:.1e} ({where})"
            )

    def _record_graph_err(self, out, ref, layer):
        """Relative error of the real rows, written on the device (capturable; no host sync)."""
        rows = self._graph_rows[: out.shape[0]]
        ref32 = ref.float() * rows
        err = ((out.float() * rows - ref32).norm() / ref32.norm().clamp_min(1e-30)).reshape(1)
        self._graph_errs[layer.layer_id : layer.layer_id + 1].copy_(err)
        self._graph_layers.add(layer.layer_id)

    def _check_graph_errors(self):
        """Checks the errors the last graph replay wrote (verification mode only; synchronizes)."""
        if not self._errs_pending:
            return
        self._errs_pending = False
        errs = self._graph_errs.cpu()
        for layer_id in sorted(self._graph_layers):
            self._count_err(float(errs[layer_id]), layer_id)

    def _log_step(self, batch_size):
        self._num_steps += 1
        every = self.config.log_every
        if every and self._num_steps % every == 0:
            g = self._step.groups
            verified = f", verified {self._checked} layer-steps, max rel err {self._max_err:.2e}" if self.config.verify else ""
            hidden = (f", GPU busy through {100 * self._replays_gpu_busy / self._replays:.0f}% of graph-step plans"
                      if self._replays else "")
            logger.info("packinfer: decode step %d, batch %d, %s%d groups (largest %d), prefix tokens saved %d, "
                        "host plan %.0f us/step%s%s",
                        self._num_steps, batch_size, "" if self._grouped_by_tree else "no tree groups: ", g.num_groups,
                        int(max(1, (g.group_indptr[1:] - g.group_indptr[:-1]).max())),
                        g.shared_token_reads_saved, self._host_us / self._num_steps, hidden, verified)


_MAX_LAYERS = 1024  # entries of the verification error buffer, indexed by layer_id


def _layer_supported(layer, kwargs) -> bool:
    """Whether the packed kernel computes exactly what SGLang's Triton decode would for this layer."""
    return (
        all(kwargs.get(name) is None for name in ("sinks", "score_mod", "aux_tensors"))
        and not (layer.logit_cap or 0) > 0
        and (layer.sliding_window_size is None or layer.sliding_window_size < 0)
        and layer.qk_head_dim == layer.v_head_dim
        and layer.k_scale is None and layer.v_scale is None
        and not getattr(layer, "is_cross_attention", False)
        and not (getattr(layer, "xai_temperature_len", None) or 0) > 0
    )


def unsupported_reason(model_runner) -> str | None:
    """Why packed decode cannot serve this model (``None`` when it can)."""
    mc, sa = model_runner.model_config, model_runner.server_args
    dtype = getattr(model_runner, "kv_cache_dtype", None)
    head_dim = getattr(mc, "head_dim", None)
    checks = [
        (getattr(model_runner, "use_mla_backend", False), "MLA models"),
        (model_runner.sliding_window_size is not None, "sliding-window attention"),
        (mc.is_encoder_decoder, "encoder-decoder models"),
        (dtype is not None and dtype not in SUPPORTED_DTYPES, f"KV cache dtype {dtype}"),
        (head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS, f"head_dim {head_dim}"),
        (sa.speculative_algorithm is not None, "speculative decoding"),
        (getattr(sa, "dcp_size", 1) not in (None, 1), "decode context parallelism"),
    ]
    return next((what + " are not supported" for bad, what in checks if bad), None)


def create_packinfer_backend(model_runner):
    """Factory for ``register_attention_backend``: packed decode, composed with a prefill backend.

    Returns SGLang's ``HybridAttnBackend`` with :class:`PackInferAttnBackend` for decode and SGLang's
    FlashInfer backend for extend and mixed batches (``PACKINFER_PREFILL_BACKEND``: ``auto`` or
    ``flashinfer``); or :class:`PackInferAttnBackend` alone, whose extend is SGLang's Triton kernel
    (``triton``, FlashInfer not importable under ``auto``, or a prefill backend chosen with
    ``--prefill-attention-backend``, which SGLang composes itself). Models packed decode does not
    support get SGLang's Triton backend, with a one-line warning.

    Raises:
        RuntimeError: ``PACKINFER_PREFILL_BACKEND=flashinfer`` and SGLang's FlashInfer backend
            cannot be built here.
    """
    reason = unsupported_reason(model_runner)
    if reason:
        logger.warning("packinfer attention backend: %s; using SGLang's triton backend", reason)
        return TritonAttnBackend(model_runner)
    backend = PackInferAttnBackend(model_runner)
    if getattr(backend, "_translate_kv_loc", None) is not None or backend.dcp_size > 1:
        logger.warning("packinfer attention backend: unified/DCP KV pools are not supported; using triton")
        return TritonAttnBackend(model_runner)
    prefill = _prefill_backend(model_runner, backend.config.prefill_backend)
    if prefill is None:
        return backend
    from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend

    logger.info("packinfer: decode packed, extend and mixed batches on SGLang's %s backend", type(prefill).__name__)
    return HybridAttnBackend(model_runner, prefill_backend=prefill, decode_backend=backend)


def _prefill_backend(model_runner, choice: str):
    """The backend for extend and mixed batches, or ``None`` for the packinfer backend's own
    (SGLang's Triton extend)."""
    prefill, _ = model_runner.server_args.get_attention_backends()
    if prefill != "packinfer" or choice == "triton":  # SGLang composes an explicit --prefill-attention-backend
        return None
    try:
        from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

        return FlashInferAttnBackend(model_runner)
    except Exception as e:
        if choice == "flashinfer":
            raise RuntimeError(f"PACKINFER_PREFILL_BACKEND=flashinfer, but SGLang's FlashInfer backend cannot be "
                               f"built: {e}") from e
        logger.warning("packinfer: FlashInfer unavailable for extend (%s); extend runs SGLang's triton kernels", e)
        return None
