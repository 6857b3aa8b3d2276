"""Serving benchmark results: rows from client output, per-run row files, their merge into one
report (JSON, one Markdown table per workload, a PNG of grouped bars, and a PNG of the KV
fragmentation series over decode steps where the server logged them).

Each (workload, mode, backend) run leaves ``<out-dir>/rows/<workload>.<mode>.<backend>.json`` (a
record: workload, backend, commands, environment and the row). ``merge_reports`` rebuilds
``<name>.json``, ``<name>.md`` and ``<name>.png`` from every record in ``rows/``, so separate
invocations into one ``--out-dir`` (one per backend, say) end in one report; a later run of the same
(workload, mode, backend) replaces the earlier record.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PACKINFER = "packinfer"
VERSION_PACKAGES = ("torch", "triton", "sglang", "flashinfer-python", "transformers")
LOG_LINE_PREFIX = "packinfer:"  # the backend's summary lines (config.py's PACKINFER_LOG_EVERY)
PACKINFER_LOG_LINES = 5
FRAGMENTATION_PREFIX = "packinfer: fragmentation step"  # PACKINFER_FRAG_LOG_EVERY
_FRAGMENTATION_LINE = re.compile(FRAGMENTATION_PREFIX + r" (\d+): (\{.*\})")
WORKLOAD_ORDER = ("anchors", "prefill-heavy", "multi-level", "parallel-sampling", "no-sharing", "mixed")
# (series key stem, label) of the fragmentation plot's panels: mean and max over the logged batch.
FRAGMENTATION_PANELS = (("prefix_runs", "runs per shared group's prefix"), ("suffix_runs", "runs per request's suffix"))

# Keys of the JSON line sglang.benchmark.serving (and scripts.serving_parallel) appends to --output-file;
# times in milliseconds, throughputs in tokens (or requests) per second, duration in seconds.
RESULT_KEYS = (
    "completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
    "p99_itl_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms", "max_concurrent_requests",
)

# (header, row key, format) of the Markdown tables.
TABLE_COLUMNS = (
    ("backend", "backend", "{}"), ("status", "status", "{}"), ("done", "completed", "{}"),
    ("out tok/s", "output_throughput", "{:.1f}"), ("vs best base", "throughput_vs_best_baseline", "{:.2f}x"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.1f}"), ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("ITL p50 ms", "median_itl_ms", "{:.2f}"), ("ITL p99 ms", "p99_itl_ms", "{:.2f}"),
    ("E2E p50 ms", "median_e2e_latency_ms", "{:.0f}"), ("E2E p99 ms", "p99_e2e_latency_ms", "{:.0f}"),
    ("steady decode tok/s", "steady_decode_tok_s", "{:.0f}"), ("traceback", "log_has_traceback", "{}"),
)


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


def scan_server_log(text: str, last: int = PACKINFER_LOG_LINES) -> dict:
    """``log_tail``: the last ``last`` packinfer summary lines (the message starts with "packinfer:"
    after an optional ``[date time]`` stamp; each cut to 400 characters; fragmentation lines, kept
    whole by :func:`fragmentation_series`, left out); ``log_has_traceback``:
    whether ``Traceback`` occurs anywhere in ``text``."""
    hits = [line[:400] for line in text.splitlines()
            if line.split("] ", 1)[-1].lstrip().startswith(LOG_LINE_PREFIX) and FRAGMENTATION_PREFIX not in line]
    return {"log_tail": hits[-last:], "log_has_traceback": "Traceback" in text}


_DECODE_LINE = re.compile(r"Decode batch, #running-req: (\d+),.*gen throughput \(token/s\): ([\d.]+)")


def steady_decode(text: str) -> dict:
    """Steady decode rate from SGLang's "Decode batch" log lines: the median ``gen throughput``
    (tokens/s) over the lines at the largest ``#running-req``, skipping the first such line (it
    spans the ramp from prefill). Keys ``steady_decode_tok_s``, ``steady_decode_batch``,
    ``steady_decode_lines`` (None, None, 0 without such lines)."""
    lines = [(int(m[1]), float(m[2])) for m in _DECODE_LINE.finditer(text)]
    if not lines:
        return {"steady_decode_tok_s": None, "steady_decode_batch": None, "steady_decode_lines": 0}
    batch = max(b for b, _ in lines)
    rates = [r for b, r in lines if b == batch][1:] or [r for b, r in lines if b == batch]
    return {"steady_decode_tok_s": statistics.median(rates), "steady_decode_batch": batch,
            "steady_decode_lines": len(rates)}


_PACKINFER_STEP = re.compile(r"packinfer: decode step (\d+),.*?host plan (\d+) us/step"
                             r"(?:, verified (\d+) layer-steps, max rel err ([\d.e+-]+))?")
_PACKINFER_MOVED = re.compile(r"packinfer: compaction moved (\d+) tokens")


def packinfer_stats(text: str) -> dict:
    """The packinfer backend's own counters from its log lines (the last decode-step line; the
    compaction lines): ``host_plan_us_per_step`` (mean host time of decode metadata since start),
    ``verified_layer_steps``, ``verify_max_rel_err``, ``compaction_plans``,
    ``compaction_tokens_moved`` (a list, per plan), ``fragmentation`` (:func:`fragmentation_series`).
    Empty dict when the log has none."""
    steps = list(_PACKINFER_STEP.finditer(text))
    moved = [int(m[1]) for m in _PACKINFER_MOVED.finditer(text)]
    out = {}
    if steps:
        last = steps[-1]
        out = {"packinfer_decode_steps": int(last[1]), "host_plan_us_per_step": int(last[2])}
        if last[3] is not None:
            out.update(verified_layer_steps=int(last[3]), verify_max_rel_err=float(last[4]))
    if moved:
        out.update(compaction_plans=len(moved), compaction_tokens_moved=moved)
    series = fragmentation_series(text)
    if series:
        out["fragmentation"] = series
    return out


def fragmentation_series(text: str) -> list[dict]:
    """The fragmentation time series of a server log (``PACKINFER_FRAG_LOG_EVERY``; the lines of
    ``patches/fragmentation_log.py``): per line ``{"step": N, **its JSON}`` (``groups``,
    ``requests``, ``batch``, ``shared_groups``, ``prefix_runs``, ``suffix_runs``, ``tokens``,
    ``runs_per_1k_tokens``, ``prefix_runs_mean``/``_max`` per shared group, ``suffix_runs_mean``/
    ``_max`` per request), in log order. Lines whose JSON is cut off are skipped."""
    series = []
    for m in _FRAGMENTATION_LINE.finditer(text):
        try:
            series.append({"step": int(m[1]), **json.loads(m[2])})
        except json.JSONDecodeError:
            continue
    return series


def is_baseline(backend: str, baselines: tuple[str, ...] | None) -> bool:
    """Whether ``backend`` ("NAME" or "NAME:variant") counts as a baseline: named in ``baselines``
    (by full or base name), or, without that list, any backend that is not packinfer."""
    if baselines:
        return backend in baselines or backend.partition(":")[0] in baselines
    return backend.partition(":")[0] != PACKINFER


def add_baseline_ratio(rows: list[dict], baselines: tuple[str, ...] | None = None) -> str | None:
    """Set ``throughput_vs_best_baseline`` (output throughput / the best baseline's) on every row in
    place; returns the best baseline's backend name (None without an "ok" baseline row)."""
    candidates = [r for r in rows if is_baseline(r["backend"], baselines) and r.get("status") == "ok"
                  and r.get("output_throughput")]
    best = max(candidates, key=lambda r: r["output_throughput"], default=None)
    for row in rows:
        value = row.get("output_throughput")
        row["throughput_vs_best_baseline"] = value / best["output_throughput"] if value and best else None
    return best["backend"] if best else None


def render_table(rows: list[dict]) -> str:
    """Markdown table of ``rows``, one per backend; missing values shown as ``-``."""
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else fmt.format(value)

    lines = ["| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row, key, fmt) for _, key, fmt in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Environment
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


# ---------------------------------------------------------------------------------------------
# Row files and their merge
# ---------------------------------------------------------------------------------------------


def record_path(out_dir: Path, workload_name: str, mode: str, backend: str) -> Path:
    """Where the record of one (workload, mode, backend) run lives."""
    return out_dir / "rows" / f"{workload_name}.{mode}.{backend.replace(':', '-')}.json"


def write_record(out_dir: Path, record: dict) -> Path:
    """Write one run's record (keys ``workload_name``, ``mode``, ``backend``, ``row``, ...)."""
    path = record_path(out_dir, record["workload_name"], record["mode"], record["backend"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_records(out_dir: Path) -> list[dict]:
    """Every record under ``out_dir/rows`` (sorted by file name); raises ``ValueError`` on a broken file."""
    records = []
    for path in sorted((out_dir / "rows").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from exc
    return records


def _backend_order(backend: str) -> tuple:
    return (backend.partition(":")[0] != PACKINFER, backend)


def build_tables(records: list[dict], baselines: tuple[str, ...] | None = None) -> list[dict]:
    """One table per (workload name, mode, workload sizes): its rows (row fields plus ``backend``,
    ``commands``, ``environment``, ``seed``), packinfer first, with ratios to the best baseline."""
    tables: dict[tuple, dict] = {}
    for rec in records:
        key = (rec["workload_name"], rec["mode"], json.dumps(rec["workload"], sort_keys=True))
        table = tables.setdefault(key, {k: rec[k] for k in ("workload_name", "mode", "workload", "description")}
                                  | {"rows": []})
        table["rows"].append({"backend": rec["backend"], **rec["row"], "seed": rec.get("seed"),
                              "request_rate": rec.get("request_rate"), "model_dir": rec.get("model_dir"),
                              "commands": rec.get("commands"), "environment": rec.get("environment")})
    order = {name: i for i, name in enumerate(WORKLOAD_ORDER)}
    result = sorted(tables.values(), key=lambda t: (order.get(t["workload_name"], len(order)),
                                                    t["workload_name"], t["mode"]))
    for table in result:
        table["rows"].sort(key=lambda r: _backend_order(r["backend"]))
        table["best_baseline"] = add_baseline_ratio(table["rows"], baselines)
    return result


def fragmentation_line(rows: list[dict]) -> str | None:
    """One Markdown line on the rows' fragmentation series (None without any): per backend, the
    lines logged and the mean over them of runs per shared group's prefix and per request's suffix,
    the last line's value in parentheses."""
    def avg(series, key):
        values = [p[key] for p in series if p.get(key) is not None]
        return f"{sum(values) / len(values):.2f}" if values else "-"

    def last(series, key):
        return "-" if series[-1].get(key) is None else f"{series[-1][key]:.2f}"

    parts = [f"{r['backend']}: {len(f)} lines, prefix {avg(f, 'prefix_runs_mean')} ({last(f, 'prefix_runs_mean')}),"
             f" suffix {avg(f, 'suffix_runs_mean')} ({last(f, 'suffix_runs_mean')})"
             for r in rows if (f := r.get("fragmentation"))]
    if not parts:
        return None
    return ("fragmentation (runs per shared group's prefix and per request's suffix, mean over the logged decode"
            " batches, last in parentheses): " + "; ".join(parts))


def render_markdown(tables: list[dict], title: str = "Serving benchmark",
                    baselines: tuple[str, ...] | None = None) -> str:
    """The report: environment lines (every GPU, version set and date seen), then per workload a
    heading, its description and its table."""
    envs = [r["environment"] for t in tables for r in t["rows"] if r.get("environment")]
    gpus = sorted({str(e.get("gpu")) for e in envs})
    versions = sorted({", ".join(f"{k} {v}" for k, v in e["versions"].items() if v) for e in envs})
    dates = sorted(e["date"] for e in envs)
    rows = [r for t in tables for r in t["rows"]]
    rates = ", ".join(sorted({str(r.get("request_rate")) for r in rows}))
    models = ", ".join(sorted({str(r.get("model_dir")) for r in rows}))
    lines = [f"# {title}", "", f"- GPU: {'; '.join(gpus) or '-'}",
             *[f"- versions: {v}" for v in versions],
             f"- dates: {dates[0]} to {dates[-1]}" if dates else "- dates: -",
             (f"- vs best base: output throughput / the best baseline's in the same table (baselines:"
              f" {', '.join(baselines) if baselines else 'every backend but packinfer'})"),
             f"- model: {models} (--load-format dummy); request rate (requests/s; inf: all at time 0): {rates}",
             ""]
    for t in tables:
        best = t.get("best_baseline") or "none"
        lines += [f"## {t['workload_name']} ({t['mode']})", "", f"{t['description']}; best baseline: {best}",
                  "", render_table(t["rows"]), ""]
        frag = fragmentation_line(t["rows"])
        lines += [frag, ""] if frag else []
    return "\n".join(lines)


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def write_plot(path: Path, tables: list[dict]) -> None:
    """Grouped bars: output throughput per workload (groups) and backend (bars), ratio to the best
    baseline written over each bar. Needs matplotlib."""
    plt = _pyplot()

    backends = sorted({r["backend"] for t in tables for r in t["rows"]}, key=_backend_order)
    width = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 * len(tables)), 4.5))
    for i, backend in enumerate(backends):
        xs, ys, labels = [], [], []
        for j, t in enumerate(tables):
            row = next((r for r in t["rows"] if r["backend"] == backend), None)
            if row and row.get("output_throughput"):
                ratio = row.get("throughput_vs_best_baseline")
                xs.append(j + (i - (len(backends) - 1) / 2) * width)
                ys.append(row["output_throughput"])
                labels.append(f"{ratio:.2f}x" if ratio else "")
        bars = ax.bar(xs, ys, width, label=backend)
        ax.bar_label(bars, labels=labels, fontsize=7)
    ax.set_xticks(range(len(tables)), [f"{t['workload_name']}\n({t['mode']})" for t in tables])
    ax.set_ylabel("output tokens/s")
    ax.set_title("SGLang server, output throughput by attention backend")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_fragmentation_plot(path: Path, tables: list[dict]) -> bool:
    """Runs per shared group's prefix (left) and per request's suffix (right) over the server's
    decode steps, one row of panels per table with a fragmentation series, one color per backend
    (solid: mean over the logged batch, dotted: max). Returns False (nothing written) without a
    series. Needs matplotlib."""
    tables = [t for t in tables if any(r.get("fragmentation") for r in t["rows"])]
    if not tables:
        return False
    plt = _pyplot()

    backends = sorted({r["backend"] for t in tables for r in t["rows"] if r.get("fragmentation")}, key=_backend_order)
    color = {b: f"C{i}" for i, b in enumerate(backends)}
    nan = float("nan")
    fig, axes = plt.subplots(len(tables), len(FRAGMENTATION_PANELS), figsize=(11, 3.6 * len(tables)), squeeze=False)
    for panel_row, t in zip(axes, tables):
        for ax, (key, label) in zip(panel_row, FRAGMENTATION_PANELS):
            for row in (r for r in t["rows"] if r.get("fragmentation")):
                series, b = row["fragmentation"], row["backend"]
                steps = [p["step"] for p in series]
                for stat, style in (("mean", "-"), ("max", ":")):
                    values = [nan if p.get(f"{key}_{stat}") is None else p[f"{key}_{stat}"] for p in series]
                    ax.plot(steps, values, style, color=color[b], lw=1.5 if stat == "mean" else 1.0, label=f"{b} {stat}")
            ax.set_title(f"{t['workload_name']} ({t['mode']}): {label}", fontsize=9)
            ax.set_xlabel("decode step (server)")
            ax.set_ylabel("contiguous slot runs")
            ax.legend(fontsize=7)
    _save(fig, path)
    return True


def merge_reports(out_dir: Path, name: str = "serving", baselines: tuple[str, ...] | None = None
                  ) -> tuple[list[dict], list[Path]]:
    """Rebuild ``out_dir/<name>.{json,md,png}`` (and ``<name>_fragmentation.png`` where rows hold a
    fragmentation series) from every record in ``out_dir/rows``; returns the tables and the files
    written (the PNGs are skipped, with a message, without matplotlib)."""
    tables = build_tables(load_records(out_dir), baselines)
    json_path, md_path, png_path = (out_dir / f"{name}{ext}" for ext in (".json", ".md", ".png"))
    report = {"generated": datetime.now(UTC).isoformat(timespec="seconds"),
              "baselines": list(baselines) if baselines else "every backend but packinfer",
              "tables": tables}
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(render_markdown(tables, baselines=baselines))
    written = [json_path, md_path]
    try:
        if tables:
            write_plot(png_path, tables)
            written.append(png_path)
        frag_path = out_dir / f"{name}_fragmentation.png"
        if write_fragmentation_plot(frag_path, tables):
            written.append(frag_path)
    except Exception as exc:  # noqa: BLE001 -- a missing matplotlib is not worth a failed run
        print(f"plot skipped: {type(exc).__name__}: {exc}", flush=True)
    return tables, written
