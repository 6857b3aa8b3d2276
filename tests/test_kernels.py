"""packed_cascade_attention == flat attention over cat(prefix, suffix), on fresh random inputs."""

import numpy as np
import pytest
import torch
from conftest import DEVICE, HAS_CUDA, TOL, gpu, rel_err
from packinfer_sglang.kernels import launch, packed_cascade_attention, plan_packed_cascade, run_packed_cascade
from packinfer_sglang.kernels.launch import (
    BLOCK_N,
    NUM_STAGES,
    PLAIN_LAUNCH_BY_GPU,
    launch_config,
    plain_launch,
)
from packinfer_sglang.kernels.reference import packed_cascade_attention_ref


def make_batch(group_sizes, prefix_lens, suffix_lens, num_qo_heads, num_kv_heads, head_dim, dtype,
               device=DEVICE, seed=None):
    """Random q and a KV pool with each group's prefix and each request's suffix at scattered slots."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    num_tokens = sum(group_sizes)
    total = sum(prefix_lens) + sum(suffix_lens)
    num_slots = total + 29
    slots = torch.randperm(num_slots, generator=g)[:total].to(torch.int32)
    k = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(num_tokens, num_qo_heads, head_dim, generator=g).to(dtype)
    csr = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    p_total = sum(prefix_lens)
    args = (q, k, v, csr(group_sizes), csr(prefix_lens), slots[:p_total], csr(suffix_lens), slots[p_total:])
    return tuple(a.to(device) for a in args)


def check(args, dtype, **plan_kwargs):
    q, k, _, gi, pi, pidx, si, sidx = args
    sm_scale = q.shape[-1] ** -0.5
    plan = plan_packed_cascade(gi, pi, pidx, si, sidx, q.shape[1], k.shape[1], **plan_kwargs)
    out = torch.full_like(q, float("nan"))
    out, lse = packed_cascade_attention(*args, sm_scale, out=out, return_lse=True, plan=plan)
    ref_out, ref_lse = packed_cascade_attention_ref(*args, sm_scale)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert rel_err(out, ref_out) < TOL[dtype]
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), atol=2e-2, rtol=1e-3)


STRUCTURES = {
    # name: (group sizes, prefix lens, suffix lens)
    "one_group": ([5], [37], [1, 17, 3, 64, 2]),
    "singletons": ([1, 1, 1], [0, 0, 0], [17, 1, 70]),
    "mixed": ([3, 1, 2], [70, 0, 17], [5, 1, 17, 9, 0, 3]),
    "empty_suffix": ([2], [33], [0, 0]),
    "big_group": ([37], [130], [1] * 37),
}


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1), (7, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_packed_equals_flat(structure, heads, dtype):
    args = make_batch(*STRUCTURES[structure], *heads, 64, dtype)
    check(args, dtype, prefix_chunk=64, suffix_chunk=64)  # small chunks: several partials per request


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_unsplit_plan_writes_outputs_directly(heads):
    """Every request one item (no prefix, suffixes within one chunk): the partial kernel writes the
    outputs itself and the merge launch is skipped; every row must still be written."""
    args = make_batch([1, 1, 1, 1], [0, 0, 0, 0], [17, 1, 70, 33], *heads, 64, torch.float16)
    check(args, torch.float16, suffix_chunk=128)


@pytest.mark.parametrize("head_dim", [64, 96, 128] + ([256] if HAS_CUDA else []))
def test_head_dims_and_default_plan(head_dim):
    args = make_batch([3, 2], [65, 130], [3, 1, 40, 2, 7], 8, 2, head_dim, torch.bfloat16)
    check(args, torch.bfloat16)


def test_rejects_bad_inputs():
    q, k, v, gi, pi, pidx, si, sidx = make_batch([2], [5], [1, 1], 4, 2, 64, torch.float16, seed=0)
    with pytest.raises(ValueError, match="int32"):
        packed_cascade_attention(q, k, v, gi.long(), pi, pidx, si, sidx, 0.1)
    with pytest.raises(ValueError, match="suffix_kv_indptr must have 3"):
        packed_cascade_attention(q, k, v, gi, pi, pidx, si[:2], sidx, 0.1)
    with pytest.raises(ValueError, match="dtypes"):
        packed_cascade_attention(q.float(), k, v, gi, pi, pidx, si, sidx, 0.1)
    with pytest.raises(ValueError, match="no KV tokens"):
        empty = torch.zeros(3, dtype=torch.int32, device=q.device)
        packed_cascade_attention(q, k, v, gi, torch.zeros(2, dtype=torch.int32, device=q.device), pidx, empty,
                                 sidx, 0.1)


@gpu
@pytest.mark.parametrize("case", [(64, 4096, 256), (16, 2048, 512), (8, 512, 64), (3, 1000, 17)],
                         ids=lambda c: "B{}_P{}_S{}".format(*c))
@pytest.mark.parametrize("heads", [(32, 8), (28, 4), (32, 32)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_gpu_anchor_shapes(case, heads):
    b, p, s = case
    args = make_batch([b], [p], [s] * b, *heads, 128, torch.bfloat16)
    check(args, torch.bfloat16)


@gpu
def test_gpu_many_groups_odd_lengths():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    sizes = torch.randint(1, 40, (17,), generator=g).tolist()
    prefix = torch.randint(0, 3000, (17,), generator=g).tolist()
    suffix = torch.randint(1, 600, (sum(sizes),), generator=g).tolist()
    check(make_batch(sizes, prefix, suffix, 32, 8, 128, torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_plain_decode_with_h200_launch(graph, monkeypatch):
    """Plain decode (no prefix items) with the H200's plain-decode launch (128-token blocks, 2
    stages; :data:`PLAIN_LAUNCH_BY_GPU`), chunks aligned to it, suffixes of odd lengths; eager and
    on a CUDA graph's fixed grid with spare programs."""
    block_n, stages = PLAIN_LAUNCH_BY_GPU["H200"]
    monkeypatch.setattr(launch, "plain_launch", lambda device: (block_n, stages))
    args = make_batch([1] * 5, [0] * 5, [1, 129, 300, 127, 517], 8, 2, 64, torch.float16)
    q, k, v = args[:3]
    plan = plan_packed_cascade(*args[3:], 8, 2, kv_align=block_n, suffix_chunk=256)
    assert not plan.has_prefix and plan.num_partials > 5
    if graph:
        plan = plan._replace(grid_items=plan.num_items + 3, plain_grid_items=plan.num_items + 3, has_prefix=True)
    out = torch.full_like(q, float("nan"))
    run_packed_cascade(q, k, v, plan, 64 ** -0.5, out)
    assert rel_err(out, packed_cascade_attention_ref(*args, 64 ** -0.5)[0]) < TOL[torch.float16]


