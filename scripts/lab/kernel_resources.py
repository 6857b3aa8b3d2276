"""Registers, spills and shared memory of the packed kernel's launch variants, compiled for a GPU
architecture without that GPU (Triton's bundled ptxas; no device needed), and how the compiler
pipelined each: 16-byte ``cp.async`` copies of the gathered K/V tiles and the depths of their
``cp.async.wait_group``, ``wgmma`` instructions and the depths of their ``wgmma.wait_group`` (0:
each warpgroup MMA is waited for at once), and ``mma.sync`` instructions.

Each variant is compiled as the JIT would on the device (pointers and strides 16-byte aligned), and
``cuobjdump --dump-resource-usage`` reads the cubin. Resident programs per multiprocessor follow
from the registers and shared memory (Hopper: 64K registers, 227 KB shared memory per
multiprocessor), which is what ``kernel_occupancy`` measures on a GPU.

    python -m scripts.lab.kernel_resources --arch 90
    python -m scripts.lab.kernel_resources --arch 90 --variants "guard=1,role=1" "block_n=128,stages=2"
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

POINTERS = {"Q": "*bf16", "K_Buffer": "*bf16", "V_Buffer": "*bf16", "Out": "*bf16", "O_Partial": "*fp32",
            "LSE_Partial": "*fp32", "LSE_Out": "*fp32", "KV_Indices": "*i32", "KV_Base": "*i32", "Items": "*i32",
            "Counts": "*i32", "Merge_Indptr": "*i32"}
# the default eager launch (64-row prefix tiles), the H200's plain-decode launch, the CUDA graphs'
# pair of launches (guard: programs past the plan's units exit; role 1 prefix tiles, role 2 the
# plain-decode ones), the eager plain-decode tiles on other GPUs, and the contiguous-slot path
DEFAULT_VARIANTS = ("", "block_n=128,stages=2,pbm=16", "guard=1,role=1", "guard=1,role=2,block_n=128,stages=2,pbm=16",
                    "pbm=16", "kv_base=1")
REGS_PER_SM, SMEM_PER_SM, SMEM_RESERVED = 65536, 227 * 1024, 1024


def compile_variant(arch: int, *, gqa=4, kv_heads=8, head_dim=128, pbm=None, block_n=None, stages=None,
                    warps=None, kv_base=0, maxnreg=0, guard=0, role=0) -> dict:
    """Compiles one variant; returns its resources and the programs per multiprocessor they allow.
    ``None``: the launcher's choice for the prefix launch (``PREFIX_BLOCK_M``, ``BLOCK_N``,
    ``NUM_STAGES`` of :mod:`packinfer_sglang.kernels.launch`; warps by ``num_warps_for(pbm,
    head_dim)``); ``pbm`` is the tile height the launch compiles as ``PREFIX_BLOCK_M`` (the suffix
    height for plain decode); ``maxnreg`` a register cap (a compile option, 0: none)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("scripts.lab.kernel_resources compiles for the GPU: unset TRITON_INTERPRET")
    from packinfer_sglang.kernels import launch
    from packinfer_sglang.kernels.cascade_kernel import _packed_attn_partial_kernel as fn
    pbm = launch.PREFIX_BLOCK_M if pbm is None else pbm
    block_n = launch.BLOCK_N if block_n is None else block_n
    stages = launch.NUM_STAGES if stages is None else stages
    warps = launch.num_warps_for(pbm, head_dim) if warps is None else warps
    names = list(inspect.signature(fn.fn).parameters)
    const = {"GQA": gqa, "NUM_KV_HEADS": kv_heads, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
             "PREFIX_BLOCK_M": pbm, "SUFFIX_BLOCK_M": launch.suffix_block_m_for(gqa), "BLOCK_N": block_n,
             "DOT_FP32": False, "STORE_LSE": False, "ROLE": role, "HAS_KV_BASE": bool(kv_base),
             "GUARD_UNITS": bool(guard)}
    differ = sorted({p.name for p in fn.params if p.is_constexpr} ^ set(const))
    if differ:
        raise SystemExit(f"constexprs {differ} differ from the kernel's: update scripts.lab.kernel_resources")
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "fp32" if n == "sm_scale_log2" else "i32")
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS or n.startswith("stride")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                                    attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    regs = int(re.search(r"REG:(\d+)", usage)[1])
    stack = int(re.search(r"STACK:(\d+)", usage)[1])
    smem = kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    pipelining = {
        "cp_async_16B": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*0x10\s*[,;]", ptx)),
        "cp_async_waits": sorted({int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)}),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "wgmma_waits": sorted({int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}),
        "mma_sync": len(re.findall(r"mma\.sync\.aligned", ptx)),
    }
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = (SMEM_PER_SM + SMEM_RESERVED) // (smem + SMEM_RESERVED)
    return {"regs": regs, "stack_bytes": stack, "shared_bytes": smem,
            "programs_per_sm": max(0, min(by_regs, by_smem, 2048 // (32 * warps))), **pipelining}


def parse_variant(text: str) -> dict:
    """``"key=value,key=value"`` (keys of :func:`compile_variant`) as keyword arguments."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in inspect.signature(compile_variant).parameters or key == "arch":
            raise SystemExit(f"unknown variant key {key!r} in {text!r}")
        out[key] = int(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS),
                   help="key=value lists (gqa, kv_heads, head_dim, pbm, block_n, stages, warps, kv_base, "
                        "maxnreg: a register cap, 0 none; guard: programs past the plan's units exit; role: the "
                        "kernel's ROLE); empty: the default launch")
    p.add_argument("--out", type=Path, help="also write this JSON (and its .md): the rows, Triton's version")
    args = p.parse_args(argv)
    head = (f"| variant (sm_{args.arch}) | registers | stack B | shared KB | programs/SM | cp.async 16 B | "
            "cp.async waits | wgmma | wgmma waits | mma.sync |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    print("\n".join(lines))
    rows = []
    for text in args.variants:
        r = {"variant": text or "default", **compile_variant(args.arch, **parse_variant(text))}
        rows.append(r)
        lines.append(f"| {r['variant']} | {r['regs']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} | "
                     f"{r['programs_per_sm']} | {r['cp_async_16B']} | {r['cp_async_waits']} | {r['wgmma']} | "
                     f"{r['wgmma_waits']} | {r['mma_sync']} |")
        print(lines[-1], flush=True)
    if args.out:
        import datetime
        import json
        meta = {"arch": f"sm_{args.arch}", "triton": triton.__version__, "gpu": None,
                "method": "compiled offline with Triton's bundled ptxas, no GPU; resources from cuobjdump",
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(
            f"# Packed kernel resources, sm_{args.arch} (offline compile)\n\ntriton {meta['triton']}; "
            f"{meta['date']}; {meta['method']}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
