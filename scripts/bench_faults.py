"""Fault benchmark: shared-prefix traffic with injected faults against one packinfer server with
verification on; nothing may be lost and nothing wrong.

For each configuration of ``--configs`` (``base``: packinfer; ``compact``: with
``PACKINFER_COMPACT=1``; ``compact_forced``: compaction set to relocate often; ``dedup``: with
``PACKINFER_PREFILL_DEDUP=1``; default ``base,compact``) this starts ``python -m sglang.launch_server`` with ``--attention-backend
packinfer --radix-cache-backend packinfer``, ``PACKINFER_VERIFY=1`` (every decode layer checked
against SGLang's Triton decode; at every idle period the pools checked by
:mod:`packinfer_sglang.patches.idle_check` after SGLang's own idle memory check), a KV pool of
``--max-total-tokens`` and a context of ``--context-length`` tokens. Then the phases, in order:

``disconnect``  streamed shared-prefix requests; 25 % of the clients close the connection at a
                random point of their generation
``abort``       shared-prefix requests; ``/abort_request`` for random running requests and for every
                request of two whole groups
``retract``     more shared-prefix traffic than the pool holds: SGLang retracts decode requests
                (the ``retractions`` column counts its log lines) and the radix cache evicts
                group prefixes while other members still run
``edge``        parallel sampling (``n = 8``), ``max_new_tokens = 1``, prompts of the longest length
                SGLang admits (``max_req_input_len - 1``, from ``/server_info``), at its limit and
                over the context (a 4xx answer is expected), beside ordinary shared-prefix requests

Every request asks for ``ignore_eos`` and a fixed ``max_new_tokens``, so a completed request must
return exactly that many tokens. After each phase the driver waits for the idle check's log line,
asks ``/health_generate`` and flushes the cache. Per phase and in total it reports ``requests``,
``completed``, ``aborted`` (a fault was injected and the request did not complete), ``rejected``
(the expected 4xx of an over-long prompt), ``errored`` (anything else that did not complete as
asked), ``verify_layer_steps`` and ``verify_max_rel_err`` (cumulative, from the backend's log
line), ``leaked_slots``, ``integrity_checks_passed``, ``retractions``, ``server_tracebacks`` and
``server_alive_at_end``, into ``<out-dir>/faults_<gpu>.json`` and ``.md``.

Run from the repository root on the GPU host::

    python -m scripts.make_model_dir --shape llama-3-8b --out out/models/llama-3-8b
    python -m scripts.bench_faults --model-dir out/models/llama-3-8b --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import serving_procs as procs
from .serving_report import environment

PHASES = ("disconnect", "abort", "retract", "edge")
CONFIGS = {
    "base": {},
    "compact": {"PACKINFER_COMPACT": "1"},
    # compaction made to relocate often (the settings of mixed_compaction_verify), so faults meet relocations
    "compact_forced": {"PACKINFER_COMPACT": "1", "PACKINFER_COMPACT_MIN_GAIN": "0.01",
                       "PACKINFER_COMPACT_GATHER_PENALTY": "1", "PACKINFER_COMPACT_EVERY": "8"},
    # prefill dedup holds waiting requests back: aborts and disconnects then also hit held requests
    "dedup": {"PACKINFER_PREFILL_DEDUP": "1"},
}
VERIFY_RE = re.compile(r"verified (\d+) layer-steps, max rel err ([0-9.eE+-]+|nan)")
IDLE_RE = re.compile(r"packinfer: idle check \d+ passed .*leaked slots (\d+)")
RETRACT_RE = re.compile(r"Retract requests\. #retracted_reqs: (\d+)")
MOVED_RE = re.compile(r"packinfer: compaction moved .*; (\d+) tokens so far")
HELD_RE = re.compile(r"packinfer: prefill dedup held (\d+) requests so far")


@dataclass
class Outcome:
    """One HTTP request's fate: ``completed``, ``aborted``, ``rejected`` or ``errored`` (+ why)."""
    kind: str
    detail: str = ""


@dataclass
class PhaseRow:
    config: str
    phase: str
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    rejected: int = 0
    errored: int = 0
    verify_layer_steps: int | None = None
    verify_max_rel_err: float | None = None
    leaked_slots: int | None = None
    integrity_checks_passed: int = 0
    retractions: int = 0
    server_tracebacks: int = 0
    compaction_moved_tokens: int = 0  # cumulative, from the compaction hook's log line
    dedup_held_requests: int = 0  # cumulative, from the prefill dedup hook's log line
    server_alive_at_end: bool = False
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def clean(self) -> bool:
        """The issue's targets: nothing errored or leaked, no traceback, checks ran, alive."""
        return (self.errored == 0 and self.leaked_slots == 0 and self.server_tracebacks == 0
                and self.integrity_checks_passed > 0 and self.server_alive_at_end)


