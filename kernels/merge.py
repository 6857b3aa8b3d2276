"""Log-sum-exp merge of partial attention states (PackInfer Sec. 4; FlashInfer's ``merge_states``).

Request ``t`` has partial states ``(o_j, lse_j)`` over disjoint KV chunks, rows
``merge_indptr[t]:merge_indptr[t+1]`` of the partial buffers. The exact attention over the union is

    lse = log sum_j exp(lse_j),        o = sum_j exp(lse_j - lse) * o_j

computed here with a running maximum so no exponent overflows. ``lse`` is natural log; inside the
kernel it is carried in base 2 (``lse2``) and converted at the load and the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_partials_kernel(
    O_Partial, LSE_Partial, Merge_Indptr, Out, LSE_Out,
    stride_pr, stride_ph, stride_lr,
    stride_ot, stride_oh, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, STORE_LSE: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
):
    """One ``(request, query head)``: its partials ``BLOCK_P`` at a time, each block's loads issued
    together (one memory round trip for up to ``BLOCK_P`` partials instead of one per partial)."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    mask_d = offs_d < HEAD_DIM
    start = tl.load(Merge_Indptr + tok)
    end = tl.load(Merge_Indptr + tok + 1)
    if SKIP_SINGLE:  # noqa: SIM102 -- a constexpr branch around a runtime one (Triton)
        if end - start == 1:
            return  # the partial kernel wrote this row's output itself

    m_i = -float("inf")
    s_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_P):
        r = r0 + offs_p
        valid = r < end
        lse2 = tl.load(LSE_Partial + r * stride_lr + head, mask=valid, other=-float("inf")) * 1.4426950408889634
        o = tl.load(O_Partial + r[:, None] * stride_pr + head * stride_ph + offs_d[None, :],
                    mask=valid[:, None] & mask_d[None, :], other=0.0)
        m_new = tl.maximum(m_i, tl.max(lse2, 0))  # finite: the block has a partial
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse2 - m_new)  # 0 past the request's partials
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        s_i = s_i * alpha + tl.sum(w, 0)
        m_i = m_new
    o = tl.where(s_i > 0, acc / tl.maximum(s_i, 1e-30), 0.0)  # a row without partials (padding) is 0
    tl.store(Out + tok * stride_ot + head * stride_oh + offs_d, o.to(Out.dtype.element_ty), mask=mask_d)
    if STORE_LSE:
        tl.store(LSE_Out + tok * stride_lt + head, (m_i + tl.log2(s_i)) * 0.6931471805599453)


MERGE_BLOCK_P = 1  # partials loaded per step of a row's merge (1 was fastest on the H200: ab_merge_block_h200.json)


def merge_partials(
    o_partial: torch.Tensor,
    lse_partial: torch.Tensor,
    merge_indptr: torch.Tensor,
    out: torch.Tensor,
    lse_out: torch.Tensor | None = None,
    *,
    skip_single: bool = False,
    block_p: int = MERGE_BLOCK_P,
) -> None:
    """Merges partial states into ``out`` (and ``lse_out``) in place.

    Args:
        o_partial: ``[num_partials, num_qo_heads, head_dim]`` float32.
        lse_partial: ``[num_partials, num_qo_heads]`` float32, natural log.
        merge_indptr: ``[>= num_tokens + 1]`` int32; a row without partials is written as zeros.
        out: ``[num_tokens, num_qo_heads, head_dim]``, written in place (any float dtype).
        lse_out: ``[num_tokens, num_qo_heads]`` float32, written in place when given.
        skip_single: leave rows with exactly one partial alone (the packed kernel writes those
            rows' outputs directly; their partial rows are not written).
        block_p: partials of a row loaded at once (a power of 2; launch tuning only).
    """
    num_tokens, num_qo_heads, head_dim = out.shape
    if num_tokens == 0:
        return
    lse_arg = lse_out if lse_out is not None else lse_partial
    _merge_partials_kernel[(num_tokens, num_qo_heads)](
        o_partial, lse_partial, merge_indptr, out, lse_arg,
        o_partial.stride(0), o_partial.stride(1), lse_partial.stride(0),
        out.stride(0), out.stride(1), lse_arg.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_P=block_p, STORE_LSE=lse_out is not None,
        SKIP_SINGLE=skip_single,
        num_warps=1 if head_dim <= 64 else 2,
    )
