"""End-to-end serving benchmark: one SGLang server per attention backend, SGLang's own client.

For each backend in ``--backends`` this starts ``python -m sglang.launch_server`` on a weightless
model directory (``--load-format dummy``; see ``scripts/make_model_dir.py``), waits for
``/health``, runs ``python -m sglang.benchmark.serving --dataset-name generated-shared-prefix``
against it with every request sent at time 0, stops the server (SIGTERM to its process group, then
SIGKILL) and reads the client's JSONL result into one row. A server that dies or never becomes
healthy is reported (exit code, last log lines) and the next backend runs.

Workload (``--workload``; every field can be overridden by its flag): ``num_groups`` groups of
``prompts_per_group`` prompts; each prompt is a group's system prompt (``system_prompt_len``
tokens, shared) followed by its own question (``question_len`` tokens); each request generates
exactly ``output_len`` tokens (EOS ignored). Prompt tokens sent:
``num_groups * prompts_per_group * (system_prompt_len + question_len)``, of which
``num_groups * system_prompt_len`` are distinct prefix tokens.

Outputs under ``--out-dir``: ``serving_<workload>.json`` (environment, exact commands, rows),
``serving_<workload>.md`` (the table), per backend ``server_<workload>_<backend>.log``,
``client_<workload>_<backend>.log`` and ``.jsonl``. Runs on a GPU host only; ``--dry-run`` prints
the commands anywhere.

    python scripts/make_model_dir.py --shape llama-3-8b --out models/llama-3-8b
    python scripts/bench_serving.py --model-dir models/llama-3-8b --workload anchors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HOST = "127.0.0.1"  # never anything else
PACKINFER = "packinfer"
LOG_TAIL_LINES = 30  # server log lines kept in a row when the server fails
PACKINFER_LOG_LINES = 5  # last lines mentioning packinfer kept in a packinfer row
VERSION_PACKAGES = ("torch", "triton", "sglang", "flashinfer-python", "transformers")


@dataclass(frozen=True)
class Workload:
    """A generated-shared-prefix workload; lengths in tokens."""

    num_groups: int
    prompts_per_group: int
    system_prompt_len: int
    question_len: int
    output_len: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1, got {getattr(self, f.name)}")

    @property
    def num_requests(self) -> int:
        return self.num_groups * self.prompts_per_group


WORKLOADS = {
    "anchors": Workload(num_groups=8, prompts_per_group=32, system_prompt_len=4096, question_len=64, output_len=1024),
    "short": Workload(num_groups=8, prompts_per_group=32, system_prompt_len=4096, question_len=64, output_len=128),
    "smoke": Workload(num_groups=2, prompts_per_group=4, system_prompt_len=256, question_len=16, output_len=16),
}

# Keys of the JSON line sglang.benchmark.serving appends to --output-file (its ``result`` dict);
# times in milliseconds, throughputs in tokens (or requests) per second, duration in seconds.
RESULT_KEYS = (
    "completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
    "p99_itl_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms", "max_concurrent_requests",
)

# (header, row key, format) of the Markdown table.
TABLE_COLUMNS = (
    ("backend", "backend", "{}"), ("status", "status", "{}"), ("done", "completed", "{}"),
    ("out tok/s", "output_throughput", "{:.1f}"), ("vs base", "throughput_vs_baseline", "{:.2f}x"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.1f}"), ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("ITL p50 ms", "median_itl_ms", "{:.2f}"), ("ITL p99 ms", "p99_itl_ms", "{:.2f}"),
    ("E2E p50 ms", "median_e2e_latency_ms", "{:.0f}"), ("E2E p99 ms", "p99_e2e_latency_ms", "{:.0f}"),
    ("traceback", "log_has_traceback", "{}"),
)


def resolve_workload(name: str, overrides: dict[str, int | None]) -> Workload:
    """The preset ``name`` with every non-None entry of ``overrides`` replacing its field."""
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    return dataclasses.replace(WORKLOADS[name], **{k: v for k, v in overrides.items() if v is not None})


def server_argv(python: str, model_dir: Path, tokenizer: Path, backend: str, port: int,
                extra_args: str = "") -> list[str]:
    """argv of ``sglang.launch_server`` for one backend; ``extra_args`` is shlex-split and appended."""
    argv = [
        python, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--tokenizer-path", str(tokenizer),
        "--load-format", "dummy", "--attention-backend", backend,
    ]
    if backend == PACKINFER:
        argv += ["--radix-cache-backend", PACKINFER]
    argv += ["--port", str(port), "--host", HOST, "--cuda-graph-backend-prefill", "disabled"]
    return argv + shlex.split(extra_args)


def server_env(backend: str, verify: bool, packinfer_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables added to the server's for ``backend`` (PACKINFER_* only for packinfer)."""
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if backend == PACKINFER:
        env["PACKINFER_VERIFY"] = "1" if verify else "0"
        env.update(packinfer_env or {})
    return env


