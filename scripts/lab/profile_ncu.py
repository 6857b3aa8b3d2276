"""Hardware counters of our partial kernel on a few grid cases, read by Nsight Compute (GPU only).

For each case this runs ``ncu`` on a child of this module (``--run-case``), which plans the case
as :mod:`scripts.bench_kernel` does (the eager launch: one program per item and KV head) and calls
``run_packed_cascade`` a few times; ncu profiles one call of
``_packed_attn_partial_kernel`` after the JIT warmup with ``--set detailed`` and the warp-state
section, clocks left alone (``--clock-control none``, as the device notes ask). The merge launch is
not profiled. Writes, under ``--out-dir``: ``ncu_<case>.csv`` (ncu's raw page, every metric
collected) and ``ncu_profile.json`` / ``.md`` with the metrics that say where the time goes: duration,
tensor-pipe and issue utilization, L2 and DRAM throughput, the L2 hit rate and the top warp stall
reasons (warps stalled per issued instruction). ``--summarize-only`` rebuilds the JSON and table
from the CSVs already in ``--out-dir``.

    python -m scripts.lab.profile_ncu --cases B64_P4096_S32,B64_P4096_S256 --out-dir out/ncu
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .. import bench_kernel as bk
from .. import kernel_cases as kc

REPO_ROOT = Path(__file__).resolve().parents[2]  # the ncu child runs as `python -m` from here
KERNEL = "_packed_attn_partial_kernel"
CASES = ("B64_P4096_S32,B64_P4096_S256,B64_P16384_S256,B64_P4096_S256_qwen2.5-7b,B64_P4096_S256_llama3-70b-tp8,"
         "B64_P0_S4096")
CALLS, SKIP = 6, 3  # calls of the kernel per child; ncu skips the first SKIP (JIT and warm caches)
# (column of the report, ncu raw metric); the stall metrics are added from whatever ncu reports
METRICS = (
    ("duration us", "gpu__time_duration.sum"),
    ("SM busy %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("issue active %", "sm__issue_active.avg.pct_of_peak_sustained_elapsed"),
    ("tensor pipe %", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"),
    ("memory busy %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L2 busy %", "lts__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L2 hit %", "lts__t_sector_hit_rate.pct"),
    ("DRAM busy %", "dram__cycles_active.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM read GB", "dram__bytes_read.sum"),
    ("L2 to SM GB", "lts__t_sectors_srcunit_tex_op_read.sum"),
    ("warps active / SM", "sm__warps_active.avg.per_cycle_active"),
)
# warps stalled per issued instruction, by reason ("selected", the issuing warp, left out)
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def run_case(name: str) -> None:
    """The ncu child: plan the full-grid case ``name`` and launch it ``CALLS`` times."""
    import torch
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: under TRITON_INTERPRET=1
    kern = bk.import_kernels()
    cases = {c.name: c for c in kc.full_grid()}
    if name not in cases:
        raise SystemExit(f"unknown case {name!r}: not in the full grid of scripts.kernel_cases")
    inp = kc.make_inputs(cases[name], dev)
    hq, hkv, d = inp.q.shape[1], inp.k_buffer.shape[1], inp.q.shape[2]
    plan = kern.plan_packed_cascade(*inp[3:8], hq, hkv, head_dim=d, dtype=inp.k_buffer.dtype)
    out = torch.empty_like(inp.q)
    for _ in range(CALLS):
        kern.run_packed_cascade(inp.q, inp.k_buffer, inp.v_buffer, plan, inp.sm_scale, out)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"{name}: {plan.num_items} items, {plan.num_partials} partials", flush=True)


UNIT_SCALE = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6,  # to microseconds (ncu 2025 writes "ns")
              "nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
              "byte": 1e-9, "Kbyte": 1e-6, "Mbyte": 1e-3, "Gbyte": 1.0, "Tbyte": 1e3}  # to GB


def read_raw(path: Path) -> dict[str, tuple[str, str]]:
    """ncu's ``--page raw --csv`` output: header row of metric names, a units row, then one row per
    profiled kernel; returns the first kernel's ``{metric: (value, unit)}``."""
    rows = [r for r in csv.reader(path.read_text().splitlines()) if r]
    start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    header, units, data = rows[start], rows[start + 1], rows[start + 2]
    return {h: (v, u) for h, u, v in zip(header, units, data, strict=False)}


