"""The SGLang glue: everything that runs inside SGLang's server and scheduler processes.

- :mod:`.plugin`: the ``sglang.srt.plugins`` entry point, registering both backends and the hooks;
- :mod:`.backend`: ``--attention-backend packinfer`` (packed decode; SGLang's Triton backend for the rest);
- :mod:`.radix_cache`: ``--radix-cache-backend packinfer`` (SGLang's ``RadixCache`` owning the runtime);
- :mod:`.runtime`: the per-scheduler state carried from the scheduler hooks to the backend.

The hooks themselves (``HookRegistry``) are in ``packinfer_sglang.patches``.
"""
