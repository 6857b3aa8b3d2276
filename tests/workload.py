"""Shared-prefix workloads on SGLang's real RadixCache (CPU tensors), for grouping tests."""

from packinfer_sglang.config import PackInferConfig
from packinfer_sglang.demo import admit, shared_prefix_prompts  # noqa: F401
from packinfer_sglang.demo import new_cache as _new_cache


def new_cache(min_prefix_tokens=8, min_group_size=2):
    return _new_cache(PackInferConfig(min_prefix_tokens=min_prefix_tokens, min_group_size=min_group_size))
