"""Baselines of the kernel benchmark, each bound to a case's inputs as an :class:`Impl`.

Every builder takes a :class:`.kernel_cases.CaseInputs` on a GPU, does its once-per-step work
(planning, metadata, gathers: untimed) and returns the timed call. A builder raises :class:`Skipped`
where the baseline does not apply and anything else where it fails; the driver records either.

- ``sglang_triton``: SGLang 0.5.17's ``decode_attention_fwd`` as ``TritonAttnBackend`` calls it.
- ``flashinfer_decode``: ``BatchDecodeWithPagedKVCacheWrapper`` (tensor cores, page size 1).
- ``flashinfer_cascade``: ``MultiLevelCascadeAttentionWrapper``, 2 levels (group prefix, suffix).
- ``flashinfer_cascade_fa2``: the same two levels composed by hand from
  ``BatchPrefillWithPagedKVCacheWrapper(backend="fa2")`` (packs GQA heads into rows and splits KV,
  which the sm90 FA3 backend that the cascade wrapper's ``auto`` picks does not) and
  ``merge_state_in_place``, as the cascade wrapper composes its levels.
- ``flashinfer_prefix_prefill``: "prefix as prefill": each group's queries as one non-causal fa2
  paged prefill over its prefix, the suffixes with the tensor-core decode wrapper, ``merge_state_in_place``.
- ``flashinfer_batch_attention``: ``BatchAttention``, FlashInfer's persistent one-launch kernel, on
  the flat lists (no sharing exploited).
- ``fa2_varlen``: FlashAttention-2 varlen through torch (``torch.ops.aten._flash_attention_forward``,
  what ``torch.nn.attention.varlen.varlen_attn`` calls) on K/V gathered dense per request: the
  PackInfer paper's baseline. The gather is *not* timed (reported beside it as ``gather_us``).
- ``fa2_cascade``: FA2 varlen over each group's prefix with all the group's queries, FA2 varlen over
  each request's suffix, LSE merge in torch; the dense gathers are not timed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

SGLANG_MAX_KV_SPLITS = 8  # ServerArgs.triton_attention_num_kv_splits, its default on CUDA
FLASHINFER_WORKSPACE_BYTES = 256 << 20


class Skipped(Exception):
    """The implementation does not apply to the case."""


class Impl(NamedTuple):
    """A bound implementation: ``run()`` makes the timed call and returns its output
    ``[batch_size, num_qo_heads, head_dim]``; ``out`` is that tensor when preallocated (``None``: the
    library allocates it); ``extra`` goes into the result; ``side`` are further calls timed as
    ``{key}_us`` (not part of ``run``)."""
    run: Callable[[], torch.Tensor]
    out: torch.Tensor | None = None
    extra: dict | None = None
    side: dict[str, Callable[[], object]] | None = None


def build_sglang_triton(inp) -> Impl:
    """``decode_attention_fwd`` as ``TritonAttnBackend.forward_decode`` calls it, its buffers and
    ``num_kv_splits`` made as ``init_forward_metadata`` makes them (once per step: untimed)."""
    import triton
    from sgl_kernel.utils import is_arch_support_pdl
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    (num_tokens, num_qo_heads, head_dim), dev, splits = inp.q.shape, inp.q.device, SGLANG_MAX_KV_SPLITS
    kv_indices = inp.kv_indices.long()  # the backend's kv_indices are int64
    num_kv_splits = torch.empty(num_tokens, dtype=torch.int32, device=dev)
    get_num_kv_splits_triton[(1,)](
        num_kv_splits, (inp.kv_indptr[1:] - inp.kv_indptr[:-1]).long(), num_tokens, 1, num_qo_heads,
        inp.k_buffer.shape[1], splits, torch.cuda.get_device_properties(dev).multi_processor_count,
        MAX_NUM_SEQ=max(256, triton.next_power_of_2(num_tokens)))
    attn_logits = torch.empty(num_tokens, num_qo_heads, splits, head_dim, dtype=torch.float32, device=dev)
    attn_lse = torch.empty(num_tokens, num_qo_heads, splits, dtype=torch.float32, device=dev)
    out, use_pdl = torch.empty_like(inp.q), is_arch_support_pdl()

    def run():
        decode_attention_fwd(inp.q, inp.k_buffer, inp.v_buffer, out, inp.kv_indptr, kv_indices, attn_logits,
                             attn_lse, num_kv_splits, splits, inp.sm_scale, 1.0, 1.0, logit_cap=0.0,
                             sinks=None, xai_temperature_len=-1, has_mla=False, use_pdl=use_pdl, page_size=1)
        return out
    return Impl(run, out, {"max_num_kv_splits": int(num_kv_splits.max()), "use_pdl": use_pdl})


def _flashinfer(inp):
    """``flashinfer``, a zeroed workspace, and the pools as NHD pages of one token ``[num_slots, 1, ...]``."""
    import flashinfer
    workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=inp.q.device)
    return flashinfer, workspace, (inp.k_buffer.unsqueeze(1), inp.v_buffer.unsqueeze(1))


def build_flashinfer_decode(inp) -> Impl:
    """``BatchDecodeWithPagedKVCacheWrapper`` (tensor cores, NHD, page size 1) on the flat lists."""
    flashinfer, workspace, pages = _flashinfer(inp)
    (num_tokens, num_qo_heads, head_dim), q = inp.q.shape, inp.q
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    wrapper.plan(inp.kv_indptr, inp.kv_indices, torch.ones(num_tokens, dtype=torch.int32, device=q.device),
                 num_qo_heads, inp.k_buffer.shape[1], head_dim, 1, q_data_type=q.dtype, kv_data_type=q.dtype,
                 sm_scale=inp.sm_scale)
    out = torch.empty_like(q)
    return Impl(lambda: wrapper.run(q, pages, out=out), out)


def _needs_two_levels(inp) -> None:
    """Raises :class:`Skipped` unless every group has a prefix and every request a suffix."""
    prefix_lens = inp.prefix_kv_indptr[1:] - inp.prefix_kv_indptr[:-1]
    suffix_lens = inp.suffix_kv_indptr[1:] - inp.suffix_kv_indptr[:-1]
    if int(prefix_lens.min()) == 0 or int(suffix_lens.min()) == 0:
        raise Skipped("needs a shared prefix for every group and a suffix for every request")


def build_flashinfer_cascade(inp) -> Impl:
    """``MultiLevelCascadeAttentionWrapper``, 2 levels: group prefixes, then request suffixes."""
    _needs_two_levels(inp)
    flashinfer, workspace, pages = _flashinfer(inp)
    (num_tokens, num_qo_heads, head_dim), q = inp.q.shape, inp.q
    ones = lambda n: torch.ones(n, dtype=torch.int32, device=q.device)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    wrapper.plan([inp.group_indptr, torch.arange(num_tokens + 1, dtype=torch.int32, device=q.device)],
                 [inp.prefix_kv_indptr, inp.suffix_kv_indptr], [inp.prefix_kv_indices, inp.suffix_kv_indices],
                 [ones(inp.group_indptr.numel() - 1), ones(num_tokens)], num_qo_heads, inp.k_buffer.shape[1],
                 head_dim, 1, sm_scale=inp.sm_scale, q_data_type=q.dtype, kv_data_type=q.dtype)
    return Impl(lambda: wrapper.run(q, pages), None, {"note": "allocates its output: poisoned via allocator"})


def _fa2_prefill_level(flashinfer, workspace, inp, qo_indptr, kv_indptr, kv_indices):
    """A planned ``BatchPrefillWithPagedKVCacheWrapper(backend="fa2")`` (non-causal, page size 1)."""
    q = inp.q
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    wrapper.plan(qo_indptr, kv_indptr, kv_indices,
                 torch.ones(qo_indptr.numel() - 1, dtype=torch.int32, device=q.device), q.shape[1],
                 inp.k_buffer.shape[1], q.shape[2], 1, causal=False, sm_scale=inp.sm_scale, q_data_type=q.dtype,
                 kv_data_type=q.dtype)
    return wrapper


def _workspace(inp):
    return torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=inp.q.device)


def _merged(flashinfer, q, pages, prefix, suffix) -> Impl:
    """The timed call of a two-level composition: the suffix level, the prefix level, then the prefix
    state merged into the suffix output in place (as ``MultiLevelCascadeAttentionWrapper.run`` does)."""
    def run():
        out, lse = suffix.run(q, pages, return_lse=True)
        out_p, lse_p = prefix.run(q, pages, return_lse=True)
        flashinfer.merge_state_in_place(out, lse, out_p, lse_p)
        return out
    return Impl(run, None, {"note": "allocates its output: poisoned via allocator"})


def build_flashinfer_cascade_fa2(inp) -> Impl:
    """Two fa2 prefill levels (group prefixes with ``group_indptr`` as ``qo_indptr``; request
    suffixes) merged in place, each level with its own workspace."""
    _needs_two_levels(inp)
    flashinfer, workspace, pages = _flashinfer(inp)
    q, num_tokens = inp.q, inp.q.shape[0]
    prefix = _fa2_prefill_level(flashinfer, workspace, inp, inp.group_indptr, inp.prefix_kv_indptr,
                                inp.prefix_kv_indices)
    suffix = _fa2_prefill_level(flashinfer, _workspace(inp), inp,
                                torch.arange(num_tokens + 1, dtype=torch.int32, device=q.device),
                                inp.suffix_kv_indptr, inp.suffix_kv_indices)
    return _merged(flashinfer, q, pages, prefix, suffix)


def build_flashinfer_prefix_prefill(inp) -> Impl:
    """Prefix as prefill (fa2, group queries non-causal over the group prefix), suffixes with the
    tensor-core decode wrapper, merged in place."""
    _needs_two_levels(inp)
    flashinfer, workspace, pages = _flashinfer(inp)
    q, num_tokens = inp.q, inp.q.shape[0]
    prefix = _fa2_prefill_level(flashinfer, workspace, inp, inp.group_indptr, inp.prefix_kv_indptr,
                                inp.prefix_kv_indices)
    suffix = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(inp), "NHD", use_tensor_cores=True)
    suffix.plan(inp.suffix_kv_indptr, inp.suffix_kv_indices, torch.ones(num_tokens, dtype=torch.int32,
                device=q.device), q.shape[1], inp.k_buffer.shape[1], q.shape[2], 1, q_data_type=q.dtype,
                kv_data_type=q.dtype, sm_scale=inp.sm_scale)
    return _merged(flashinfer, q, pages, prefix, suffix)


def build_flashinfer_batch_attention(inp) -> Impl:
    """``BatchAttention`` (persistent, one launch) over each request's flat KV list."""
    import flashinfer

    pages = (inp.k_buffer.unsqueeze(1), inp.v_buffer.unsqueeze(1))
    q, num_tokens = inp.q, inp.q.shape[0]
    if not hasattr(flashinfer, "BatchAttention"):
        raise Skipped("this FlashInfer has no BatchAttention")
    wrapper = flashinfer.BatchAttention("NHD", device=str(q.device))
    kv_lens = (inp.kv_indptr[1:] - inp.kv_indptr[:-1]).to(torch.int32)
    wrapper.plan(torch.arange(num_tokens + 1, dtype=torch.int32, device=q.device), inp.kv_indptr, inp.kv_indices,
                 kv_lens, q.shape[1], inp.k_buffer.shape[1], q.shape[2], q.shape[2], 1, causal=False,
                 sm_scale=inp.sm_scale, q_data_type=q.dtype, kv_data_type=q.dtype)
    return Impl(lambda: wrapper.run(q, pages)[0], None, {"note": "allocates its output: poisoned via allocator"})


