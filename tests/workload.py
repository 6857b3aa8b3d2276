"""Shared-prefix workloads on SGLang's real RadixCache (CPU tensors), for grouping tests."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from packinfer_sglang.config import PackInferConfig
from packinfer_sglang.radix_cache import PackInferRadixCache, slots_of_path


def new_cache(min_prefix_tokens=8, min_group_size=2) -> PackInferRadixCache:
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=None, page_size=1)
    return PackInferRadixCache(params, PackInferConfig(min_prefix_tokens=min_prefix_tokens,
                                                       min_group_size=min_group_size))


def shared_prefix_prompts(rng: random.Random, num_systems: int, per_system: int, system_len: int,
                          question_len: int) -> list[list[int]]:
    """``num_systems`` system prompts (distinct first tokens) × ``per_system`` random questions."""
    prompts = []
    for s in range(num_systems):
        system = [s + 1] + [rng.randrange(1000, 50000) for _ in range(system_len - 1)]
        for _ in range(per_system):
            prompts.append(system + [rng.randrange(1000, 50000) for _ in range(question_len)])
    return prompts


def admit(cache: PackInferRadixCache, prompts: list[list[int]], rng: random.Random):
    """Inserts each prompt as SGLang does after prefill (fresh slots for new tokens) and returns
    running requests (``rid``, ``last_node``, ``slots``: the position→slot row) in random order."""
    next_slot, reqs = 0, []
    for i, tokens in enumerate(prompts):
        key = RadixKey(tokens)
        cached = cache.match_prefix(MatchPrefixParams(key=key)).device_indices
        fresh = torch.arange(next_slot, next_slot + len(tokens) - len(cached), dtype=torch.int64)
        next_slot += len(fresh)
        cache.insert(InsertParams(key=key, value=torch.cat([cached, fresh])))
        reqs.append(SimpleNamespace(rid=f"r{i}", tokens=tokens))
    for r in reqs:  # like cache_unfinished_req: the request's node after all inserts
        r.last_node = cache.match_prefix(MatchPrefixParams(key=RadixKey(r.tokens))).last_device_node
        r.slots = slots_of_path(r.last_node)
    rng.shuffle(reqs)
    return reqs, next_slot
