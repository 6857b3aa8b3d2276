"""Packed cascade attention for decode: the public entry points (PackInfer, Sec. 4).

Requests sharing a prefix form a group; :func:`packed_cascade_attention` computes, for every
request, exact attention over ``cat(group prefix, request suffix)`` while reading each group's
prefix KV once per tile of its requests. It plans with :func:`plan_packed_cascade` (host work,
:mod:`.plan`) and runs with :func:`run_packed_cascade` (the kernel of :mod:`.cascade_kernel`
launched per :mod:`.launch`, then the merge of :mod:`.merge`). A plan is reused by every layer of
a step.
"""

from __future__ import annotations

import torch
import triton

from . import launch as _launch
from .cascade_kernel import _packed_attn_partial_kernel
from .checks import check_cascade_inputs
from .launch import PREFIX_BLOCK_M, kernel_occupancy, num_sms_of, num_warps_for
from .merge import merge_partials
from .plan import plan_work
from .plan_tensors import PackedCascadePlan, make_plan

LOG2E = 1.4426950408889634


def plan_packed_cascade(
    group_indptr: torch.Tensor,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    num_qo_heads: int,
    num_kv_heads: int,
    *,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    kv_base: bool = False,
    **plan_kwargs,
) -> PackedCascadePlan:
    """Plans one decode step (host work; copies the indptr arrays to the host if they are on a GPU,
    which synchronizes); arguments as :func:`packed_cascade_attention`'s. ``plan_kwargs`` go to
    :func:`.plan.plan_work`; its ``programs_per_sm`` defaults to :func:`.launch.kernel_occupancy`
    of the launch that will run the plan when ``head_dim`` and ``dtype`` (of the KV) are given, else
    2. ``kv_base``: also compute the items' base slots (contiguous fast path).

    Raises:
        ValueError: from :func:`.plan.plan_work` on malformed indptr arrays.
    """
    gqa = num_qo_heads // num_kv_heads
    device = prefix_kv_indices.device
    plan_kwargs.setdefault("num_sms", num_sms_of(device))
    group_host, prefix_host, suffix_host = (a.cpu().numpy() for a in (group_indptr, prefix_kv_indptr, suffix_kv_indptr))
    plain = int(prefix_host[-1]) == 0  # launched with the plain-decode tiles
    if "programs_per_sm" not in plan_kwargs and head_dim is not None and dtype is not None:
        plan_kwargs["programs_per_sm"] = kernel_occupancy(device, dtype, head_dim, gqa, has_kv_base=kv_base,
                                                          plain=plain)
    plan_kwargs.setdefault("kv_align", _launch.launch_config(device, plain)[0])
    work = plan_work(group_host, prefix_host, suffix_host, gqa_group_size=gqa, num_kv_heads=num_kv_heads,
                     prefix_block_m=PREFIX_BLOCK_M, **plan_kwargs)
    kv_indices = torch.cat([prefix_kv_indices[: int(prefix_host[-1])],
                            suffix_kv_indices[: int(suffix_host[-1])]]).to(torch.int32)
    return make_plan(work, kv_indices, gqa, kv_base=kv_base)


def _launch_partial(args: tuple, plan: PackedCascadePlan, q: torch.Tensor, num_kv_heads: int, grid_items: int,
                    plain: bool, role: int, guard: bool, store_lse: bool) -> None:
    """One launch of the partial kernel over ``grid_items * num_kv_heads`` programs, with the tiles,
    block and pipeline depth of :mod:`.launch` for the prefix or the plain-decode launch."""
    _, num_qo_heads, head_dim = q.shape
    block_m = plan.suffix_block_m if plain else plan.prefix_block_m
    block_n, num_stages = _launch.launch_config(q.device, plain)
    _packed_attn_partial_kernel[(grid_items * num_kv_heads,)](
        *args, GQA=num_qo_heads // num_kv_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PREFIX_BLOCK_M=block_m, SUFFIX_BLOCK_M=plan.suffix_block_m,
        BLOCK_N=block_n, DOT_FP32=q.device.type == "cpu" and q.dtype == torch.bfloat16, STORE_LSE=store_lse,
        ROLE=role, HAS_KV_BASE=plan.kv_base is not None, GUARD_UNITS=guard,
        num_warps=num_warps_for(block_m, head_dim), num_stages=num_stages,
    )


