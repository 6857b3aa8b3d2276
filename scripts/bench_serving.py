"""End-to-end serving benchmark: one SGLang server per attention backend, every workload against it.

For each backend in ``--backends`` (``NAME``, or ``NAME:VARIANT``: ``eager``, decode CUDA graphs off;
``compact``, packinfer with ``PACKINFER_COMPACT=1``; ``fiprefill``, packinfer decode with FlashInfer
prefill through SGLang's ``HybridAttnBackend`` (``--prefill-attention-backend flashinfer``);
``triprefill``, packinfer with ``PACKINFER_PREFILL_BACKEND=triton`` (extend on SGLang's Triton kernels);
``mixedchunk``, any backend with ``--enable-mixed-chunk``; ``dedup``, packinfer with
``PACKINFER_PREFILL_DEDUP=1``; ``lpm``, any backend with ``--schedule-policy lpm`` (SGLang's own
in-batch prefix caching); joined by ``+``, as ``packinfer:compact+eager``)
this starts ``python -m sglang.launch_server`` once on a weightless model directory
(``--load-format dummy``; ``python -m scripts.make_model_dir``), waits for ``/health`` and starts one
client runner (``python -m scripts.serving_client``, in the repository root). Then, for each workload
of ``--workloads`` in turn:

1. ``POST /flush_cache``; a warmup pass of the same shape, small and with another seed (seed +
   ``WARMUP_SEED_OFFSET``; not measured), sent straight to ``/generate`` so that one-time JIT
   compilation does not land in the measured TTFT; ``POST /flush_cache`` again;
2. the measured run: SGLang's ``sglang.benchmark.serving`` (or, for parallel sampling,
   :mod:`.serving_parallel`) with ``--seed``, every request at time 0 (the ``mixed`` workload and
   ``--request-rate``: Poisson arrivals);
3. its row (output throughput, TTFT, ITL, end-to-end latency: median and p99; the ``packinfer:``
   lines, the fragmentation series of ``PACKINFER_FRAG_LOG_EVERY`` and any Traceback of the server
   log written meanwhile) into
   ``<out-dir>/rows/<workload>.<mode>.<backend>.json``, and the report rebuilt from every row file.

The server is then stopped (SIGTERM to its process group, SIGKILL after ``--stop-grace`` seconds).
A server that dies or never becomes healthy is reported (exit code, last log lines) and the next
backend runs. Workloads and their sizes: :mod:`.serving_workloads`; ``--quick`` picks the small sizes.

Reports (:mod:`.serving_report`): ``<out-dir>/<report-name>.json`` (environment, exact commands,
rows), ``.md`` (one table per workload, each backend a row with its ratio to the best baseline),
``.png`` and, when rows hold a fragmentation series, ``_fragmentation.png``; logs under ``<out-dir>/logs``. Runs of separate invocations into one ``--out-dir`` merge
(``--merge-only`` rebuilds the report alone), so a full run can be split by backend or workload;
``--deadline-s`` skips what would not finish in time. GPU host only; ``--dry-run`` prints the plan and
the commands anywhere.

Run from the repository root:

    python -m scripts.make_model_dir --shape llama-3-8b --out out/models/llama-3-8b
    python -m scripts.bench_serving --model-dir out/models/llama-3-8b --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import serving_procs as procs
from . import serving_report as report
from . import serving_workloads as wl

PACKINFER = report.PACKINFER
WARMUP_SEED_OFFSET = 1000
QUICK_DEADLINE_S = 520.0  # --quick ends within 9 minutes: the GPU host's 10-minute call limit, less margin
LOG_TAIL_LINES = 30  # log lines kept in a row when something fails
CLIENT_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
CLIENT_RUNNER = "scripts.serving_client"  # run as `python -m` in wl.REPO_ROOT
VARIANTS = ("eager", "compact", "fiprefill", "triprefill", "mixedchunk", "dedup", "lpm")  # NAME:VARIANT[+VARIANT] in --backends
PACKINFER_ONLY = ("compact", "fiprefill", "triprefill", "dedup")


@dataclass(frozen=True)
class BackendPlan:
    """One server: its backend label, port, command and environment additions."""

    backend: str
    port: int
    server_argv: list[str]
    server_env: dict[str, str]


@dataclass(frozen=True)
class Unit:
    """One workload to run against every server, with its files."""

    name: str
    workload: wl.Workload
    dataset_file: Path | None  # multi-level only


def plan_backends(args: argparse.Namespace, tokenizer: Path) -> list[BackendPlan]:
    """A ``BackendPlan`` per ``--backends`` entry, on ports ``--port`` + i. Raises ``ValueError`` on an
    unknown variant, ``compact`` on another backend than packinfer, bad extra arguments or a bad
    ``--packinfer-env``."""
    plans = []
    for i, backend in enumerate(b.strip() for b in args.backends.split(",") if b.strip()):
        name, _, variant = backend.partition(":")
        variants = set(variant.split("+")) if variant else set()
        if not variants <= set(VARIANTS) or (variants & set(PACKINFER_ONLY) and name != PACKINFER):
            raise ValueError(f"--backends: bad variant {variant!r} in {backend!r} (known: {', '.join(VARIANTS)};"
                             f" {', '.join(PACKINFER_ONLY)} for {PACKINFER} only)")
        extra = args.extra_server_args + (" --cuda-graph-backend-decode disabled" if "eager" in variants else "")
        extra += " --prefill-attention-backend flashinfer" if "fiprefill" in variants else ""
        extra += " --enable-mixed-chunk" if "mixedchunk" in variants else ""
        extra += " --schedule-policy lpm" if "lpm" in variants else ""
        env = procs.server_env(name, args.verify, procs.parse_env_pairs(args.packinfer_env))
        if "compact" in variants:
            env["PACKINFER_COMPACT"] = "1"
        if "triprefill" in variants:
            env["PACKINFER_PREFILL_BACKEND"] = "triton"
        if "dedup" in variants:
            env["PACKINFER_PREFILL_DEDUP"] = "1"
        plans.append(BackendPlan(backend, args.port + i,
                                 procs.server_argv(args.python, args.model_dir, tokenizer, name, args.port + i, extra),
                                 env))
    if not plans:
        raise ValueError("--backends names no backend")
    return plans


def plan_units(args: argparse.Namespace) -> list[Unit]:
    """The workloads of ``--workloads`` at ``--quick``/full size with the size flags applied."""
    names = wl.ALL_WORKLOADS if args.workloads == "all" else [n.strip() for n in args.workloads.split(",")]
    overrides = {f: getattr(args, f) for f in (*wl.SIZE_FIELDS, "range_ratio")}
    overrides["request_rate"] = None if args.request_rate is None else float(args.request_rate)
    units = []
    for name in names:
        w = wl.resolve_workload(name, args.mode, overrides)
        dataset = (args.out_dir / "datasets" / f"{name}.{args.mode}.seed{args.seed}.jsonl"
                   if w.kind == "multi-level" else None)
        units.append(Unit(name, w, dataset))
    return units


def result_file(args: argparse.Namespace, unit: Unit, backend: str) -> Path:
    """The client's JSONL output of one (workload, backend) run."""
    return args.out_dir / "results" / f"{unit.name}.{args.mode}.{backend.replace(':', '-')}.jsonl"


