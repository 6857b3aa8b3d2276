"""Client runner: runs benchmark client jobs one after another in one process.

Importing ``sglang.benchmark.serving`` takes seconds; a serving run of five workloads per backend
would pay it ten times with one process per run. The driver (:mod:`.bench_serving`) starts this
runner (``python -m scripts.serving_client``, from the repository root) once per server and sends
it jobs, one JSON line each on stdin::

    {"id": 3, "client": "sglang", "argv": ["--backend", "sglang", "--port", "30000", ...]}

``client`` "sglang" runs ``python -m sglang.benchmark.serving <argv>`` in this process (its
``cli_main``, which parses ``argv`` with the stock parser), "parallel" runs
``python -m scripts.serving_parallel <argv>`` (:mod:`.serving_parallel`), both in this process. After each job one JSON line goes back on stdout:
``{"id": 3, "ok": true, "error": null}`` (``ok`` false with the exception when the client raised or
exited non-zero). Everything the clients print goes to stderr, which the driver sends to the client
log. EOF on stdin ends the runner.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def run_job(job: dict) -> str | None:
    """Run one job; returns None on success, else the error text."""
    try:
        if job["client"] == "sglang":
            from sglang.benchmark import serving

            sys.argv = ["sglang.benchmark.serving", *job["argv"]]
            serving.cli_main()
        elif job["client"] == "parallel":
            from . import serving_parallel

            serving_parallel.main(job["argv"])
        else:
            return f"unknown client {job['client']!r}"
    except SystemExit as exc:  # argparse errors and explicit exits
        return None if exc.code in (0, None) else f"SystemExit({exc.code!r})"
    except Exception as exc:  # noqa: BLE001 -- reported to the driver, the runner goes on
        traceback.print_exc()
        return repr(exc)
    return None


def main() -> None:
    # Replies go to the original stdout; fd 1 itself (Python prints and C code alike) goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        print(f"=== job {job['id']}: {job['client']} {' '.join(job['argv'])}", flush=True)
        error = run_job(job)
        sys.stderr.flush()
        replies.write(json.dumps({"id": job["id"], "ok": error is None, "error": error}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
