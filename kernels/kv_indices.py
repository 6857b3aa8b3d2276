"""Gathers KV pool slots out of SGLang's ``req_to_token`` table into CSR ``kv_indices``.

Segment ``i`` is ``req_to_token[pool_rows[i], pos_starts[i]:pos_ends[i]]`` (request positions →
pool slots); segments are written back to back at ``kv_indptr[i]``. The backend builds the
combined ``cat(prefix_kv_indices, suffix_kv_indices)`` of a decode step with one launch: group
prefixes (positions ``0:prefix_len`` of any member's row) then request suffixes.

:func:`item_kv_bases` then marks the plan's work items whose KV range is one run of consecutive
slots with that run's first slot, which the packed kernel reads by base + offset (issue 5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kv_indices_kernel(
    Req_To_Token, Pool_Rows, Pos_Starts, KV_Indptr, KV_Indices, stride_rt, BLOCK: tl.constexpr,
):
    seg = tl.program_id(0)
    row = tl.load(Pool_Rows + seg).to(tl.int64)
    pos_start = tl.load(Pos_Starts + seg)
    out_start = tl.load(KV_Indptr + seg)
    n = tl.load(KV_Indptr + seg + 1) - out_start
    offs = tl.arange(0, BLOCK)
    for i in range(0, n, BLOCK):
        mask = i + offs < n
        slots = tl.load(Req_To_Token + row * stride_rt + pos_start + i + offs, mask=mask)
        tl.store(KV_Indices + out_start + i + offs, slots.to(tl.int32), mask=mask)


def gather_kv_indices(
    req_to_token: torch.Tensor,
    pool_rows: torch.Tensor,
    pos_starts: torch.Tensor,
    kv_indptr: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes each segment's pool slots into ``out`` in place and returns it.

    Args:
        req_to_token: ``[num_req_slots, max_context_len]`` int32 (SGLang's ``ReqToTokenPool``).
        pool_rows: ``[num_segments]`` int32/int64 rows of ``req_to_token``.
        pos_starts: ``[num_segments]`` int32 first request position of each segment.
        kv_indptr: ``[num_segments + 1]`` int32; segment ``i`` has ``kv_indptr[i+1] - kv_indptr[i]``
            positions (the caller knows the lengths on the host).
        out: ``[>= kv_indptr[-1]]`` int32.
    """
    num_segments = pool_rows.numel()
    if kv_indptr.numel() != num_segments + 1 or pos_starts.numel() != num_segments:
        raise ValueError(f"pool_rows {num_segments}, pos_starts {pos_starts.numel()}, "
                         f"kv_indptr {kv_indptr.numel()}: need n, n and n + 1 elements")
    if req_to_token.stride(1) != 1 or out.dtype != torch.int32:
        raise ValueError(f"req_to_token must be row-contiguous and out int32 (got {out.dtype})")
    if num_segments:
        _gather_kv_indices_kernel[(num_segments,)](
            req_to_token, pool_rows, pos_starts, kv_indptr, out, req_to_token.stride(0), BLOCK=512,
        )
    return out


@triton.jit
def _item_kv_bases_kernel(KV_Indices, KV_Start, KV_Len, KV_Base, stride_start, stride_len, BLOCK: tl.constexpr):
    item = tl.program_id(0)
    kv_start = tl.load(KV_Start + item * stride_start).to(tl.int64)
    kv_len = tl.load(KV_Len + item * stride_len)
    first = tl.load(KV_Indices + kv_start, mask=kv_len > 0, other=-1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    breaks = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, kv_len, BLOCK):
        mask = i + offs < kv_len
        slots = tl.load(KV_Indices + kv_start + i + offs, mask=mask, other=0).to(tl.int64)
        breaks += (mask & (slots != first + i + offs)).to(tl.int32)
    one_run = (tl.sum(breaks, 0) == 0) & (kv_len > 0)
    tl.store(KV_Base + item, tl.where(one_run, first, -1).to(KV_Base.dtype.element_ty))


def item_kv_bases(
    kv_indices: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per work item, the first slot of its KV range when the range is one run of consecutive pool
    slots, else ``-1``: what the packed kernel's base + length path reads (issue 5: compacted
    prefixes, placed suffixes). One launch, a program per item reading its range; no host sync, so
    it runs on the step's stream after the gather (and outside CUDA graphs).

    Args:
        kv_indices: ``[num_kv]`` int32/int64 pool slots (a plan's ``cat(prefix, suffix)`` list).
        kv_start, kv_len: ``[num_items]`` int32/int64 offsets into ``kv_indices`` and lengths in
            tokens (``kv_start + kv_len <= num_kv``); any stride (e.g. columns of a plan's item table).
        out: optional ``[>= num_items]`` int32/int64 buffer; ``out[:num_items]`` is written in place.

    Returns:
        ``[num_items]`` (``out``'s dtype, else int64): ``kv_indices[kv_start]`` where
        ``kv_indices[kv_start + j] == kv_indices[kv_start] + j`` for all ``j < kv_len``, else ``-1``
        (also for ``kv_len == 0``). Oracle: :func:`.reference.item_kv_bases_ref`.

    Raises:
        ValueError: on shapes, devices or an ``out`` that is not int32/int64 or too short.
    """
    n = kv_start.numel()
    out = torch.empty(n, dtype=torch.int64, device=kv_indices.device) if out is None else out
    if (kv_start.dim() != 1 or kv_len.shape != kv_start.shape or out.dim() != 1 or out.numel() < n
            or out.dtype not in (torch.int32, torch.int64)
            or len({t.device for t in (kv_indices, kv_start, kv_len, out)}) != 1):
        raise ValueError(f"kv_start {tuple(kv_start.shape)}, kv_len {tuple(kv_len.shape)}, out {tuple(out.shape)} "
                         f"{out.dtype}: need 1-D [num_items], out int32/int64 with >= num_items entries, all on "
                         f"kv_indices' device {kv_indices.device}")
    if n:
        _item_kv_bases_kernel[(n,)](kv_indices, kv_start, kv_len, out, kv_start.stride(0), kv_len.stride(0),
                                    BLOCK=256)
    return out[:n]
