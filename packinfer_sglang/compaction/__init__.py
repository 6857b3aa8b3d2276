"""Group-contiguous KV placement in SGLang's pool (``PACKINFER_COMPACT=1``; off by default).

- :mod:`.plan`: which groups to relocate and where (pure numpy: owners, fragmentation, the cost rule);
- :mod:`.relocate`: :class:`~.relocate.Relocator`, applying a plan (slot-ownership table in its docstring);
- :mod:`.alloc`: claiming page runs from SGLang's allocators, copying KV;
- :mod:`.placement`: decode tokens placed next to their request's tail;
- :mod:`.integrity`: the pool invariants after relocation, checked against SGLang's own state.

The scheduler hooks that drive them are in ``packinfer_sglang.patches.compaction_hook``.
"""
