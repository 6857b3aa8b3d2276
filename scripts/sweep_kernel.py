#!/usr/bin/env python3
"""Launch-parameter sweep of the packed cascade kernel on a few cases (GPU only; ours only).

For each case of ``--cases`` (names of :mod:`kernel_cases`' full grid) and each variant
(``block_n`` x ``num_warps`` x ``num_stages`` x planner ``waves``): plan, check against the fp32
oracle, time by CUDA-graph replay (median; L2 warm). Baselines are not re-timed here: compare with
``bench_kernel.py --full`` on the same GPU. Writes ``sweep_<gpu>.json`` and prints a table with the
best variant per case.

    python scripts/sweep_kernel.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernel as bk  # noqa: E402
import kernel_cases as kc  # noqa: E402

DEFAULT_CASES = ("B64_P0_S4096,B16_P0_S8192,B256_P0_S1024,B64_P4096_S256,B16_P2048_S512,B256_P2048_S256,"
                 "B64_P4096_S4096,B32_P8192_S1024")


def variants():
    for block_n, warps, stages, waves in itertools.product((64, 128), (4, 8), (2, 3, 4), (2, 4)):
        yield {"block_n": block_n, "num_warps": warps, "num_stages": stages, "waves": waves}


def run_variant(kern, inp, ref, var, rep_ms, tol) -> dict:
    plan = kern.plan_packed_cascade(*inp[3:8], inp.q.shape[1], inp.k_buffer.shape[1], waves=var["waves"])
    out = torch.full_like(inp.q, float("nan"))
    launch = {k: var[k] for k in ("block_n", "num_warps", "num_stages")}

    def run():
        kern.run_packed_cascade(inp.q, inp.k_buffer, inp.v_buffer, plan, inp.sm_scale, out, **launch)
    try:
        run()
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        if not err <= tol:
            return {**var, "status": "wrong", "rel_err": err}
        return {**var, "status": "ok", "rel_err": err, "us": bk.time_us(run, rep_ms)}
    except Exception as e:  # a variant that does not compile (shared memory) is recorded
        return {**var, "status": "error", "note": f"{type(e).__name__}: {e}"[:200]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated exact case names of the full grid")
    p.add_argument("--rep-ms", type=float, default=10.0, help="ms of calls per timed CUDA graph")
    p.add_argument("--out-dir", type=Path, default=Path("out/kernel"), help="folder of the JSON")
    args = p.parse_args(argv)
    dev, kern, start = torch.device("cuda"), bk.import_kernels(), time.perf_counter()
    by_name = {c.name: c for c in kc.full_grid()}
    rows = []
    for name in args.cases.split(","):
        inp = kc.make_inputs(by_name[name], dev)
        ref = kern.reference.packed_cascade_attention_ref(*inp.cascade_args())[0]
        tol = bk.TOLERANCE[by_name[name].dtype]
        results = [run_variant(kern, inp, ref, v, args.rep_ms, tol) for v in variants()]
        ok = [r for r in results if r["status"] == "ok"]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        rows.append({"case": name, "results": results, "best": best})
        print(f"{name:24s} best {best['us'] if best else float('nan'):8.1f} us {best}", flush=True)
    meta = {**bk.environment(dev), "wall_s": round(time.perf_counter() - start, 1), "rep_ms": args.rep_ms}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"sweep_{meta['gpu'].split()[1].lower() if len(meta['gpu'].split()) > 1 else 'gpu'}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}; wall {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
