"""Lab tools: profilers and studies of the packed kernel, not the product (house style, rule 14).
Run from the repository root as ``python -m scripts.lab.<tool>``; they reuse the product's
benchmark modules (``from .. import bench_kernel``).

- :mod:`.kernel_resources`: registers, spills, shared memory and programs per multiprocessor of
  the kernel's launches, compiled offline for a GPU architecture (no GPU needed).
- :mod:`.profile_ncu`: Nsight Compute counters of the partial kernel on a few grid cases (GPU).
- :mod:`.profile_host_step`: host time of one decode step's metadata into CUDA-graph buffers (GPU).
- :mod:`.bench_compaction`: what compaction buys in the kernel and what its KV copy costs (GPU).
"""