def client_argv(python: str, model_dir: Path, tokenizer: Path, port: int, workload: Workload, seed: int,
                output_file: Path, request_rate: str = "inf", extra_args: str = "") -> list[str]:
    """argv of ``sglang.benchmark.serving`` for ``workload``; ``request_rate`` "inf" sends all at time 0."""
    w = workload
    argv = [
        python, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--host", HOST, "--port", str(port),
        "--model", str(model_dir), "--tokenizer", str(tokenizer), "--dataset-name", "generated-shared-prefix",
        "--gsp-num-groups", str(w.num_groups), "--gsp-prompts-per-group", str(w.prompts_per_group),
        "--gsp-system-prompt-len", str(w.system_prompt_len), "--gsp-question-len", str(w.question_len),
        "--gsp-output-len", str(w.output_len), "--gsp-range-ratio", "1.0", "--num-prompts", str(w.num_requests),
        "--request-rate", request_rate, "--seed", str(seed), "--output-file", str(output_file), "--disable-tqdm",
    ]
    return argv + shlex.split(extra_args)


def parse_result_line(line: str, expected_requests: int | None = None) -> dict:
    """Row fields (``RESULT_KEYS``) from one JSON line of the client; ``status`` "incomplete" when
    fewer than ``expected_requests`` completed. Raises ``ValueError`` on malformed JSON."""
    try:
        result = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"client result is not JSON: {line[:200]!r}") from exc
    row = {key: result.get(key) for key in RESULT_KEYS}
    complete = expected_requests is None or (row["completed"] or 0) >= expected_requests
    row["status"] = "ok" if complete else "incomplete"
    return row


def read_result_file(path: Path, expected_requests: int | None = None) -> dict:
    """Row from the last line of the client's JSONL file (it appends); raises ``ValueError`` if empty."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not lines:
        raise ValueError(f"no result line in {path}")
    return parse_result_line(lines[-1], expected_requests)


def scan_server_log(text: str, pattern: str = PACKINFER, last: int = PACKINFER_LOG_LINES) -> dict:
    """``log_tail``: the last ``last`` lines containing ``pattern`` (case-insensitive, each cut to
    400 characters); ``log_has_traceback``: whether ``Traceback`` occurs anywhere."""
    hits = [line[:400] for line in text.splitlines() if pattern.lower() in line.lower()]
    return {"log_tail": hits[-last:], "log_has_traceback": "Traceback" in text}


def add_baseline_ratio(rows: list[dict], baseline: str) -> None:
    """Set ``throughput_vs_baseline`` (output throughput / the baseline backend's) in place."""
    base = next((r.get("output_throughput") for r in rows if r["backend"] == baseline), None)
    for row in rows:
        value = row.get("output_throughput")
        row["throughput_vs_baseline"] = value / base if value and base else None


def render_table(rows: list[dict]) -> str:
    """Markdown table of ``rows``, one per backend; missing values shown as ``-``."""
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else fmt.format(value)

    lines = ["| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key, fmt) for _, key, fmt in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a text file (empty if it does not exist)."""
    if not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-n:]
