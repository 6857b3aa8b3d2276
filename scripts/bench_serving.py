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

    python scripts/make_model_dir.py --shape llama-3-8b --out out/models/llama-3-8b
    python scripts/bench_serving.py --model-dir out/models/llama-3-8b --workload anchors
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
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
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
    "anchors": Workload(num_groups=8, prompts_per_group=32, system_prompt_len=4096, question_len=64,
                        output_len=1024),
    "short": Workload(num_groups=8, prompts_per_group=32, system_prompt_len=4096, question_len=64,
                      output_len=128),  # verification runs
    "smoke": Workload(num_groups=2, prompts_per_group=4, system_prompt_len=256, question_len=16,
                      output_len=16),
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


def split_extra_args(extra_args: str,
                     forbidden: tuple[str, ...] = ("--host", "--port", "--base-url")) -> list[str]:
    """shlex-split ``extra_args``; raises ``ValueError`` on flags that would move the server or the
    client off ``HOST`` and the planned port."""
    argv = shlex.split(extra_args)
    bad = [a for a in argv if a.split("=")[0] in forbidden]
    if bad:
        raise ValueError(f"extra arguments may not set {bad}: this script chooses host and port")
    return argv


def server_argv(python: str, model_dir: Path, tokenizer: Path, backend: str, port: int,
                extra_args: str = "") -> list[str]:
    """argv of ``sglang.launch_server`` for one backend; ``extra_args`` is shlex-split and appended."""
    argv = [
        python, "-m", "sglang.launch_server", "--model-path", str(model_dir),
        "--tokenizer-path", str(tokenizer), "--load-format", "dummy", "--attention-backend", backend,
    ]
    if backend == PACKINFER:
        argv += ["--radix-cache-backend", PACKINFER]
    argv += ["--port", str(port), "--host", HOST, "--cuda-graph-backend-prefill", "disabled"]
    return argv + split_extra_args(extra_args)


def server_env(backend: str, verify: bool, packinfer_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables added to the server's for ``backend`` (PACKINFER_* only for packinfer)."""
    # Only our plugin: the GPU host's SGLang archive lacks the deps of SGLang's own smg plugins.
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SGLANG_PLUGINS": PACKINFER}
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
        "--gsp-output-len", str(w.output_len), "--gsp-range-ratio", "1.0",
        "--num-prompts", str(w.num_requests), "--request-rate", request_rate, "--seed", str(seed),
        "--output-file", str(output_file), "--disable-tqdm",
    ]
    return argv + split_extra_args(extra_args)


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


def expected_input_tokens(workload: Workload) -> int:
    """Prompt tokens the client should count for ``workload`` (no BOS with our tokenizer)."""
    return workload.num_requests * (workload.system_prompt_len + workload.question_len)


def dataset_cache_files(workload: Workload, seed: int, home: Path | None = None) -> list[Path]:
    """Cached prompt pickles sglang.benchmark would reuse for ``workload`` and ``seed`` (any tokenizer
    class). A pickle written with another tokenizer gives prompts of other token lengths."""
    w = workload
    cache_dir = (home or Path.home()) / ".cache" / "sglang" / "benchmark"
    stem = (f"gen_shared_prefix_{seed}_{w.num_groups}_{w.prompts_per_group}_{w.system_prompt_len}_"
            f"{w.question_len}_{w.output_len}_")
    return sorted(cache_dir.glob(stem + "*.pkl")) if cache_dir.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Processes (GPU host only)
# ---------------------------------------------------------------------------------------------


def port_in_use(port: int) -> bool:
    """Whether something already listens on ``HOST:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def start_process(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``argv`` in a new process group (pgid == pid), stdout and stderr to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, read from /proc (Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process exited meanwhile
            continue
        state, _ppid, pgrp = text[text.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def stop_process_group(proc: subprocess.Popen, grace_s: float = 30.0) -> int | None:
    """SIGTERM ``proc``'s process group, wait up to ``grace_s`` seconds, then SIGKILL what is left;
    returns the leader's exit code. The server's scheduler and detokenizer are in the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nothing left in the group, zombies included
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_members(proc.pid):
                return proc.returncode
            time.sleep(0.2)
    return proc.poll()


