"""SGLang plugin entry point (``sglang.srt.plugins``: ``packinfer = packinfer_sglang.serving.plugin:register``).

``register()`` runs in the server process and in every scheduler process, before arguments are
parsed. It adds the attention backend and radix cache backend named ``packinfer`` and registers
the hooks of :mod:`packinfer_sglang.patches`. It imports no CUDA code and touches no device.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)

NAME = "packinfer"
_registered = False


def register() -> None:
    """Registers backends and hooks; idempotent. A bad ``PACKINFER_*`` setting ends the process with
    one line on stderr and exit code 2 (``SystemExit``, which SGLang's plugin loader does not catch)."""
    global _registered
    if _registered:
        return
    from ..config import ConfigError, get_config

    try:
        config = get_config()
    except ConfigError as e:
        print(f"packinfer: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from ..patches import batch_order, forward_batch, graph_capture, idle_check

    if NAME not in ATTENTION_BACKENDS:
        register_attention_backend(NAME)(_create_attention_backend)
    if NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([NAME])
    if NAME not in registered_radix_cache_backends():
        register_radix_cache_backend(NAME, _create_radix_cache)
    HookRegistry.register(forward_batch.TARGET, forward_batch.attach_decode_groups, HookType.AFTER)
    HookRegistry.register(batch_order.TARGET, batch_order.group_adjacent, HookType.BEFORE)
    HookRegistry.register(graph_capture.TARGET, graph_capture.raise_decode_graph_range, HookType.AROUND)
    if config.verify:  # the pools checked whenever the scheduler goes idle
        HookRegistry.register(idle_check.TARGET, idle_check.check_at_idle, HookType.AFTER)
    if config.compact:  # retired slots returned before SGLang's own idle check
        HookRegistry.register(idle_check.TARGET, idle_check.release_at_idle, HookType.BEFORE)
    if config.frag_log_every:  # before compaction's hook, so it runs after it (later ones run first)
        from ..patches import fragmentation_log

        HookRegistry.register(fragmentation_log.TARGET, fragmentation_log.log_fragmentation, HookType.BEFORE)
    if config.prefill_dedup:  # one prefill per uncached shared prefix: off until measured
        from ..patches import prefill_dedup

        HookRegistry.register(prefill_dedup.TARGET, prefill_dedup.hold_shared_prefills, HookType.AROUND)
    if config.compact:  # KV compaction (issue 5): off until measured
        from ..patches import compaction_hook

        HookRegistry.register(compaction_hook.BEFORE_TARGET, compaction_hook.plan_and_relocate, HookType.BEFORE)
        HookRegistry.register(compaction_hook.AFTER_TARGET, compaction_hook.launch_copies, HookType.AFTER)
        if config.place:  # new decode tokens next to their request's tail
            HookRegistry.register(compaction_hook.PLACE_TARGET, compaction_hook.place_decode_tokens,
                                  HookType.BEFORE)
    _registered = True
    logger.info("packinfer: registered attention backend and radix cache backend %r", NAME)


def _create_attention_backend(model_runner):
    from .backend import create_packinfer_backend

    return create_packinfer_backend(model_runner)


def _create_radix_cache(ctx):
    from .radix_cache import create_packinfer_radix_cache

    return create_packinfer_radix_cache(ctx)
