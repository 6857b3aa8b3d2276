"""CPU tests of the serving benchmark (scripts/bench_serving.py and its serving_* modules): workloads
and the commands and datasets they produce (checked with SGLang's own client parser and loaders),
result parsing, row-file merge and tables; the parallel-sampling client against a fake streaming
server; the driver end to end against a fake ``python`` that imitates the SGLang server and the
client runner (one start per backend, warmup and flushes around every workload, merge)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from packinfer_sglang.model_dirs import SHAPES, make_model_dir, tokenizer_dir

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_serving as bench  # noqa: E402
import serving_parallel  # noqa: E402
import serving_procs as procs  # noqa: E402
import serving_report as report  # noqa: E402
import serving_workloads as wl  # noqa: E402

W = wl.Workload
TINY_VOCAB = SHAPES["tiny"].vocab_size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model_dir("tiny", tmp_path_factory.mktemp("models") / "tiny")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def test_presets():
    assert wl.PRESETS["anchors"]["full"] == W("shared-prefix", 8, 32, 4096, 64, 1024)  # ANCHORS.md
    assert wl.PRESETS["anchors"]["quick"] == W("shared-prefix", 8, 32, 4096, 64, 128)
    assert wl.PRESETS["smoke"]["full"] == wl.PRESETS["smoke"]["quick"] == W("shared-prefix", 2, 4, 256, 16, 16)
    assert {wl.PRESETS[n]["full"].kind for n in wl.ALL_WORKLOADS} == set(wl.KINDS)
    prefill = wl.PRESETS["prefill-heavy"]["full"]
    assert prefill.num_groups >= 64 and prefill.output_len <= 16
    for name in wl.ALL_WORKLOADS:
        full, quick = wl.PRESETS[name]["full"], wl.PRESETS[name]["quick"]
        assert wl.estimate_seconds(quick) <= wl.estimate_seconds(full) and quick.kind == full.kind


def test_overrides_apply_where_the_kind_uses_the_field():
    overrides = {"num_groups": 3, "prompts_per_group": 5, "question_len": 7, "fewshot_len": 11,
                 "system_prompt_len": None, "range_ratio": 0.5}
    got = {n: wl.resolve_workload(n, "quick", overrides) for n in wl.ALL_WORKLOADS}
    assert got["anchors"] == W("shared-prefix", 3, 5, 4096, 7, 128)
    assert got["multi-level"] == W("multi-level", 3, 5, 2048, 7, 128, fewshot_len=11)
    assert got["parallel-sampling"] == W("parallel-sampling", 3, 5, 2048, 0, 128)
    assert got["no-sharing"] == W("no-sharing", 3, 1, 0, 7, 128, range_ratio=0.5)
    with pytest.raises(KeyError, match="known"):
        wl.resolve_workload("nope")
    with pytest.raises(ValueError, match="output_len"):
        wl.resolve_workload("smoke", overrides={"output_len": 0})


@pytest.mark.parametrize("bad", [
    dict(kind="nope"), dict(question_len=0), dict(fewshot_len=5), dict(range_ratio=0.5),
    dict(kind="multi-level"), dict(kind="multi-level", fewshot_len=8, output_len=3),
    dict(kind="parallel-sampling"), dict(kind="no-sharing"), dict(num_groups=0),
])
def test_invalid_workloads_raise(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(W("shared-prefix", 2, 4, 256, 16, 16), **bad)


@pytest.mark.parametrize("w, expected, distinct", [
    (W("shared-prefix", 3, 5, 37, 17, 9), 15 * 54, 3 * 37 + 15 * 17),
    (W("multi-level", 3, 5, 37, 17, 9, fewshot_len=11), 15 * 65, 37 + 3 * 11 + 15 * 17),
    (W("parallel-sampling", 3, 5, 37, 0, 9), 15 * 37, 3 * 37),
    (W("no-sharing", 4, 1, 0, 100, 9, range_ratio=0.5), None, 300),
])
def test_token_counts(w, expected, distinct):
    assert wl.expected_input_tokens(w) == expected
    assert wl.distinct_prompt_tokens(w) == distinct


def _prefix_count(seqs: list[list[int]], n: int) -> int:
    return len({tuple(s[:n]) for s in seqs})


@pytest.mark.parametrize("w", [wl.PRESETS[n]["quick"] for n in wl.ALL_WORKLOADS])
def test_warmup_bodies_have_the_workloads_shape(w):
    bodies = wl.warmup_bodies(w, seed=5, vocab_size=TINY_VOCAB)
    ww = wl.warmup_workload(w)
    ids = [b["input_ids"] for b in bodies]
    assert all(3 <= t < TINY_VOCAB for s in ids for t in s)
    assert all(b["sampling_params"]["max_new_tokens"] == ww.output_len <= 16 for b in bodies)
    assert all(b["sampling_params"]["ignore_eos"] for b in bodies)
    assert wl.warmup_bodies(w, 5, TINY_VOCAB) == bodies != wl.warmup_bodies(w, 6, TINY_VOCAB)
    if w.kind == "parallel-sampling":
        assert len(bodies) == ww.num_groups and {b["sampling_params"]["n"] for b in bodies} == {ww.prompts_per_group}
        assert {len(s) for s in ids} == {w.system_prompt_len}
    elif w.kind == "no-sharing":
        assert len(bodies) == ww.num_groups and _prefix_count(ids, 8) == len(ids)
        assert all(w.question_len * w.range_ratio <= len(s) <= w.question_len for s in ids)
    else:
        s, f, q = w.system_prompt_len, w.fewshot_len, w.question_len
        assert len(bodies) == ww.num_requests == 8 and {len(x) for x in ids} == {s + f + q}
        assert _prefix_count(ids, s) == (1 if w.kind == "multi-level" else ww.num_groups)
        assert _prefix_count(ids, s + f) == ww.num_groups and _prefix_count(ids, s + f + q) == len(ids)


def _parse_with_sglang_client(argv: list[str], monkeypatch) -> argparse.Namespace:
    from sglang.benchmark import serving

    captured = {}
    monkeypatch.setattr(serving, "run_benchmark", lambda args: captured.setdefault("args", args))
    monkeypatch.setattr(sys, "argv", ["serving", *argv])
    serving.cli_main()
    return captured["args"]


@pytest.mark.parametrize("name", ["anchors", "multi-level", "no-sharing"])
def test_client_jobs_parsed_by_sglang_client(name, tmp_path, monkeypatch):
    w = wl.resolve_workload(name, "quick")
    job = wl.client_job(w, model_dir=tmp_path, tokenizer=tmp_path / "tok", port=30017, seed=7,
                        output_file=tmp_path / "r.jsonl", dataset_file=tmp_path / "d.jsonl",
                        extra_args=["--flush-cache"])
    assert job["client"] == "sglang"
    args = _parse_with_sglang_client(job["argv"], monkeypatch)
    assert (args.backend, args.host, args.port, args.num_prompts, args.seed) == (
        "sglang", "127.0.0.1", 30017, w.num_requests, 7)
    assert args.request_rate == float("inf") and args.warmup_requests == 0 and args.flush_cache
    assert (args.tokenizer, args.output_file) == (str(tmp_path / "tok"), str(tmp_path / "r.jsonl"))
    if w.kind == "shared-prefix":
        assert (args.dataset_name, args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
                args.gsp_question_len, args.gsp_output_len, args.gsp_range_ratio) == (
            "generated-shared-prefix", 8, 32, 4096, 64, 128, 1.0)
    elif w.kind == "multi-level":
        assert (args.dataset_name, args.dataset_path, args.sharegpt_output_len) == (
            "custom", str(tmp_path / "d.jsonl"), w.output_len)
    else:
        assert (args.dataset_name, args.random_input_len, args.random_output_len, args.random_range_ratio) == (
            "random-ids", w.question_len, w.output_len, w.range_ratio)
    command = wl.job_command("py", job)
    assert command[:3] == ["py", "-m", "sglang.benchmark.serving"] and command[3:] == job["argv"]


def test_parallel_job_parsed_by_its_client(tmp_path):
    w = W("parallel-sampling", 3, 5, 37, 0, 9)
    job = wl.client_job(w, model_dir=tmp_path, tokenizer=tmp_path, port=1, seed=7, output_file=tmp_path / "r")
    args = serving_parallel.build_parser().parse_args(job["argv"])
    assert (job["client"], args.num_prompts, args.n, args.prompt_len, args.output_len, args.seed) == (
        "parallel", 3, 5, 37, 9, 7)
    assert wl.job_command("py", job)[1].endswith("scripts/serving_parallel.py")


def test_multilevel_dataset_read_by_sglang_custom_loader(tiny, tmp_path):
    """The stock loader reads our file back with the exact prompt lengths and the tree of prefixes."""
    import random

    from sglang.benchmark.datasets.custom import sample_custom_requests
    from sglang.benchmark.utils import get_tokenizer

    w = W("multi-level", 3, 5, 37, 17, 9, fewshot_len=11)
    tok = get_tokenizer(str(tokenizer_dir(tiny)))
    path = wl.write_multilevel_dataset(w, 3, tok, tmp_path / "ml.jsonl")
    random.seed(1)
    rows = sample_custom_requests(str(path), w.num_requests, tok, fixed_output_len=w.output_len)
    assert len(rows) == 15 and {(r.prompt_len, r.output_len) for r in rows} == {(65, 9)}
    ids = [tok.encode(r.prompt) for r in rows]
    assert (_prefix_count(ids, 37), _prefix_count(ids, 48), _prefix_count(ids, 65)) == (1, 3, 15)
    assert path.read_text() == wl.write_multilevel_dataset(w, 3, tok, tmp_path / "again.jsonl").read_text()


def test_dataset_cache_files(tmp_path):
    cache = tmp_path / ".cache" / "sglang" / "benchmark"
    cache.mkdir(parents=True)
    hit = cache / "gen_shared_prefix_1_2_4_256_16_16_TokenizersBackend.pkl"
    for path in (hit, cache / "gen_shared_prefix_1_2_4_256_16_17_TokenizersBackend.pkl"):
        path.write_bytes(b"")
    smoke = wl.PRESETS["smoke"]["full"]
    assert wl.dataset_cache_files(smoke, 1, home=tmp_path) == [hit]
    assert wl.dataset_cache_files(smoke, 2, home=tmp_path) == []
    assert wl.dataset_cache_files(wl.PRESETS["no-sharing"]["full"], 1, home=tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Server commands
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["packinfer", "triton", "flashinfer"])
def test_server_argv(backend, tmp_path):
    from sglang.srt.server_args import ServerArgs

    argv = procs.server_argv("py", tmp_path, tmp_path / "tok", backend, 30017, "--mem-fraction-static 0.5")
    assert argv[:3] == ["py", "-m", "sglang.launch_server"] and argv[-2:] == ["--mem-fraction-static", "0.5"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "30017"
    assert ("--radix-cache-backend" in argv) == (backend == "packinfer")
    if backend != "packinfer":  # "packinfer" is a choice only once the plugin has registered it
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        args = parser.parse_args(argv[3:])
        assert (args.attention_backend, args.load_format, args.cuda_graph_backend_prefill) == (
            backend, "dummy", "disabled")
        assert (args.model_path, args.tokenizer_path, args.mem_fraction_static) == (
            str(tmp_path), str(tmp_path / "tok"), 0.5)


@pytest.mark.parametrize("extra", ["--host 0.0.0.0", "--port=1", "--base-url http://x"])
def test_extra_args_may_not_move_host_or_port(extra, tmp_path):
    with pytest.raises(ValueError, match="host and port"):
        procs.server_argv("py", tmp_path, tmp_path, "triton", 1, extra)
    with pytest.raises(ValueError, match="host and port"):
        procs.split_extra_args(extra)


def test_server_env():
    assert procs.server_env("packinfer", True, {"PACKINFER_LOG_EVERY": "10"})["PACKINFER_VERIFY"] == "1"
    assert procs.server_env("packinfer", False)["PACKINFER_VERIFY"] == "0"
    assert not any(k.startswith("PACKINFER_") for k in procs.server_env("triton", True, {"PACKINFER_X": "1"}))
    assert procs.parse_env_pairs(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError):
        procs.parse_env_pairs(["A"])


def test_every_flag_has_help():
    for parser in (bench.build_parser(), serving_parallel.build_parser()):
        assert all(action.help for action in parser._actions)
