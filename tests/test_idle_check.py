"""Hooks on ``Scheduler.on_idle`` (``patches/idle_check.py``) on the CPU world: a relocation in the
last decode step leaves no slot behind at idle, and the idle check finds a leak or a stuck lock."""

import logging
import random
from types import SimpleNamespace

import pytest
from compaction_world import World
from packinfer_sglang.patches import idle_check

from packinfer_sglang.config import PackInferConfig

CONFIG = PackInferConfig(min_prefix_tokens=8, compact=True, compact_every=1, compact_min_gain=1e-9, verify=True)


def _scheduler(w, idle=True, forward_ct=1):
    return SimpleNamespace(tree_cache=w.cache, is_fully_idle=lambda: idle, forward_ct=forward_ct,
                           max_total_num_tokens=w.alloc.size)


def _relocated_then_finished(page_size, num_pages):
    """A world whose last decode step relocated (copy launched, old slots retired), then every request
    finished: the state SGLang's idle check meets."""
    w = World(page_size, num_pages)
    w.cache.runtime.config = CONFIG
    rng = random.Random(3)
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(39)] for s in range(2)]
    for i in range(6):
        w.admit(systems[i % 2] + [rng.randrange(1000, 50000) for _ in range(rng.randrange(1, 9))], 80)
        w.decode_step()
    w.cache.runtime.compaction = SimpleNamespace(relocator=w.relocator)
    plan = w.compact(flush=True)  # relocate and launch the copy; the old slots wait for the next step
    assert plan is not None and plan.tokens > 0
    w.forward(w.prepare_decode())
    for req in list(w.running):
        w.finish(req)
    return w


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (16, 64)])
def test_release_at_idle_returns_retired_slots_so_sglang_sees_no_leak(page_size, num_pages):
    w = _relocated_then_finished(page_size, num_pages)
    retired = (w.relocator.pending_free_slots() // page_size).unique().numel() * page_size  # whole pages
    assert retired > 0
    total = w.alloc.size
    assert w.alloc.available_size() + w.cache.evictable_size() + w.cache.protected_size() == total - retired

    idle_check.release_at_idle(_scheduler(w, idle=False))  # busy: nothing moves
    assert w.relocator.pending_free_slots().numel() > 0
    idle_check.release_at_idle(_scheduler(w))
    assert w.relocator.pending_free_slots().numel() == 0
    assert w.alloc.available_size() + w.cache.evictable_size() + w.cache.protected_size() == total  # SGLang's check


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (16, 64)])
def test_check_at_idle_passes_once_per_idle_period_and_logs(page_size, num_pages, caplog):
    w = _relocated_then_finished(page_size, num_pages)
    idle_check.check_at_idle(None, _scheduler(w))  # retired slots are counted, not leaked
    idle_check.release_at_idle(_scheduler(w))
    with caplog.at_level(logging.INFO, logger=idle_check.__name__):
        idle_check.check_at_idle(None, _scheduler(w, forward_ct=2))
        idle_check.check_at_idle(None, _scheduler(w, forward_ct=2))  # same idle period: not again
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(idle_check.LINE_PREFIX)]
    assert len(lines) == 1 and "leaked slots 0" in lines[0] and w.cache.runtime.idle_checks == 2


def test_check_at_idle_finds_a_leaked_slot():
    w = _relocated_then_finished(1, 1024)
    idle_check.release_at_idle(_scheduler(w))
    w.alloc.alloc(3)  # taken from the free list, owned by nobody
    with pytest.raises(AssertionError):
        idle_check.check_at_idle(None, _scheduler(w))


def test_check_at_idle_is_off_without_verification():
    w = _relocated_then_finished(1, 1024)
    w.cache.runtime.config = PackInferConfig(min_prefix_tokens=8)
    w.alloc.alloc(3)
    idle_check.check_at_idle(None, _scheduler(w))  # no check, no raise
    assert not hasattr(w.cache.runtime, "idle_checks")
