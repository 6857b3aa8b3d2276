"""What SGLang's registries cannot reach, through ``HookRegistry`` only (registered by the plugin).

- :mod:`.forward_batch`: hands each decode batch's groups to the backend through the scheduler's runtime.
- :mod:`.batch_order`: keeps each group's running requests adjacent in the decode batch.
- :mod:`.graph_capture`: decode CUDA graphs up to ``PACKINFER_GRAPH_MAX_BS`` when SGLang's default is lower.
- :mod:`.compaction_hook`: KV compaction and decode-token placement (only with ``PACKINFER_COMPACT=1``).
- :mod:`.fragmentation_log`: KV fragmentation of the decode batch in the log (``PACKINFER_FRAG_LOG_EVERY``).
"""
