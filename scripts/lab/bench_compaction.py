"""What compaction (issue 5) buys in the kernel and what it costs to copy (GPU only).

``kernel``: for each case, our kernel on scattered slots (the grid's layout: a random permutation)
and on contiguous ones (each prefix, then each suffix, one run), each with the plan's base slots off
(every chunk read through ``kv_indices``) and on (chunks that are one run read by base + offset);
each variant is checked against the fp32 oracle first, then timed like :mod:`scripts.bench_kernel`. ``bases_us`` is the per-step cost of computing the bases
(:func:`~packinfer_sglang.kernels.kv_indices.item_kv_bases`).

``copy``: a relocation's KV copy, K and V of every layer from scattered old slots to a contiguous
new range, with ``sglang.srt.mem_cache.memory_pool.move_kv_cache_native`` (what
:func:`packinfer_sglang.compaction.alloc.move_kv` runs unless SGLang built its fused copy), for N tokens; bytes =
2 (read + write) x 2 (K, V) x layers x kv_heads x head_dim x itemsize x N.

Writes ``bench_compaction.json`` and ``bench_compaction.md`` under ``--out-dir``.

    python -m scripts.lab.bench_compaction --out-dir out/compaction
"""

# ruff: noqa: B023 -- every timed lambda runs inside the loop iteration that defines it
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .. import bench_kernel as bk
from .. import kernel_cases as kc

CASES = "B64_P4096_S256,B256_P2048_S256,B64_P4096_S32,B16_P2048_S512,B64_P16384_S256,B64_P0_S4096"
COPY_TOKENS = (256, 1024, 4096, 16384, 65536)


def kernel_rows(names: str, dev: torch.device) -> list[dict]:
    """Per case and layout, two rows: base slots off, then on (module docstring)."""
    from packinfer_sglang.kernels.kv_indices import item_kv_bases
    kern = bk.import_kernels()
    by_name = {c.name: c for c in kc.full_grid()}
    rows = []
    for name in names.split(","):
        for layout in ("scattered", "contiguous"):
            case = dataclasses.replace(by_name[name], layout=layout)
            inp = kc.make_inputs(case, dev)
            ref = kern.reference.packed_cascade_attention_ref(*inp.cascade_args())[0]
            hq, hkv, d = inp.q.shape[1], inp.k_buffer.shape[1], inp.q.shape[2]
            for bases in (False, True):
                plan = kern.plan_packed_cascade(*inp[3:8], hq, hkv, head_dim=d, dtype=inp.k_buffer.dtype,
                                                kv_base=bases)
                out = torch.full_like(inp.q, float("nan"))
                run = lambda: kern.run_packed_cascade(inp.q, inp.k_buffer, inp.v_buffer, plan, inp.sm_scale, out)
                run()
                err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                ok = bool(torch.isfinite(out).all()) and err <= bk.TOLERANCE[case.dtype]
                row = {"case": name, "layout": layout, "kv_base": bases, "items": plan.num_items, "rel_err": err,
                       "us": bk.time_us(run, 5.0) if ok else None}
                if bases:
                    row["fast_items"] = int((plan.kv_base[: plan.num_items] >= 0).sum())
                    items = plan.items[: plan.num_items]
                    buf = torch.empty(plan.num_items, dtype=torch.int32, device=dev)
                    row["bases_us"] = bk.time_us(lambda: item_kv_bases(plan.kv_indices, items[:, 2],
                                                                       items[:, 3], buf), 5.0)
                rows.append(row)
            print(name, layout, " ".join(f"{'base' if r['kv_base'] else 'index'}: {r['us'] or float('nan'):.1f}"
                                         for r in rows[-2:]), flush=True)
    return rows


def copy_rows(layers: int, kv_heads: int, head_dim: int, dev: torch.device) -> list[dict]:
    from sglang.srt.mem_cache.memory_pool import move_kv_cache_native
    n_max = max(COPY_TOKENS)
    slots = 2 * n_max + 1024
    k = [torch.randn(slots, kv_heads, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    v = [torch.randn(slots, kv_heads, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    rows = []
    for n in COPY_TOKENS:
        src = torch.randperm(n_max, device=dev)[:n] + 1  # scattered old slots
        dst = torch.arange(n_max + 512, n_max + 512 + n, device=dev)  # one contiguous new run
        move_kv_cache_native(k, v, dst, src)
        assert all(torch.equal(kb[dst], kb[src]) for kb in k[:2])
        us = bk.time_us(lambda: move_kv_cache_native(k, v, dst, src), 20.0)
        nbytes = 2 * 2 * layers * kv_heads * head_dim * 2 * n
        rows.append({"tokens": n, "us": us, "ns_per_token": 1e3 * us / n, "bytes": nbytes,
                     "gb_s": nbytes / us / 1e3})
        print(f"copy {n} tokens: {us:.1f} us, {1e3 * us / n:.1f} ns/token, {nbytes / us / 1e3:.0f} GB/s", flush=True)
    return rows


def markdown(meta: dict, kernel: list[dict], copy: list[dict]) -> str:
    lines = [(f"# Compaction: kernel layout and copy cost\n\nGPU {meta['gpu']}; torch {meta['torch']}, triton "
              f"{meta['triton']}, sglang {meta['sglang']}; {meta['date']}\n")]
    if kernel:
        lines += ["## Kernel (µs)\n", "| case | layout | index | base | fast items | bases µs |",
                  "|---|---|---:|---:|---:|---:|"]
    fmt = lambda r: f"{r['us']:.1f}" if r["us"] is not None else "fail"
    for i in range(0, len(kernel), 2):
        index, base = kernel[i : i + 2]
        lines.append(f"| {index['case']} | {index['layout']} | {fmt(index)} | {fmt(base)} | "
                     f"{base['fast_items']}/{base['items']} | {base['bases_us']:.1f} |")
    if copy:
        lines += ["", f"## Relocation copy ({meta['copy_shape']})\n", "| tokens | µs | ns/token | GB/s |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {r['tokens']} | {r['us']:.1f} | {r['ns_per_token']:.1f} | {r['gb_s']:.0f} |" for r in copy]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=("kernel", "copy", "both"), default="both")
    p.add_argument("--cases", default=CASES, help="comma-separated exact case names of the full grid")
    p.add_argument("--layers", type=int, default=32, help="copy study: layers of the pool (Llama-3-8B: 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="copy study: KV heads per layer")
    p.add_argument("--head-dim", type=int, default=128, help="copy study: head dimension")
    p.add_argument("--out-dir", type=Path, default=Path("out/compaction"), help="where the JSON and table go")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev = torch.device("cuda")
    meta = {**bk.environment(dev), "copy_shape": f"{args.layers} layers x {args.kv_heads} KV heads x "
            f"{args.head_dim}, bf16, move_kv_cache_native"}
    kernel = kernel_rows(args.cases, dev) if args.study in ("kernel", "both") else []
    copy = copy_rows(args.layers, args.kv_heads, args.head_dim, dev) if args.study in ("copy", "both") else []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_compaction.json").write_text(
        json.dumps({"meta": meta, "kernel": kernel, "copy": copy}, indent=1) + "\n")
    text = markdown(meta, kernel, copy)
    (args.out_dir / "bench_compaction.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
