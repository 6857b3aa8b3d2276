"""The contiguous fast path (issue 5): items whose KV chunk is one run of consecutive slots are read
by base + offset. ``item_kv_bases`` == its oracle, and the kernel with bases == flat attention on
scattered, contiguous and mixed layouts, eager and on CUDA-graph buffers."""

import pytest
import torch
from conftest import DEVICE, TOL, gpu, rel_err
from packinfer_sglang.kernels import plan_packed_cascade, plan_work, run_packed_cascade
from packinfer_sglang.kernels.kv_indices import item_kv_bases
from packinfer_sglang.kernels.plan_tensors import PlanBuffers
from packinfer_sglang.kernels.reference import item_kv_bases_ref, packed_cascade_attention_ref
from test_decode_step import flat_reference, random_kv, running_batch

from packinfer_sglang.decode_step import GraphBuffers, build_decode_step, run_decode_step
from packinfer_sglang.grouping import ungrouped


@pytest.mark.parametrize("seed", range(6))
def test_item_kv_bases_equals_oracle(seed):
    """Random slot lists with planted runs; items of length 1, crossing run boundaries, the whole list."""
    g = torch.Generator().manual_seed(seed)
    pieces, base = [], 1000
    for _ in range(7):
        n = int(torch.randint(1, 40, (1,), generator=g))
        if torch.rand(1, generator=g) < 0.5:
            pieces.append(torch.arange(base, base + n))
        else:
            pieces.append(torch.randperm(5000, generator=g)[:n] + 6000)
        base += n + int(torch.randint(0, 3, (1,), generator=g))
    kv = torch.cat(pieces).to(torch.int32)
    total = kv.numel()
    starts = torch.randint(0, total, (50,), generator=g)
    lens = torch.minimum(torch.randint(1, 45, (50,), generator=g), total - starts)
    starts, lens = torch.cat([starts, torch.tensor([0, total - 1, 0])]), torch.cat([lens, torch.tensor([total, 1, 1])])
    want = item_kv_bases_ref(kv, starts, lens)
    assert item_kv_bases(kv.to(DEVICE), starts.to(DEVICE), lens.to(DEVICE)).cpu().tolist() == want.tolist()
    out = torch.full((60,), 7, dtype=torch.int32, device=DEVICE)
    got = item_kv_bases(kv.to(DEVICE), starts.int().to(DEVICE), lens.int().to(DEVICE), out)
    assert got.data_ptr() == out.data_ptr() and got.cpu().tolist() == want.tolist()


def test_item_kv_bases_edges():
    kv = torch.tensor([7, 8, 9, 3, 20, 21, 5, 9], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 1, 3, 4, 4, 6, 7, 2], device=DEVICE)
    lens = torch.tensor([3, 3, 1, 2, 3, 1, 1, 0], device=DEVICE)
    assert item_kv_bases(kv, starts, lens).tolist() == [7, -1, 3, 20, -1, 5, 9, -1]
    with pytest.raises(ValueError, match="num_items"):
        item_kv_bases(kv, starts, lens[:3])
    with pytest.raises(ValueError, match="int32/int64"):
        item_kv_bases(kv, starts, lens, torch.zeros(8, dtype=torch.float32, device=DEVICE))
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="device"):
            item_kv_bases(kv.cpu(), starts, lens)


def make_layout(group_sizes, prefix_lens, suffix_lens, num_qo_heads, num_kv_heads, head_dim, dtype, layout, seed):
    """q, a KV pool and the two-level index lists with slots ``scattered`` (a permutation),
    ``contiguous`` (each prefix, then each suffix, one run) or ``mixed`` (contiguous prefixes,
    scattered suffixes, one suffix's run broken in the middle)."""
    g = torch.Generator().manual_seed(seed)
    p_total, s_total = sum(prefix_lens), sum(suffix_lens)
    num_slots = p_total + s_total + 41
    if layout == "scattered":
        slots = torch.randperm(num_slots, generator=g)[: p_total + s_total]
    elif layout == "contiguous":
        slots = torch.arange(13, 13 + p_total + s_total)
    else:
        rest = torch.randperm(num_slots - p_total - 3, generator=g)[:s_total] + p_total + 3
        slots = torch.cat([torch.arange(3, 3 + p_total), rest])
    csr = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    k = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(sum(group_sizes), num_qo_heads, head_dim, generator=g).to(dtype)
    slots = slots.to(torch.int32)
    args = (q, k, v, csr(group_sizes), csr(prefix_lens), slots[:p_total], csr(suffix_lens), slots[p_total:])
    return tuple(a.to(DEVICE) for a in args)


