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


@pytest.fixture
def hook(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "patches" / "compaction_hook.py"
    spec = importlib.util.spec_from_file_location("compaction_hook_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = PackInferConfig(min_prefix_tokens=8, compact=True, compact_every=3, compact_min_gain=1e-9)
    monkeypatch.setattr(config_module, "get_config", lambda: cfg)
    return module


def _batch(w):
    return SimpleNamespace(reqs=list(w.running), spec_info=None, spec_algorithm=SimpleNamespace(is_none=lambda: True),
                           tree_cache=w.cache, seq_lens_cpu=torch.tensor([r.kv.kv_allocated_len + 1 for r in w.running]),
                           model_config=SimpleNamespace(num_attention_heads=8, num_key_value_heads=2))


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (16, 64)])
def test_hooks_in_decode_order_keep_kv_and_free_after_the_next_forward(hook, page_size, num_pages):
    w = World(page_size, num_pages)
    rng = random.Random(7)
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(39)] for s in range(2)]
    for i in range(6):
        w.admit(systems[i % 2] + [rng.randrange(1000, 50000) for _ in range(rng.randrange(1, 9))], 80)
        w.decode_step()
    w.relocator = hook._state.relocator  # the world's checks count the hook's pending slots
    for step in range(9):
        batch = _batch(w)
        hook.plan_and_relocate(batch)
        if w.relocator is None:
            w.relocator = hook._state.relocator
        w.check()
        inflight = w.prepare_decode()
        hook.launch_copies("forward batch", None, batch, None)
        assert not w.relocator._copies
        w.forward(inflight)
        w.check()
        w.check_content()
    assert hook._state.moved_tokens > 0 and hook._state.steps == 9
    hook.plan_and_relocate(_batch(w))
    assert w.relocator.pending_free_slots().numel() == 0
    w.check()
