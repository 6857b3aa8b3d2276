"""Processes and HTTP for the serving benchmark: server commands; servers and the client runner in
their own process groups; health polling, cache flushes and warmup requests. Linux only (process
groups, /proc)."""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"  # never anything else
PACKINFER = "packinfer"


def server_argv(python: str, model_dir: Path, tokenizer: Path, backend: str, port: int,
                extra_args: str = "") -> list[str]:
    """argv of ``sglang.launch_server`` for one backend; ``extra_args`` is shlex-split and appended."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", str(model_dir),
            "--tokenizer-path", str(tokenizer), "--load-format", "dummy", "--attention-backend", backend]
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


def split_extra_args(extra_args: str,
                     forbidden: tuple[str, ...] = ("--host", "--port", "--base-url")) -> list[str]:
    """shlex-split ``extra_args``; raises ``ValueError`` on flags that would move the server or the
    client off ``HOST`` and the planned port."""
    argv = shlex.split(extra_args)
    bad = [a for a in argv if a.split("=")[0] in forbidden]
    if bad:
        raise ValueError(f"extra arguments may not set {bad}: this script chooses host and port")
    return argv


def parse_env_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``["K=V", ...]`` -> ``{"K": "V"}``; raises ``ValueError`` on an entry without ``=``."""
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def port_in_use(port: int) -> bool:
    """Whether something already listens on ``HOST:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def start_process(argv: list[str], env: dict[str, str], log_path: Path, stdin=None,
                  stdout=None, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` in a new process group (pgid == pid) with ``env`` added to ours, in ``cwd``
    (default: ours); stderr (and stdout unless ``stdout`` is given, e.g. ``subprocess.PIPE``) appended
    to ``log_path``."""
    with open(log_path, "a") as log:
        return subprocess.Popen(argv, stdin=stdin, stdout=log if stdout is None else stdout,
                                stderr=subprocess.STDOUT if stdout is None else log,
                                env={**os.environ, **env}, cwd=cwd, start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, read from /proc."""
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


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15.0) -> int | None:
    """SIGTERM ``proc``'s process group, wait up to ``grace_s`` seconds, then SIGKILL what is left
    and wait for it (GPU memory is free when this returns); returns the leader's exit code."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nothing left in the group, zombies included
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_members(proc.pid):
                return proc.returncode
            time.sleep(0.2)
    return proc.poll()


def http_request(url: str, body: dict | None = None, timeout_s: float = 5.0) -> tuple[int, str]:
    """GET ``url`` (POST with a JSON ``body``); returns (status, text), status 0 when unreachable."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        return 0, repr(exc)


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
        if http_request(url)[0] == 200:
            return "ready", elapsed
        if elapsed > timeout_s:
            return "timeout", elapsed
        if time.monotonic() - last_report >= report_every_s:
            print(f"[{label}] waiting for {url}: {elapsed:.0f} s", flush=True)
            last_report = time.monotonic()
        time.sleep(poll_s)


def flush_cache(port: int, timeout_s: float = 60.0, poll_s: float = 0.5) -> bool:
    """POST SGLang's ``/flush_cache`` until it succeeds (it refuses, 400, while requests run) or
    ``timeout_s`` seconds pass; returns whether the radix cache was flushed."""
    deadline = time.monotonic() + timeout_s
    while True:
        if http_request(f"http://{HOST}:{port}/flush_cache", body={}, timeout_s=30.0)[0] == 200:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)


def send_all(port: int, bodies: list[dict], timeout_s: float) -> list[tuple[int, str]]:
    """POST every body to ``/generate`` at once (one thread each); (status, text) per body."""
    if not bodies:
        return []
    url = f"http://{HOST}:{port}/generate"
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda b: http_request(url, body=b, timeout_s=timeout_s), bodies))


class ClientRunner:
    """The client runner (``python -m scripts.serving_client``, started in ``cwd``: the repository
    root) in its own process group: one JSON job line in, one reply line out."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None):
        self.log_path, self.next_id = log_path, 0
        self.proc = start_process(argv, env, log_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd)

    def run(self, job: dict, timeout_s: float) -> tuple[str, str | None]:
        """Run ``job`` ({"client", "argv"}); returns ("ok", None), ("client_failed", error) or
        ("client_timeout", None). After a timeout or a dead runner the runner is stopped: call
        ``alive()`` before the next job."""
        self.next_id += 1
        try:
            self.proc.stdin.write((json.dumps({"id": self.next_id, **job}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            self.close()
            return "client_failed", f"runner gone: {exc!r}"
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close(grace_s=0.5)
                return "client_timeout", None
            ready, _, _ = select.select([self.proc.stdout], [], [], min(remaining, 1.0))
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:  # EOF: the runner died
                self.close()
                return "client_failed", f"runner exited with {self.proc.poll()}"
            reply = json.loads(line)
            if reply.get("id") == self.next_id:
                return ("ok", None) if reply["ok"] else ("client_failed", reply.get("error"))

    def alive(self) -> bool:
        """Whether the runner process is still running."""
        return self.proc.poll() is None

    def close(self, grace_s: float = 10.0) -> int | None:
        """Close stdin (the runner exits after its job), then stop its process group."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s if self.alive() else 0.1)
        except subprocess.TimeoutExpired:
            pass
        code = stop_process_group(self.proc, grace_s=1.0)
        self.proc.stdout.close()
        return code


def tail_lines(path: Path, n: int, start: int = 0) -> list[str]:
    """The last ``n`` lines of a text file from byte ``start`` on (empty if it does not exist)."""
    return read_from(path, start).splitlines()[-n:]


def read_from(path: Path, start: int = 0) -> str:
    """Text of ``path`` from byte ``start`` (empty if the file does not exist)."""
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def file_size(path: Path) -> int:
    """Bytes in ``path`` (0 if it does not exist): offsets for per-workload log slices."""
    return path.stat().st_size if path.exists() else 0
