"""Per-step decode metadata: from groups and SGLang's ``req_to_token`` to a kernel plan.

Built once per decode step on the host (plus two small launches) and shared by all layers:

- positions ``0:prefix_lens[g]`` of group ``g``'s first request give the group's prefix slots;
- positions ``prefix_lens[g]:seq_len`` of each request give its suffix slots;
- both are gathered by one :func:`gather_kv_indices` launch into
  ``kv_indices = cat(prefix_kv_indices, suffix_kv_indices)``, and the work plan of
  :mod:`packinfer_sglang.kernels.plan` is computed from the lengths alone (no device sync).

Index spaces: *positions* index a request's tokens (``0:seq_len``); *slots* index the KV pool.
Slots read here stay valid for the step: prefix slots are pinned by the members' tree locks and
suffix slots are owned by the running requests until they finish.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .grouping import DecodeGroups
from .kernels import PackedCascadePlan, gather_kv_indices, make_plan, plan_work, run_packed_cascade
from .kernels.packed_cascade import BLOCK_N, PREFIX_BLOCK_M, host_to_device


class DecodeStep(NamedTuple):
    """Everything a layer's packed decode needs for one step."""

    plan: PackedCascadePlan
    perm: torch.Tensor | None  # [num_tokens] int64 batch row of each packed row; None if identity
    groups: DecodeGroups


def _host_lengths(groups: DecodeGroups, seq_lens: np.ndarray):
    """Per group prefix lengths (clamped so every request keeps >= 1 suffix token) and per packed row
    suffix lengths, in tokens."""
    order, gi = groups.order, groups.group_indptr.astype(np.int64)
    seq = seq_lens[order].astype(np.int64)
    sizes = np.diff(gi)
    token_group = np.repeat(np.arange(len(sizes)), sizes)
    min_seq = np.full(len(sizes), np.iinfo(np.int64).max)
    np.minimum.at(min_seq, token_group, seq)
    prefix = np.minimum(groups.prefix_lens.astype(np.int64), np.maximum(min_seq - 1, 0))
    return prefix, seq - prefix[token_group], token_group


def _to_device(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    return host_to_device(torch.from_numpy(np.ascontiguousarray(a)), dev)


def _indptr(lens: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def build_decode_step(
    groups: DecodeGroups,
    seq_lens_cpu: torch.Tensor,
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    num_qo_heads: int,
    num_kv_heads: int,
    num_sms: int,
) -> DecodeStep:
    """Builds a step's plan.

    Args:
        groups: grouping of the batch (rows in batch order), see :mod:`.grouping`.
        seq_lens_cpu: ``[num_tokens]`` request lengths in tokens, including the decoded token (host).
        req_pool_indices: ``[num_tokens]`` rows of ``req_to_token`` (device).
        req_to_token: ``[num_req_slots, max_context_len]`` int32 position→slot table (device).
        num_qo_heads, num_kv_heads: attention heads of this rank.
        num_sms: multiprocessors, for the chunk sizes of the work plan.
    """
    dev = req_pool_indices.device
    prefix, suffix, _ = _host_lengths(groups, seq_lens_cpu.numpy())
    order, gi = groups.order, groups.group_indptr
    prefix_indptr, suffix_indptr = _indptr(prefix), _indptr(suffix)
    first = order[gi[:-1].astype(np.int64)]
    num_groups = len(prefix)
    # Segments: one per group prefix, then one per request suffix.
    seg = np.concatenate([
        np.concatenate([first, order]),  # batch rows
        np.concatenate([np.zeros(num_groups, np.int64), prefix[np.repeat(np.arange(num_groups), np.diff(gi))]]),
        np.concatenate([prefix_indptr, prefix_indptr[-1] + suffix_indptr[1:]]),
    ]).astype(np.int32)
    seg_dev = _to_device(seg, dev)
    n_seg = len(first) + len(order)
    pool_rows = req_pool_indices.index_select(0, seg_dev[:n_seg].long())
    kv_indices = torch.empty(max(int(seg[-1]), 1), dtype=torch.int32, device=dev)
    gather_kv_indices(req_to_token, pool_rows, seg_dev[n_seg : 2 * n_seg], seg_dev[2 * n_seg :], kv_indices)

    gqa = num_qo_heads // num_kv_heads
    work = plan_work(gi, prefix_indptr, suffix_indptr, gqa_group_size=gqa, num_kv_heads=num_kv_heads,
                     prefix_block_m=PREFIX_BLOCK_M, num_sms=num_sms, kv_align=BLOCK_N)
    plan = make_plan(work, kv_indices, gqa)
    perm = None if groups.is_identity else _to_device(order, dev)
    return DecodeStep(plan, perm, groups)


def run_decode_step(step: DecodeStep, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                    sm_scale: float) -> torch.Tensor:
    """Packed decode attention of one layer for a planned step.

    Args:
        q: ``[num_tokens, num_qo_heads, head_dim]`` in batch order.
        k_buffer, v_buffer: ``[num_slots, num_kv_heads, head_dim]``, the layer's KV pool.

    Returns:
        ``[num_tokens, num_qo_heads, head_dim]`` in batch order, ``q``'s dtype. Rows are gathered
        into group order for the kernel and scattered back when the batch is not group-adjacent.
    """
    q_packed = q if step.perm is None else q.index_select(0, step.perm)
    out = torch.empty_like(q_packed)
    run_packed_cascade(q_packed, k_buffer, v_buffer, step.plan, sm_scale, out)
    return out if step.perm is None else torch.empty_like(out).index_copy_(0, step.perm, out)
