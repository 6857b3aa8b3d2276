"""Gathers KV pool slots out of SGLang's ``req_to_token`` table into CSR ``kv_indices``.

Segment ``i`` is ``req_to_token[pool_rows[i], pos_starts[i]:pos_ends[i]]`` (request positions →
pool slots); segments are written back to back at ``kv_indptr[i]``. The backend builds the
combined ``cat(prefix_kv_indices, suffix_kv_indices)`` of a decode step with one launch: group
prefixes (positions ``0:prefix_len`` of any member's row) then request suffixes.
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


def item_kv_bases(
    kv_indices: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per work item, the first slot of its KV range when the range is one run of consecutive pool
    slots, else ``-1``: what the packed kernel's base + length path reads (issue 5: compacted
    prefixes, placed suffixes). A few vectorized ops on ``kv_indices``' device, no host sync, so it
    runs on the step's stream after the gather (and outside CUDA graphs).

    Args:
        kv_indices: ``[num_kv]`` int32/int64 pool slots (a plan's ``cat(prefix, suffix)`` list).
        kv_start, kv_len: ``[num_items]`` int offsets into ``kv_indices`` and lengths in tokens
            (``kv_start + kv_len <= num_kv``); any stride (e.g. columns of a plan's item table).
        out: optional ``[>= num_items]`` int32 buffer; ``out[:num_items]`` is written in place.

    Returns:
        ``[num_items]`` (``out``'s dtype, else int64): ``kv_indices[kv_start]`` where
        ``kv_indices[kv_start + j] == kv_indices[kv_start] + j`` for all ``j < kv_len``, else ``-1``
        (also for ``kv_len == 0``). Oracle: :func:`.reference.item_kv_bases_ref`.
    """
    n = kv_start.numel()
    idx = kv_indices.to(torch.int64)
    breaks = torch.zeros(idx.numel() + 1, dtype=torch.int64, device=idx.device)  # breaks[p]: at 1..p-1
    if idx.numel() > 1:
        torch.cumsum((idx[1:] - idx[:-1] != 1).to(torch.int64), 0, out=breaks[2:])
    start, length = kv_start.to(torch.int64), kv_len.to(torch.int64)
    first = start.clamp(max=max(idx.numel() - 1, 0))
    end = (start + length).clamp(min=1, max=idx.numel())
    one_run = (length > 0) & (breaks[end] - breaks[(start + 1).clamp(max=idx.numel())] == 0)
    bases = torch.where(one_run, idx[first] if idx.numel() else start, torch.full_like(start, -1))
    if out is None:
        return bases
    out[:n].copy_(bases)
    return out[:n]
