"""``packinfer demo``: the whole method on a machine without a GPU.

It admits a shared-prefix workload into SGLang's real ``RadixCache`` (our subclass, CPU tensors)
as SGLang's scheduler would after prefill, lets every request decode a few tokens at fresh pool
slots, forms the decode groups, builds the step plan from a ``req_to_token`` table, runs the packed
kernel (Triton's CPU interpreter without a GPU) and compares it with flat decode attention.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import NamedTuple

import torch

from .config import PackInferConfig


def shared_prefix_prompts(rng: random.Random, num_groups: int, prompts_per_group: int, system_len: int,
                          question_len: int) -> list[list[int]]:
    """``num_groups`` system prompts (distinct first tokens) × ``prompts_per_group`` random questions."""
    prompts = []
    for s in range(num_groups):
        system = [s + 1] + [rng.randrange(1000, 50000) for _ in range(system_len - 1)]
        for _ in range(prompts_per_group):
            prompts.append(system + [rng.randrange(1000, 50000) for _ in range(question_len)])
    return prompts


def new_cache(config: PackInferConfig):
    """A :class:`~.serving.radix_cache.PackInferRadixCache` on CPU without memory pools (values are
    given on insert)."""
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from .serving.radix_cache import PackInferRadixCache

    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=None, page_size=1)
    return PackInferRadixCache(params, config)


def admit(cache, prompts: list[list[int]], rng: random.Random):
    """Inserts each prompt as SGLang does after prefill (fresh slots for uncached tokens).

    Returns ``(reqs, num_slots)``: requests with ``rid``, ``tokens``, ``last_node`` and ``slots`` (the
    position→slot row of the prompt), in random batch order, and the slots used.
    """
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from .grouping import slots_of_path

    next_slot, reqs = 0, []
    for i, tokens in enumerate(prompts):
        key = RadixKey(tokens)
        cached = cache.match_prefix(MatchPrefixParams(key=key)).device_indices
        fresh = torch.arange(next_slot, next_slot + len(tokens) - len(cached), dtype=torch.int64)
        next_slot += len(fresh)
        cache.insert(InsertParams(key=key, value=torch.cat([cached, fresh])))
        reqs.append(SimpleNamespace(rid=f"r{i}", tokens=tokens))
    for r in reqs:  # like cache_unfinished_req: the request's node once all prompts are in
        r.last_node = cache.match_prefix(MatchPrefixParams(key=RadixKey(r.tokens))).last_device_node
        r.slots = slots_of_path(r.last_node)
    rng.shuffle(reqs)
    return reqs, next_slot


class DemoResult(NamedTuple):
    num_requests: int
    num_groups: int
    group_sizes: list[int]
    prefix_lens: list[int]
    kv_bytes_flat: int
    kv_bytes_packed: int
    max_abs_err: float
    rel_err: float


def run_demo(num_groups=4, prompts_per_group=8, system_len=256, question_len=16, decoded=4,
             num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, seed=0,
             device="cpu", config: PackInferConfig | None = None) -> DemoResult:
    """Runs the pipeline once (see module docstring); sizes in tokens. ``config``: the grouping
    thresholds (default: :class:`PackInferConfig`'s defaults)."""
    from .decode_step import build_decode_step, run_decode_step
    from .kernels.reference import flat_decode_attention_ref

    rng = random.Random(seed)
    cache = new_cache(config or PackInferConfig())
    reqs, next_slot = admit(cache, shared_prefix_prompts(rng, num_groups, prompts_per_group, system_len,
                                                         question_len), rng)
    rows = [torch.cat([r.slots, torch.arange(next_slot + i * decoded, next_slot + (i + 1) * decoded)])
            for i, r in enumerate(reqs)]
    num_slots = next_slot + len(reqs) * decoded
    seq_lens = torch.tensor([len(s) for s in rows], dtype=torch.int64)
    req_to_token = torch.zeros(len(reqs), int(seq_lens.max()), dtype=torch.int32)
    for i, s in enumerate(rows):
        req_to_token[i, : len(s)] = s.to(torch.int32)
    cache.check_integrity()
    groups = cache.runtime.decode_groups(reqs, seq_lens.tolist())

    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype).to(dev) for _ in range(2))
    q = torch.randn(len(reqs), num_qo_heads, head_dim, generator=g).to(dtype).to(dev)
    step = build_decode_step(groups, seq_lens, torch.arange(len(reqs), device=dev), req_to_token.to(dev),
                             num_qo_heads, num_kv_heads, num_sms=4)
    out = run_decode_step(step, q, k, v, head_dim ** -0.5)
    kv_indptr = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    kv_indptr[1:] = seq_lens.cumsum(0)
    flat = torch.cat([req_to_token[i, :n] for i, n in enumerate(seq_lens.tolist())])
    ref, _ = flat_decode_attention_ref(q, k, v, kv_indptr, flat.to(dev), head_dim ** -0.5)
    token_bytes = 2 * num_kv_heads * head_dim * q.element_size()  # K and V of one token, all heads
    items = step.plan.items.cpu()
    diff = (out.double() - ref.double())
    return DemoResult(len(reqs), groups.num_groups, (groups.group_indptr[1:] - groups.group_indptr[:-1]).tolist(),
                      groups.prefix_lens.tolist(), int(seq_lens.sum()) * token_bytes,
                      int(items[:, 3].sum()) * token_bytes, diff.abs().max().item(),
                      (diff.norm() / ref.double().norm()).item())


def format_demo(r: DemoResult) -> str:
    """A short human-readable report of :func:`run_demo`."""
    shared = sum((n - 1) * p for n, p in zip(r.group_sizes, r.prefix_lens))
    return "\n".join([
        f"requests            {r.num_requests}",
        f"groups              {r.num_groups}  sizes {r.group_sizes}",
        f"shared prefix       {r.prefix_lens} tokens per group; {shared} token reads shared",
        (f"KV bytes read       flat {r.kv_bytes_flat / 1e6:.3f} MB, packed {r.kv_bytes_packed / 1e6:.3f} MB "
         f"({r.kv_bytes_flat / max(r.kv_bytes_packed, 1):.2f}x less)"),
        f"packed vs flat      max abs error {r.max_abs_err:.2e}, relative L2 error {r.rel_err:.2e}",
    ])
