"""The fragmentation log hook (``patches/fragmentation_log.py``) on the CPU world: the counts it logs
for a planted layout equal an oracle that reads ``req_to_token`` rows directly; it does nothing at
``PACKINFER_FRAG_LOG_EVERY=0``; the plugin registers it, compaction on or off. The module is loaded
from this checkout's ``patches/`` by path, as in ``test_compaction_hook.py``."""

import dataclasses
import importlib.util
import json
import logging
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from compaction_world import World

import packinfer_sglang.config as config_module
from packinfer_sglang.config import PackInferConfig
from scripts import serving_report as report


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "patches" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def frag_log():
    return _load("fragmentation_log")


def _use_config(monkeypatch, **fields):
    """The process's settings (what the plugin reads at registration)."""
    cfg = PackInferConfig(**fields)
    monkeypatch.setattr(config_module, "get_config", lambda: cfg)


def _use_runtime_config(monkeypatch, w: World, **fields):
    """The settings of ``w``'s scheduler runtime (what the hook reads), its cache's thresholds kept."""
    runtime = w.cache.runtime
    monkeypatch.setattr(runtime, "config", dataclasses.replace(runtime.config, **fields))


def _planted_world(page_size: int, num_pages: int) -> World:
    """Two groups of a 40-token system prompt (3 and 2 members, 3-token questions) and one unshared
    request, after 4 interleaved decode steps. System 0's first 20 tokens were cached by an earlier
    request, so with page size 1 its other 20 lie elsewhere: a prefix of 2 runs."""
    w = World(page_size, num_pages)
    rng = random.Random(3)
    systems = [[s + 1] + [rng.randrange(1000, 50000) for _ in range(39)] for s in range(2)]
    early = w.admit(systems[0][:20] + [5, 6, 7], 80)
    w.decode_step()
    w.finish(early)
    for i in range(5):
        w.admit(systems[i % 2] + [rng.randrange(1000, 50000) for _ in range(3)], 80)
    w.admit([9] + [rng.randrange(1000, 50000) for _ in range(20)], 80)
    for _ in range(4):
        w.decode_step()
    return w


def _runs(slots) -> int:
    return 0 if len(slots) == 0 else 1 + int(np.count_nonzero(np.diff(np.asarray(slots)) != 1))


def _oracle(w: World) -> dict:
    """Runs from the requests' rows: a group's prefix is its first member's first ``prefix_lens``
    slots, each member's suffix the rest; a request alone is all suffix."""
    groups = w.cache.runtime.decode_groups(w.running, [r.kv.kv_allocated_len + 1 for r in w.running])
    rows = [w.rtp.req_to_token[r.req_pool_idx, :r.kv.kv_allocated_len].numpy() for r in w.running]
    prefix, suffix, tokens = [], [], 0  # tokens: a shared prefix once
    for g in range(groups.num_groups):
        members = groups.order[groups.group_indptr[g]:groups.group_indptr[g + 1]]
        p = int(groups.prefix_lens[g]) if len(members) > 1 else 0
        if p:
            prefix.append(_runs(rows[members[0]][:p]))
        suffix += [_runs(rows[i][p:]) for i in members]
        tokens += p + sum(len(rows[i]) - p for i in members)
    return {"groups": groups.num_groups, "requests": len(rows), "batch": len(rows), "shared_groups": len(prefix),
            "prefix_runs": sum(prefix), "suffix_runs": sum(suffix), "tokens": tokens,
            "prefix_runs_mean": np.mean(prefix), "prefix_runs_max": max(prefix),
            "suffix_runs_mean": np.mean(suffix), "suffix_runs_max": max(suffix)}


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("packinfer: fragmentation")]


@pytest.mark.parametrize("page_size, num_pages", [(1, 1024), (16, 64)])
def test_logs_the_planted_layout_every_n_steps(frag_log, monkeypatch, caplog, page_size, num_pages):
    w = _planted_world(page_size, num_pages)
    _use_runtime_config(monkeypatch, w, frag_log_every=2)
    caplog.set_level(logging.INFO)
    for _ in range(5):
        frag_log.log_fragmentation(SimpleNamespace(reqs=list(w.running), tree_cache=w.cache))
    lines = _lines(caplog)
    assert w.cache.runtime._groups_key is None  # the runtime's group memo is left alone
    assert [int(line.split()[3].rstrip(":")) for line in lines] == [2, 4]
    logged = json.loads(lines[0].split(": ", 2)[2])
    expected = _oracle(w)
    assert {k: logged[k] for k in expected} == pytest.approx(expected)
    runs = expected["prefix_runs"] + expected["suffix_runs"]
    assert logged["runs_per_1k_tokens"] == pytest.approx(1000 * runs / expected["tokens"])
    if page_size == 1:  # by hand: 2 + 1 prefix runs; every suffix is its question (or prompt) + 4 lone tokens
        assert (logged["groups"], logged["shared_groups"], logged["prefix_runs"], logged["suffix_runs"],
                logged["prefix_runs_max"], logged["suffix_runs_max"], logged["tokens"]) == (3, 2, 3, 30, 2, 5, 140)
    # The report reads the line back from a server log.
    series = report.fragmentation_series(f"[2026-01-01 00:00:00] {lines[0]}\n[t] {lines[1]}\n")
    assert [s["step"] for s in series] == [2, 4] and series[0] == {"step": 2, **logged}


def test_off_or_without_the_packinfer_cache_does_nothing(frag_log, monkeypatch, caplog):
    from packinfer_sglang.compaction import relocate

    def fail(*args, **kwargs):
        raise AssertionError("measured")

    w = _planted_world(1, 1024)
    monkeypatch.setattr(relocate, "measure_fragmentation", fail)
    caplog.set_level(logging.INFO)
    _use_runtime_config(monkeypatch, w, frag_log_every=0)
    for _ in range(3):
        frag_log.log_fragmentation(SimpleNamespace(reqs=list(w.running), tree_cache=w.cache))
    _use_runtime_config(monkeypatch, w, frag_log_every=1)
    frag_log.log_fragmentation(SimpleNamespace(reqs=list(w.running), tree_cache=object()))  # no runtime
    assert w.cache.runtime.decode_batches == 0 and _lines(caplog) == []


@pytest.mark.parametrize("compact, every", [(False, 0), (False, 50), (True, 0), (True, 50)])
def test_plugin_registers_the_log_with_compaction_on_or_off(monkeypatch, compact, every):
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from packinfer_sglang import patches as patches_package
    from packinfer_sglang.serving import plugin

    hooks = {name: _load(name) for name in ("fragmentation_log", "compaction_hook")}
    for name, module in hooks.items():  # this checkout's modules
        monkeypatch.setattr(patches_package, name, module, raising=False)
        monkeypatch.setitem(sys.modules, f"packinfer_sglang.patches.{name}", module)
    _use_config(monkeypatch, compact=compact, frag_log_every=every)
    calls = []
    record = classmethod(lambda cls, target, fn, kind: calls.append((target, fn, kind)))
    monkeypatch.setattr(HookRegistry, "register", record)
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    on_decode = [fn for target, fn, kind in calls if target == hooks["fragmentation_log"].TARGET
                 and kind == HookType.BEFORE]
    log, relocate = hooks["fragmentation_log"].log_fragmentation, hooks["compaction_hook"].plan_and_relocate
    assert (log in on_decode) is (every > 0) and (relocate in on_decode) is compact
    if every and compact:  # registered earlier, so HookRegistry runs it after the relocation
        assert on_decode.index(log) < on_decode.index(relocate)