class Traffic:
    """Request bodies of random token ids in [3, ``vocab``) from one seeded generator."""

    def __init__(self, seed: int, vocab: int):
        self.rng, self.vocab, self.n = random.Random(seed), vocab, 0

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(n)]

    def body(self, input_ids, max_new: int, stream=False, n=1) -> dict:
        self.n += 1
        # Fixed-width rids: SGLang's /abort_request aborts every request whose rid *starts with* the
        # given one (scheduler.abort_request), so "fault-7" would also abort "fault-70".
        params = {"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0.0 if n == 1 else 1.0}
        return {"rid": f"fault-{self.n:06d}", "input_ids": input_ids, "stream": stream,
                "sampling_params": params | ({"n": n} if n > 1 else {})}

    def groups(self, num_groups: int, per_group: int, system: int, question: int, max_new: int,
               stream=False) -> list[list[dict]]:
        out = []
        for _ in range(num_groups):
            prefix = self.ids(system)
            out.append([self.body(prefix + self.ids(question), max_new, stream) for _ in range(per_group)])
        return out


def _judge(body: dict, status: int, payload, injected: bool, expect_reject=False) -> Outcome:
    """The outcome of a finished non-streamed request."""
    if expect_reject:
        return Outcome("rejected") if 400 <= status < 500 else Outcome("errored", f"expected 4xx, got {status}")
    items = payload if isinstance(payload, list) else [payload]
    want_n = body["sampling_params"].get("n", 1)
    want = body["sampling_params"]["max_new_tokens"]
    if status == 200 and len(items) == want_n and all(
            isinstance(i, dict) and i.get("meta_info", {}).get("completion_tokens") == want
            and (i["meta_info"].get("finish_reason") or {}).get("type") == "length" for i in items):
        return Outcome("completed")
    if injected:
        return Outcome("aborted")
    got = [i.get("meta_info", {}) if isinstance(i, dict) else {} for i in items]
    finish = [(m.get("completion_tokens"), (m.get("finish_reason") or {}).get("type")) for m in got]
    return Outcome("errored", f"{body['rid']}: status {status}, want {want_n} x {want} tokens, got (tokens, finish) "
                              f"{finish[:4]}, {str(payload)[:120]}")


async def _post(session, url: str, body: dict, injected=False, expect_reject=False) -> Outcome:
    try:
        async with session.post(url, json=body) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = text
            return _judge(body, resp.status, payload, injected, expect_reject)
    except Exception as e:  # noqa: BLE001 - every failure is counted, none may stop the phase
        return Outcome("aborted" if injected else "errored", f"{body['rid']}: {e!r}"[:240])


async def _stream(session, url: str, body: dict, close_after: int | None) -> Outcome:
    """A streamed request; with ``close_after`` the client disconnects after that many chunks."""
    chunks, last = 0, None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return Outcome("errored", f"{body['rid']}: status {resp.status}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                last, chunks = json.loads(line[5:]), chunks + 1
                if close_after is not None and chunks >= close_after:
                    resp.close()  # the client goes away mid-generation
                    return Outcome("aborted")
    except Exception as e:  # noqa: BLE001
        return Outcome("aborted" if close_after is not None else "errored", f"{body['rid']}: {e!r}"[:240])
    return _judge(body, 200, last, close_after is not None)


async def _abort_later(session, base: str, rids: list[str], delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    for rid in rids:
        async with session.post(f"{base}/abort_request", json={"rid": rid}) as resp:
            await resp.read()


async def run_phase(phase: str, base: str, traffic: Traffic, args) -> list[Outcome]:
    """Sends one phase's traffic (module docstring) and returns every request's outcome."""
    import aiohttp

    url, rng, q = f"{base}/generate", traffic.rng, args.question_len
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if phase == "disconnect":
            bodies = [b for g in traffic.groups(args.groups, 8, args.system_len, q, 256, stream=True) for b in g]
            cut = {i: rng.randint(1, 250) for i in rng.sample(range(len(bodies)), len(bodies) // 4)}
            return await asyncio.gather(*(_stream(session, url, b, cut.get(i)) for i, b in enumerate(bodies)))
        if phase == "abort":
            groups = traffic.groups(args.groups, 8, args.system_len, q, 256)
            bodies = [b for g in groups for b in g]
            single = {b["rid"] for b in rng.sample(bodies, len(bodies) * 15 // 100)}
            whole = {b["rid"] for g in rng.sample(groups, 2) for b in g}
            tasks = [_post(session, url, b, injected=b["rid"] in single | whole) for b in bodies]
            aborts = [_abort_later(session, base, [rid], rng.uniform(0.3, 3.0)) for rid in sorted(single)]
            aborts += [_abort_later(session, base, sorted(whole), rng.uniform(0.5, 2.0))]
            results = await asyncio.gather(*tasks, *aborts)
            return list(results[:len(tasks)])
        if phase == "retract":
            bodies = [b for g in traffic.groups(args.groups * 2, 8, args.system_len * 3 // 2, q, 512) for b in g]
            return await asyncio.gather(*(_post(session, url, b) for b in bodies))
        if phase == "edge":
            # The longest prompt SGLang admits is max_req_input_len - 1 (min(context, pool) - 6 tokens);
            # at max_req_input_len and over the context it answers 400.
            async with session.get(f"{base}/server_info") as resp:
                limit = (await resp.json()).get("max_req_input_len") or args.context_length - 6
            ctx = args.context_length
            tasks = [_post(session, url, b) for g in traffic.groups(4, 8, args.system_len, q, 128) for b in g]
            tasks += [_post(session, url, traffic.body(traffic.ids(args.system_len), 64, n=8)) for _ in range(4)]
            shared = traffic.ids(args.system_len)
            tasks += [_post(session, url, traffic.body(shared + traffic.ids(16), 1)) for _ in range(16)]
            tasks += [_post(session, url, traffic.body(traffic.ids(limit - 1), 1)) for _ in range(2)]
            tasks += [_post(session, url, traffic.body(traffic.ids(n), 1), expect_reject=True)
                      for n in (limit, ctx + 100, ctx + 100)]
            return await asyncio.gather(*tasks)
    raise ValueError(f"unknown phase {phase!r}; known: {PHASES}")


def _wait_idle_check(log_path: Path, start: int, timeout_s: float) -> str:
    """The log written since ``start`` once it holds an idle-check line (or after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = procs.read_from(log_path, start)
        if IDLE_RE.search(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _fill_row(row: PhaseRow, outcomes: list[Outcome], log: str, cumulative: dict) -> None:
    for o in outcomes:
        setattr(row, o.kind, getattr(row, o.kind) + 1)
        if o.kind == "errored":
            row.errors.append(o.detail)
    row.requests = len(outcomes)
    verified = VERIFY_RE.findall(log)
    if verified:
        cumulative["steps"], cumulative["err"] = int(verified[-1][0]), float(verified[-1][1])
    row.verify_layer_steps, row.verify_max_rel_err = cumulative.get("steps"), cumulative.get("err")
    leaks = [int(x) for x in IDLE_RE.findall(log)]
    row.integrity_checks_passed, row.leaked_slots = len(leaks), max(leaks) if leaks else None
    row.retractions = sum(int(x) for x in RETRACT_RE.findall(log))
    row.server_tracebacks = log.count("Traceback (most recent call last)")
    for attr, regex in (("compaction_moved_tokens", MOVED_RE), ("dedup_held_requests", HELD_RE)):
        found = regex.findall(log)
        if found:
            cumulative[attr] = int(found[-1])
        setattr(row, attr, cumulative.get(attr, 0))


def run_config(name: str, args, out_rows: list[PhaseRow]) -> None:
    """Starts one server, runs every phase against it, appends a row per phase."""
    port, log_path = args.port, args.out_dir / "logs" / f"faults.{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    extra = (f"--max-total-tokens {args.max_total_tokens} --context-length {args.context_length} "
             f"{args.extra_server_args}")
    env = procs.server_env(procs.PACKINFER, True, {"PACKINFER_LOG_EVERY": "20", **CONFIGS[name]})
    argv = procs.server_argv(args.python, args.model_dir, args.model_dir / "tokenizer", procs.PACKINFER, port, extra)
    print(f"[{name}] {' '.join(argv)}", flush=True)
    proc = procs.start_process(argv, env, log_path)
    base = f"http://{procs.HOST}:{port}"
    try:
        state, waited = procs.wait_for_health(proc, port, args.server_timeout, name)
        print(f"[{name}] server {state} after {waited:.0f} s", flush=True)
        if state != "ready":
            out_rows.append(PhaseRow(name, "start", errors=procs.tail_lines(log_path, 20)))
            return
        vocab = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]
        traffic, cumulative = Traffic(args.seed, vocab), {}
        procs.send_all(port, [traffic.body(traffic.ids(300), 8) for _ in range(4)], 600)  # JIT warmup
        for phase in PHASES:
            procs.flush_cache(port)
            start, t0 = procs.file_size(log_path), time.monotonic()
            outcomes = asyncio.run(run_phase(phase, base, traffic, args))
            log = _wait_idle_check(log_path, start, 60.0)
            row = PhaseRow(name, phase, seconds=round(time.monotonic() - t0, 1))
            _fill_row(row, outcomes, log, cumulative)
            row.server_alive_at_end = proc.poll() is None and procs.http_request(
                f"{base}/health_generate", timeout_s=60.0)[0] == 200
            out_rows.append(row)
            print(f"[{name}] {phase}: {json.dumps({k: v for k, v in asdict(row).items() if k != 'errors'})}",
                  flush=True)
            for e in row.errors[:5]:
                print(f"[{name}]   errored: {e}", flush=True)
    finally:
        procs.stop_process_group(proc, args.stop_grace)


def totals(rows: list[PhaseRow]) -> list[PhaseRow]:
    """One ``total`` row per configuration."""
    out = []
    for name in dict.fromkeys(r.config for r in rows):
        rs = [r for r in rows if r.config == name]
        t = PhaseRow(name, "total")
        for f in ("requests", "completed", "aborted", "rejected", "errored", "integrity_checks_passed",
                  "retractions", "server_tracebacks"):
            setattr(t, f, sum(getattr(r, f) for r in rs))
        leaks = [r.leaked_slots for r in rs]
        t.leaked_slots = None if None in leaks else max(leaks, default=0)
        t.verify_layer_steps, t.verify_max_rel_err = rs[-1].verify_layer_steps, rs[-1].verify_max_rel_err
        t.compaction_moved_tokens, t.dedup_held_requests = rs[-1].compaction_moved_tokens, rs[-1].dedup_held_requests
        t.server_alive_at_end = rs[-1].server_alive_at_end and len(rs) == len(PHASES)
        t.seconds = round(sum(r.seconds for r in rs), 1)
        out.append(t)
    return out


def write_report(rows: list[PhaseRow], args, stem: str) -> None:
    all_rows = rows + totals(rows)
    env = environment()
    doc = {"environment": env, "commit": args.commit, "command": " ".join(sys.argv), "max_total_tokens": args.max_total_tokens,
           "context_length": args.context_length, "rows": [asdict(r) for r in all_rows],
           "clean": all(r.clean() for r in totals(rows))}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    cols = ["requests", "completed", "aborted", "rejected", "errored", "verify_layer_steps", "verify_max_rel_err",
            "leaked_slots", "integrity_checks_passed", "retractions", "server_tracebacks", "server_alive_at_end",
            "compaction_moved_tokens", "dedup_held_requests"]
    lines = [f"# Fault benchmark ({env.get('gpu', '?')})", "",
             f"- command: `{doc['command']}`; commit {args.commit}; {env.get('date', '')}",
             f"- versions: {env.get('versions', '')}",
             (f"- KV pool {args.max_total_tokens} tokens, context {args.context_length}; verification on (every decode "
             "layer against SGLang's Triton decode), pools checked at every idle period"), "",
             "| config | phase | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in all_rows:
        err = "" if r.verify_max_rel_err is None else f"{r.verify_max_rel_err:.1e}"
        vals = [str(getattr(r, c)) if c != "verify_max_rel_err" else err for c in cols]
        lines.append(f"| {r.config} | {r.phase} | " + " | ".join(vals) + " |")
    lines += ["", f"All targets met (errored 0, leaked 0, no traceback, checks ran, alive): **{doc['clean']}**"]
    (args.out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="from python -m scripts.make_model_dir")
    p.add_argument("--configs", default="base,compact", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--groups", type=int, default=12, help="groups of 8 requests in the disconnect/abort phases")
    p.add_argument("--system-len", type=int, default=1024, help="shared prefix tokens per group")
    p.add_argument("--question-len", type=int, default=64, help="own tokens per request")
    p.add_argument("--max-total-tokens", type=int, default=40000, help="KV pool size (small: retraction)")
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=31000)
    p.add_argument("--server-timeout", type=float, default=420.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--stop-grace", type=float, default=15.0)
    p.add_argument("--extra-server-args", default="")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out-dir", type=Path, default=Path("out/faults"))
    p.add_argument("--report-name", default=None, help="file stem (default: faults_<gpu>)")
    p.add_argument("--commit", default="?", help="the commit under test, for the report header")
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        p.error(f"--configs: unknown {bad}; known: {sorted(CONFIGS)}")
    if min(args.groups, args.system_len, args.question_len) < 1 or args.context_length < 256:
        p.error("--groups, --system-len, --question-len must be >= 1 and --context-length >= 256")
    if procs.port_in_use(args.port):
        p.error(f"port {args.port} is in use")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[PhaseRow] = []
    gpu = (environment().get("gpu") or "gpu").split()[-1].lower()  # "NVIDIA H200" -> "h200"
    stem = args.report_name or f"faults_{gpu}"
    for name in configs:
        run_config(name, args, rows)
        write_report(rows, args, stem)
    print((args.out_dir / f"{stem}.md").read_text(), flush=True)
    return 0 if all(r.clean() for r in totals(rows)) else 1


if __name__ == "__main__":
    sys.exit(main())