def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, sm_scale):
    """FlashAttention-2 varlen forward (non-causal) through torch; ``q`` ``[total_q, num_qo_heads,
    head_dim]``, ``k``/``v`` ``[total_k, num_kv_heads, head_dim]`` (GQA: ``num_kv_heads`` divides
    ``num_qo_heads``), ``cu_seqlens_*`` int32 ``[n + 1]``. Returns ``(out, lse [num_qo_heads, total_q]
    float32, natural log)``."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 0.0, False, False, scale=sm_scale)
    if lse.shape != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"FA2 varlen lse of shape {tuple(lse.shape)}, expected [num_qo_heads, total_q] "
                           f"= {(q.shape[1], q.shape[0])}")
    return out, lse


def _check_fa2(inp) -> None:
    if not torch.backends.cuda.is_flash_attention_available():
        raise Skipped("torch was built without FlashAttention")


def _max_len(indptr: torch.Tensor) -> int:
    return int((indptr[1:] - indptr[:-1]).max())


def build_fa2_varlen(inp) -> Impl:
    """FA2 varlen, one query per request against its own K/V gathered dense (``cat(prefix, suffix)``
    per request, ``kv_indptr`` as ``cu_seqlens_k``). Gather untimed, its time reported as ``gather_us``."""
    _check_fa2(inp)
    q, slots = inp.q, inp.kv_indices.long()
    k, v = inp.k_buffer[slots], inp.v_buffer[slots]
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    max_k = _max_len(inp.kv_indptr)

    def gather():
        torch.index_select(inp.k_buffer, 0, slots, out=k)
        torch.index_select(inp.v_buffer, 0, slots, out=v)
    run = lambda: fa2_varlen(q, k, v, cu_q, inp.kv_indptr, 1, max_k, inp.sm_scale)[0]
    return Impl(run, None, {"gather_timed": False, "dense_kv_bytes": 2 * k.numel() * k.element_size(),
                            "note": "K/V gathered dense per request before timing"}, {"gather": gather})


def build_fa2_cascade(inp) -> Impl:
    """FA2 varlen of every group's queries (``group_indptr`` as ``cu_seqlens_q``) against its prefix
    gathered dense, FA2 varlen of each request against its suffix gathered dense, then the LSE merge
    ``o = o_p e^(lse_p - lse) + o_s e^(lse_s - lse)``, ``lse = logaddexp(lse_p, lse_s)``, in torch
    (float32). The two passes and the merge are timed; the gathers are not."""
    _check_fa2(inp)
    _needs_two_levels(inp)
    q = inp.q
    prefix_slots, suffix_slots = inp.prefix_kv_indices.long(), inp.suffix_kv_indices.long()
    k_p, v_p = inp.k_buffer[prefix_slots], inp.v_buffer[prefix_slots]
    k_s, v_s = inp.k_buffer[suffix_slots], inp.v_buffer[suffix_slots]
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    max_group, max_p, max_s = (_max_len(t) for t in (inp.group_indptr, inp.prefix_kv_indptr,
                                                     inp.suffix_kv_indptr))
    out = torch.empty_like(q)

    def run():
        o_p, lse_p = fa2_varlen(q, k_p, v_p, inp.group_indptr, inp.prefix_kv_indptr, max_group, max_p,
                                inp.sm_scale)
        o_s, lse_s = fa2_varlen(q, k_s, v_s, cu_q, inp.suffix_kv_indptr, 1, max_s, inp.sm_scale)
        lse = torch.logaddexp(lse_p, lse_s)
        w_p, w_s = (torch.exp(x - lse).t().unsqueeze(-1) for x in (lse_p, lse_s))  # [B, H, 1]
        out.copy_(o_p.float() * w_p + o_s.float() * w_s)
        return out
    return Impl(run, out, {"gather_timed": False,
                           "note": "prefix and suffix K/V gathered dense before timing"})


BASELINE_BUILDERS = {"sglang_triton": build_sglang_triton, "flashinfer_decode": build_flashinfer_decode,
                     "flashinfer_cascade": build_flashinfer_cascade,
                     "flashinfer_cascade_fa2": build_flashinfer_cascade_fa2,
                     "flashinfer_prefix_prefill": build_flashinfer_prefix_prefill,
                     "flashinfer_batch_attention": build_flashinfer_batch_attention,
                     "fa2_varlen": build_fa2_varlen, "fa2_cascade": build_fa2_cascade}
