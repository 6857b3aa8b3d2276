"""Decode grouping on SGLang's real RadixCache: valid partitions, truly shared slots, best cut."""

import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from workload import admit, new_cache, shared_prefix_prompts

from packinfer_sglang.grouping import form_groups, ungrouped


def groups_as_sets(groups, reqs):
    gi = groups.group_indptr
    return [({reqs[i].rid for i in groups.order[gi[g]:gi[g + 1]]}, int(groups.prefix_lens[g]))
            for g in range(groups.num_groups)]


def check_valid(groups, reqs, min_prefix):
    n = len(reqs)
    assert sorted(groups.order.tolist()) == list(range(n))
    assert groups.group_indptr[0] == 0 and groups.group_indptr[-1] == n
    gi = groups.group_indptr
    for g in range(groups.num_groups):
        members = [reqs[i] for i in groups.order[gi[g]:gi[g + 1]]]
        p = int(groups.prefix_lens[g])
        if len(members) == 1:
            assert p == 0
            continue
        assert p >= min_prefix
        for m in members[1:]:  # the prefix is the same tokens at the same pool slots
            assert m.tokens[:p] == members[0].tokens[:p]
            assert m.slots[:p].tolist() == members[0].slots[:p].tolist()
    assert list(gi[1:] - gi[:-1]).count(0) == 0


def test_system_prompts_form_one_group_each():
    rng = random.Random(0)
    cache = new_cache(min_prefix_tokens=16)
    reqs, _ = admit(cache, shared_prefix_prompts(rng, 3, 5, 40, 7), rng)
    groups = cache.runtime.decode_groups(reqs, [len(r.tokens) + 1 for r in reqs])
    got = sorted(groups_as_sets(groups, reqs), key=lambda g: min(g[0]))
    want = sorted(({r.rid for r in reqs if r.tokens[0] == s}, 40) for s in (1, 2, 3))
    assert sorted(got, key=lambda g: sorted(g[0])) == sorted(want, key=lambda g: sorted(g[0]))
    check_valid(groups, reqs, 16)


def test_short_prefixes_stay_ungrouped():
    rng = random.Random(1)
    cache = new_cache(min_prefix_tokens=64)
    reqs, _ = admit(cache, shared_prefix_prompts(rng, 2, 4, 40, 7), rng)
    groups = cache.runtime.decode_groups(reqs, [len(r.tokens) + 1 for r in reqs])
    assert groups.num_groups == len(reqs) and (groups.prefix_lens == 0).all()


def test_prefers_wider_group_when_it_saves_more():
    # 6 requests share 900 tokens; two subsets of 3 share 1000. Grouping all at 900 saves 5*900 = 4500
    # token reads; two groups at 1000 save 2*2*1000 = 4000.
    rng = random.Random(2)
    base = [1] + [rng.randrange(1000, 50000) for _ in range(899)]
    prompts = [base + [b] * 100 + [rng.randrange(1000, 50000) for _ in range(5)] for b in (7, 8) for _ in range(3)]
    cache = new_cache(min_prefix_tokens=16)
    reqs, _ = admit(cache, prompts, rng)
    groups = cache.runtime.decode_groups(reqs, [len(r.tokens) + 1 for r in reqs])
    assert groups.num_groups == 1 and groups.prefix_lens.tolist() == [900]
    assert groups.shared_token_reads_saved == 4500


def test_prefix_clamped_to_keep_a_suffix():
    rng = random.Random(3)
    cache = new_cache(min_prefix_tokens=4)
    reqs, _ = admit(cache, [[5] * 30, [5] * 30], rng)  # identical prompts: one node
    groups = form_groups([r.last_node for r in reqs], [30, 31], 4, 2)
    assert groups.prefix_lens.tolist() == [29]


def test_ungrouped_is_identity():
    g = ungrouped(5)
    assert g.is_identity and g.num_groups == 5 and g.shared_token_reads_saved == 0


def test_cache_recomputes_when_batch_changes():
    rng = random.Random(4)
    cache = new_cache(min_prefix_tokens=16)
    reqs, _ = admit(cache, shared_prefix_prompts(rng, 2, 3, 40, 5), rng)
    lens = [len(r.tokens) + 1 for r in reqs]
    first = cache.runtime.decode_groups(reqs, lens)
    assert cache.runtime.decode_groups(reqs, lens) is first
    assert len(cache.runtime.decode_groups(reqs[:-1], lens[:-1]).order) == len(reqs) - 1


@settings(max_examples=40, deadline=None)
@given(num_systems=st.integers(1, 4), per_system=st.integers(1, 6), system_len=st.integers(0, 80),
       question_len=st.integers(1, 20), min_prefix=st.sampled_from([1, 16, 64]), seed=st.integers(0, 2**16))
