"""Without a GPU, Triton kernels run in its CPU interpreter; set before any kernel is imported."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative L2 error vs the fp32 oracle

gpu = pytest.mark.gpu  # needs a CUDA device: skipped without one (pytest_collection_modifyitems)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
