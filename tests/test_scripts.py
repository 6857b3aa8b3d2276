"""CPU tests of scripts/make_model_dir.py, packinfer_sglang.model_dirs and the pure parts of
scripts/bench_serving.py; the process handling runs against a fake ``python`` that imitates the
SGLang server and benchmark client."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import random
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import transformers

from packinfer_sglang.model_dirs import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    SHAPES,
    SPECIAL_TOKENS,
    make_model_dir,
    tokenizer_dir,
)

REPO = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = _load_script("bench_serving")
make_script = _load_script("make_model_dir")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {shape: make_model_dir(shape, root / shape) for shape in SHAPES}


@pytest.fixture(scope="module")
def tokenizers(model_dirs) -> dict:
    load = transformers.AutoTokenizer.from_pretrained
    return {shape: load(tokenizer_dir(d)) for shape, d in model_dirs.items()}


# ---------------------------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_config_matches_shape(model_dirs, shape):
    s, config = SHAPES[shape], transformers.AutoConfig.from_pretrained(model_dirs[shape])
    assert config.architectures == [s.architecture] and config.model_type == s.model_type
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        s.hidden_size, s.num_layers, s.intermediate_size)
    assert (config.num_attention_heads, config.num_key_value_heads) == (s.num_qo_heads, s.num_kv_heads)
    assert config.hidden_size // config.num_attention_heads == s.head_dim
    assert (config.vocab_size, config.max_position_embeddings) == (s.vocab_size, s.max_position_embeddings)
    assert config.rope_parameters["rope_theta"] == s.rope_theta
    assert str(config.dtype) == "torch.bfloat16"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sglang_model_config_parses(model_dirs, shape):
    from sglang.srt.configs.model_config import ModelConfig

    s, config = SHAPES[shape], ModelConfig(model_path=str(model_dirs[shape]))
    assert (config.num_attention_heads, config.get_num_kv_heads(1), config.head_dim) == (
        s.num_qo_heads, s.num_kv_heads, s.head_dim)
    assert (config.num_hidden_layers, config.vocab_size, config.context_len) == (
        s.num_layers, s.vocab_size, s.max_position_embeddings)
    assert str(config.dtype) == "torch.bfloat16"


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("num_words", [1, 17, 37, 4096])
def test_random_words_encode_to_one_token_each(tokenizers, shape, num_words):
    tok, rng = tokenizers[shape], random.Random(num_words)
    words = [f"w{rng.randrange(SHAPES[shape].vocab_size - len(SPECIAL_TOKENS))}" for _ in range(num_words)]
    ids = tok.encode(" ".join(words))  # no BOS/EOS added: exactly one id per word
    assert len(ids) == num_words
    assert tok.convert_ids_to_tokens(ids) == words


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_decode_encode_round_trip_over_whole_vocab(tokenizers, shape):
    """What the benchmark's gen_prompt does: decode random ids (special ones included), re-encode."""
    tok = tokenizers[shape]
    assert len(tok) == SHAPES[shape].vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    ids = random.Random(shape).choices(range(len(tok)), k=1000) + [0, 1, 2, len(tok) - 1]
    assert tok.encode(tok.decode(ids)) == ids


@pytest.mark.parametrize("shape", ["tiny", "qwen2.5-7b"])
def test_sglang_loaders_and_gsp_prompt_lengths(model_dirs, shape):
    """SGLang's server loader and the client's loader + gen_prompt give exact prompt lengths,
    including the system prompt + "\\n\\n" + question join of generated-shared-prefix."""
    from sglang.benchmark.datasets.common import gen_prompt
    from sglang.benchmark.utils import get_tokenizer as client_tokenizer
    from sglang.srt.utils.hf_transformers.tokenizer import get_tokenizer as server_tokenizer

    path = str(tokenizer_dir(model_dirs[shape]))
    server, client = server_tokenizer(path), client_tokenizer(path)
    random.seed(0)
    prompt = f"{gen_prompt(client, 300)}\n\n{gen_prompt(client, 17)}"
    assert len(client.encode(prompt)) == 317
    assert server.encode(prompt) == client.encode(prompt)


def test_make_model_dir_cli(tmp_path, capsys):
    make_script.main(["--shape", "tiny", "--out", str(tmp_path / "tiny")])
    root = tmp_path / "tiny"
    names = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert names == {"config.json", "generation_config.json", "tokenizer/tokenizer.json",
                     "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"}
    assert "LlamaForCausalLM" in capsys.readouterr().out


