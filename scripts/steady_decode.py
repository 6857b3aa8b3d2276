"""Steady decode rates (and the packinfer backend's logged counters: host plan time, verified
layer-steps, compaction moves) of committed serving runs, from their server-log excerpts (CPU only).

An excerpt file holds one ``## <backend>`` (or ``### <backend>``) section of SGLang server-log
lines per backend; each section is read with :func:`.serving_report.steady_decode` and paired with
the GPU and versions of the run's JSON.

    python -m scripts.steady_decode benchmarks/results/archive/serving_anchors_h100.json \\
        benchmarks/results/archive/serving_h100_log_excerpts.txt --out out/steady.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import serving_report as report


def sections(text: str) -> dict[str, str]:
    """``{backend: its lines}`` of an excerpt file (headings ``## name:``/``### name``)."""
    out, name = {}, None
    for line in text.splitlines(keepends=True):
        m = re.match(r"^#{2,3} ([\w.:-]+?):?(\s|$)", line)
        if m:
            name = m[1]
            out.setdefault(name, "")
        elif name:
            out[name] += line
    return out


def _environment(run: dict):
    """The run's environment: one object (older single-workload JSON) or, for a merged report, the
    distinct environments of its rows by backend."""
    if "environment" in run:
        return run["environment"]
    return {row["backend"]: row["environment"] for table in run["tables"] for row in table["rows"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_json", type=Path, help="the run's serving JSON (its environment is copied)")
    p.add_argument("excerpts", type=Path, help="server-log excerpt file of the same run")
    p.add_argument("--backends", default=None, help="comma-separated sections to keep (default: all with lines)")
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = p.parse_args(argv)
    run = json.loads(args.run_json.read_text())
    keep = args.backends.split(",") if args.backends else None
    rows = [{"backend": name, **report.steady_decode(text), **report.packinfer_stats(text)} for name, text in sections(args.excerpts.read_text()).items()
            if keep is None or name in keep]
    out = {"environment": _environment(run), "run": args.run_json.name, "log_excerpts": args.excerpts.name,
           "method": report.steady_decode.__doc__.split("\n\n")[0].replace("\n", " "),
           "packinfer_counters": report.packinfer_stats.__doc__.replace("\n", " "), "rows": rows}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(f"{r['backend']:20s} {r['steady_decode_tok_s']} tok/s at batch {r['steady_decode_batch']} "
              f"({r['steady_decode_lines']} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
