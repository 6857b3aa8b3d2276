"""AROUND hook on ``ServerArgs._handle_gpu_memory_settings``: decode CUDA graphs for large batches.

SGLang captures decode CUDA graphs up to a batch size it picks from the GPU's memory (256 on an
H100 or H200 with fewer than 4 tensor-parallel ranks); larger decode batches run eagerly. Packed
decode plans every step on the host and launches two kernels per layer, which costs more outside
a graph than FlashInfer's decode. When packinfer decodes and neither ``--cuda-graph-max-bs`` nor
``--cuda-graph-bs`` is given, this hook raises SGLang's default (where it is at least 256) to
``PACKINFER_GRAPH_MAX_BS`` (512; 0 keeps SGLang's), with SGLang's own list of captured sizes.
Smaller defaults, chosen for GPUs with little memory, are kept. It runs in the server process
while the arguments are resolved, before any scheduler starts.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
TARGET = "sglang.srt.server_args.ServerArgs._handle_gpu_memory_settings"
MIN_DEFAULT_RAISED = 256  # SGLang's default on GPUs with 60 GB or more (tp < 4)


def raise_decode_graph_range(original, server_args, *args, **kwargs):
    """``HookType.AROUND`` hook: ``(original, server_args, gpu_mem)``; returns ``original``'s result."""
    from packinfer_sglang.config import get_config

    decode = server_args.cuda_graph_config.decode
    user_set = decode.max_bs is not None or decode.bs is not None
    result = original(server_args, *args, **kwargs)
    target = get_config().graph_max_bs
    if user_set or not target or server_args.get_attention_backends()[1] != "packinfer":
        return result
    if decode.max_bs is not None and MIN_DEFAULT_RAISED <= decode.max_bs < target and decode.bs is not None:
        logger.info("packinfer: decode CUDA graphs up to batch %d (SGLang's default %d; PACKINFER_GRAPH_MAX_BS)",
                    target, decode.max_bs)
        decode.max_bs = target
        decode.bs = server_args._generate_decode_cuda_graph_batch_sizes(target)
    return result