def unit_job(args: argparse.Namespace, unit: Unit, bp: BackendPlan) -> dict:
    """The measured client job of ``unit`` against ``bp``'s server."""
    return wl.client_job(unit.workload, model_dir=args.model_dir, tokenizer=args.tokenizer, port=bp.port,
                         seed=args.seed, output_file=result_file(args, unit, bp.backend),
                         dataset_file=unit.dataset_file, extra_args=procs.split_extra_args(args.extra_client_args))


def commands(args: argparse.Namespace, unit: Unit, bp: BackendPlan) -> dict:
    """The exact commands of one run, as recorded in its row file."""
    warm = wl.warmup_workload(unit.workload)
    return {"server": shlex.join(bp.server_argv), "server_env": bp.server_env,
            "client": shlex.join(wl.job_command(args.python, unit_job(args, unit, bp))),
            "client_env": CLIENT_ENV,
            "warmup": f"POST /generate (input_ids, all at once): {warm.describe()};"
                      f" seed {args.seed + WARMUP_SEED_OFFSET}"}


def print_plan(args: argparse.Namespace, plans: list[BackendPlan], units: list[Unit]) -> float:
    """Print what will run with a rough H100 time estimate; returns the estimate in seconds."""
    per_backend = args.start_estimate_s + args.stop_grace + sum(wl.estimate_seconds(u.workload) for u in units)
    total = per_backend * len(plans)
    deadline = f"; deadline {args.deadline_s:.0f} s" if args.deadline_s is not None else ""
    print(f"plan ({args.mode}): {len(plans)} server(s) x {len(units)} workload(s), about {total / 60:.1f} min"
          f" (server start estimated at {args.start_estimate_s:.0f} s each{deadline})", flush=True)
    for u in units:
        print(f"  {u.name:18s} {u.workload.describe()}  ~{wl.estimate_seconds(u.workload):.0f} s", flush=True)
    print("  backends: " + ", ".join(f"{p.backend} (port {p.port})" for p in plans), flush=True)
    return total


