"""Triton kernels and their pure-torch oracles (Triton and torch only; never imports sglang)."""

from .kv_indices import gather_kv_indices
from .merge import merge_partials
from .packed_cascade import (
    PackedCascadePlan,
    make_plan,
    packed_cascade_attention,
    plan_packed_cascade,
    run_packed_cascade,
)
from .plan import WorkPlan, plan_work

__all__ = [
    "PackedCascadePlan", "WorkPlan", "gather_kv_indices", "make_plan", "merge_partials",
    "packed_cascade_attention", "plan_packed_cascade", "plan_work", "run_packed_cascade",
]