def number(entry: tuple[str, str] | None) -> float | None:
    """A metric's value, times / bytes converted to microseconds / GB by its unit."""
    if entry is None:
        return None
    try:
        value = float(entry[0].replace(",", ""))
    except ValueError:
        return None
    return value * UNIT_SCALE.get(entry[1], 1.0)


def summarize(spec: str, raw: dict[str, tuple[str, str]]) -> dict:
    """The report's columns of one case (:data:`METRICS`, the stall reasons sorted, the top four)."""
    row = {"case": spec}
    for col, metric in METRICS:
        row[col] = number(raw.get(metric))
    if row["L2 to SM GB"] is not None:
        row["L2 to SM GB"] = row["L2 to SM GB"] * 32 / 1e9  # sectors of 32 bytes
    stalls = {k[len(STALL_PREFIX):-len(STALL_SUFFIX)]: number(v) for k, v in raw.items()
              if k.startswith(STALL_PREFIX) and k.endswith(STALL_SUFFIX) and number(v)}
    stalls.pop("selected", None)
    row["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1]))
    row["top stalls"] = ", ".join(f"{k} {v:.1f}" for k, v in list(row["stalls"].items())[:4])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=CASES, help="comma-separated full-grid case names")
    p.add_argument("--out-dir", type=Path, default=Path("out/ncu"), help="where the CSVs and the report go")
    p.add_argument("--ncu", default=shutil.which("ncu") or "/usr/local/cuda/bin/ncu", help="the ncu binary")
    p.add_argument("--timeout-s", type=float, default=240.0, help="per case")
    p.add_argument("--summarize-only", action="store_true", help="rebuild the report from --out-dir's CSVs")
    p.add_argument("--run-case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_case:
        run_case(args.run_case)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows, failures = [], {}
    for spec in args.cases.split(","):
        csv_path = args.out_dir / f"ncu_{spec}.csv"
        if args.summarize_only:
            if csv_path.exists():
                rows.append(summarize(spec, read_raw(csv_path)))
            continue
        cmd = [args.ncu, "--clock-control", "none", "--target-processes", "all", "-k", f"regex:{KERNEL}",
               "--launch-skip", str(SKIP), "--launch-count", "1", "--set", "detailed", "--section", "WarpStateStats",
               "--csv", "--page", "raw", "--print-units", "base", sys.executable, "-m", __spec__.name,
               "--run-case", spec]
        print(f"[ncu] {spec}", flush=True)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=REPO_ROOT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
        except subprocess.TimeoutExpired:
            failures[spec] = f"timed out after {args.timeout_s} s"
            continue
        csv_path.write_text(res.stdout)
        try:
            rows.append(summarize(spec, read_raw(csv_path)))
        except (StopIteration, IndexError) as e:
            failures[spec] = f"no profile (rc {res.returncode}, {type(e).__name__}): {res.stderr[-600:]}"
            print(failures[spec], flush=True)
            continue
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "stalls"}), flush=True)
    meta_path = args.out_dir / "ncu_profile.json"
    if args.summarize_only and meta_path.exists():  # keep the GPU run's environment
        meta = json.loads(meta_path.read_text())["meta"]
    else:
        import torch
        meta = bk.environment(torch.device("cuda"))
    meta_path.write_text(json.dumps({"meta": meta, "rows": rows, "failures": failures},
                                                              indent=1) + "\n")
    cols = [c for c, _ in METRICS] + ["top stalls"]
    lines = [f"# ncu counters of {KERNEL}", "", f"- GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}",
             ("- ncu --set detailed --section WarpStateStats --clock-control none; one call after "
              f"{SKIP} warm ones; stalls: warps stalled per issued instruction, by reason"), "",
             "| case | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    fmt = lambda v: "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
    lines += [f"| {r['case']} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += [f"- {k}: {v}" for k, v in failures.items()]
    (args.out_dir / "ncu_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
