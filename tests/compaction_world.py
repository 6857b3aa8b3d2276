"""A small SGLang scheduler on CPU for compaction tests: SGLang's real RadixCache (ours), real
allocators, ReqToTokenPool and MHATokenToKVPool, driven the way the scheduler drives them. Decode
slots come from SGLang's own ``alloc_for_decode`` (paged: its Triton ``alloc_decode_kernel`` in the
interpreter), optionally after the placement policy reordered the free list (``place=True``).

KV content is an oracle: the K/V of position ``p`` of a token sequence is a function of a rolling
hash of ``tokens[:p + 1]`` (small integers, exact in fp16), so equal prefixes hold equal KV, as in
a real model, and any slot mix-up shows as a mismatch.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from sglang.srt.mem_cache.allocation import alloc_for_decode
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from packinfer_sglang.compaction.integrity import check_pool_integrity
from packinfer_sglang.compaction.placement import Placer, group_rows
from packinfer_sglang.compaction.plan import CostModel
from packinfer_sglang.compaction.relocate import Relocator
from packinfer_sglang.config import PackInferConfig
from packinfer_sglang.serving.radix_cache import PackInferRadixCache

LAYERS, KV_HEADS, HEAD_DIM, DTYPE = 2, 2, 8, torch.float16
_MOD = (1 << 61) - 1
_SHIFT_K = np.arange(KV_HEADS * HEAD_DIM) * 3
_SHIFT_V = np.arange(KV_HEADS * HEAD_DIM) * 2 + 5


def rolling_hashes(tokens, h=0) -> np.ndarray:
    out = np.empty(len(tokens), dtype=np.int64)
    for i, t in enumerate(tokens):
        h = (h * 1000003 + int(t) + 1) % _MOD
        out[i] = h
    return out


def expected_kv(hashes: np.ndarray, layer: int):
    """``([n, KV_HEADS, HEAD_DIM], same)`` K and V the oracle assigns to these positions."""
    k = ((hashes[:, None] >> (_SHIFT_K + layer)[None]) & 127) - 64
    v = ((hashes[:, None] >> (_SHIFT_V + layer)[None]) & 127) - 64
    shape = (len(hashes), KV_HEADS, HEAD_DIM)
    return torch.from_numpy(k).reshape(shape).to(DTYPE), torch.from_numpy(v).reshape(shape).to(DTYPE)


class SimReq:
    """The fields of SGLang's ``Req`` that the radix cache, pools and compaction read."""

    def __init__(self, rid, prompt, max_new):
        self.rid, self.origin_input_ids, self.output_ids = rid, list(prompt), []
        self.fill_ids, self.max_new, self.extra_key, self.priority = list(prompt), max_new, None, 0
        self.req_pool_idx, self.kv, self.last_node, self.cache_protected_len = None, None, None, 0
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.inflight_middle_chunks, self.kv_committed_len = 0, 0

    def get_fill_ids(self):
        return self.fill_ids

    @property
    def tokens(self):
        return self.origin_input_ids + self.output_ids