def http_ok(url: str, timeout_s: float = 5.0) -> bool:
    """Whether GET ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_for_health(proc: subprocess.Popen, port: int, timeout_s: float, label: str,
                    poll_s: float = 1.0, report_every_s: float = 15.0) -> tuple[str, float]:
    """Poll ``/health`` until it answers 200 ("ready"), the server exits ("died") or ``timeout_s``
    seconds pass ("timeout"); returns the state and the seconds waited."""
    start = last_report = time.monotonic()
    url = f"http://{HOST}:{port}/health"
    while True:
        elapsed = time.monotonic() - start
        if proc.poll() is not None:
            return "died", elapsed
        if http_ok(url):
            return "ready", elapsed
        if elapsed > timeout_s:
            return "timeout", elapsed
        if time.monotonic() - last_report >= report_every_s:
            print(f"[{label}] waiting for {url}: {elapsed:.0f} s", flush=True)
            last_report = time.monotonic()
        time.sleep(poll_s)


def run_logged(argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> int | None:
    """Run ``argv`` to completion with output to ``log_path``; None if killed after ``timeout_s`` s."""
    proc = start_process(argv, env, log_path)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            stop_process_group(proc, grace_s=10.0)


@dataclass(frozen=True)
class BackendRun:
    """Everything one backend's run needs: commands, environment additions and file paths."""

    backend: str
    port: int
    server_argv: list[str]
    server_env: dict[str, str]
    client_argv: list[str]
    client_env: dict[str, str]
    server_log: Path
    client_log: Path
    result_file: Path

    def commands(self) -> dict:
        """The exact commands, as recorded in the JSON output."""
        return {"server": shlex.join(self.server_argv), "server_env": self.server_env,
                "client": shlex.join(self.client_argv), "client_env": self.client_env}


