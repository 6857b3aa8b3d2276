#!/usr/bin/env python3
"""A/B studies of the packed kernel's planner and launch choices on a few cases (GPU only; ours only).

``--study order``: the planner's item orders, each switched off in turn (chunk-major prefix items,
longest-first suffix items), flat and persistent launches. ``--study tiles``: plain-decode
(no-prefix) cases with the kernel compiled for 64-row prefix tiles against suffix-height tiles,
and a few warps / stages / block_n / no-split variants. ``--study prefix``: the cases with groups of
many prefix row blocks (the 2x-floor misses of issue 4) and a few anchors, with 64- and 128-row
prefix tiles, warps, stages, block_n and prefix chunks doubled (fewer partials); each row also
times the merge launch alone on the same plan. ``--study merge``: the merge launch loading 1, 4, 8
or 16 of a row's partials at once (``merge_block_p``), on the anchors, the misses and the
no-sharing cases, with the merge launch timed alone too. ``--study planner``: the planner's per-item
overhead (``ITEM_OVERHEAD_TOKENS``) and per-row partial cost (``PARTIAL_ROW_TOKENS``) set to other
values, on short-suffix, prefix-heavy and no-sharing cases, each planned and launched as
``bench_kernel.py`` (flat) and the persistent pair of launches (SGLang's decode graphs until session 10) do.
(The ``mix`` study and prefix variant 15, ``prefix_overlap``, went with those experiments after
session 10; their results stay in ``benchmarks/results/ab_mix_h200.json`` and
``ab_prefix_gp_h200.json``.) ``--study
grid``: the flat launch with 0, 1, 3 or 7 times the plan's units of extra programs that exit at once
(a static plan's ``grid_items``: what a flat grid fixed at a CUDA graph's capacity costs) against the
persistent pair, on sharing and no-sharing cases. Every variant is checked against the fp32
oracle, then timed like ``bench_kernel.py`` (CUDA-graph replay median, L2 warm); baselines are not
re-timed (compare with the grid of the same GPU). Writes ``ab_<study>.json`` under ``--out-dir``.

    python scripts/ab_variants.py --study order --out-dir out/ab
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernel as bk
import kernel_cases as kc

ORDER_CASES = ("B64_P4096_S256,B8_P4096_S256,B16_P2048_S512,B64_P4096_S32,B64_P16384_S256,"
               "B64_P4096_S256_qwen2.5-7b,B64_P4096_S256_llama3-70b-tp8,B128_P0_S2048_het,B256_P0_S1024,"
               "B256_P2048_S256_zipf16_het,B64_P4096_S256_het")
TILE_CASES = "B256_P0_S1024,B128_P0_S2048_het,B64_P0_S4096,B16_P0_S8192,B64_P0_S4096_qwen2.5-7b"
# prefix_block_m (16: the suffix tile height, what plain decode now launches), warps, stages, block_n
TILE_VARIANTS = [
    {"pbm": 64, "w": 4, "st": 3, "n": 64}, {"pbm": 16, "w": 4, "st": 3, "n": 64},
    {"pbm": 16, "w": 2, "st": 3, "n": 64}, {"pbm": 16, "w": 8, "st": 3, "n": 64},
    {"pbm": 16, "w": 4, "st": 4, "n": 64}, {"pbm": 16, "w": 4, "st": 3, "n": 128},
    {"pbm": 16, "w": 4, "st": 4, "n": 32}, {"pbm": 64, "w": 4, "st": 3, "n": 64, "nosplit": True},
    {"pbm": 16, "w": 4, "st": 3, "n": 64, "nosplit": True},
    # 9-11: the H200 sweep's best for B256_P0_S1024 (259 us: 128-token blocks, 2 stages, 64-row tile)
    {"pbm": 64, "w": 4, "st": 2, "n": 128}, {"pbm": 16, "w": 4, "st": 2, "n": 128},
    {"pbm": 16, "w": 4, "st": 2, "n": 128, "nosplit": True},
    # 12-13: the H200 plain launch and the default one with slot ids prefetched (gather_prefetch)
    {"pbm": 16, "w": 4, "st": 2, "n": 128, "gp": True}, {"pbm": 16, "w": 4, "st": 3, "n": 64, "gp": True},
]


PREFIX_CASES = ("B64_P4096_S32,B64_P16384_S256,B64_P4096_S256_qwen2.5-7b,B64_P4096_S256_llama3-70b-tp8,"
                "B64_P4096_S256,B256_P2048_S256,B8_P512_S64,B16_P2048_S512,B32_P8192_S1024,B128_P4096_S256,"
                "B256_P2048_S256_G8_qwen2.5-7b,B16_P2048_S512_llama3-70b-tp8,B64_P256_S256,B64_P1024_S256")
PREFIX_VARIANTS = [
    {"pbm": 64, "w": 4, "st": 3, "n": 64}, {"pbm": 64, "w": 4, "st": 3, "n": 64, "pmult": 2},
    {"pbm": 64, "w": 4, "st": 4, "n": 64}, {"pbm": 64, "w": 4, "st": 3, "n": 128},
    {"pbm": 64, "w": 8, "st": 3, "n": 64}, {"pbm": 128, "w": 8, "st": 3, "n": 64},
    {"pbm": 128, "w": 8, "st": 2, "n": 64}, {"pbm": 128, "w": 8, "st": 2, "n": 128},
    {"pbm": 128, "w": 8, "st": 3, "n": 32}, {"pbm": 128, "w": 8, "st": 3, "n": 64, "pmult": 2},
    {"pbm": 128, "w": 4, "st": 3, "n": 64}, {"pbm": 32, "w": 4, "st": 3, "n": 64},
    # 12: the H200 plain-decode launch (PLAIN_LAUNCH_BY_GPU) on prefix tiles
    {"pbm": 64, "w": 4, "st": 2, "n": 128},
    # 13: 2 stages of 64-token blocks (sm_90 compile: 193 registers and 80 KB of shared memory as
    # with 3 stages, so still 2 programs per SM; scripts/kernel_resources.py)
    {"pbm": 64, "w": 4, "st": 2, "n": 64},
    # 14: 32-token blocks capped at 168 registers: 48 KB and no spill on sm_90, 3 programs per SM
    # instead of 2 (kernel_resources.py), for short-suffix plans whose programs run 2-4 blocks each
    {"pbm": 64, "w": 4, "st": 3, "n": 32, "maxnreg": 168},
    # 15: removed (prefix_overlap: 0-23% slower flat on the H200, session 9); None keeps the indices
    None,
    # 16: slot ids of index-list chunks loaded a block ahead in registers (gather_prefetch): K/V
    # copies pipelined 3 deep on sm_90 instead of awaited at every block (TTGIR; 196 registers,
    # 112 KB, 2 programs per SM), prefix and suffix tiles alike
    {"pbm": 64, "w": 4, "st": 3, "n": 64, "gp": True},
    # 17: 128-row tiles (two warpgroups on one K/V block) with the slot prefetch: lost 10-40% on the
    # H100 with the unpipelined gather loop and 1 program per SM (228 registers), which stays
    {"pbm": 128, "w": 8, "st": 3, "n": 64, "gp": True},
]


MERGE_CASES = ("B64_P4096_S256,B16_P2048_S512,B128_P1024_S128,B32_P8192_S1024,B8_P512_S64,B256_P2048_S256,"
               "B64_P16384_S256,B64_P4096_S32,B64_P4096_S256_llama3-70b-tp8,B64_P4096_S256_qwen2.5-7b,"
               "B256_P0_S1024,B128_P0_S2048_het,B64_P4096_S256_het")
MERGE_VARIANTS = [{"bp": 1}, {"bp": 4}, {"bp": 8}, {"bp": 16}]

PLANNER_CASES = ("B64_P256_S256,B64_P1024_S256,B128_P1024_S128,B512_P1024_S128,B8_P512_S64,B16_P2048_S512,"
                 "B64_P4096_S256,B64_P4096_S32,B256_P2048_S256,B32_P8192_S1024,B64_P4096_S256_llama3-70b-tp8,"
                 "B256_P2048_S256_zipf16_het,B256_P0_S1024,B128_P0_S2048_het,B64_P0_S4096_qwen2.5-7b,B16_P0_S8192")
PLANNER_VARIANTS = [{"ovh": 32, "prow": 2}, {"ovh": 16, "prow": 2}, {"ovh": 64, "prow": 2}, {"ovh": 128, "prow": 2},
                    {"ovh": 256, "prow": 2}, {"ovh": 64, "prow": 4}, {"ovh": 128, "prow": 4}]


def run_checked(kern, inp, plan, ref, tol, **launch) -> tuple[torch.Tensor, dict]:
    """Runs ours on ``plan`` with ``launch`` options into a NaN-poisoned output, checks it against the
    fp32 oracle ``ref`` and, when within ``tol``, times it as ``bench_kernel.py`` does; returns the
    output and ``{rel_err, unwritten, us}`` (``us`` None when wrong)."""
    out = torch.full_like(inp.q, float("nan"))

    def run():
        kern.run_packed_cascade(inp.q, inp.k_buffer, inp.v_buffer, plan, inp.sm_scale, out, **launch)
    run()
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return out, {"rel_err": err, "unwritten": int(torch.isnan(out).sum()),
                 "us": bk.time_us(run, 5.0) if err <= tol else None}


def time_variant(kern, inp, ref, tol, *, pbm=64, w=4, st=3, n=64, nosplit=False, pmult=1, persistent=False,
                 merge=False, bp=1, maxnreg=None, gp=False) -> dict:
    """Plans and runs ours with the given launch (``pbm``: the kernel's ``PREFIX_BLOCK_M``; ``bp``:
    partials a merge program loads at once, 1 as before the blocked merge)."""
    from packinfer_sglang.kernels.packed_cascade import kernel_occupancy, num_sms_of, persistent_programs
    dev, num_kv_heads = inp.q.device, inp.k_buffer.shape[1]
    launch = {"block_n": n, "num_warps": w, "num_stages": st, "merge_block_p": bp, "maxnreg": maxnreg,
              "gather_prefetch": gp}
    occ = kernel_occupancy(dev, inp.k_buffer.dtype, inp.q.shape[2], inp.q.shape[1] // num_kv_heads,
                           prefix_block_m=pbm, persistent=persistent, block_n=n, num_warps=w, num_stages=st,
                           maxnreg=maxnreg, gather_prefetch=gp)
    plan = kern.plan_packed_cascade(*inp[3:8], inp.q.shape[1], num_kv_heads, waves=occ, prefix_block_m=pbm,
                                    kv_align=n, **({"suffix_chunk": 1 << 20} if nosplit else {}))
    if pmult != 1 and plan.has_prefix:  # the same plan with prefix chunks pmult times longer
        from packinfer_sglang.kernels.plan import plan_work
        args = [a.cpu().numpy() for a in (inp[3], inp[4], inp[6])]
        auto = plan_work(*args, gqa_group_size=inp.q.shape[1] // num_kv_heads, num_kv_heads=num_kv_heads,
                         prefix_block_m=pbm, num_sms=num_sms_of(dev), waves=occ, kv_align=n)
        plan = kern.plan_packed_cascade(*inp[3:8], inp.q.shape[1], num_kv_heads, waves=occ, prefix_block_m=pbm,
                                        kv_align=n, prefix_chunk=pmult * auto.prefix_chunk,
                                        suffix_chunk=auto.suffix_chunk)
    if persistent:
        plan = plan._replace(num_programs=persistent_programs(num_sms_of(dev), occ, num_kv_heads))
    else:  # plan_packed_cascade launches plain plans with suffix tiles; force the asked-for tile
        plan = plan._replace(has_prefix=True, prefix_block_m=pbm)
    out, checked = run_checked(kern, inp, plan, ref, tol, **launch)
    row = {"occupancy": occ, "items": plan.num_items, "partials": plan.num_partials, **checked}
    if merge:  # the merge launch alone, on this plan's partial buffers
        from packinfer_sglang.kernels.merge import merge_partials
        hq, d = inp.q.shape[1], inp.q.shape[2]
        o_p = torch.zeros(plan.num_partials, hq, d, dtype=torch.float32, device=dev)
        lse_p = torch.zeros(plan.num_partials, hq, dtype=torch.float32, device=dev)
        row["merge_us"] = bk.time_us(lambda: merge_partials(o_p, lse_p, plan.merge_indptr, out, None,
                                                            skip_single=True, block_p=bp), 5.0)
    return row


def persistent_pair(kern, inp):
    """Ours planned and launched as the persistent pair (``PACKINFER_GRAPH_LAUNCH=persistent``):
    waves and programs from each launch's persistent occupancy; returns the plan and the waves it
    was planned with."""
    from packinfer_sglang.kernels.packed_cascade import kernel_occupancy, num_sms_of, persistent_programs
    dev, dtype = inp.q.device, inp.k_buffer.dtype
    num_qo_heads, num_kv_heads, head_dim = inp.q.shape[1], inp.k_buffer.shape[1], inp.q.shape[2]
    occ = {pl: kernel_occupancy(dev, dtype, head_dim, num_qo_heads // num_kv_heads, persistent=True, plain=pl)
           for pl in (False, True)}
    waves = occ[int(inp[4][-1]) == 0]
    plan = kern.plan_packed_cascade(*inp[3:8], num_qo_heads, num_kv_heads, waves=waves)
    sms = num_sms_of(dev)
    return plan._replace(num_programs=persistent_programs(sms, occ[False], num_kv_heads),
                         plain_num_programs=persistent_programs(sms, occ[True], num_kv_heads)), waves


def time_planner(kern, inp, ref, tol, *, ovh=32, prow=2, persistent=False) -> dict:
    """Plans ours with the planner's per-item costs set to ``ovh`` and ``prow`` (KV tokens) and runs
    it with the default launch: flat as ``bench_kernel.py``, or persistent as the decode graphs (the
    pair of launches, programs from each one's persistent occupancy)."""
    from packinfer_sglang.kernels import plan as planner
    from packinfer_sglang.kernels.packed_cascade import kernel_occupancy, launch_config, num_sms_of
    dev, dtype = inp.q.device, inp.k_buffer.dtype
    num_qo_heads, num_kv_heads, head_dim = inp.q.shape[1], inp.k_buffer.shape[1], inp.q.shape[2]
    gqa, sms = num_qo_heads // num_kv_heads, num_sms_of(dev)
    plain = int(inp[4][-1]) == 0
    saved = planner.ITEM_OVERHEAD_TOKENS, planner.PARTIAL_ROW_TOKENS
    planner.ITEM_OVERHEAD_TOKENS, planner.PARTIAL_ROW_TOKENS = ovh, prow
    try:
        if persistent:
            plan, waves = persistent_pair(kern, inp)
        else:
            plan = kern.plan_packed_cascade(*inp[3:8], num_qo_heads, num_kv_heads, head_dim=head_dim, dtype=dtype)
            waves = kernel_occupancy(dev, dtype, head_dim, gqa, plain=plain)
        work = planner.plan_work(*[a.cpu().numpy() for a in (inp[3], inp[4], inp[6])], gqa_group_size=gqa,
                                 num_kv_heads=num_kv_heads, prefix_block_m=plan.prefix_block_m, num_sms=sms,
                                 waves=waves, kv_align=launch_config(dev, plain)[0])
    finally:
        planner.ITEM_OVERHEAD_TOKENS, planner.PARTIAL_ROW_TOKENS = saved
    return {"items": plan.num_items, "partials": plan.num_partials, "prefix_chunk": work.prefix_chunk,
            "suffix_chunk": work.suffix_chunk, **run_checked(kern, inp, plan, ref, tol)[1]}


GRID_CASES = ("B64_P4096_S256,B256_P2048_S256,B64_P256_S256,B8_P512_S64,B16_P2048_S512,B64_P4096_S256_qwen2.5-7b,"
              "B64_P4096_S256_llama3-70b-tp8,B256_P2048_S256_G8_qwen2.5-7b,B256_P0_S1024,B128_P0_S2048_het,B16_P0_S8192")
# extra: flat programs past the plan's units, in multiples of them (a static plan's grid_items);
# None: the persistent pair, programs from each one's occupancy
GRID_VARIANTS = [{"extra": 0}, {"extra": 1}, {"extra": 3}, {"extra": 7}, {"extra": None}]


def time_grid(kern, inp, ref, tol, *, extra=0) -> dict:
    """Ours planned as in serving (default launch); flat with ``extra`` times the plan's units of
    programs that exit at once (what a flat grid fixed at a CUDA graph's capacity costs), or, with
    ``extra`` None, the persistent pair (``PACKINFER_GRAPH_LAUNCH=persistent``)."""
    num_qo_heads, num_kv_heads, head_dim = inp.q.shape[1], inp.k_buffer.shape[1], inp.q.shape[2]
    if extra is None:
        plan = persistent_pair(kern, inp)[0]
        return {"items": plan.num_items, "persistent": True, **run_checked(kern, inp, plan, ref, tol)[1]}
    plan = kern.plan_packed_cascade(*inp[3:8], num_qo_heads, num_kv_heads, head_dim=head_dim,
                                    dtype=inp.k_buffer.dtype)
    plan = plan._replace(grid_items=plan.num_items * (1 + extra))  # flat, as a static plan (merge always runs)
    return {"items": plan.num_items, "grid_units": plan.grid_items * num_kv_heads,
            **run_checked(kern, inp, plan, ref, tol)[1]}


def run_one(study, kern, inp, ref, tol, var, persistent, orders, planner, case) -> dict:
    """One variant of ``study`` on one case, flat or persistent: its row fields."""
    if study == "order":
        planner._chunk_major, planner._longest_first = orders[var["order"]]
        return time_variant(kern, inp, ref, tol, persistent=persistent)
    if study == "planner":
        return time_planner(kern, inp, ref, tol, persistent=persistent, **var)
    if study == "grid":
        return time_grid(kern, inp, ref, tol, **var)
    plain = {"pbm": 16} if study == "merge" and case.prefix_len == 0 else {}  # serving's tiles
    return time_variant(kern, inp, ref, tol, persistent=persistent, merge=study in ("prefix", "merge"), **var, **plain)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=("order", "tiles", "prefix", "merge", "planner", "grid"), required=True)
    p.add_argument("--cases", help="comma-separated exact case names of the full grid")
    p.add_argument("--variants", help="comma-separated indices into the study's variant list (default: all)")
    p.add_argument("--out-dir", type=Path, default=Path("out/ab"))
    args = p.parse_args(argv)
    from packinfer_sglang.kernels import plan as planner
    dev, kern = torch.device("cuda"), bk.import_kernels()
    by_name = {c.name: c for c in kc.full_grid()}
    keep = lambda items, *_: items
    orders = {"both": (planner._chunk_major, planner._longest_first),
              "no_chunk_major": (keep, planner._longest_first),
              "no_longest_first": (planner._chunk_major, keep), "neither": (keep, keep)}
    rows, meta = [], bk.environment(dev)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"ab_{args.study}.json"
    default_cases = {"order": ORDER_CASES, "tiles": TILE_CASES, "prefix": PREFIX_CASES,
                     "merge": MERGE_CASES, "planner": PLANNER_CASES,
                     "grid": GRID_CASES}[args.study]
    for name in (args.cases or default_cases).split(","):
        inp = kc.make_inputs(by_name[name], dev)
        ref = kern.reference.packed_cascade_attention_ref(*inp.cascade_args())[0]
        tol = bk.TOLERANCE[by_name[name].dtype]
        variants = {"order": [{"order": o} for o in orders], "tiles": TILE_VARIANTS,
                    "prefix": PREFIX_VARIANTS, "merge": MERGE_VARIANTS,
                    "planner": PLANNER_VARIANTS, "grid": GRID_VARIANTS}[args.study]
        if args.variants:
            variants = [variants[int(i)] for i in args.variants.split(",")]
            if None in variants:
                raise SystemExit(f"--variants {args.variants}: a removed variant (None in the study's list)")
        variants = [v for v in variants if v is not None]
        for var in variants:
            for persistent in ((False,) if args.study == "grid" else (False, True)):  # grid: set by the variant
                try:
                    r = run_one(args.study, kern, inp, ref, tol, var, persistent, orders, planner, by_name[name])
                except Exception as e:  # noqa: BLE001 -- a variant that fails to compile or launch (OutOfResources, CUDA errors) is recorded, not fatal
                    r = {"us": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(f"{name} {var} persistent={persistent}: {r['error']}", flush=True)
                rows.append({"case": name, **var, "persistent": persistent, **r})
        planner._chunk_major, planner._longest_first = orders["both"]
        mine = [r for r in rows if r["case"] == name]
        print(name, " ".join(f"{'/'.join(str(v) for k, v in r.items() if k in ('order', 'pbm', 'w', 'st', 'n', 'bp', 'ovh', 'prow', 'maxnreg', 'gp', 'extra'))}"
                             f"{'/ns' if r.get('nosplit') else ''}{'/x2' if r.get('pmult', 1) != 1 else ''}{'P' if r['persistent'] else 'F'}:"
                             f"{r['us'] or float('nan'):.1f}" for r in mine), flush=True)
        # rewritten after every case, so a run cut short keeps what it measured
        path.write_text(json.dumps({"meta": meta, "study": args.study, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