class World:
    def __init__(self, page_size: int, num_pages: int, need_sort=False, min_prefix_tokens=8, min_gain=1e-9,
                 max_tokens=1 << 20, max_reqs=24, max_context=320, chunk_tokens=None, place=False,
                 place_every=1, horizon=256):
        if torch.cuda.is_available():  # SGLang picks CUDA kernels by CUDA's presence, not the tensors' device
            pytest.skip("CPU world: with CUDA present SGLang's pool and allocators launch CUDA kernels on these "
                        "CPU tensors; it runs where Triton's interpreter does (CI)")
        size = num_pages * page_size
        self.ps = page_size
        self.kv = MHATokenToKVPool(size, page_size, DTYPE, KV_HEADS, HEAD_DIM, LAYERS, "cpu", False,
                                   enable_alt_stream=False)
        if page_size == 1:
            self.alloc = TokenToKVPoolAllocator(size, DTYPE, "cpu", self.kv, need_sort)
        else:
            self.alloc = PagedTokenToKVPoolAllocator(size, page_size, DTYPE, "cpu", self.kv, need_sort)
        self.rtp = ReqToTokenPool(max_reqs, max_context, "cpu", False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.rtp, token_to_kv_pool_allocator=self.alloc,
                                 page_size=page_size)
        self.cache = PackInferRadixCache(params, PackInferConfig(min_prefix_tokens=min_prefix_tokens))
        cost = CostModel(LAYERS, KV_HEADS, HEAD_DIM, 2, gqa_group_size=4, chunk_tokens=chunk_tokens or 2 * page_size,
                         min_gain=min_gain)
        self.relocator = Relocator(self.cache, cost, max_tokens)
        self.placer = Placer(self.alloc, self.rtp.req_to_token, place_every) if place else None
        self.horizon = horizon
        self.before_alloc = None
        self.running: list[SimReq] = []
        self.next_rid, self.moved_tokens = 0, 0

    # --- allocation as SGLang's alloc_extend / alloc_decode do it -------------------------------
    def _alloc(self, need_pages: int):
        out = self.alloc.alloc(need_pages * self.ps)
        if out is None:
            self.cache.evict(EvictParams(num_tokens=need_pages * self.ps))
            out = self.alloc.alloc(need_pages * self.ps)
        return out

    def _write_kv(self, req, start, end):
        row = self.rtp.req_to_token[req.req_pool_idx, start:end].long()
        hashes = rolling_hashes(req.tokens[:end])[start:]
        for layer in range(LAYERS):
            k, v = expected_kv(hashes, layer)
            self.kv.k_buffer[layer][row], self.kv.v_buffer[layer][row] = k, v

    def admit(self, prompt, max_new) -> SimReq | None:
        req = SimReq(f"r{self.next_rid}", prompt, max_new)
        self.next_rid += 1
        match = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(list(prompt[:-1]))))
        prefix, node = match.device_indices, match.last_device_node
        self.cache.inc_lock_ref(node)
        need = len(prompt) - len(prefix)
        fresh = self._alloc(-(-need // self.ps))
        if fresh is None or self.rtp.alloc([req]) is None:
            if fresh is not None:
                self.alloc.free(fresh)
            self.cache.dec_lock_ref(node)
            return None
        row = self.rtp.req_to_token[req.req_pool_idx]
        row[: len(prefix)] = prefix.to(torch.int32)
        row[len(prefix):len(prompt)] = fresh[:need].to(torch.int32)
        req.prefix_indices, req.last_node, req.cache_protected_len = prefix.clone(), node, len(prefix)
        req.kv = SimpleNamespace(kv_allocated_len=len(prompt), swa_evicted_seqlen=0)
        self._write_kv(req, len(prefix), len(prompt))  # the prefill forward
        req.output_ids.append(int(prompt[-1]) * 7 % 50000 + 1000)
        self.cache.cache_unfinished_req(req)  # as SGLang does after prefill
        self.running.append(req)
        return req

    def prepare_decode(self) -> list:
        """SGLang's ``prepare_for_decode``: retracts (here: aborts) the newest requests while the pool
        cannot hold a page per request, as ``check_decode_mem`` does, places (``place=True``), then
        SGLang's ``alloc_for_decode``. Returns ``(req, position, slot)`` for the forward."""
        while self.running and (self.alloc.available_size() + self.cache.evictable_size_
                                < len(self.running) * self.ps):
            self.finish(self.running[-1], abort=True)
        if not self.running:
            return []
        reqs = list(self.running)
        lens = torch.tensor([r.kv.kv_allocated_len for r in reqs], dtype=torch.int64)
        if self.placer is not None:
            self.placer.place(reqs, lens.numpy(), lambda: self.plan_inputs(reqs))
        rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)
        batch = SimpleNamespace(reqs=reqs, seq_lens=lens, seq_lens_cpu=lens.clone(), tree_cache=self.cache,
                                req_to_token_pool=self.rtp, token_to_kv_pool_allocator=self.alloc,
                                req_pool_indices=rows, model_config=SimpleNamespace(is_encoder_decoder=False),
                                maybe_evict_swa=lambda: None, spec_info=None)
        if self.before_alloc is not None:  # a BEFORE hook on alloc_for_decode
            self.before_alloc(batch, token_per_req=1)
        slots = alloc_for_decode(batch, token_per_req=1).tolist()
        return list(zip(reqs, lens.tolist(), slots))

    def plan_inputs(self, reqs):
        """Groups and expected remaining steps for a placement refresh."""
        groups = self.cache.runtime.decode_groups(reqs, [r.kv.kv_allocated_len + 1 for r in reqs])
        remaining = np.array([min(max(r.max_new - len(r.output_ids), 0), self.horizon) for r in reqs])
        return group_rows(groups), remaining

    def forward(self, items) -> None:
        """The decode forward: writes each token's KV at the slot it was given, appends an output."""
        for req, pos, slot in items:
            for layer, (k, v) in enumerate(expected_kv(rolling_hashes(req.tokens[: pos + 1])[-1:], l)
                                           for l in range(LAYERS)):
                self.kv.k_buffer[layer][slot], self.kv.v_buffer[layer][slot] = k[0], v[0]
            req.output_ids.append((len(req.output_ids) * 31 + int(req.rid[1:])) % 50000 + 1000)

    def decode_step(self):
        self.forward(self.prepare_decode())
        self.relocator.free_deferred()  # the old slots of the last relocation, after this forward

    def finish(self, req, abort=False):
        n = req.kv.kv_allocated_len
        req.kv_committed_len = n
        self.cache.cache_finished_req(req, is_insert=not abort, kv_len_to_handle=n)
        self.rtp.free(req)
        req.kv = None
        self.running.remove(req)

    def evict(self, num_tokens):
        self.cache.evict(EvictParams(num_tokens=num_tokens))

    def compact(self, flush=True):
        """Plans and relocates (and copies, with ``flush``); returns the plan. Checks that every
        request's KV is bit-identical after the copy."""
        if not self.running:
            return None
        lens = [r.kv.kv_allocated_len + 1 for r in self.running]
        groups = self.cache.runtime.decode_groups(self.running, lens)
        before = self.request_kv()
        remaining = [max(r.max_new - len(r.output_ids), 0) for r in self.running]
        avoid = self.placer.reserved_pages() if self.placer is not None else None
        plan = self.relocator.compact(self.running, groups, remaining, avoid=avoid)
        if plan.moves and self.placer is not None:
            self.placer.invalidate()
        self.check()  # between relocate and copy: ownership already consistent
        if not flush:
            return plan
        self.moved_tokens += self.relocator.flush_copies()
        after = self.request_kv()
        for rid, kv in before.items():
            for a, b in zip(kv, after[rid]):
                assert torch.equal(a, b), f"{rid}: KV changed by relocation"
        return plan

    # --- checks ----------------------------------------------------------------------------------
    def request_kv(self) -> dict:
        out = {}
        for r in self.running:
            row = self.rtp.req_to_token[r.req_pool_idx, : r.kv.kv_allocated_len].long()
            out[r.rid] = [buf[layer][row].clone() for layer in range(LAYERS) for buf in (self.kv.k_buffer,
                                                                                      self.kv.v_buffer)]
        return out

    def check(self):
        check_pool_integrity(self.cache, self.running, self.relocator.pending_free_slots())

    def check_content(self):
        """Every running request's and every tree node's KV equals the oracle's."""
        def compare(slots, hashes, what):
            for layer in range(LAYERS):
                k, v = expected_kv(hashes, layer)
                assert torch.equal(self.kv.k_buffer[layer][slots], k), f"{what}: K of layer {layer}"
                assert torch.equal(self.kv.v_buffer[layer][slots], v), f"{what}: V of layer {layer}"

        if self.relocator._copies:
            return  # relocated, copy not yet launched: the new slots hold no KV yet
        for r in self.running:
            n = r.kv.kv_allocated_len
            compare(self.rtp.req_to_token[r.req_pool_idx, :n].long(), rolling_hashes(r.tokens[:n]), r.rid)
        stack = [(c, 0) for c in self.cache.root_node.children.values()]
        while stack:
            node, h = stack.pop()
            hashes = rolling_hashes(list(node.key.token_ids), h)
            compare(node.value.long(), hashes, f"node {node.id}")
            stack.extend((c, int(hashes[-1])) for c in node.children.values())


# --- random workloads: the operations both property tests draw ------------------------------------
BASIC_OPS = (  # hypothesis strategies of the operations apply_basic_op runs
    st.tuples(st.just("admit"), st.integers(0, 3), st.integers(1, 14), st.integers(2, 40)),
    st.tuples(st.just("decode"), st.integers(1, 6)),
    st.tuples(st.just("finish"), st.integers(0, 30)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("evict"), st.integers(1, 200)),
)
MAX_RUNNING = 16


def apply_basic_op(w: World, op: tuple, rng, systems: list[list[int]]) -> bool:
    """Runs ``op`` when it is one of :data:`BASIC_OPS`' kinds; returns whether it was. ``admit``
    (below :data:`MAX_RUNNING` running requests): system prompt ``op[1]`` of ``systems`` + ``op[2]``
    random tokens, ``op[3]`` tokens to decode; ``decode``: ``op[1]`` steps, finishing requests that
    are done; ``finish``/``abort``: running request ``op[1]`` (modulo); ``evict``: ``op[1]`` tokens."""
    kind = op[0]
    if kind == "admit":
        if len(w.running) < MAX_RUNNING:
            w.admit(systems[op[1]] + [rng.randrange(1000, 50000) for _ in range(op[2])], op[3])
    elif kind == "decode":
        for _ in range(op[1]):
            w.decode_step()
            for r in [r for r in w.running if len(r.output_ids) > r.max_new]:
                w.finish(r)
    elif kind in ("finish", "abort"):
        if w.running:
            w.finish(w.running[op[1] % len(w.running)], abort=kind == "abort")
    elif kind == "evict":
        w.evict(op[1])
    else:
        return False
    return True