BATCHES = {
    "groups": ([4, 1, 3], [130, 0, 70], [1, 17, 64, 3, 9, 2, 40, 5]),
    "plain": ([1, 1, 1, 1], [0, 0, 0, 0], [17, 1, 130, 33]),
}


def _run(args, plan, sm_scale):
    out = torch.full_like(args[0], float("nan"))
    run_packed_cascade(args[0], args[1], args[2], plan, sm_scale, out)
    return out


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("layout", ["scattered", "contiguous", "mixed"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (7, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_kernel_with_bases_equals_flat(batch, layout, heads):
    """Eager plans with bases (one program per item) == the oracle == the same plan without bases;
    a contiguous layout takes the fast path for every item."""
    dtype, seed = torch.float16, hash((batch, layout, heads)) % 1000
    args = make_layout(*BATCHES[batch], *heads, 64, dtype, layout, seed)
    sm_scale = 64 ** -0.5
    ref = packed_cascade_attention_ref(*args, sm_scale)[0]
    kw = {"prefix_chunk": 64, "suffix_chunk": 64}
    with_bases = plan_packed_cascade(*args[3:], heads[0], heads[1], kv_base=True, **kw)
    without = plan_packed_cascade(*args[3:], heads[0], heads[1], **kw)
    bases = with_bases.kv_base[: with_bases.num_items].cpu()
    if layout == "contiguous":
        assert (bases >= 0).all()
    elif layout == "mixed" and batch == "groups":
        assert (bases >= 0).any() and (bases < 0).any()
    out = _run(args, with_bases, sm_scale)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, _run(args, without, sm_scale)) < 1e-3


@pytest.mark.parametrize("layout", ["contiguous", "mixed"])
@pytest.mark.parametrize("pair", [False, True])
def test_plan_buffers_with_bases(layout, pair):
    """Graph launches over CUDA-graph buffers (the ROLE pair with ``pair``), plans with and without
    prefix items in turn, bases recomputed by every write."""
    heads, dtype, sm_scale = (8, 2), torch.bfloat16, 64 ** -0.5
    buffers = PlanBuffers(max_tokens=12, max_items=256, max_kv_tokens=2048, device=torch.device(DEVICE))
    for name in ["groups", "plain", "groups"]:
        args = make_layout(*BATCHES[name], *heads, 64, dtype, layout, seed=len(name))
        gi, pi, _, si, _ = args[3:]
        work = plan_work(gi.cpu().numpy(), pi.cpu().numpy(), si.cpu().numpy(), gqa_group_size=4, num_kv_heads=2,
                         prefix_block_m=64, num_sms=4, prefix_chunk=64, suffix_chunk=64)
        kv = torch.cat([args[5], args[7]])
        buffers.kv_indices[: kv.numel()].copy_(kv)
        plan = buffers.write(work, 4, num_partials=200, grid_items=200, plain_grid_items=200 if pair else None,
                             num_kv_tokens=kv.numel())
        assert plan.kv_base is buffers.kv_base
        want = item_kv_bases_ref(kv.cpu(), plan.items[: plan.num_items, 2].cpu(), plan.items[: plan.num_items, 3].cpu())
        assert plan.kv_base[: plan.num_items].cpu().tolist() == want.tolist()
        out = _run(args, plan, sm_scale)
        ref = packed_cascade_attention_ref(*args, sm_scale)[0]
        assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[dtype]


def test_broken_run_takes_the_index_path():
    """One slot id inside a contiguous chunk changed (its K/V copied there): that item's base turns
    -1, and the result still equals the oracle through the index list."""
    args = list(make_layout(*BATCHES["groups"], 8, 2, 64, torch.float16, "contiguous", seed=5))
    prefix = args[5].clone()
    spare = args[1].shape[0] - 1
    args[1][spare], args[2][spare] = args[1][prefix[40]], args[2][prefix[40]]
    prefix[40] = spare
    args[5] = prefix
    plan = plan_packed_cascade(*args[3:], 8, 2, kv_base=True, prefix_chunk=64, suffix_chunk=64)
    items = plan.items[: plan.num_items].cpu()
    hit = (items[:, 2] <= 40) & (40 < items[:, 2] + items[:, 3])
    assert (plan.kv_base[: plan.num_items].cpu()[hit] == -1).all()
    out = _run(args, plan, 64 ** -0.5)
    assert rel_err(out, packed_cascade_attention_ref(*args, 64 ** -0.5)[0]) < TOL[torch.float16]


@pytest.mark.parametrize("grouped", [True, False])
def test_decode_step_with_bases(grouped):
    """build_decode_step(kv_base=True), eager and on graph buffers with padding: == flat decode over
    req_to_token, with the bases its oracle gives (a group's system prompt is one run of slots)."""
    num_qo_heads, num_kv_heads, head_dim, dtype = 8, 2, 64, torch.float16
    graph = GraphBuffers(max_bs=16, max_context_len=128, num_kv_heads=num_kv_heads, num_sms=4, device=DEVICE,
                         plain_programs_per_sm=3)
    cache, reqs, req_to_token, pool_rows, seq_lens, num_slots = running_batch(7, num_systems=2, per_system=3)
    groups = cache.runtime.decode_groups(reqs, seq_lens.tolist()) if grouped else ungrouped(len(reqs))
    k, v = random_kv(num_slots, num_kv_heads, head_dim, dtype)
    ref = None
    for use_graph in (False, True):
        padded_bs = len(reqs) + 2 * use_graph
        rows = torch.cat([pool_rows, torch.zeros(padded_bs - len(reqs), dtype=pool_rows.dtype)])
        q = torch.randn(padded_bs, num_qo_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
        q = q.to(DEVICE)
        step = build_decode_step(groups, seq_lens, rows.to(DEVICE), req_to_token.to(DEVICE), num_qo_heads,
                                 num_kv_heads, num_sms=4, graph=graph if use_graph else None,
                                 padded_bs=padded_bs if use_graph else None, kv_base=True)
        plan = step.plan
        items, kv = plan.items[: plan.num_items].cpu(), plan.kv_indices.cpu()
        assert plan.kv_base[: plan.num_items].cpu().tolist() == item_kv_bases_ref(kv, items[:, 2], items[:, 3]).tolist()
        assert (plan.kv_base[: plan.num_items] >= 0).any() or not grouped  # a group's prefix is a run
        out = run_decode_step(step, q, k, v, head_dim ** -0.5)
        ref = flat_reference(q[: len(reqs)], k, v, req_to_token, pool_rows, seq_lens)
        assert rel_err(out[: len(reqs)], ref) < TOL[dtype]
        assert (out[len(reqs):] == 0).all()


@gpu
@pytest.mark.parametrize("layout", ["scattered", "contiguous", "mixed"])
def test_gpu_anchor_shape_with_bases(layout):
    """B64 P4096 S256, Llama-3-8B heads, bf16: fp32 relative error, every output written."""
    args = make_layout([64], [4096], [256] * 64, 32, 8, 128, torch.bfloat16, layout, seed=3)
    plan = plan_packed_cascade(*args[3:], 32, 8, head_dim=128, dtype=torch.bfloat16, kv_base=True)
    out = _run(args, plan, 128 ** -0.5)
    ref = packed_cascade_attention_ref(*args, 128 ** -0.5)[0]
    assert torch.isfinite(out).all() and rel_err(out.float(), ref.float()) < TOL[torch.bfloat16]


def test_items_with_a_base_never_read_their_slot_ids():
    """After planning, the slot ids of every item that has a base are overwritten with garbage: the
    output is unchanged, so those items took the base + offset path."""
    args = make_layout(*BATCHES["groups"], 8, 2, 64, torch.float16, "mixed", seed=11)
    plan = plan_packed_cascade(*args[3:], 8, 2, kv_base=True, prefix_chunk=64, suffix_chunk=64)
    before = _run(args, plan, 64 ** -0.5)
    items, bases = plan.items[: plan.num_items].cpu(), plan.kv_base[: plan.num_items].cpu()
    assert (bases >= 0).sum() >= 2
    for start, length in items[bases >= 0][:, 2:4].tolist():
        plan.kv_indices[start : start + length] = args[1].shape[0] - 1  # a slot no item owns
    assert torch.equal(_run(args, plan, 64 ** -0.5), before)
