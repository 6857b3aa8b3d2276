"""CPU tests of the serving benchmark (scripts.bench_serving and its serving_* modules): workloads
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
from typing import ClassVar

import pytest

from packinfer_sglang.model_dirs import SHAPES, make_model_dir, tokenizer_dir
from scripts import bench_serving as bench
from scripts import serving_parallel, steady_decode
from scripts import serving_procs as procs
from scripts import serving_report as report
from scripts import serving_workloads as wl

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
RUNNER_ARGV = [sys.executable, "-m", bench.CLIENT_RUNNER]  # the client runner, started in wl.REPO_ROOT

W = wl.Workload
TINY_VOCAB = SHAPES["tiny"].vocab_size
SMALL = {"num_groups": 2, "prompts_per_group": 3, "system_prompt_len": 40, "fewshot_len": 20, "question_len": 10,
         "output_len": 8}  # sizes for end-to-end runs on CPU
SIZES = [a for k, v in SMALL.items() for a in ("--" + k.replace("_", "-"), str(v))]


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
    assert {wl.PRESETS[n]["full"].kind for n in wl.ALL_WORKLOADS} == set(wl.KINDS) - {"mixed"}  # mixed: alone
    prefill = wl.PRESETS["prefill-heavy"]["full"]
    assert prefill.num_groups >= 64 and prefill.output_len <= 16
    for name in (*wl.ALL_WORKLOADS, "mixed"):
        full, quick = wl.PRESETS[name]["full"], wl.PRESETS[name]["quick"]
        assert wl.estimate_seconds(quick) <= wl.estimate_seconds(full) and quick.kind == full.kind


def test_mixed_preset_runs_minutes_at_a_finite_rate():
    full, quick = wl.PRESETS["mixed"]["full"], wl.PRESETS["mixed"]["quick"]
    assert (full.num_requests, full.request_rate, quick.num_requests, quick.request_rate) == (1560, 12.0, 960, 16.0)
    # Arrivals plus the last request's decode: two servers and two starts of 90 s fit in 9 minutes.
    assert 120 <= wl.estimate_seconds(full) and 2 * (90 + 8 + wl.estimate_seconds(full)) < 9 * 60
    assert 60 <= wl.estimate_seconds(quick) <= 90
    assert wl.expected_input_tokens(full) is None and "12 requests/s" in full.describe()
    assert wl.rate_arg(full) == "12" and wl.rate_arg(wl.PRESETS["anchors"]["full"]) == "inf"
    # --request-rate overrides every kind but parallel sampling; inf means all at time 0.
    assert wl.resolve_workload("anchors", "quick", {"request_rate": 4.0}).request_rate == 4.0
    assert wl.resolve_workload("anchors", "quick", {"request_rate": float("inf")}).request_rate is None
    assert wl.resolve_workload("parallel-sampling", "quick", {"request_rate": 4.0}).request_rate is None
    with pytest.raises(ValueError, match="request_rate"):
        wl.resolve_workload("mixed", "quick", {"request_rate": float("inf")})
    assert wl.dataset_cache_files(full, 1) == []  # lengths varied: the stock client does not cache them


def test_dry_run_of_compaction_off_and_on_for_the_mixed_workload(tiny, tmp_path, capsys):
    bench.main(["--model-dir", str(tiny), "--backends", "packinfer,packinfer:compact", "--workloads", "mixed",
                "--packinfer-env", "PACKINFER_FRAG_LOG_EVERY=100", "--out-dir", str(tmp_path), "--dry-run"])
    text = capsys.readouterr().out
    plans = [json.loads(m) for m in re.findall(r"^\{\n.*?^\}", text, re.DOTALL | re.MULTILINE)]
    assert [p["backend"] for p in plans] == ["packinfer", "packinfer:compact"]
    assert [p["server_env"].get("PACKINFER_COMPACT") for p in plans] == [None, "1"]
    assert {p["server_env"]["PACKINFER_FRAG_LOG_EVERY"] for p in plans} == {"100"}
    assert plans[0]["server"].replace("30000", "30001") == plans[1]["server"]
    assert "--cuda-graph-backend-decode" not in plans[1]["server"]  # decode CUDA graphs on
    client = plans[1]["clients"]["mixed"]
    assert "--request-rate 12 " in client and "--gsp-group-distribution zipf" in client
    assert "mixed.full.packinfer-compact.jsonl" in client
    args = _args(["--model-dir", str(tiny), "--backends", "packinfer:compact+eager,triton:eager"])
    plans = bench.plan_backends(args, tiny)
    assert plans[0].server_env["PACKINFER_COMPACT"] == "1" and "PACKINFER_COMPACT" not in plans[1].server_env
    assert all(p.server_argv[-2:] == ["--cuda-graph-backend-decode", "disabled"] for p in plans)
    plans = bench.plan_backends(_args(["--model-dir", str(tiny), "--backends", "packinfer:fiprefill"]), tiny)
    argv = plans[0].server_argv
    assert argv[argv.index("--prefill-attention-backend") + 1] == "flashinfer"
    assert argv[argv.index("--attention-backend") + 1] == "packinfer"
    plans = bench.plan_backends(_args(["--model-dir", str(tiny), "--backends", "packinfer:dedup,flashinfer:lpm"]), tiny)
    assert plans[0].server_env["PACKINFER_PREFILL_DEDUP"] == "1" and "--schedule-policy" not in plans[0].server_argv
    argv = plans[1].server_argv
    assert argv[argv.index("--schedule-policy") + 1] == "lpm" and "PACKINFER_PREFILL_DEDUP" not in plans[1].server_env
    for bad in ("triton:compact", "flashinfer:fiprefill", "flashinfer:dedup", "packinfer:fast"):
        with pytest.raises(ValueError, match="variant"):
            bench.plan_backends(_args(["--model-dir", str(tiny), "--backends", bad]), tiny)


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
    {"kind": "nope"}, {"question_len": 0}, {"fewshot_len": 5}, {"range_ratio": 0.5},
    {"kind": "multi-level"}, {"kind": "multi-level", "fewshot_len": 8, "output_len": 3},
    {"kind": "parallel-sampling"}, {"kind": "no-sharing"}, {"num_groups": 0},
    {"kind": "mixed", "request_rate": 8.0}, {"kind": "mixed", "zipf_alpha": 1.1},
    {"zipf_alpha": 1.1}, {"request_rate": 0.0}, {"request_rate": float("inf")},
    {"kind": "mixed", "zipf_alpha": 1.1, "request_rate": 8.0, "fewshot_len": 4},
    {"kind": "no-sharing", "prompts_per_group": 1, "system_prompt_len": 0, "ordered": True},
])
def test_invalid_workloads_raise(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(W("shared-prefix", 2, 4, 256, 16, 16), **bad)


@pytest.mark.parametrize("w, expected, distinct", [
    (W("shared-prefix", 3, 5, 37, 17, 9), 15 * 54, 3 * 37 + 15 * 17),
    (W("multi-level", 3, 5, 37, 17, 9, fewshot_len=11), 15 * 65, 37 + 3 * 11 + 15 * 17),
    (W("parallel-sampling", 3, 5, 37, 0, 9), 15 * 37, 3 * 37),
    (W("no-sharing", 4, 1, 0, 100, 9, range_ratio=0.5), None, 300),
    (W("mixed", 3, 5, 40, 20, 9, range_ratio=0.5, zipf_alpha=1.0, request_rate=2.0), None, (3 * 40 + 15 * 20) * 3 // 4),
])
def test_token_counts(w, expected, distinct):
    assert wl.expected_input_tokens(w) == expected
    assert wl.distinct_prompt_tokens(w) == distinct


def _prefix_count(seqs: list[list[int]], n: int) -> int:
    return len({tuple(s[:n]) for s in seqs})


@pytest.mark.parametrize("w", [wl.PRESETS[n]["quick"] for n in (*wl.ALL_WORKLOADS, "mixed")])
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


@pytest.mark.parametrize("name", ["anchors", "multi-level", "no-sharing", "mixed"])
def test_client_jobs_parsed_by_sglang_client(name, tmp_path, monkeypatch):
    w = wl.resolve_workload(name, "quick")
    job = wl.client_job(w, model_dir=tmp_path, tokenizer=tmp_path / "tok", port=30017, seed=7,
                        output_file=tmp_path / "r.jsonl", dataset_file=tmp_path / "d.jsonl",
                        extra_args=["--flush-cache"])
    assert job["client"] == "sglang"
    args = _parse_with_sglang_client(job["argv"], monkeypatch)
    assert (args.backend, args.host, args.port, args.num_prompts, args.seed) == (
        "sglang", "127.0.0.1", 30017, w.num_requests, 7)
    assert args.request_rate == (w.request_rate or float("inf")) and args.warmup_requests == 0 and args.flush_cache
    assert (args.tokenizer, args.output_file) == (str(tmp_path / "tok"), str(tmp_path / "r.jsonl"))
    if w.kind == "shared-prefix":
        assert (args.dataset_name, args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
                args.gsp_question_len, args.gsp_output_len, args.gsp_range_ratio) == (
            "generated-shared-prefix", 8, 32, 4096, 64, 128, 1.0)
        assert args.gsp_group_distribution == "uniform" and args.gsp_zipf_alpha is None
    elif w.kind == "mixed":  # Poisson arrivals at 16/s of requests drawn by Zipf popularity, shuffled
        assert (args.dataset_name, args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
                args.gsp_question_len, args.gsp_output_len, args.gsp_range_ratio, args.gsp_group_distribution,
                args.gsp_zipf_alpha, args.request_rate, args.gsp_ordered) == (
            "generated-shared-prefix", 160, 6, 2048, 256, 512, 0.25, "zipf", 1.1, 16.0, False)
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
    assert wl.job_command("py", job) == ["py", "-m", "scripts.serving_parallel", *job["argv"]]


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


# ---------------------------------------------------------------------------------------------
# Results, records, merge, tables
# ---------------------------------------------------------------------------------------------


def test_result_keys_are_written_by_both_clients():
    from sglang.benchmark import serving

    source = inspect.getsource(serving.benchmark)
    assert not [key for key in report.RESULT_KEYS if f'"{key}":' not in source]
    metrics_fields = {f.name for f in dataclasses.fields(serving.BenchmarkMetrics)}
    ours = {serving_parallel.RENAMED.get(k, k) for k in metrics_fields} | {"duration"}
    assert set(report.RESULT_KEYS) <= ours


def sample_result(completed=8, total_input_tokens=8 * 272, output_throughput=51.2) -> dict:
    """A JSON line as sglang.benchmark.serving writes it (its ``result`` dict, the keys we read)."""
    result = {"backend": "sglang", "duration": 2.5, "completed": completed,
              "total_input_tokens": total_input_tokens, "total_output_tokens": 128, "request_throughput": 3.2,
              "output_throughput": output_throughput, "total_throughput": 921.6, "max_concurrent_requests": 8}
    for i, stat in enumerate(("mean", "median", "std", "p90", "p95", "p99")):
        result.update({f"{stat}_e2e_latency_ms": 2000.0 + i, f"{stat}_ttft_ms": 100.0 + i,
                       f"{stat}_tpot_ms": 10.0 + i, f"{stat}_itl_ms": 9.0 + i})
    return result


def test_parse_and_read_result(tmp_path):
    row = report.parse_result_line(json.dumps(sample_result()), expected_requests=8)
    assert set(row) == set(report.RESULT_KEYS) | {"status"} and row["status"] == "ok"
    assert (row["median_ttft_ms"], row["p99_ttft_ms"], row["median_itl_ms"], row["p99_itl_ms"]) == (
        101.0, 105.0, 10.0, 14.0)
    assert (row["median_e2e_latency_ms"], row["p99_e2e_latency_ms"]) == (2001.0, 2005.0)
    assert report.parse_result_line(json.dumps(sample_result(completed=7)), 8)["status"] == "incomplete"
    with pytest.raises(ValueError, match="not JSON"):
        report.parse_result_line("Traceback (most recent call last):")
    path = tmp_path / "r.jsonl"
    with pytest.raises(ValueError):
        report.read_result_file(path)
    path.write_text(json.dumps(sample_result(completed=3)) + "\n" + json.dumps(sample_result()) + "\n\n")
    assert report.read_result_file(path, 8)["completed"] == 8


def test_scan_server_log():
    lines = [f"[2026-11-22 05:00:{i:02d}] packinfer: decode step {i}" if i % 2 else f"other packinfer {i}"
             for i in range(20)]
    scan = report.scan_server_log("\n".join(lines + ["packinfer: bare line"]))
    assert scan["log_tail"] == [lines[i] for i in (13, 15, 17, 19)] + ["packinfer: bare line"]
    assert not scan["log_has_traceback"]
    assert report.scan_server_log("[x] packinfer: a\nTraceback (most recent call last):\n") == {
        "log_tail": ["[x] packinfer: a"], "log_has_traceback": True}


_FRAG = ('{{"groups": {g}, "requests": 40, "prefix_runs": {p}, "suffix_runs": 95, "tokens": 70000,'
         ' "runs_per_1k_tokens": 1.5, "batch": 40, "shared_groups": {g}, "prefix_runs_mean": {pm},'
         ' "prefix_runs_max": 3, "suffix_runs_mean": 2.375, "suffix_runs_max": 9}}')


def _frag_log(steps=(100, 200), prefix_means=(1.0, 1.5)) -> str:
    lines = ["[2026-11-22 05:00:00] Decode batch, #running-req: 40, #token: 1",
             ("[2026-11-22 05:00:01] packinfer: decode step 500, batch 40, 3 groups (largest 20), prefix tokens"
              " saved 1, host plan 900 us/step")]
    for step, pm in zip(steps, prefix_means):
        fields = _FRAG.format(g=3, p=int(3 * (pm or 0)), pm="null" if pm is None else pm)
        lines.append(f"[2026-11-22 05:00:02 TP0] packinfer: fragmentation step {step}: {fields}")
    return "\n".join(lines + ["[2026-11-22 05:00:03] packinfer: fragmentation step 300: {\"groups\": 3, \"req"])


def test_fragmentation_series_from_server_log_lines():
    text = _frag_log(prefix_means=(1.0, None))
    series = report.fragmentation_series(text)  # the line cut off at the end is skipped
    assert [(p["step"], p["prefix_runs_mean"], p["suffix_runs_max"], p["batch"]) for p in series] == [
        (100, 1.0, 9, 40), (200, None, 9, 40)]
    assert report.packinfer_stats(text)["fragmentation"] == series
    assert report.packinfer_stats(text)["packinfer_decode_steps"] == 500
    assert report.scan_server_log(text)["log_tail"] == [text.splitlines()[1]]  # the series is kept whole elsewhere
    assert report.fragmentation_series("[t] packinfer: decode step 5, batch 1") == []


def test_fragmentation_plot_and_markdown_line(tmp_path):
    pytest.importorskip("matplotlib")
    w = wl.PRESETS["mixed"]["quick"]
    for backend, means in (("packinfer", (1.0, 2.0)), ("packinfer:compact", (1.0, 1.0))):
        rec = _record("mixed", "quick", backend, 50.0)
        rec["row"].update(report.packinfer_stats(_frag_log(prefix_means=means)))
        report.write_record(tmp_path, rec)
    report.write_record(tmp_path, _record("anchors", "full", "triton", 20.0))  # no series: no panel
    _, files = report.merge_reports(tmp_path, "x")
    assert files[-1] == tmp_path / "x_fragmentation.png" and files[-1].read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "x.md").read_text()
    assert ("packinfer: 2 lines, prefix 1.50 (2.00), suffix 2.38 (2.38); packinfer:compact: 2 lines,"
            " prefix 1.00 (1.00)") in md and w.describe() in md
    rows = json.loads((tmp_path / "x.json").read_text())["tables"][-1]["rows"]
    assert [len(r["fragmentation"]) for r in rows] == [2, 2]
    assert not report.write_fragmentation_plot(tmp_path / "none.png", report.build_tables(
        [_record("anchors", "full", "triton", 20.0)])) and not (tmp_path / "none.png").exists()


def test_ratio_to_best_baseline():
    rows = [{"backend": "packinfer:eager", "status": "ok", "output_throughput": 90.0},
            {"backend": "triton", "status": "ok", "output_throughput": 30.0},
            {"backend": "flashinfer", "status": "ok", "output_throughput": 60.0},
            {"backend": "fa3", "status": "incomplete", "output_throughput": 100.0}]
    assert report.add_baseline_ratio(rows) == "flashinfer"
    assert [r["throughput_vs_best_baseline"] for r in rows] == [1.5, 0.5, 1.0, 100 / 60]
    assert report.add_baseline_ratio(rows, ("triton",)) == "triton"
    assert rows[0]["throughput_vs_best_baseline"] == 3.0
    assert report.add_baseline_ratio(rows[:1]) is None and rows[0]["throughput_vs_best_baseline"] is None


def _record(name, mode, backend, throughput, workload=None, status="ok"):
    w = workload or wl.PRESETS[name][mode]
    row = {**report.parse_result_line(json.dumps(sample_result(output_throughput=throughput))),
           "status": status, "log_has_traceback": False}
    return {"workload_name": name, "mode": mode, "workload": dataclasses.asdict(w), "description": w.describe(),
            "backend": backend, "seed": 1, "environment": {"gpu": "G", "versions": {"sglang": "0.5.17"},
                                                           "date": f"2026-01-0{len(backend) % 9 + 1}"},
            "commands": {"client": "c"}, "row": row}


def test_records_merge_into_one_report_per_workload(tmp_path):
    # Two "invocations": packinfer and triton first, flashinfer later; then triton again (replaces).
    for rec in (_record("anchors", "full", "packinfer", 80.0), _record("anchors", "full", "triton", 20.0),
                _record("no-sharing", "full", "packinfer", 50.0), _record("no-sharing", "full", "triton", 40.0),
                _record("anchors", "quick", "triton", 10.0)):
        report.write_record(tmp_path, rec)
    report.write_record(tmp_path, _record("anchors", "full", "flashinfer", 40.0))
    report.write_record(tmp_path, _record("anchors", "full", "triton", 25.0))
    tables, files = report.merge_reports(tmp_path)
    assert [(t["workload_name"], t["mode"]) for t in tables] == [
        ("anchors", "full"), ("anchors", "quick"), ("no-sharing", "full")]
    anchors = tables[0]
    assert [r["backend"] for r in anchors["rows"]] == ["packinfer", "flashinfer", "triton"]
    assert [r["output_throughput"] for r in anchors["rows"]] == [80.0, 40.0, 25.0]
    assert anchors["best_baseline"] == "flashinfer" and anchors["rows"][0]["throughput_vs_best_baseline"] == 2.0
    assert tables[2]["rows"][0]["throughput_vs_best_baseline"] == 1.25
    saved = json.loads((tmp_path / "serving.json").read_text())
    assert saved["tables"] == json.loads(json.dumps(tables))
    md = (tmp_path / "serving.md").read_text()
    assert md.count("\n## ") == 3 and "## anchors (full)" in md and "best baseline: flashinfer" in md
    assert "| packinfer | ok | 8 | 80.0 | 2.00x |" in md
    assert files[:2] == [tmp_path / "serving.json", tmp_path / "serving.md"]
    # Other sizes under the same name are another table, not mixed rows.
    other = dataclasses.replace(wl.PRESETS["anchors"]["full"], output_len=17)
    report.write_record(tmp_path, _record("anchors", "full", "triton", 1.0, workload=other))
    tables = report.build_tables(report.load_records(tmp_path))  # triton's file replaced; sizes differ
    assert [[r["backend"] for r in t["rows"]] for t in tables if t["workload_name"] == "anchors"] == [
        ["packinfer", "flashinfer"], ["triton"], ["triton"]]


def test_render_table_marks_missing_values():
    rows = [{"backend": "flashinfer", "status": "server_died", "log_has_traceback": True}]
    report.add_baseline_ratio(rows)
    lines = report.render_table(rows).splitlines()
    assert all(line.count("|") == len(report.TABLE_COLUMNS) + 1 for line in lines)
    assert lines[2].startswith("| flashinfer | server_died | - |") and lines[2].endswith("| True |")


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    report.write_record(tmp_path, _record("anchors", "full", "packinfer", 80.0))
    report.write_record(tmp_path, _record("anchors", "full", "triton", 20.0))
    _, files = report.merge_reports(tmp_path, "x")
    assert files[-1] == tmp_path / "x.png" and files[-1].read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# Parallel-sampling client against a fake streaming /generate
# ---------------------------------------------------------------------------------------------


class _StreamingGenerate(BaseHTTPRequestHandler):
    """SGLang's /generate with n > 1 and stream: interleaved cumulative chunks tagged with index;
    sequence i emits its tokens in chunks of (i % 2) + 1."""

    protocol_version = "HTTP/1.0"
    seen: ClassVar[list] = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # /server_info, read by the stock client
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        n, out = body["sampling_params"].get("n", 1), body["sampling_params"]["max_new_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        done = [0] * n
        while min(done) < out:
            for i in range(n):
                if done[i] < out:
                    done[i] = min(out, done[i] + i % 2 + 1)
                    chunk = {"text": " ".join(["w5"] * done[i]), "index": i,
                             "meta_info": {"id": f"r{i}", "completion_tokens": done[i]}}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
            time.sleep(0.002)
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def streaming_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StreamingGenerate)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_parallel_client_against_streaming_server(tiny, tmp_path, streaming_server):
    out = tmp_path / "ps.jsonl"
    result = serving_parallel.main(["--port", str(streaming_server), "--tokenizer", str(tokenizer_dir(tiny)),
                                    "--num-prompts", "3", "--n", "4", "--prompt-len", "17", "--output-len", "6",
                                    "--output-file", str(out)])
    bodies = _StreamingGenerate.seen[-3:]
    assert [b["sampling_params"] for b in bodies] == [
        {"n": 4, "max_new_tokens": 6, "ignore_eos": True, "temperature": 0.0}] * 3 and bodies[0]["stream"]
    assert len({b["text"] for b in bodies}) == 3
    assert (result["completed"], result["total_output_tokens"], result["total_input_tokens"]) == (12, 72, 12 * 17)
    assert result["total_output_tokens_retokenized"] == 72
    assert result["median_ttft_ms"] > 0 and result["p99_itl_ms"] >= result["median_itl_ms"] > 0
    assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(result))
    assert report.parse_result_line(out.read_text().splitlines()[-1], 12)["status"] == "ok"


def test_runner_runs_every_workload_with_the_real_clients(tiny, tmp_path, streaming_server):
    """One client runner process (scripts.serving_client) runs the stock client (three datasets) and
    ours in turn."""
    from sglang.benchmark.utils import get_tokenizer

    tok = tokenizer_dir(tiny)
    runner = procs.ClientRunner(RUNNER_ARGV, bench.CLIENT_ENV, tmp_path / "client.log", wl.REPO_ROOT)
    try:
        for name in wl.ALL_WORKLOADS:
            w = wl.resolve_workload(name, "quick", SMALL)
            dataset = (wl.write_multilevel_dataset(w, 1, get_tokenizer(str(tok)), tmp_path / "ml.jsonl")
                       if w.kind == "multi-level" else None)
            out = tmp_path / f"{name}.jsonl"
            job = wl.client_job(w, model_dir=tiny, tokenizer=tok, port=streaming_server, seed=1,
                                output_file=out, dataset_file=dataset)
            assert runner.run(job, 120) == ("ok", None), (tmp_path / "client.log").read_text()[-3000:]
            row = report.read_result_file(out, w.num_requests)
            assert row["status"] == "ok" and row["total_output_tokens"] <= w.num_requests * w.output_len
            assert row["total_input_tokens"] == (wl.expected_input_tokens(w) or row["total_input_tokens"])
            assert row["median_ttft_ms"] > 0
    finally:
        runner.close()


def test_sample_tracker_spreads_multi_token_chunks():
    tracker = serving_parallel.SampleTracker(2, prompt_len=5, start=10.0)
    for now, i, k in [(10.5, 1, 1), (10.6, 0, 2), (11.0, 1, 3), (11.2, 0, 2), (11.4, 0, 3)]:
        tracker.on_chunk({"text": "w5", "index": i, "meta_info": {"completion_tokens": k}}, now)
    first, second = tracker.finish()
    assert (first.ttft, first.output_len, first.latency) == pytest.approx((0.6, 3, 1.4))
    assert first.itl == pytest.approx([0.8])
    assert (second.ttft, second.output_len) == pytest.approx((0.5, 3)) and second.itl == pytest.approx([0.25, 0.25])
    assert first.success and second.success
    with pytest.raises(RuntimeError, match="server error"):
        tracker.on_chunk({"error": {"message": "x"}}, 12.0)
    assert not any(o.success for o in serving_parallel.SampleTracker(2, 5, 0.0).finish())


# ---------------------------------------------------------------------------------------------
# Client runner and process groups
# ---------------------------------------------------------------------------------------------


def test_client_runner_protocol(tmp_path):
    log = tmp_path / "client.log"
    runner = procs.ClientRunner(RUNNER_ARGV, {}, log, wl.REPO_ROOT)
    try:
        assert runner.run({"client": "nope", "argv": []}, 30) == ("client_failed", "unknown client 'nope'")
        status, error = runner.run({"client": "parallel", "argv": ["--bogus"]}, 30)  # argparse exits 2
        assert (status, error) == ("client_failed", "SystemExit(2)") and runner.alive()
    finally:
        assert runner.close() == 0
    text = log.read_text()
    assert "=== job 1: nope" in text and "=== job 2: parallel --bogus" in text and "arguments are required" in text


def test_client_runner_timeout_stops_it(tmp_path):
    runner = procs.ClientRunner([sys.executable, "-c", "import sys, time\nfor line in sys.stdin: time.sleep(60)"],
                                {}, tmp_path / "log")
    assert runner.run({"client": "sglang", "argv": []}, 0.5) == ("client_timeout", None)
    assert not runner.alive() and procs.group_members(runner.proc.pid) == []


def test_stop_process_group_kills_children_that_ignore_sigterm(tmp_path):
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                " print('up', flush=True); time.sleep(60)")
    parent = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {stubborn!r}]); "
              f"exec({stubborn!r})")
    log = tmp_path / "log"
    proc = procs.start_process([sys.executable, "-c", parent], {}, log)
    deadline = time.monotonic() + 20
    while log.read_text().count("up") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(procs.group_members(proc.pid)) == 2
    assert procs.stop_process_group(proc, grace_s=0.5) == -signal.SIGKILL
    assert procs.group_members(proc.pid) == []


def test_clock_deadline():
    assert bench.Clock(None).fits(1e9)
    clock = bench.Clock(10.0)
    assert clock.fits(9.0) and not clock.fits(11.0)


# ---------------------------------------------------------------------------------------------
# The driver end to end against a fake python
# ---------------------------------------------------------------------------------------------

FAKE_PYTHON = '''#!{python}
"""Imitates `python -m sglang.launch_server` and `python -m scripts.serving_client` (run in the repository root)."""
import http.server, json, os, sys, threading, urllib.request

argv = sys.argv[1:]
SAMPLE = json.loads({sample!r})
LOCK = threading.Lock()  # handler threads print whole lines


def say(text):
    with LOCK:
        print(text, flush=True)


def opt(args, name):
    return args[args.index(name) + 1]


def serve():
    backend, packinfer = opt(argv, "--attention-backend"), "--radix-cache-backend" in argv
    print(f"fake server {{backend}} PACKINFER_VERIFY={{os.environ.get('PACKINFER_VERIFY')}}", flush=True)
    if backend == "dies":
        print("Traceback (most recent call last):\\n  RuntimeError: boom", flush=True)
        sys.exit(3)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, text=""):
            self.send_response(code)
            self.end_headers()
            self.wfile.write(text.encode())

        def do_GET(self):
            if self.path.startswith("/client?workload="):
                name = self.path.split("=")[1]
                say(f"client {{name}}")
                if packinfer:
                    say(f"[2026-01-01 00:00:00] packinfer: decode step, workload {{name}}")
                    say('[2026-01-01 00:00:00] packinfer: fragmentation step 7: {{"suffix_runs_mean": 2.5}}')
            self.reply(200 if self.path == "/health" or self.path.startswith("/client") else 404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/flush_cache":
                say("flush")
                return self.reply(200, "Cache flushed.")
            n = body["sampling_params"].get("n", 1)
            say(f"warmup {{len(body['input_ids'])}} n={{n}}")
            self.reply(200, json.dumps({{"text": "w1"}}))

    http.server.ThreadingHTTPServer(("127.0.0.1", int(opt(argv, "--port"))), Handler).serve_forever()


def input_tokens(job):
    a, get = job["argv"], lambda name: int(opt(job["argv"], name))
    if job["client"] == "parallel":
        return get("--num-prompts") * get("--n") * get("--prompt-len")
    name = opt(a, "--dataset-name")
    if name == "generated-shared-prefix":
        per_request = get("--gsp-system-prompt-len") + get("--gsp-question-len")
        return get("--gsp-num-groups") * get("--gsp-prompts-per-group") * per_request
    if name == "custom":  # our word-level tokenizer: one token per word
        lines = open(opt(a, "--dataset-path")).read().splitlines()[: get("--num-prompts")]
        return sum(len(json.loads(x)["conversations"][0]["content"].split()) for x in lines)
    return get("--num-prompts") * get("--random-input-len")


def client():
    for line in sys.stdin:
        job = json.loads(line)
        a = job["argv"]
        completed = int(opt(a, "--num-prompts")) * (int(opt(a, "--n")) if job["client"] == "parallel" else 1)
        name = os.path.basename(opt(a, "--output-file")).split(".")[0]
        urllib.request.urlopen(f"http://127.0.0.1:{{opt(a, '--port')}}/client?workload={{name}}").read()
        with open(opt(a, "--output-file"), "a") as f:
            f.write(json.dumps(dict(SAMPLE, completed=completed, total_input_tokens=input_tokens(job))) + "\\n")
        print(json.dumps({{"id": job["id"], "ok": True, "error": None}}), flush=True)


if argv[:2] == ["-m", "sglang.launch_server"]:
    serve()
elif argv[:2] == ["-m", "scripts.serving_client"]:
    if not os.path.isfile(os.path.join("scripts", "serving_client.py")):  # run as a module of the checkout
        sys.exit(f"fake python: client runner started outside the repository root, in {{os.getcwd()}}")
    client()
else:
    sys.exit(f"fake python: unexpected {{argv}}")
'''



def _events(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.match(r"(flush|warmup|client) ", line) or line == "flush"]


def test_driver_end_to_end_and_merge_across_invocations(tiny, tmp_path, capsys):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, sample=json.dumps(sample_result())))
    fake.chmod(0o755)
    out, port = tmp_path / "out", _free_port()
    common = ["--model-dir", str(tiny), "--python", str(fake), "--out-dir", str(out), "--server-timeout", "30",
              "--client-timeout", "30", "--stop-grace", "5", *SIZES]
    bench.main([*common, "--backends", "packinfer,dies,triton", "--port", str(port), "--verify"])
    progress = capsys.readouterr().out
    assert "plan (full): 3 server(s) x 5 workload(s)" in progress and "[packinfer] no-sharing (5/5)" in progress
    units = {u.name: u for u in bench.plan_units(_args(common))}
    for backend in ("packinfer", "triton"):
        log = (out / "logs" / f"server_{backend}.log").read_text()
        assert log.count("fake server") == 1  # one start for all five workloads
        expected = []
        for name in wl.ALL_WORKLOADS:
            bodies = wl.warmup_bodies(units[name].workload, 1 + bench.WARMUP_SEED_OFFSET, TINY_VOCAB)
            expected += ["flush"] + sorted(f"warmup {len(b['input_ids'])} n={b['sampling_params'].get('n', 1)}"
                                           for b in bodies) + ["flush", f"client {name}"]
        events = _events(log)
        for i in range(len(events)):  # warmups arrive concurrently: compare them as a multiset
            if events[i].startswith("warmup"):
                j = next(k for k in range(i, len(events)) if not events[k].startswith("warmup"))
                events[i:j] = sorted(events[i:j])
        assert events == expected
    assert "PACKINFER_VERIFY=1" in (out / "logs" / "server_packinfer.log").read_text()
    records = {(r["workload_name"], r["backend"]): r for r in report.load_records(out)}
    assert len(records) == 15
    for name in wl.ALL_WORKLOADS:
        pi, tr, dies = (records[name, b]["row"] for b in ("packinfer", "triton", "dies"))
        assert pi["status"] == tr["status"] == "ok" and pi["flush_ok"] and pi["warmup_failures"] == 0
        assert pi["completed"] == units[name].workload.num_requests
        assert pi["input_tokens_match"] is (None if name == "no-sharing" else True)
        assert pi["log_tail"] == [f"[2026-01-01 00:00:00] packinfer: decode step, workload {name}"]
        assert pi["fragmentation"] == [{"step": 7, "suffix_runs_mean": 2.5}] and "fragmentation" not in tr
        assert "log_tail" not in tr and not pi["log_has_traceback"] and not pi["server_log_has_traceback"]
        assert dies["status"] == "server_died" and dies["server_exit_code"] == 3
        assert "  RuntimeError: boom" in dies["server_log_tail"] and dies["server_log_has_traceback"]
        commands = records[name, "triton"]["commands"]
        assert "PACKINFER_VERIFY" not in commands["server_env"] and "--port" in commands["client"]
        assert set(records[name, "packinfer"]["environment"]) == {"gpu", "versions", "python", "date"}
    assert not any(procs.port_in_use(port + i) for i in range(3))
    # A second invocation adds a backend to one workload; the report holds both runs.
    bench.main([*common, "--backends", "flashinfer", "--workloads", "anchors", "--port", str(port + 3)])
    tables = json.loads((out / "serving.json").read_text())["tables"]
    assert [len(t["rows"]) for t in tables] == [4, 3, 3, 3, 3]
    assert [r["backend"] for r in tables[0]["rows"]] == ["packinfer", "dies", "flashinfer", "triton"]
    assert tables[0]["rows"][0]["throughput_vs_best_baseline"] == 1.0
    md = (out / "serving.md").read_text()
    capsys.readouterr()
    bench.main(["--merge-only", "--out-dir", str(out)])
    assert (out / "serving.md").read_text() == md and "## anchors (full)" in capsys.readouterr().out


def _args(argv: list[str]) -> argparse.Namespace:
    args = bench.build_parser().parse_args(argv)
    args.mode, args.out_dir = "full", args.out_dir.resolve()
    return args


def test_quick_plan_fits_nine_minutes_and_deadline_skips(tiny, tmp_path, capsys):
    bench.main(["--model-dir", str(tiny), "--quick", "--dry-run", "--out-dir", str(tmp_path)])
    text = capsys.readouterr().out
    minutes = float(re.search(r"about ([\d.]+) min", text).group(1))
    assert "deadline 520 s" in text and minutes < 10
    args = _args(["--model-dir", str(tiny), "--quick"])
    args.mode = "quick"
    work = sum(wl.estimate_seconds(u.workload) for u in bench.plan_units(args))
    assert 3 * (120 + args.stop_grace) + work < 9 * 60  # with 2-minute server starts
    # Past the deadline nothing starts and nothing is written.
    bench.main(["--model-dir", str(tiny), "--out-dir", str(tmp_path), "--deadline-s", "1", "--python", "false"])
    text = capsys.readouterr().out
    assert "deadline: server not started" in text and not (tmp_path / "rows").exists()
    assert "skipped for the deadline" in text and "flashinfer/no-sharing" in text


def test_steady_decode_median_at_full_batch_skips_the_ramp_line():
    line = "[t] Decode batch, #running-req: {b}, #token: 1, token usage: 0.1, cuda graph: True, gen throughput (token/s): {r}, #queue-req: 0"
    text = "\n".join(line.format(b=b, r=r) for b, r in [(1, 5.0), (8, 100.0), (8, 10.0), (8, 30.0), (8, 20.0), (4, 9.0)])
    assert report.steady_decode(text) == {"steady_decode_tok_s": 20.0, "steady_decode_batch": 8, "steady_decode_lines": 3}
    assert report.steady_decode("no such lines")["steady_decode_lines"] == 0


def test_steady_decode_script_reads_committed_excerpts(tmp_path):
    archive, out = RESULTS / "archive", tmp_path / "s.json"
    steady_decode.main([str(archive / "serving_anchors_h100.json"), str(archive / "serving_h100_log_excerpts.txt"),
                        "--out", str(out)])
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"triton", "packinfer-eager", "flashinfer"}
    assert all(r["steady_decode_batch"] == 256 and r["steady_decode_lines"] == 24 for r in rows.values())


def test_packinfer_counters_from_its_log_lines():
    text = "\n".join([  # noqa: FLY002 -- one log line per element
        "[t] packinfer: compaction moved 560 tokens of 2 groups (0 skipped); 560 tokens so far",
        ("[t] packinfer: decode step 16, batch 8, 2 groups (largest 4), prefix tokens saved 24576, host plan 5350 us/step, "
         "verified 480 layer-steps, max rel err 1.56e-04"),
        "[t] packinfer: compaction moved 17665 tokens of 8 groups (0 skipped); 18225 tokens so far",
        "[t] packinfer: decode step 32, batch 256, 8 groups (largest 32), prefix tokens saved 1015808, host plan 1414 us/step",
    ])
    assert report.packinfer_stats(text) == {"packinfer_decode_steps": 32, "host_plan_us_per_step": 1414,
                                            "compaction_plans": 2, "compaction_tokens_moved": [560, 17665]}
    verified = report.packinfer_stats(text.rsplit("\n", 1)[0])
    assert verified["verified_layer_steps"] == 480 and verified["verify_max_rel_err"] == 1.56e-4
    assert report.packinfer_stats("[t] Decode batch, #running-req: 8") == {}


def test_counters_of_a_merged_report_keep_each_backends_environment(tmp_path):
    archive, out = RESULTS / "archive", tmp_path / "c.json"
    steady_decode.main([str(archive / "serving_full_h100.json"), str(archive / "serving_full_h100_log_excerpts.txt"),
                        "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["environment"]) == {"packinfer", "triton", "flashinfer"}
    rows = {r["backend"]: r for r in data["rows"]}
    assert rows["packinfer"]["host_plan_us_per_step"] == 1497 and "host_plan_us_per_step" not in rows["triton"]


def test_burst_workload_keeps_groups_together():
    burst, shuffled = wl.PRESETS["prefill-burst-512"]["full"], wl.PRESETS["prefill-heavy-512"]["full"]
    assert burst.ordered and dataclasses.replace(burst, ordered=False) == shuffled
    assert "burst" in burst.describe()
    jobs = [wl.client_job(w, model_dir=Path("m"), tokenizer=Path("t"), port=1, seed=0, output_file=Path("o"))
            for w in (burst, shuffled)]
    assert "--gsp-ordered" in jobs[0]["argv"] and "--gsp-ordered" not in jobs[1]["argv"]
