#!/usr/bin/env python3
"""Launch-parameter sweep of the packed cascade kernel on a few cases (GPU only; ours only).

For each case of ``--cases`` (names of :mod:`kernel_cases`' full grid) and each variant
(``block_n`` x ``num_warps`` x ``num_stages`` x ``prefix_block_m`` x persistent grid or one program
per item x planner ``waves``: the kernel's measured occupancy, 2 or 4 programs per SM): plan, check
against the fp32 oracle, time by CUDA-graph replay (median; L2 warm). Baselines are not re-timed here: compare with
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
import bench_kernel as bk
import kernel_cases as kc

DEFAULT_CASES = ("B64_P0_S4096,B16_P0_S8192,B256_P0_S1024,B64_P4096_S256,B16_P2048_S512,B256_P2048_S256,"
                 "B64_P4096_S4096,B32_P8192_S1024")


def variants():
    for block_n, warps, stages, pbm, persistent in itertools.product((64, 128), (4, 8), (2, 3), (64, 128), (False, True)):
        for waves in ("occ", 2, 4):
            yield {"block_n": block_n, "num_warps": warps, "num_stages": stages, "prefix_block_m": pbm,
                   "persistent": persistent, "waves": waves}


def run_variant(kern, inp, ref, var, rep_ms, tol) -> dict:
    from packinfer_sglang.kernels.packed_cascade import kernel_occupancy, num_sms_of, persistent_programs
    launch = {k: var[k] for k in ("block_n", "num_warps", "num_stages")}
    dev, gqa = inp.q.device, inp.q.shape[1] // inp.k_buffer.shape[1]
    try:
        occ = kernel_occupancy(dev, inp.k_buffer.dtype, inp.q.shape[2], gqa, prefix_block_m=var["prefix_block_m"],
                               persistent=var["persistent"], **launch)
        waves = occ if var["waves"] == "occ" else var["waves"]
        plan = kern.plan_packed_cascade(*inp[3:8], inp.q.shape[1], inp.k_buffer.shape[1], waves=waves,
                                        prefix_block_m=var["prefix_block_m"], kv_align=var["block_n"])
        if var["persistent"]:
            plan = plan._replace(num_programs=persistent_programs(num_sms_of(dev), waves, inp.k_buffer.shape[1]))
        out = torch.full_like(inp.q, float("nan"))

        def run():
            kern.run_packed_cascade(inp.q, inp.k_buffer, inp.v_buffer, plan, inp.sm_scale, out, **launch)
        run()
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        info = {**var, "occupancy": occ, "items": plan.num_items, "partials": plan.num_partials, "rel_err": err}
        if not err <= tol:
            return {**info, "status": "wrong"}
        return {**info, "status": "ok", "us": bk.time_us(run, rep_ms)}
    except Exception as e:  # noqa: BLE001 -- a variant that does not compile (shared memory) is recorded
        return {**var, "status": "error", "note": f"{type(e).__name__}: {e}"[:200]}


def _key(r) -> str:
    return (f"n{r['block_n']} w{r['num_warps']} s{r['num_stages']} m{r['prefix_block_m']} "
            f"{'P' if r['persistent'] else 'F'} {r['waves']}")


def summary(rows) -> str:
    """Per case: best variant, and each variant's time relative to the best, averaged over cases
    (geometric mean), the ten best variants overall first."""
    import math
    ratios: dict[str, list[float]] = {}
    for row in rows:
        best = row["best"]["us"] if row["best"] else None
        for r in row["results"]:
            ratios.setdefault(_key(r), []).append(r["us"] / best if best and r["status"] == "ok" else float("inf"))
    ranked = sorted(ratios.items(), key=lambda kv: sum(map(math.log, kv[1])) / len(kv[1]))
    lines = ["variant (block_n warps stages prefix_block_m Persistent|Flat waves): geo-mean x best, per case"]
    for key, rs in ranked[:10]:
        gm = math.exp(sum(map(math.log, rs)) / len(rs))
        lines.append(f"  {key:22s} {gm:5.2f}  " + " ".join(f"{x:4.2f}" for x in rs))
    lines.append("cases: " + ", ".join(row["case"] for row in rows))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated exact case names of the full grid")
    p.add_argument("--rep-ms", type=float, default=5.0, help="ms of calls per timed CUDA graph")
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
    print(summary(rows))
    meta = {**bk.environment(dev), "wall_s": round(time.perf_counter() - start, 1), "rep_ms": args.rep_ms}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"sweep_{meta['gpu'].split()[1].lower() if len(meta['gpu'].split()) > 1 else 'gpu'}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}; wall {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
