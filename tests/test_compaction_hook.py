"""The proposed scheduler hooks (``patches/compaction_hook.py``) driven in SGLang's decode order on
the CPU world: hook BEFORE ``prepare_for_decode`` → allocation → hook AFTER ``ForwardBatch.init_new``
→ forward. The module is loaded from this checkout's ``patches/`` by path."""

import importlib.util
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from compaction_world import World

import packinfer_sglang.config as config_module
from packinfer_sglang.config import PackInferConfig

CONFIG = PackInferConfig(min_prefix_tokens=8, compact=True, compact_every=3, compact_min_gain=1e-9)


@pytest.fixture
def hook():
    path = Path(__file__).resolve().parents[1] / "patches" / "compaction_hook.py"
    spec = importlib.util.spec_from_file_location("compaction_hook_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _world(page_size, num_pages):
    """A CPU world whose scheduler runtime has compaction on (every 3 steps, any gain)."""
    w = World(page_size, num_pages)
    w.cache.runtime.config = CONFIG
    return w


def _state(w):
    """The compaction hooks' state in the world's scheduler runtime."""
    return w.cache.runtime.compaction


def _batch(w):
    return SimpleNamespace(reqs=list(w.running), spec_info=None, spec_algorithm=SimpleNamespace(is_none=lambda: True),
                           tree_cache=w.cache, seq_lens_cpu=torch.tensor([r.kv.kv_allocated_len + 1 for r in w.running]),
                           model_config=SimpleNamespace(num_attention_heads=8, num_key_value_heads=2))


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (16, 64)])
def test_hooks_in_decode_order_keep_kv_and_free_after_the_next_forward(hook, page_size, num_pages):
    w = _world(page_size, num_pages)
    rng = random.Random(7)
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(39)] for s in range(2)]
    for i in range(6):
        w.admit(systems[i % 2] + [rng.randrange(1000, 50000) for _ in range(rng.randrange(1, 9))], 80)
        w.decode_step()
    for step in range(9):
        batch = _batch(w)
        hook.plan_and_relocate(batch)
        w.relocator = _state(w).relocator  # the world's checks count the hook's pending slots
        w.check()
        inflight = w.prepare_decode()
        hook.launch_copies("forward batch", None, batch, None)
        assert not w.relocator._copies
        w.forward(inflight)
        w.check()
        w.check_content()
    assert _state(w).moved_tokens > 0 and _state(w).steps == 9
    hook.plan_and_relocate(_batch(w))
    assert w.relocator.pending_free_slots().numel() == 0
    w.check()


def _hooked_decode(hook, page_size, num_pages, place, steps=14):
    """The decode loop with the compaction hooks (and the placement hook BEFORE ``alloc_for_decode``
    with ``place``); checks pool integrity and oracle KV every step. Returns the world."""
    w = _world(page_size, num_pages)
    w.before_alloc = hook.place_decode_tokens if place else None
    rng = random.Random(8)
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(39)] for s in range(2)]
    for i in range(6):
        w.admit(systems[i % 2] + [rng.randrange(1000, 50000) for _ in range(rng.randrange(1, 9))], 80)
        w.decode_step()
    for _ in range(steps):
        hook.plan_and_relocate(_batch(w))
        w.relocator = _state(w).relocator
        w.check()
        needs_page = any(r.kv.kv_allocated_len % page_size == 0 for r in w.running)
        inflight = w.prepare_decode()
        if place and needs_page:  # a relocation's forced refresh happens at the next page allocation
            assert not _state(w).placer._forced
        hook.launch_copies("forward batch", None, _batch(w), None)
        w.forward(inflight)
        w.check()
        w.check_content()
    return w


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (16, 64)])
def test_placement_hook_before_alloc_for_decode(hook, page_size, num_pages):
    # Relocations every 3 steps (steps 2, 5, 8, 11 of 14) pack each group's members back to back,
    # so a member's next tokens cannot follow its tail: with placement they go to one reservation
    # (two runs per suffix); without, SGLang's default interleaves them.
    runs = {}
    for place in (False, True):
        w = _hooked_decode(hook, page_size, num_pages, place)
        assert _state(w).moved_tokens > 0
        groups = w.cache.runtime.decode_groups(w.running, [r.kv.kv_allocated_len + 1 for r in w.running])
        frag = w.relocator.measure(w.running, groups)
        assert (frag.prefix_runs == 1).all()
        runs[place] = frag.suffix_runs
    placer = _state(w).placer
    # page size 1: every relocation is followed by a page allocation, so by a refresh
    assert placer.refreshes >= (4 if page_size == 1 else 1) and placer.offered_pages > 0
    assert runs[True].max() <= 2
    # Measured: page size 1: 6 requests, 24 runs without placement (tail + 3 tokens each), 12 with;
    # page size 16: 7 and 7 (the 3 tokens mostly fit in each relocated tail's last page).
    if page_size == 1:
        assert runs[False].sum() >= 2 * runs[True].sum()
    else:
        assert runs[True].sum() <= runs[False].sum()


@pytest.mark.parametrize("compact, place, registered", [(False, True, False), (True, True, True),
                                                       (True, False, False)])
def test_plugin_registers_placement_only_with_compaction(hook, monkeypatch, compact, place, registered):
    import sys

    import packinfer_sglang.patches as patches_package
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from packinfer_sglang.serving import plugin

    cfg = PackInferConfig(compact=compact, compact_place=place)
    monkeypatch.setattr(config_module, "get_config", lambda: cfg)
    monkeypatch.setattr(patches_package, "compaction_hook", hook, raising=False)  # this checkout's
    monkeypatch.setitem(sys.modules, "packinfer_sglang.patches.compaction_hook", hook)
    calls = []
    record = classmethod(lambda cls, target, fn, kind: calls.append((target, fn, kind)))
    monkeypatch.setattr(HookRegistry, "register", record)
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    placement = [(fn, kind) for target, fn, kind in calls if target == hook.PLACE_TARGET]
    assert placement == ([(hook.place_decode_tokens, HookType.BEFORE)] if registered else [])
    assert (hook.plan_and_relocate in [c[1] for c in calls]) is compact