def test_plain_launch_defaults_off_the_listed_gpus():
    assert plain_launch(torch.device("cpu")) == (BLOCK_N, NUM_STAGES)
    assert PLAIN_LAUNCH_BY_GPU["H200"] == (128, 2)
    assert launch_config(torch.device("cpu"), True) == launch_config(torch.device("cpu"), False) == (BLOCK_N, NUM_STAGES)


@gpu
def test_launch_config_and_plan_alignment_follow_the_gpu():
    """Plain plans cut suffixes at multiples of this GPU's plain-decode ``block_n``; plans with prefix
    items at multiples of :data:`BLOCK_N` (the launches run_packed_cascade then makes)."""
    dev = torch.device("cuda")
    assert launch_config(dev, False) == (BLOCK_N, NUM_STAGES)
    assert launch_config(dev, True) == plain_launch(dev)
    suffix = [700, 901, 1203]
    for prefix, plain in (([0] * 3, True), ([300] * 3, False)):
        args = make_batch([1] * 3, prefix, suffix, 8, 2, 64, torch.float16)
        plan = plan_packed_cascade(*args[3:], 8, 2, head_dim=64, dtype=torch.float16)
        assert plan.has_prefix == (not plain)
        items = plan.items.cpu().numpy()
        suffix_items = items[items[:, 2] >= sum(prefix)]
        assert len(suffix_items) > len(suffix)  # split, so the cut points mean something
        starts = sum(prefix) + np.concatenate([[0], np.cumsum(suffix)])[suffix_items[:, 0]]
        assert ((suffix_items[:, 2] - starts) % launch_config(dev, plain)[0] == 0).all()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_slot_prefetch_chunks_equal_flat(graph, structure):
    """Index-list chunks read their next block's slot ids a block ahead: every structure, chunks of
    1 to 3 whole blocks, tails and empty whole-block ranges, eager and on a graph's fixed grid."""
    for dtype, heads, chunk in ((torch.float16, (8, 2), 64), (torch.bfloat16, (7, 1), 192)):
        q, k, v, *rest = args = make_batch(*STRUCTURES[structure], *heads, 64, dtype)
        plan = plan_packed_cascade(*rest, q.shape[1], k.shape[1], prefix_chunk=chunk, suffix_chunk=chunk)
        if graph:
            plan = plan._replace(grid_items=plan.num_items + 2)
        out = torch.full_like(q, float("nan"))
        run_packed_cascade(q, k, v, plan, q.shape[-1] ** -0.5, out)
        ref = packed_cascade_attention_ref(*args, q.shape[-1] ** -0.5)[0]
        assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("structure", ["mixed", "singletons", "big_group"])
@pytest.mark.parametrize("extra", [0, 1, 13])
@pytest.mark.parametrize("pair", [False, True])
def test_fixed_flat_grid_equals_flat(structure, extra, pair):
    """Graph plans (``grid_items``): programs past the plan's units exit and write nothing; with the pair (``plain_grid_items``) the launch whose tiles do not
    match the plan finds nothing to do."""
    args = make_batch(*STRUCTURES[structure], 8, 2, 64, torch.float16)
    plan = plan_packed_cascade(*args[3:], 8, 2, prefix_chunk=64, suffix_chunk=64)
    grid = plan.num_items + extra
    plan = plan._replace(grid_items=grid, plain_grid_items=grid if pair else None, has_prefix=True)
    ref = packed_cascade_attention_ref(*args, 0.125)[0]
    for _ in range(2):
        out = torch.full_like(args[0], float("nan"))
        run_packed_cascade(*args[:3], plan, 0.125, out)
        assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float16]