def test_every_flag_has_help():
    for parser in (make_script.build_parser(), bench.build_parser()):
        for action in parser._actions:
            assert action.help, f"{action.option_strings} has no help"


# ---------------------------------------------------------------------------------------------
# bench_serving: pure parts
# ---------------------------------------------------------------------------------------------

SMOKE = bench.WORKLOADS["smoke"]


def test_workload_presets_and_overrides():
    assert bench.WORKLOADS["anchors"] == bench.Workload(8, 32, 4096, 64, 1024)
    assert bench.WORKLOADS["short"] == bench.Workload(8, 32, 4096, 64, 128)
    assert SMOKE == bench.Workload(2, 4, 256, 16, 16)
    w = bench.resolve_workload("anchors", {"output_len": 17, "num_groups": None, "question_len": 1})
    assert w == bench.Workload(8, 32, 4096, 1, 17) and w.num_requests == 256
    assert bench.expected_input_tokens(w) == 256 * 4097
    with pytest.raises(KeyError, match="known"):
        bench.resolve_workload("nope", {})
    with pytest.raises(ValueError, match="output_len"):
        bench.resolve_workload("smoke", {"output_len": 0})


def _server_parser():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.mark.parametrize("backend", ["packinfer", "triton", "flashinfer"])
def test_server_argv(backend, tmp_path):
    argv = bench.server_argv("py", tmp_path, tmp_path / "tok", backend, 30017, "--mem-fraction-static 0.5")
    assert argv[:3] == ["py", "-m", "sglang.launch_server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "30017"
    assert argv[-2:] == ["--mem-fraction-static", "0.5"]
    assert ("--radix-cache-backend" in argv) == (backend == "packinfer")
    if backend != "packinfer":  # "packinfer" is a choice only once the plugin has registered it
        args = _server_parser().parse_args(argv[3:])
        assert (args.attention_backend, args.load_format, args.cuda_graph_backend_prefill) == (
            backend, "dummy", "disabled")
        assert (args.model_path, args.tokenizer_path, args.mem_fraction_static) == (
            str(tmp_path), str(tmp_path / "tok"), 0.5)
    else:
        assert argv[argv.index("--radix-cache-backend") + 1] == "packinfer"


@pytest.mark.parametrize("extra", ["--host 0.0.0.0", "--port=1", "--base-url http://x"])
def test_extra_args_may_not_move_host_or_port(extra, tmp_path):
    with pytest.raises(ValueError, match="host and port"):
        bench.server_argv("py", tmp_path, tmp_path, "triton", 1, extra)
    with pytest.raises(ValueError, match="host and port"):
        bench.client_argv("py", tmp_path, tmp_path, 1, SMOKE, 1, tmp_path / "r", extra_args=extra)


def test_server_env():
    assert bench.server_env("packinfer", True, {"PACKINFER_LOG_EVERY": "10"})["PACKINFER_VERIFY"] == "1"
    assert bench.server_env("packinfer", False)["PACKINFER_VERIFY"] == "0"
    assert not any(k.startswith("PACKINFER_") for k in bench.server_env("triton", True, {"PACKINFER_X": "1"}))
    assert bench.parse_env_pairs(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError):
        bench.parse_env_pairs(["A"])


def test_client_argv_parsed_by_sglang_client(tmp_path, monkeypatch):
    """The real sglang.benchmark.serving parser accepts our argv and reads the workload from it."""
    from sglang.benchmark import serving

    w = bench.Workload(3, 5, 37, 17, 9)
    argv = bench.client_argv("py", tmp_path, tmp_path / "tok", 30017, w, 7, tmp_path / "r.jsonl",
                             extra_args="--flush-cache")
    captured = {}
    monkeypatch.setattr(serving, "run_benchmark", lambda args: captured.setdefault("args", args))
    monkeypatch.setattr(sys, "argv", ["serving"] + argv[3:])
    serving.cli_main()
    args = captured["args"]
    assert (args.backend, args.host, args.port, args.dataset_name) == (
        "sglang", "127.0.0.1", 30017, "generated-shared-prefix")
    assert (args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
            args.gsp_question_len, args.gsp_output_len, args.gsp_range_ratio) == (3, 5, 37, 17, 9, 1.0)
    assert args.request_rate == float("inf") and args.seed == 7 and args.flush_cache
    assert (args.tokenizer, args.output_file) == (str(tmp_path / "tok"), str(tmp_path / "r.jsonl"))


def test_result_keys_are_written_by_sglang_client():
    from sglang.benchmark import serving

    source = inspect.getsource(serving.benchmark)
    missing = [key for key in bench.RESULT_KEYS if f'"{key}":' not in source]
    assert not missing, f"sglang.benchmark.serving no longer writes {missing}"


def sample_result(completed=8, total_input_tokens=8 * 272) -> dict:
    """A JSON line as sglang.benchmark.serving writes it (its ``result`` dict, all keys)."""
    keys = ("mean", "median", "std", "p90", "p95", "p99")
    result = {
        "tag": None, "backend": "sglang", "dataset_name": "generated-shared-prefix",
        "request_rate": float("inf"),
        "max_concurrency": None, "sharegpt_output_len": None, "random_input_len": 1024,
        "random_output_len": 1024, "random_range_ratio": 0.0, "server_info": {"version": "0.5.17"},
        "duration": 2.5, "completed": completed, "total_input_tokens": total_input_tokens,
        "total_input_text_tokens": total_input_tokens, "total_input_vision_tokens": 0,
        "total_output_tokens": 128, "total_output_tokens_retokenized": 128, "request_throughput": 3.2,
        "input_throughput": 870.4, "output_throughput": 51.2, "total_throughput": 921.6,
        "concurrency": 7.9, "accept_length": None, "max_output_tokens_per_s": 64.0,
        "max_concurrent_requests": 8,
    }
    for i, stat in enumerate(keys):
        result.update({f"{stat}_e2e_latency_ms": 2000.0 + i, f"{stat}_ttft_ms": 100.0 + i,
                       f"{stat}_tpot_ms": 10.0 + i, f"{stat}_itl_ms": 9.0 + i})
    return result


def test_parse_result_line():
    row = bench.parse_result_line(json.dumps(sample_result()), expected_requests=8)
    assert set(row) == set(bench.RESULT_KEYS) | {"status"}
    assert row["status"] == "ok" and row["output_throughput"] == 51.2
    assert (row["median_ttft_ms"], row["p99_ttft_ms"], row["median_itl_ms"], row["p99_itl_ms"]) == (
        101.0, 105.0, 10.0, 14.0)
    assert (row["median_e2e_latency_ms"], row["p99_e2e_latency_ms"]) == (2001.0, 2005.0)
    assert bench.parse_result_line(json.dumps(sample_result(completed=7)), 8)["status"] == "incomplete"
    with pytest.raises(ValueError, match="not JSON"):
        bench.parse_result_line("Traceback (most recent call last):")


def test_read_result_file_takes_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(ValueError):
        bench.read_result_file(path)
    path.write_text(json.dumps(sample_result(completed=3)) + "\n" + json.dumps(sample_result()) + "\n\n")
    assert bench.read_result_file(path, 8)["completed"] == 8


def test_scan_server_log():
    lines = [f"[packinfer] step {i}" if i % 2 else f"other {i}" for i in range(20)]
    scan = bench.scan_server_log("\n".join(lines))
    assert scan["log_tail"] == [f"[packinfer] step {i}" for i in (11, 13, 15, 17, 19)]
    assert not scan["log_has_traceback"]
    scan = bench.scan_server_log("PackInfer x\nTraceback (most recent call last):\n")
    assert scan == {"log_tail": ["PackInfer x"], "log_has_traceback": True}


def test_render_table_and_baseline_ratio():
    rows = [{"backend": "packinfer", **bench.parse_result_line(json.dumps(sample_result()), 8),
             "log_has_traceback": False},
            {"backend": "triton", "status": "ok", "output_throughput": 25.6, "log_has_traceback": False},
            {"backend": "flashinfer", "status": "server_died", "log_has_traceback": True}]
    bench.add_baseline_ratio(rows, "triton")
    assert [r["throughput_vs_baseline"] for r in rows] == [2.0, 1.0, None]
    lines = bench.render_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == len(bench.TABLE_COLUMNS) + 1 for line in lines)
    assert lines[2].split("|")[1:6] == [" packinfer ", " ok ", " 8 ", " 51.2 ", " 2.00x "]
    assert lines[4].startswith("| flashinfer | server_died | - |") and lines[4].endswith("| True |")