def plan_backend(args: argparse.Namespace, backend: str, port: int, workload: Workload,
                 tokenizer: Path) -> BackendRun:
    """The ``BackendRun`` for ``backend`` on ``port`` from the parsed flags. ``backend`` is an attention
    backend name, or ``NAME:eager`` for the same with decode CUDA graphs off."""
    name, _, variant = backend.partition(":")
    if variant not in ("", "eager"):
        raise SystemExit(f"--backends: unknown variant {variant!r} in {backend!r} (known: eager)")
    extra = args.extra_server_args + (" --cuda-graph-backend-decode disabled" if variant == "eager" else "")
    stem = f"{args.workload}_{backend.replace(':', '-')}"
    result_file = args.out_dir / f"client_{stem}.jsonl"
    return BackendRun(
        backend=backend, port=port,
        server_argv=server_argv(args.python, args.model_dir, tokenizer, name, port, extra),
        server_env=server_env(name, args.verify, parse_env_pairs(args.packinfer_env)),
        client_argv=client_argv(args.python, args.model_dir, tokenizer, port, workload, args.seed,
                                result_file, args.request_rate, args.extra_client_args),
        client_env={"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        server_log=args.out_dir / f"server_{stem}.log", client_log=args.out_dir / f"client_{stem}.log",
        result_file=result_file,
    )


def parse_env_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``["K=V", ...]`` -> ``{"K": "V"}``; raises ``ValueError`` on an entry without ``=``."""
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def measure(run: BackendRun, proc: subprocess.Popen, workload: Workload, client_timeout_s: float) -> dict:
    """Run the client against the healthy server ``proc``; row fields from its result."""
    run.result_file.unlink(missing_ok=True)  # the client appends
    print(f"[{run.backend}] client: {shlex.join(run.client_argv)}", flush=True)
    rc = run_logged(run.client_argv, run.client_env, run.client_log, client_timeout_s)
    if rc != 0:
        row = {"status": "client_timeout" if rc is None else "client_failed", "client_exit_code": rc,
               "client_log_tail": tail_lines(run.client_log, LOG_TAIL_LINES)}
        if proc.poll() is not None:
            row.update(status="server_died", server_exit_code=proc.returncode,
                       server_log_tail=tail_lines(run.server_log, LOG_TAIL_LINES))
        return row
    try:
        row = read_result_file(run.result_file, workload.num_requests)
    except ValueError as exc:
        return {"status": "no_result", "error": str(exc),
                "client_log_tail": tail_lines(run.client_log, LOG_TAIL_LINES)}
    row["input_tokens_expected"] = expected_input_tokens(workload)
    row["input_tokens_match"] = row.get("total_input_tokens") == row["input_tokens_expected"]
    return row


def run_backend(run: BackendRun, workload: Workload, server_timeout_s: float,
                client_timeout_s: float) -> dict:
    """Start the server, wait for health, measure, stop; one row, whatever happens."""
    row = {"backend": run.backend, "port": run.port}
    if port_in_use(run.port):
        return {**row, "status": "port_busy", "error": f"{HOST}:{run.port} already in use"}
    print(f"[{run.backend}] server: {shlex.join(run.server_argv)}", flush=True)
    proc = start_process(run.server_argv, run.server_env, run.server_log)
    log_before_stop = ""
    try:
        state, waited_s = wait_for_health(proc, run.port, server_timeout_s, run.backend)
        row["server_start_s"] = round(waited_s, 1)
        if state == "ready":
            print(f"[{run.backend}] server healthy after {waited_s:.0f} s", flush=True)
            row.update(measure(run, proc, workload, client_timeout_s))
        else:
            row.update(status=f"server_{state}", server_exit_code=proc.poll(),
                       server_log_tail=tail_lines(run.server_log, LOG_TAIL_LINES))
            print(f"[{run.backend}] server {state} (exit code {proc.poll()}); last log lines:\n  "
                  + "\n  ".join(row["server_log_tail"]), flush=True)
        log_before_stop = run.server_log.read_text(errors="replace")
    finally:
        row["server_stop_exit_code"] = stop_process_group(proc)
    row.update(scan_log_after_stop(run, log_before_stop))
    return row


def scan_log_after_stop(run: BackendRun, log_before_stop: str) -> dict:
    """``log_has_traceback`` (before the stop signal), ``shutdown_traceback`` (after it) and, for
    packinfer, ``log_tail``."""
    full = run.server_log.read_text(errors="replace") if run.server_log.exists() else ""
    scan = scan_server_log(log_before_stop)
    found = {"log_has_traceback": scan["log_has_traceback"],
             "shutdown_traceback": "Traceback" in full[len(log_before_stop):]}
    if run.backend.partition(":")[0] == PACKINFER:
        found["log_tail"] = scan["log_tail"]
    return found


# ---------------------------------------------------------------------------------------------
# Environment, outputs, CLI
# ---------------------------------------------------------------------------------------------


def gpu_name() -> str | None:
    """GPU names from ``nvidia-smi`` ("; "-joined), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return "; ".join(line.strip() for line in out.splitlines() if line.strip()) or None


def package_versions(packages: tuple[str, ...] = VERSION_PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None where absent), read without importing the packages."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict:
    """GPU, package versions, Python and date for the output header."""
    return {"gpu": gpu_name(), "versions": package_versions(), "python": sys.version.split()[0],
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def render_markdown(report: dict) -> str:
    """The Markdown file: a header naming workload, model, GPU and versions, then the table."""
    env, w = report["environment"], report["workload"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return "\n".join([
        f"# Serving benchmark: {report['workload_name']}",
        "",
        (f"- workload: {w['num_groups']} groups x {w['prompts_per_group']} prompts, system"
         f" {w['system_prompt_len']} + question {w['question_len']} tokens, output {w['output_len']} tokens,"
         " request rate"
         f" {report['request_rate']}, seed {report['seed']}"),
        f"- model: {report['model_dir']} (--load-format dummy)",
        f"- GPU: {env['gpu']}; {versions}; {env['date']}",
        f"- vs base: output throughput / {report['baseline']}'s",
        "",
        render_table(report["rows"]),
        "",
    ])


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``serving_<workload>.json`` and ``.md`` into ``out_dir``; returns both paths."""
    stem = out_dir / f"serving_{report['workload_name']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of this script."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="model directory from make_model_dir.py")
    p.add_argument("--shape", default=None,
                   help="(re)write --model-dir with this shape preset first (llama-3-8b, qwen2.5-7b, tiny)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder (default: <model-dir>/tokenizer)")
    p.add_argument("--backends", default="packinfer,triton,flashinfer",
                   help="comma-separated attention backends")
    p.add_argument("--baseline", default="triton",
                   help="backend whose output throughput the 'vs base' column divides by")
    p.add_argument("--workload", default="anchors", choices=sorted(WORKLOADS), help="workload preset")
    for field in dataclasses.fields(Workload):
        flag = "--" + field.name.replace("_", "-")
        p.add_argument(flag, type=int, default=None,
                       help=f"override the preset's {field.name} (tokens or counts)")
    p.add_argument("--seed", type=int, default=1, help="client seed: same prompts for every backend")
    p.add_argument("--request-rate", default="inf",
                   help="client request rate in requests/s; inf sends all at time 0")
    p.add_argument("--port", type=int, default=30000, help="first server port; backend i uses port + i")
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for /health")
    p.add_argument("--client-timeout", type=float, default=3600.0, help="seconds the client may run")
    p.add_argument("--verify", action="store_true", help="set PACKINFER_VERIFY=1 for the packinfer server")
    p.add_argument("--packinfer-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the packinfer server (repeatable)")
    p.add_argument("--extra-server-args", default="",
                   help="string appended (shlex-split) to every server command;"
                   " write --extra-server-args='--flag' when it is a single flag")
    p.add_argument("--extra-client-args", default="",
                   help="string appended (shlex-split) to every client command, e.g. '--flush-cache'")
    p.add_argument("--python", default=sys.executable, help="Python interpreter that runs server and client")
    p.add_argument("--out-dir", type=Path, default=Path("out/serving"),
                   help="folder for logs and results (out/ is git-ignored)")
    p.add_argument("--clear-dataset-cache", action="store_true",
                   help="delete sglang.benchmark's cached prompts for this workload and seed before running")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return p


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The preset named by ``--workload`` with per-field flag overrides applied."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)}
    return resolve_workload(args.workload, overrides)


def prepare_model_dir(args: argparse.Namespace) -> Path:
    """Write the model directory if ``--shape`` is given; returns the tokenizer folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from packinfer_sglang.model_dirs import make_model_dir, tokenizer_dir

    if args.shape:
        make_model_dir(args.shape, args.model_dir)
    if not args.dry_run and not (args.model_dir / "config.json").exists():
        raise SystemExit(f"{args.model_dir}/config.json missing: run scripts/make_model_dir.py"
                         " or pass --shape")
    return args.tokenizer or tokenizer_dir(args.model_dir)


def handle_dataset_cache(workload: Workload, seed: int, clear: bool) -> list[str]:
    """Warn about (or with ``clear`` delete) cached prompts from earlier runs; returns their paths."""
    files = dataset_cache_files(workload, seed)
    for path in files:
        if clear:
            path.unlink()
        print(f"{'deleted' if clear else 'warning: reusing'} cached prompts {path}"
              + ("" if clear else " (--clear-dataset-cache regenerates them)"), flush=True)
    return [str(p) for p in files]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    workload = workload_from_args(args)
    args.model_dir, args.out_dir = args.model_dir.resolve(), args.out_dir.resolve()
    tokenizer = prepare_model_dir(args).resolve()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        raise SystemExit("--backends names no backend")
    try:
        runs = [plan_backend(args, b, args.port + i, workload, tokenizer) for i, b in enumerate(backends)]
    except ValueError as exc:  # bad --extra-*-args or --packinfer-env
        raise SystemExit(f"error: {exc}") from None
    if args.dry_run:
        for run in runs:
            print(json.dumps({"backend": run.backend, **run.commands()}, indent=2))
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "workload_name": args.workload, "workload": dataclasses.asdict(workload), "seed": args.seed,
        "request_rate": args.request_rate, "model_dir": str(args.model_dir), "tokenizer": str(tokenizer),
        "baseline": args.baseline, "environment": environment(),
        "dataset_cache_files": handle_dataset_cache(workload, args.seed, args.clear_dataset_cache),
        "commands": {run.backend: run.commands() for run in runs}, "rows": [],
    }
    for run in runs:
        try:
            row = run_backend(run, workload, args.server_timeout, args.client_timeout)
        # A bug here must not cost the remaining backends; run_backend has stopped the server.
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row = {"backend": run.backend, "status": "driver_error", "error": repr(exc)}
        print(f"[{run.backend}] {row['status']}: output {row.get('output_throughput')} tok/s", flush=True)
        report["rows"].append(row)
        add_baseline_ratio(report["rows"], args.baseline)
        json_path, md_path = write_report(report, args.out_dir)  # after each backend: partial results stay
    print(f"\nwrote {json_path} and {md_path}\n")
    print(render_table(report["rows"]))


if __name__ == "__main__":
    main()
