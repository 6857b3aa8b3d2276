"""Triton kernels and their pure-torch oracles (Triton and torch only; never imports sglang).

- :mod:`.cascade_kernel`: the packed cascade partial kernel; :mod:`.merge`: the LSE merge;
  :mod:`.kv_indices`: gathers of KV slot lists;
- :mod:`.launch`: tile shapes, pipeline depth and occupancy of the launches;
- :mod:`.plan` (host) and :mod:`.plan_tensors` (device): the work plan a step's layers share;
- :mod:`.cost_model`: what items cost and when packing a group pays;
- :mod:`.packed_cascade`: the public entry points; :mod:`.reference`: the oracles;
  :mod:`.checks`: input validators.
"""

from .cost_model import PackingCost
from .kv_indices import gather_kv_indices
from .merge import merge_partials
from .packed_cascade import packed_cascade_attention, plan_packed_cascade, run_packed_cascade
from .plan import WorkPlan, plan_work
from .plan_tensors import PackedCascadePlan, PlanBuffers, make_plan

__all__ = [
    "PackedCascadePlan", "PackingCost", "PlanBuffers", "WorkPlan", "gather_kv_indices", "make_plan",
    "merge_partials", "packed_cascade_attention", "plan_packed_cascade", "plan_work", "run_packed_cascade",
]