class Clock:
    """Seconds since the driver started, for progress lines and ``--deadline-s``."""

    def __init__(self, deadline_s: float | None):
        self.t0, self.deadline_s = time.monotonic(), deadline_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` more work ends before the deadline (always, without one)."""
        return self.deadline_s is None or self.elapsed() + seconds <= self.deadline_s

    def say(self, label: str, text: str) -> None:
        print(f"[{self.elapsed():6.0f} s] [{label}] {text}", flush=True)


def measure(args, unit: Unit, bp: BackendPlan, runner: procs.ClientRunner, client_log: Path) -> dict:
    """Flush, warm up, flush, run the measured client; the row fields of its result."""
    w, row = unit.workload, {}
    t = time.monotonic()
    flushed = procs.flush_cache(bp.port)
    warm = procs.send_all(bp.port, wl.warmup_bodies(w, args.seed + WARMUP_SEED_OFFSET, args.vocab_size),
                          timeout_s=args.client_timeout)
    row["warmup_failures"] = sum(status != 200 for status, _ in warm)
    row["flush_ok"] = procs.flush_cache(bp.port) and flushed
    row["warmup_s"] = round(time.monotonic() - t, 1)
    out = result_file(args, unit, bp.backend)
    out.unlink(missing_ok=True)  # the client appends
    log_start, t = procs.file_size(client_log), time.monotonic()
    status, error = runner.run(unit_job(args, unit, bp), args.client_timeout)
    row["client_s"] = round(time.monotonic() - t, 1)
    if status != "ok":
        return {**row, "status": status, "error": error,
                "client_log_tail": procs.tail_lines(client_log, LOG_TAIL_LINES, log_start)}
    try:
        row.update(report.read_result_file(out, w.num_requests))
    except ValueError as exc:
        return {**row, "status": "no_result", "error": str(exc),
                "client_log_tail": procs.tail_lines(client_log, LOG_TAIL_LINES, log_start)}
    row["input_tokens_expected"] = wl.expected_input_tokens(w)
    row["input_tokens_match"] = (None if row["input_tokens_expected"] is None
                                 else row.get("total_input_tokens") == row["input_tokens_expected"])
    return row


def run_unit(args, ctx: dict, unit: Unit, bp: BackendPlan, proc, runner) -> dict:
    """One workload against a healthy server: its row, server log slice scanned, record written."""
    log_start = procs.file_size(ctx["server_log"])
    try:
        row = measure(args, unit, bp, runner, ctx["client_log"])
    except Exception as exc:  # noqa: BLE001 -- a driver bug must not cost the other workloads
        traceback.print_exc()
        row = {"status": "driver_error", "error": repr(exc)}
    if proc.poll() is not None:
        row.update(status="server_died", server_exit_code=proc.returncode,
                   server_log_tail=procs.tail_lines(ctx["server_log"], LOG_TAIL_LINES))
    log_text = procs.read_from(ctx["server_log"], log_start)
    scan = report.scan_server_log(log_text)
    row.update(report.steady_decode(log_text))
    row.update(report.packinfer_stats(log_text))
    row["log_has_traceback"] = scan["log_has_traceback"]
    if bp.backend.partition(":")[0] == PACKINFER:
        row["log_tail"] = scan["log_tail"]
    row = {"port": bp.port, "server_start_s": ctx["server_start_s"], **row}
    return write_record(args, ctx, unit, bp, row)


def write_record(args, ctx: dict, unit: Unit, bp: BackendPlan, row: dict) -> dict:
    """Write the record of one run (and rebuild the report); returns the record."""
    record = {"workload_name": unit.name, "mode": args.mode, "workload": dataclasses.asdict(unit.workload),
              "description": unit.workload.describe(), "backend": bp.backend, "seed": args.seed,
              "request_rate": wl.rate_arg(unit.workload), "model_dir": str(args.model_dir),
              "environment": ctx["environment"], "commands": commands(args, unit, bp), "row": row}
    report.write_record(args.out_dir, record)
    report.merge_reports(args.out_dir, args.report_name, args.baselines)
    return record


def run_units(args, ctx: dict, bp: BackendPlan, units: list[Unit], clock: Clock, proc, runner) -> list[dict]:
    """Every unit that fits the deadline against the healthy server ``proc``; their records."""
    records = []
    for i, unit in enumerate(units):
        if not clock.fits(wl.estimate_seconds(unit.workload)):
            clock.say(bp.backend, f"deadline: skipping {', '.join(u.name for u in units[i:])}")
            ctx["skipped"] += [f"{bp.backend}/{u.name}" for u in units[i:]]
            break
        if not runner.alive():  # a client timeout stopped it
            runner = procs.ClientRunner(ctx["runner_argv"], CLIENT_ENV, ctx["client_log"], wl.REPO_ROOT)
        clock.say(bp.backend, f"{unit.name} ({i + 1}/{len(units)}): {unit.workload.describe()}")
        records.append(run_unit(args, ctx, unit, bp, proc, runner))
        row = records[-1]["row"]
        clock.say(bp.backend, f"{unit.name}: {row['status']}, output {row.get('output_throughput') or 0:.0f} tok/s"
                              f" (warmup {row.get('warmup_s')} s, client {row.get('client_s')} s)")
        if proc.poll() is not None:
            break
    runner.close()
    return records


def run_backend(args, ctx: dict, bp: BackendPlan, units: list[Unit], clock: Clock) -> None:
    """Start ``bp``'s server (and the client runner, whose imports overlap the server start), run
    every unit that fits the deadline, stop both; records written."""
    stem = args.out_dir / "logs" / bp.backend.replace(":", "-")
    ctx = {**ctx, "server_log": stem.with_name(f"server_{stem.name}.log"), "server_start_s": None,
           "client_log": stem.with_name(f"client_{stem.name}.log"),
           "runner_argv": [args.python, "-m", CLIENT_RUNNER]}
    for log in (ctx["server_log"], ctx["client_log"]):
        log.unlink(missing_ok=True)
    if procs.port_in_use(bp.port):
        for unit in units:
            write_record(args, ctx, unit, bp, {"status": "port_busy", "port": bp.port})
        return clock.say(bp.backend, f"port {bp.port} busy: skipped")
    clock.say(bp.backend, f"starting server: {shlex.join(bp.server_argv)}")
    proc = procs.start_process(bp.server_argv, bp.server_env, ctx["server_log"])
    runner = procs.ClientRunner(ctx["runner_argv"], CLIENT_ENV, ctx["client_log"], wl.REPO_ROOT)
    records, log_before_stop = [], ""
    try:
        state, waited = procs.wait_for_health(proc, bp.port, args.server_timeout, bp.backend)
        ctx["server_start_s"] = round(waited, 1)
        ctx["start_times"].append(waited)
        clock.say(bp.backend, f"server {state} after {waited:.0f} s")
        if state == "ready":
            records = run_units(args, ctx, bp, units, clock, proc, runner)
        else:
            tail = procs.tail_lines(ctx["server_log"], LOG_TAIL_LINES)
            print("  " + "\n  ".join(tail), flush=True)
            records = [write_record(args, ctx, u, bp, {"status": f"server_{state}", "server_exit_code": proc.poll(),
                                                       "server_log_tail": tail}) for u in units]
        log_before_stop = procs.read_from(ctx["server_log"])
    finally:
        runner.close()
        stop_code = procs.stop_process_group(proc, args.stop_grace)
    after = procs.read_from(ctx["server_log"])[len(log_before_stop):]
    for rec in records:  # what only the stop tells
        rec["row"].update(server_stop_exit_code=stop_code, shutdown_traceback="Traceback" in after,
                          server_log_has_traceback="Traceback" in log_before_stop)
        report.write_record(args.out_dir, rec)
    clock.say(bp.backend, f"server stopped (exit code {stop_code})")


# ---------------------------------------------------------------------------------------------
# Preparation, CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of this script."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="model directory from scripts.make_model_dir (required unless --merge-only)")
    p.add_argument("--shape", default=None,
                   help="(re)write --model-dir with this shape preset first (llama-3-8b, qwen2.5-7b, tiny)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: <model-dir>/tokenizer)")
    p.add_argument("--backends", default="packinfer,triton,flashinfer",
                   help="comma-separated attention backends; NAME:eager runs NAME with decode CUDA graphs off,"
                   " packinfer:compact runs packinfer with PACKINFER_COMPACT=1 (KV compaction and placement;"
                   " its own row, so packinfer,packinfer:compact compares compaction off and on in one run);"
                   " packinfer:fiprefill runs packinfer decode with FlashInfer prefill"
                   " (--prefill-attention-backend flashinfer); packinfer:triprefill runs extend on SGLang's"
                   " Triton kernels (PACKINFER_PREFILL_BACKEND=triton); NAME:mixedchunk adds --enable-mixed-chunk;"
                   " packinfer:dedup sets PACKINFER_PREFILL_DEDUP=1; NAME:lpm adds --schedule-policy lpm;"
                   " variants combine with + (packinfer:compact+eager)")
    p.add_argument("--baseline", default="",
                   help="comma-separated backends the 'vs best base' column compares with (default: every"
                   " backend but packinfer); the best of them in each table is the reference")
    p.add_argument("--workloads", "--workload", dest="workloads", default="all",
                   help=f"comma-separated workloads, or all ({', '.join(wl.ALL_WORKLOADS)});"
                   f" also known: {', '.join(sorted(set(wl.PRESETS) - set(wl.ALL_WORKLOADS)))}")
    p.add_argument("--quick", action="store_true", help="the quick sizes of the workloads (scripts.serving_workloads)")
    for field in wl.SIZE_FIELDS:
        p.add_argument("--" + field.replace("_", "-"), type=int, default=None,
                       help=f"override {field} (tokens or counts) of every selected workload whose kind uses it")
    p.add_argument("--range-ratio", type=float, default=None,
                   help="override the length range ratio of no-sharing and mixed")
    p.add_argument("--seed", type=int, default=1, help="client seed: same prompts for every backend")
    p.add_argument("--request-rate", default=None,
                   help="override every selected workload's client request rate (requests/s, Poisson arrivals;"
                   " inf sends all at time 0; default: the workload's own, inf for all but mixed)")
    p.add_argument("--port", type=int, default=30000, help="first server port; backend i uses port + i")
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for /health")
    p.add_argument("--client-timeout", type=float, default=1800.0, help="seconds one workload's client may run")
    p.add_argument("--stop-grace", type=float, default=8.0, help="seconds between SIGTERM and SIGKILL of a server")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip servers and workloads whose estimate would end past this many seconds after"
                   f" start (default with --quick: {QUICK_DEADLINE_S:.0f})")
    p.add_argument("--start-estimate-s", type=float, default=150.0,
                   help="expected seconds of one server start (plan estimate; --deadline-s uses it until a"
                   " server has started, then the slowest start measured)")
    p.add_argument("--verify", action="store_true", help="set PACKINFER_VERIFY=1 for the packinfer server")
    p.add_argument("--packinfer-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the packinfer server (repeatable)")
    p.add_argument("--extra-server-args", default="",
                   help="string appended (shlex-split) to every server command;"
                   " write --extra-server-args='--flag' when it is a single flag")
    p.add_argument("--extra-client-args", default="", help="string appended (shlex-split) to every client command")
    p.add_argument("--python", default=sys.executable, help="Python interpreter that runs servers and clients")
    p.add_argument("--out-dir", type=Path, default=Path("out/serving"),
                   help="folder for rows, logs and the report (out/ is git-ignored)")
    p.add_argument("--report-name", default="serving", help="stem of the report files in --out-dir")
    p.add_argument("--clear-dataset-cache", action="store_true",
                   help="delete sglang.benchmark's cached shared-prefix prompts for these workloads and seed first")
    p.add_argument("--merge-only", action="store_true", help="only rebuild the report from --out-dir/rows")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands and exit")
    return p


def prepare_model_dir(args: argparse.Namespace) -> Path:
    """Write the model directory if ``--shape`` is given; returns the tokenizer folder."""
    from packinfer_sglang.model_dirs import make_model_dir, tokenizer_dir

    if args.shape:
        make_model_dir(args.shape, args.model_dir)
    if not args.dry_run and not (args.model_dir / "config.json").exists():
        raise SystemExit(f"{args.model_dir}/config.json missing: run python -m scripts.make_model_dir or pass --shape")
    return (args.tokenizer or tokenizer_dir(args.model_dir)).resolve()


def prepare_inputs(args: argparse.Namespace, units: list[Unit]) -> None:
    """Write the multi-level dataset files; warn about (or clear) cached shared-prefix prompts."""
    for unit in units:
        for path in wl.dataset_cache_files(unit.workload, args.seed):
            if args.clear_dataset_cache:
                path.unlink()
            print(f"{'deleted' if args.clear_dataset_cache else 'reusing'} cached prompts {path}", flush=True)
        if unit.dataset_file is not None:
            from sglang.benchmark.utils import get_tokenizer  # the client's loader

            wl.write_multilevel_dataset(unit.workload, args.seed, get_tokenizer(str(args.tokenizer)),
                                        unit.dataset_file)


def print_summary(args: argparse.Namespace, units: list[Unit]) -> None:
    """The merged report's tables of this run's workloads (all without ``units``), and where the files are."""
    tables, files = report.merge_reports(args.out_dir, args.report_name, args.baselines)
    names = {u.name for u in units}  # none (--merge-only): every table
    for t in tables:
        if not names or (t["workload_name"] in names and t["mode"] == args.mode):
            print(f"\n## {t['workload_name']} ({t['mode']}): {t['description']}\n")
            print(report.render_table(t["rows"]))
    print("\nwrote " + ", ".join(str(f) for f in files), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.out_dir, args.mode = args.out_dir.resolve(), "quick" if args.quick else "full"
    if args.quick and args.deadline_s is None:
        args.deadline_s = QUICK_DEADLINE_S
    args.baselines = tuple(b.strip() for b in args.baseline.split(",") if b.strip()) or None
    if args.merge_only:
        return print_summary(args, [])
    if args.model_dir is None:
        raise SystemExit("--model-dir is required (unless --merge-only)")
    args.model_dir = args.model_dir.resolve()
    args.tokenizer = prepare_model_dir(args)
    try:
        units, plans = plan_units(args), plan_backends(args, args.tokenizer)
    except (KeyError, ValueError) as exc:  # unknown workload, bad sizes or extra arguments
        raise SystemExit(f"error: {exc}") from None
    print_plan(args, plans, units)
    if args.dry_run:
        for bp in plans:
            print(json.dumps({"backend": bp.backend, "server": shlex.join(bp.server_argv), "server_env": bp.server_env,
                              "clients": {u.name: commands(args, u, bp)["client"] for u in units}}, indent=2))
        return
    args.vocab_size = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]
    (args.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results").mkdir(parents=True, exist_ok=True)
    prepare_inputs(args, units)
    clock = Clock(args.deadline_s)
    ctx = {"environment": report.environment(), "start_times": [], "skipped": []}
    for bp in plans:
        start_s = max(ctx["start_times"], default=args.start_estimate_s)  # measured ones once there are
        if not clock.fits(start_s + args.stop_grace + (wl.estimate_seconds(units[0].workload) if units else 0)):
            clock.say(bp.backend, "deadline: server not started")
            ctx["skipped"] += [f"{bp.backend}/{u.name}" for u in units]
            continue
        run_backend(args, ctx, bp, units, clock)
    print_summary(args, units)
    if ctx["skipped"]:
        print(f"skipped for the deadline (run them in another invocation into {args.out_dir}): "
              + ", ".join(ctx["skipped"]), flush=True)


if __name__ == "__main__":
    main()