def test_dataset_cache_files(tmp_path):
    cache = tmp_path / ".cache" / "sglang" / "benchmark"
    cache.mkdir(parents=True)
    hit = cache / "gen_shared_prefix_1_2_4_256_16_16_TokenizersBackend.pkl"
    for path in (hit, cache / "gen_shared_prefix_1_2_4_256_16_17_TokenizersBackend.pkl"):
        path.write_bytes(b"")
    assert bench.dataset_cache_files(SMOKE, 1, home=tmp_path) == [hit]
    assert bench.dataset_cache_files(SMOKE, 2, home=tmp_path) == []


# ---------------------------------------------------------------------------------------------
# bench_serving: process handling against a fake python
# ---------------------------------------------------------------------------------------------

FAKE_PYTHON = '''#!{python}
"""Imitates `python -m sglang.launch_server` and `python -m sglang.benchmark.serving`."""
import http.server, json, os, sys

argv = sys.argv[1:]
opt = lambda name: argv[argv.index(name) + 1]
if argv[1] == "sglang.launch_server":
    backend = opt("--attention-backend")
    print(f"fake server {{backend}} PACKINFER_VERIFY={{os.environ.get('PACKINFER_VERIFY')}}", flush=True)
    if backend == "dies":
        print("Traceback (most recent call last):\\n  RuntimeError: boom", flush=True)
        sys.exit(3)
    for i in range(7):
        print(f"[packinfer] decode step {{i}} radix={{opt('--radix-cache-backend')}}"
              if "--radix-cache-backend" in argv else f"step {{i}}", flush=True)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", int(opt("--port"))), Health).serve_forever()
else:
    groups, per_group = int(opt("--gsp-num-groups")), int(opt("--gsp-prompts-per-group"))
    prompt_len = int(opt("--gsp-system-prompt-len")) + int(opt("--gsp-question-len"))
    result = dict(json.loads({sample!r}), completed=groups * per_group,
                  total_input_tokens=groups * per_group * prompt_len)
    with open(opt("--output-file"), "a") as f:
        f.write(json.dumps(result) + "\\n")
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_main_runs_backends_and_survives_a_dead_server(model_dirs, tmp_path, capsys):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, sample=json.dumps(sample_result())))
    fake.chmod(0o755)
    out, port = tmp_path / "out", _free_port()
    bench.main(["--model-dir", str(model_dirs["tiny"]), "--python", str(fake),
                "--backends", "packinfer,dies,triton",
                "--workload", "smoke", "--out-dir", str(out), "--port", str(port), "--verify",
                "--server-timeout", "30", "--client-timeout", "30"])
    report = json.loads((out / "serving_smoke.json").read_text())
    packinfer, dies, triton = report["rows"]
    assert packinfer["status"] == triton["status"] == "ok" and packinfer["completed"] == 8
    assert packinfer["input_tokens_match"] and packinfer["throughput_vs_baseline"] == 1.0
    assert packinfer["log_tail"] == [f"[packinfer] decode step {i} radix=packinfer" for i in range(2, 7)]
    assert "log_tail" not in triton and not packinfer["log_has_traceback"]
    assert dies["status"] == "server_died" and dies["server_exit_code"] == 3 and dies["log_has_traceback"]
    assert "  RuntimeError: boom" in dies["server_log_tail"]
    assert "PACKINFER_VERIFY=1" in (out / "server_smoke_packinfer.log").read_text()
    assert "PACKINFER_VERIFY" not in report["commands"]["triton"]["server_env"]
    assert report["commands"]["dies"]["server"].startswith(f"{fake} -m sglang.launch_server")
    assert set(report["environment"]) == {"gpu", "versions", "python", "date"}
    table = capsys.readouterr().out.strip().splitlines()[-5:]
    assert table == bench.render_table(report["rows"]).splitlines()
    assert (out / "serving_smoke.md").read_text().endswith("\n".join(table) + "\n")
    assert not any(bench.port_in_use(port + i) for i in range(3))


def test_stop_process_group_kills_children_that_ignore_sigterm(tmp_path):
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                " print('up', flush=True); time.sleep(60)")
    parent = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {stubborn!r}]); "
              f"exec({stubborn!r})")
    log = tmp_path / "log"
    proc = bench.start_process([sys.executable, "-c", parent], {}, log)
    deadline = time.monotonic() + 20
    while log.read_text().count("up") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(bench.group_members(proc.pid)) == 2
    assert bench.stop_process_group(proc, grace_s=0.5) == -signal.SIGKILL
    assert bench.group_members(proc.pid) == []
