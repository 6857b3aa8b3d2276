"""Host time of one packed decode step's metadata, as the backend builds it before a graph replay.

Builds :func:`packinfer_sglang.decode_step.build_decode_step` into CUDA-graph buffers for a decode
batch shaped like the serving workloads (Llama-3-8B heads; no sharing, or 8 groups sharing a 4096
token prefix), with the GPU kept busy by a queue of matmuls (as it is by the previous step in
serving), and reports the mean wall time per step plus cProfile's top functions by own time. The
serving log's ``host plan X us/step`` counts the same work plus taking the groups.

    python -m scripts.lab.profile_host_step --out-dir out/host
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import bench_kernel as bk

CASES = {  # name: (batch, groups, prefix tokens, mean suffix tokens)
    "B256_nosharing_S1024": (256, 256, 0, 1024),
    "B256_G8_P4096_S512": (256, 8, 4096, 512),
    "B64_nosharing_S2048": (64, 64, 0, 2048),
}


def make_batch(batch, num_groups, prefix, suffix, device, seed=0):
    """``(groups, seq_lens_cpu, req_pool_indices, req_to_token)`` of a decode batch at scattered slots."""
    from packinfer_sglang.grouping import DecodeGroups, ungrouped
    rng = np.random.default_rng(seed)
    lens = prefix + rng.integers(suffix // 2, 3 * suffix // 2, batch)
    req_to_token = torch.from_numpy(rng.integers(0, 1 << 22, (batch + 8, int(lens.max()) + 16), dtype=np.int32))
    if num_groups == batch:
        groups = ungrouped(batch)
    else:
        indptr = np.linspace(0, batch, num_groups + 1).astype(np.int32)
        groups = DecodeGroups(np.arange(batch, dtype=np.int64), indptr, np.full(num_groups, prefix, np.int32))
    rows = torch.randperm(batch + 8)[:batch]
    return groups, torch.from_numpy(lens), rows.to(device), req_to_token.to(device)


def profile_case(name, steps, device) -> dict:
    """One case's host time per step into graph buffers sized and launched as the backend's
    (the prefix and the plain-decode launches' occupancies of Llama-3-8B heads, bf16)."""
    from packinfer_sglang.kernels.launch import kernel_occupancy, num_sms_of

    from packinfer_sglang.decode_step import GraphBuffers, build_decode_step
    batch, num_groups, prefix, suffix = CASES[name]
    groups, lens, rows, req_to_token = make_batch(batch, num_groups, prefix, suffix, device)
    num_sms = num_sms_of(device)
    occupancy = {plain: kernel_occupancy(device, torch.bfloat16, 128, 4, plain=plain) for plain in (False, True)}
    graph = GraphBuffers(batch, req_to_token.shape[1], 8, num_sms, device, programs_per_sm=occupancy[False],
                         plain_programs_per_sm=occupancy[True])
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def step():
        return build_decode_step(groups, lens, rows, req_to_token, 32, 8, num_sms, graph=graph, padded_bs=batch)

    for _ in range(20):
        step()
    torch.cuda.synchronize(device)
    times = []
    prof = cProfile.Profile()
    for i in range(2 * steps):  # timed, then profiled (cProfile inflates Python-heavy parts)
        if i % 10 == 0:  # keep about 10 steps' worth of host work queued behind GPU work
            for _ in range(40):
                a @ a
        start = time.perf_counter()
        if i >= steps:
            prof.enable()
        step()
        if i >= steps:
            prof.disable()
        else:
            times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize(device)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    return {"case": name, "batch": batch, "groups": num_groups, "prefix": prefix, "suffix": suffix,
            "steps": steps, "host_us_mean": float(np.mean(times)), "host_us_p50": float(np.median(times)),
            "host_us_p90": float(np.percentile(times, 90)), "profile_top": buf.getvalue()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="timed steps per case (as many again profiled)")
    p.add_argument("--out-dir", type=Path, default=Path("out/host"), help="where host_step.json goes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    dev = torch.device("cuda")
    rows = [profile_case(name, args.steps, dev) for name in CASES]
    for r in rows:
        print(f"--- {r['case']}: cProfile (inflates Python-heavy parts)\n{r['profile_top'][:3000]}")
    print("| case | host µs mean | p50 | p90 |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['host_us_mean']:.0f} | {r['host_us_p50']:.0f} | {r['host_us_p90']:.0f} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "host_step.json"
    path.write_text(json.dumps({"meta": bk.environment(dev), "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
