"""Launch policy of the packed cascade kernel: tile shapes, pipeline depth, warps and occupancy.

Two launches of :func:`~.cascade_kernel._packed_attn_partial_kernel` exist:

- the *prefix* launch, for plans with prefix items: ``PREFIX_BLOCK_M``-row prefix tiles (a group's
  requests x the GQA ratio), ``BLOCK_N``-token KV blocks, ``NUM_STAGES``-deep pipelined loads;
- the *plain* launch, for plans without prefix items (plain decode): suffix-height tiles
  (:func:`suffix_block_m_for`), which need fewer registers and so fit more programs per SM, with
  :func:`plain_launch`'s block and depth for the GPU.

A plan's chunk lengths are multiples of the ``block_n`` of the launch that runs it
(:func:`launch_config`). The planner balances items over ``num_sms * programs_per_sm`` program
slots, ``programs_per_sm`` being :func:`kernel_occupancy` of the compiled launch.
"""

from __future__ import annotations

import functools

import torch
import triton

from .cascade_kernel import _packed_attn_partial_kernel

PREFIX_BLOCK_M = 64  # query rows of a prefix tile (a group's requests x the GQA ratio)
BLOCK_N = 64  # KV tokens per inner step of the prefix launch
NUM_STAGES = 3  # software-pipelined KV loads; 2 ran 25-30% slower on H100 (docs/results.md)
# Plain-decode launches: (BLOCK_N, num_stages) by GPU name. On the H200, 128-token blocks in 2
# stages ran 2-13% faster than 64 in 3 on five plain cases in one run
# (benchmarks/results/ab_tiles_plain_h200.json); other GPUs keep the prefix launch's.
PLAIN_LAUNCH_BY_GPU = {"H200": (128, 2)}


def suffix_block_m_for(gqa_group_size: int) -> int:
    """Rows of a suffix tile: the GQA ratio, padded to the 16 rows ``tl.dot`` needs."""
    return max(16, triton.next_power_of_2(gqa_group_size))


def requests_per_tile(gqa_group_size: int, prefix_block_m: int = PREFIX_BLOCK_M) -> int:
    """Requests of one group whose query rows fill a prefix tile (at least 1)."""
    return max(1, prefix_block_m // gqa_group_size)


@functools.cache
def plain_launch(device: torch.device) -> tuple[int, int]:
    """``(block_n, num_stages)`` of plain-decode launches on ``device`` (:data:`PLAIN_LAUNCH_BY_GPU`;
    ``(BLOCK_N, NUM_STAGES)`` for other GPUs and off CUDA)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, launch in PLAIN_LAUNCH_BY_GPU.items():
            if key in name:
                return launch
    return BLOCK_N, NUM_STAGES


def launch_config(device: torch.device, plain: bool) -> tuple[int, int]:
    """``(block_n, num_stages)`` of a launch on ``device``: :func:`plain_launch`'s for the plain-decode
    launch, else ``(BLOCK_N, NUM_STAGES)``."""
    return plain_launch(device) if plain else (BLOCK_N, NUM_STAGES)


def num_warps_for(block_m: int, head_dim: int) -> int:
    """Warps of the partial kernel: 4 for tiles up to 64 x 128, else 8."""
    return 4 if block_m * head_dim <= 64 * 128 else 8


def num_sms_of(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (4 elsewhere, e.g. under ``TRITON_INTERPRET=1``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def programs_per_head(num_sms: int, programs_per_sm: int, num_kv_heads: int) -> int:
    """Programs per KV head that run at once: ``num_sms * programs_per_sm`` resident programs
    shared by the heads, at least 1. The planner balances a head's items over this many."""
    return max(1, num_sms * programs_per_sm // num_kv_heads)


@functools.cache
def kernel_occupancy(device: torch.device, dtype: torch.dtype, head_dim: int, gqa_group_size: int, *,
                     plain: bool = False, has_kv_base: bool = False) -> int:
    """Programs of the partial kernel resident at once on one multiprocessor (registers, shared
    memory, threads), read from the kernel compiled for this launch (compiled here if needed); 2 off
    CUDA. ``plain``: the plain-decode launch; ``has_kv_base``: the launch with the contiguous path."""
    if device.type != "cuda":
        return 2
    block_m = suffix_block_m_for(gqa_group_size) if plain else PREFIX_BLOCK_M
    block_n, num_stages = launch_config(device, plain)
    num_warps = num_warps_for(block_m, head_dim)
    q = torch.zeros(16, gqa_group_size, head_dim, dtype=dtype, device=device)
    kv = torch.zeros(16, 1, head_dim, dtype=dtype, device=device)
    i32 = torch.zeros(16, dtype=torch.int32, device=device)
    f32 = torch.zeros(16, gqa_group_size, head_dim, dtype=torch.float32, device=device)
    compiled = _packed_attn_partial_kernel.warmup(
        q, kv, kv, i32, i32, i32, i32, i32, f32, f32[:, :, 0], q, f32[:, :, 0], 1.0, q.stride(0), q.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(0), kv.stride(1), f32.stride(0), f32.stride(1), gqa_group_size,
        q.stride(0), q.stride(1), gqa_group_size,
        GQA=gqa_group_size, NUM_KV_HEADS=1, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        PREFIX_BLOCK_M=block_m, SUFFIX_BLOCK_M=suffix_block_m_for(gqa_group_size), BLOCK_N=block_n,
        DOT_FP32=False, STORE_LSE=False, ROLE=0, HAS_KV_BASE=has_kv_base, GUARD_UNITS=False,
        num_warps=num_warps, num_stages=num_stages, grid=(1,),
    )
    compiled._init_handles()
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256
    by_regs = props["max_num_regs"] // (regs_per_warp * num_warps)
    by_smem = (props["max_shared_mem"] + 1024) // (compiled.metadata.shared + 1024)
    by_threads = 2048 // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, 32))