def test_random_workloads_give_valid_groups(num_systems, per_system, system_len, question_len, min_prefix, seed):
    rng = random.Random(seed)
    cache = new_cache(min_prefix_tokens=min_prefix)
    prompts = shared_prefix_prompts(rng, num_systems, per_system, max(system_len, 1), question_len)
    prompts += [p[: rng.randrange(1, len(p) + 1)] for p in rng.sample(prompts, k=min(3, len(prompts)))]
    reqs, _ = admit(cache, prompts, rng)
    groups = cache.runtime.decode_groups(reqs, [len(r.tokens) + 1 for r in reqs])
    check_valid(groups, reqs, min_prefix)
    cache.check_integrity()
    # Never worse than grouping each system prompt's requests at the system prompt alone.
    by_system = {}
    for r in reqs:
        by_system.setdefault(r.tokens[0], []).append(r)
    shared = {k: min([max(system_len, 1)] + [len(r.tokens) for r in rs]) for k, rs in by_system.items()}
    baseline = sum((len(rs) - 1) * shared[k] for k, rs in by_system.items()
                   if len(rs) >= 2 and shared[k] >= min_prefix)
    assert groups.shared_token_reads_saved >= baseline


def test_check_integrity_catches_counter_drift():
    rng = random.Random(5)
    cache = new_cache()
    admit(cache, shared_prefix_prompts(rng, 2, 2, 20, 5), rng)
    cache.check_integrity()
    cache.evictable_size_ += 1
    with pytest.raises(AssertionError, match="counters say"):
        cache.check_integrity()


def test_cache_recomputes_when_nodes_move():
    # SGLang first holds the admission-time match, then the whole prompt's node after prefill.
    rng = random.Random(6)
    cache = new_cache(min_prefix_tokens=16)
    reqs, _ = admit(cache, shared_prefix_prompts(rng, 1, 3, 40, 5), rng)
    lens = [len(r.tokens) + 1 for r in reqs]
    nodes = [r.last_node for r in reqs]
    for r in reqs:
        r.last_node = cache.root_node
    assert cache.runtime.decode_groups(reqs, lens).num_groups == 3
    for r, n in zip(reqs, nodes):
        r.last_node = n
    assert cache.runtime.decode_groups(reqs, lens).num_groups == 1


def test_offered_groups_are_taken_once_and_only_for_matching_lengths():
    import torch

    rng = random.Random(7)
    cache = new_cache(min_prefix_tokens=16)
    reqs, _ = admit(cache, shared_prefix_prompts(rng, 2, 3, 40, 5), rng)
    lens = torch.tensor([len(r.tokens) + 1 for r in reqs])
    batch = SimpleNamespace(reqs=reqs, seq_lens_cpu=lens)
    runtime = cache.runtime
    runtime.offer_step(batch, len(reqs))
    groups = runtime.decode_groups(reqs, lens)
    assert runtime.take_step(lens + 1) is None  # another batch: not taken, and offer dropped
    runtime.offer_step(batch, len(reqs))
    assert runtime.take_step(lens.clone()) is groups
    assert runtime.take_step(lens) is None  # once
    runtime.offer_step(batch, len(reqs) + 1)  # a forward batch of another size: nothing offered
    assert runtime.take_step(lens) is None


def test_scheduler_hooks_and_backend_see_one_cost_gate(monkeypatch):
    """The batch-order hook (BEFORE ``prepare_for_decode``) and the forward-batch hook (AFTER
    ``ForwardBatch.init_new``) group a batch through the scheduler's one runtime, so the backend's
    step gets the cost gate however the hooks ran: pairs sharing 300 tokens pay at GQA 4 but not at
    GQA 64 (one request per prefix tile). Before the runtime, the reorder hook grouped without the
    gate first and the backend's lookup reused that ungated grouping (the memo ignored the gate)."""
    import torch
    from packinfer_sglang.kernels.cost_model import PackingCost
    from packinfer_sglang.patches import batch_order, forward_batch

    permutations = []
    monkeypatch.setattr(batch_order, "permute_batch", lambda batch, order: permutations.append(order))
    for cost, num_groups in ((PackingCost(32, 8, 128), 2), (PackingCost(64, 1, 128), 4)):
        rng = random.Random(8)
        cache = new_cache(min_prefix_tokens=16)
        cache.runtime.cost = cost
        reqs, _ = admit(cache, shared_prefix_prompts(rng, 2, 2, 400, 5), rng)
        lens = torch.tensor([len(r.tokens) + 1 for r in reqs])
        batch = SimpleNamespace(reqs=list(reqs), seq_lens_cpu=lens, tree_cache=cache, spec_info=None,
                                sampling_info=None, multimodal_inputs=None,
                                model_config=SimpleNamespace(is_encoder_decoder=False),
                                forward_mode=SimpleNamespace(is_decode=lambda: True))
        batch_order.group_adjacent(batch)
        forward_batch.attach_decode_groups(SimpleNamespace(batch_size=len(reqs)), None, batch, None)
        offered = cache.runtime.take_step(lens)
        assert offered is not None and offered.num_groups == num_groups
    assert len(permutations) == 1  # grouped rows made adjacent under the GQA-4 gate only