def run_packed_cascade(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: PackedCascadePlan,
    sm_scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> None:
    """Runs a planned step for one layer, writing ``out`` (and ``lse``) in place.

    Arguments as :func:`packed_cascade_attention`'s, unchecked (that function validates them). Rows
    of ``out`` past the plan's requests (padding of a CUDA-graph batch) are written with zeros.
    Allocates no host memory and never synchronizes, so it can be captured in a CUDA graph. An
    eager plan launches one program per item and KV head, with the plain-decode tiles when it has no
    prefix items; a graph plan (``grid_items``) launches its fixed grid, or the pair of launches
    (``plain_grid_items``) of which the one matching the plan finds its items.
    """
    _, num_qo_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    o_partial = torch.empty(plan.num_partials, num_qo_heads, head_dim, dtype=torch.float32, device=q.device)
    lse_partial = torch.empty(plan.num_partials, num_qo_heads, dtype=torch.float32, device=q.device)
    lse_arg = lse if lse is not None else lse_partial
    kv_base = plan.kv_indices if plan.kv_base is None else plan.kv_base
    args = (q, k_buffer, v_buffer, plan.kv_indices, kv_base, plan.items, plan.counts, plan.merge_indptr,
            o_partial, lse_partial, out, lse_arg, sm_scale * LOG2E,
            q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
            v_buffer.stride(0), v_buffer.stride(1), o_partial.stride(0), o_partial.stride(1),
            lse_partial.stride(0), out.stride(0), out.stride(1), lse_arg.stride(0))
    launch = lambda grid, plain, role, guard: _launch_partial(args, plan, q, num_kv_heads, grid, plain, role, guard,
                                                              lse is not None)
    graph = plan.grid_items is not None
    if graph and plan.plain_grid_items is None:
        launch(plan.grid_items, False, 0, True)
    elif graph:  # the pair, one of which finds the plan's items (ROLE in the kernel's docstring)
        launch(plan.grid_items, False, 1, True)
        launch(plan.plain_grid_items, True, 2, True)
    elif plan.num_items:  # eager: one program per item; plain decode gets the lighter tiles
        launch(plan.num_items, not plan.has_prefix, 0, False)
    if graph or plan.num_partials > plan.merge_indptr.numel() - 1:
        # graphs: any plan may split, and padding rows are zeroed here; eager: only if a request split
        merge_partials(o_partial, lse_partial, plan.merge_indptr, out, lse, skip_single=True)


def packed_cascade_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    group_indptr: torch.Tensor,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    plan: PackedCascadePlan | None = None,
    kv_base: bool = False,
):
    """Decode attention over ``cat(group prefix, request suffix)`` for every request, reading each
    group's prefix once per tile of its requests (PackInfer, Sec. 4).

    Args:
        q: ``[num_tokens, num_qo_heads, head_dim]`` fp16/bf16, one decode token per request;
            requests of a group are adjacent rows.
        k_buffer, v_buffer: ``[num_slots, num_kv_heads, head_dim]``, same dtype: SGLang's token KV
            pool for one layer (``page_size`` 1 slot indexing).
        group_indptr: ``[num_groups + 1]`` int32; group ``g`` owns rows ``group_indptr[g]:[g+1]``.
        prefix_kv_indptr: ``[num_groups + 1]`` int32.
        prefix_kv_indices: ``[prefix_kv_indptr[-1]]`` int32 pool slots of each group's shared prefix.
        suffix_kv_indptr: ``[num_tokens + 1]`` int32.
        suffix_kv_indices: ``[suffix_kv_indptr[-1]]`` int32 pool slots of each request's own tokens.
        sm_scale: softmax scale (usually ``head_dim ** -0.5``).
        out: optional ``[num_tokens, num_qo_heads, head_dim]`` output, written in place.
        return_lse: also return ``lse`` ``[num_tokens, num_qo_heads]`` float32, natural log.
        plan: a :class:`PackedCascadePlan` from :func:`plan_packed_cascade` for these indptr arrays,
            reused across layers; planned here when ``None``.
        kv_base: when planning here, let chunks that are one run of consecutive slots be read by
            base + offset (issue 5's contiguous fast path).

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``.

    Raises:
        ValueError: on mismatched shapes, dtypes, devices, GQA ratio, malformed indptr arrays, or a
            request with neither prefix nor suffix.

    Example::

        >>> out = packed_cascade_attention(q, k_buf, v_buf, torch.tensor([0, 3], dtype=torch.int32),
        ...     torch.tensor([0, 100], dtype=torch.int32), prefix_slots,
        ...     torch.tensor([0, 5, 9, 12], dtype=torch.int32), suffix_slots, 128 ** -0.5)
    """
    check_cascade_inputs(q, k_buffer, v_buffer, group_indptr, prefix_kv_indptr, prefix_kv_indices,
                         suffix_kv_indptr, suffix_kv_indices, out)
    num_tokens, num_qo_heads, head_dim = q.shape
    if plan is None:
        plan = plan_packed_cascade(group_indptr, prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr,
                                   suffix_kv_indices, num_qo_heads, k_buffer.shape[1], head_dim=head_dim,
                                   dtype=k_buffer.dtype, kv_base=kv_base)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(num_tokens, num_qo_heads, dtype=torch.float32, device=q.device) if return_lse else None
    run_packed_cascade(q, k_buffer, v_buffer, plan, sm_scale, out, lse)
    return (out, lse) if return_lse else out
