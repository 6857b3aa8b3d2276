"""merge_partials == log-sum-exp merge of each row's partial states (the oracle), for any number of
partials per row and any block of partials loaded at once."""

from functools import reduce

import pytest
import torch
from conftest import DEVICE, rel_err
from packinfer_sglang.kernels import merge_partials
from packinfer_sglang.kernels.reference import merge_state_ref


def merged_ref(o, lse):
    """The oracle: pairwise log-sum-exp merges of ``[n, heads, d]`` states, in float64."""
    return reduce(lambda a, b: merge_state_ref(*a, *b), zip(o.double(), lse.double(), strict=True))


def random_partials(counts, num_heads, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    o = torch.randn(n, num_heads, head_dim, generator=g)
    lse = torch.randn(n, num_heads, generator=g) * 4  # spread: the running maximum matters
    indptr = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    return o, lse, indptr


@pytest.mark.parametrize("block_p", [1, 4, 8, 16])
def test_merge_equals_oracle(block_p):
    counts = [1, 2, 0, 7, 9, 17, 3, 33, 8]  # 0: a padding row; more partials than one block
    o, lse, indptr = random_partials(counts, 3, 40, seed=block_p)
    out = torch.full((len(counts), 3, 40), float("nan"), dtype=torch.float16)
    lse_out = torch.full((len(counts), 3), float("nan"))
    merge_partials(o.to(DEVICE), lse.to(DEVICE), indptr.to(DEVICE), out := out.to(DEVICE),
                   lse_out := lse_out.to(DEVICE), block_p=block_p)
    for t, (a, b) in enumerate(zip(indptr[:-1].tolist(), indptr[1:].tolist(), strict=True)):
        if a == b:
            assert (out[t] == 0).all() and torch.isneginf(lse_out[t]).all()
            continue
        ref_o, ref_lse = merged_ref(o[a:b], lse[a:b])
        assert rel_err(out[t].cpu(), ref_o) < 2e-3, t
        torch.testing.assert_close(lse_out[t].cpu().double(), ref_lse, atol=1e-4, rtol=1e-5)


def test_skip_single_leaves_rows_alone():
    o, lse, indptr = random_partials([1, 3, 1], 2, 32, seed=0)
    out = torch.full((3, 2, 32), 7.0, device=DEVICE)
    merge_partials(o.to(DEVICE), lse.to(DEVICE), indptr.to(DEVICE), out, skip_single=True)
    assert (out[0] == 7).all() and (out[2] == 7).all()
    assert rel_err(out[1].cpu(), merged_ref(o[1:4], lse[1:4])[0]) < 1e-5
