"""Pure-torch oracles for every kernel in this package.

Tests, benchmarks and the debug fallback share these. They favour clarity over speed: each
request's attention is computed on its own, in float32, over the gathered KV of
``cat(prefix, suffix)``.
"""

from __future__ import annotations

import torch


def flat_decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query token per request over its own KV slots.

    Args:
        q: ``[num_tokens, num_qo_heads, head_dim]``.
        k_buffer, v_buffer: ``[num_slots, num_kv_heads, head_dim]``, the token KV pool of a layer.
        kv_indptr: ``[num_tokens + 1]``; request ``t`` attends to ``kv_indices[kv_indptr[t]:kv_indptr[t+1]]``.
        kv_indices: pool slots.
        sm_scale: softmax scale applied to ``q·k``.

    Returns:
        ``(out, lse)``: out ``[num_tokens, num_qo_heads, head_dim]`` float32, lse
        ``[num_tokens, num_qo_heads]`` float32 in natural log.
    """
    num_tokens, num_qo_heads, head_dim = q.shape
    gqa = num_qo_heads // k_buffer.shape[1]
    out = torch.empty(num_tokens, num_qo_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_tokens, num_qo_heads, dtype=torch.float32, device=q.device)
    indptr = kv_indptr.tolist()
    for t in range(num_tokens):
        slots = kv_indices[indptr[t] : indptr[t + 1]].long()
        k = k_buffer[slots].float().repeat_interleave(gqa, dim=1)  # [n, num_qo_heads, head_dim]
        v = v_buffer[slots].float().repeat_interleave(gqa, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[t].float(), k) * sm_scale
        lse[t] = torch.logsumexp(scores, dim=-1)
        out[t] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out, lse


def cascade_to_flat(
    group_indptr: torch.Tensor,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expands the two-level (group prefix, request suffix) layout into flat per-request KV lists.

    Returns:
        ``(kv_indptr [num_tokens + 1], kv_indices)`` int32, request ``t``'s list being
        ``cat(prefix of its group, its suffix)``.
    """
    g_ptr, p_ptr, s_ptr = group_indptr.tolist(), prefix_kv_indptr.tolist(), suffix_kv_indptr.tolist()
    pieces, lens = [], []
    for g in range(len(g_ptr) - 1):
        prefix = prefix_kv_indices[p_ptr[g] : p_ptr[g + 1]]
        for t in range(g_ptr[g], g_ptr[g + 1]):
            suffix = suffix_kv_indices[s_ptr[t] : s_ptr[t + 1]]
            pieces += [prefix, suffix]
            lens.append(len(prefix) + len(suffix))
    kv_indices = torch.cat(pieces).to(torch.int32) if pieces else prefix_kv_indices.new_zeros(0)
    kv_indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0)
    return kv_indptr.to(kv_indices.device), kv_indices


def packed_cascade_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    group_indptr: torch.Tensor,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of :func:`packinfer_sglang.kernels.packed_cascade_attention`: flat attention over
    ``cat(prefix, suffix)`` for every request. Same arguments; returns float32 ``(out, lse)``."""
    kv_indptr, kv_indices = cascade_to_flat(
        group_indptr, prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr, suffix_kv_indices
    )
    return flat_decode_attention_ref(q, k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale)


def merge_state_ref(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges two attention states over disjoint KV sets by log-sum-exp (natural log).

    ``o = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})``; shapes ``[..., head_dim]`` and ``[...]``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - lse), torch.exp(lse_b - lse)
    return o_a * w_a[..., None] + o_b * w_b[..., None], lse


def gather_kv_indices_ref(
    req_to_token: torch.Tensor,
    pool_rows: torch.Tensor,
    pos_starts: torch.Tensor,
    pos_ends: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of :func:`packinfer_sglang.kernels.gather_kv_indices`: concatenates
    ``req_to_token[pool_rows[i], pos_starts[i]:pos_ends[i]]`` over segments ``i``.

    Returns ``(kv_indptr [num_segments + 1], kv_indices)`` int32.
    """
    pieces = [
        req_to_token[r, s:e] for r, s, e in zip(pool_rows.tolist(), pos_starts.tolist(), pos_ends.tolist())
    ]
    lens = torch.tensor([0] + [len(p) for p in pieces], dtype=torch.int64)
    kv_indices = torch.cat(pieces).to(torch.int32) if pieces else req_to_token.new_zeros(0, dtype=torch.int32)
    return torch.cumsum(lens, 0).to(torch.int32), kv_indices


def item_kv_bases_ref(kv_indices: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
    """Oracle of :func:`packinfer_sglang.kernels.kv_indices.item_kv_bases`, one item at a time:
    ``kv_indices[kv_start]`` when ``kv_indices[kv_start + j] == kv_indices[kv_start] + j`` for every
    ``j < kv_len``, else ``-1`` (also for ``kv_len == 0``); int64 ``[num_items]``."""
    slots = kv_indices.tolist()
    out = []
    for s, n in zip(kv_start.tolist(), kv_len.tolist(), strict=True):
        run = n > 0 and all(slots[s + j] == slots[s] + j for j in range(n))
        out.append(slots[s] if run else -1)
    return torch.tensor(out, dtype=torch.int64)
