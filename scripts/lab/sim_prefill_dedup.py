"""A host-only model of SGLang's ``fcfs`` prefill admission under the overlap loop, with and without
``PACKINFER_PREFILL_DEDUP``: how many prefill tokens a burst of shared-prefix requests computes.

The model: every request waits at time 0 in the stock client's order (shuffled, or each group's
requests together as with ``--gsp-ordered``); a round admits requests in queue order into one
prefill batch of ``--chunk`` new tokens (the request that does not fit is chunked and continued
first next round, as SGLang's ``PrefillAdder`` does); a request's prefix is cached when a request of
its group was admitted two or more rounds earlier (the overlap loop inserts a prefill into the
radix tree while the next batch runs). Dedup is :func:`packinfer_sglang.patches.prefill_dedup.select_held`
itself. Memory, decode batches and running-request limits are left out, so the numbers bound the
prefill work, not the time::

    python -m scripts.lab.sim_prefill_dedup            # the prefill-heavy-512 shape, both orders
"""

from __future__ import annotations

import argparse
import random
import sys
from types import SimpleNamespace

from packinfer_sglang.patches import prefill_dedup as pd

from packinfer_sglang.config import PackInferConfig

MIN_PREFIX_TOKENS = PackInferConfig().min_prefix_tokens  # the setting's default


def simulate(dedup: bool, groups: int, per_group: int, system: int, question: int, chunk: int, ordered: bool,
             seed: int = 0) -> dict:
    """Rounds, prefill tokens computed and the distinct prompt tokens of one burst (module docstring)."""
    rng = random.Random(seed)
    prompts = [[g + 1] + [rng.randrange(1000, 50000) for _ in range(system - 1)] for g in range(groups)]
    waiting = [SimpleNamespace(rid=f"{g}-{i}", group=g, extra_key=None,
                               origin_input_ids=prompts[g] + [rng.randrange(1000, 50000) for _ in range(question)])
               for g in range(groups) for i in range(per_group)]
    if not ordered:
        rng.shuffle(waiting)
    cached_from: dict[int, int] = {}  # group -> first round whose batches see its prefix in the tree
    state, chunked, chunk_left, rounds, tokens = pd.DedupState(), None, 0, 0, 0
    while waiting or chunked is not None:
        rounds += 1
        held = set()
        if dedup and waiting:
            inflight = [b for r in state.inflight for b in r] + ([pd.block_hashes(chunked)] if chunked else [])
            held = {id(r) for r in pd.select_held(waiting, inflight, state.computed, MIN_PREFIX_TOKENS)[0]}
        budget, batch, rest = chunk, [], []
        if chunked is not None:
            take = min(chunk_left, budget)
            budget, chunk_left, tokens = budget - take, chunk_left - take, tokens + take
            batch.append(chunked)
            if chunk_left == 0:
                cached_from.setdefault(chunked.group, rounds + 2)
                chunked = None
        for r in waiting:
            if id(r) in held or budget <= 0 or chunked is not None:
                rest.append(r)
                continue
            new = system + question - (system if cached_from.get(r.group, rounds + 1) <= rounds else 0)
            batch.append(r)
            if new <= budget:
                budget, tokens = budget - new, tokens + new
                cached_from.setdefault(r.group, rounds + 2)
            else:
                chunked, chunk_left, tokens, budget = r, new - budget, tokens + budget, 0
        waiting = rest
        if dedup:
            pd.record_round(state, [r for r in batch if r is not chunked], chunked)
    distinct = groups * system + groups * per_group * question
    return {"rounds": rounds, "prefill_tokens": tokens, "distinct_tokens": distinct, "x_distinct": tokens / distinct}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--system", type=int, default=2048, help="shared prefix tokens per group")
    p.add_argument("--question", type=int, default=256, help="own tokens per request")
    p.add_argument("--chunk", type=int, default=8192, help="new tokens per prefill batch (SGLang's chunked prefill)")
    args = p.parse_args(argv)
    if min(args.groups, args.per_group, args.system, args.question, args.chunk) < 1:
        p.error("every size must be >= 1")
    print("order     dedup  rounds  prefill tokens  x distinct")
    for ordered in (False, True):
        for dedup in (False, True):
            r = simulate(dedup, args.groups, args.per_group, args.system, args.question, args.chunk, ordered)
            print(f"{'bursts' if ordered else 'shuffled':9} {'on' if dedup else 'off':5}  {r['rounds']:6}  "
                  f"{r['prefill_tokens']:14}  {r['x_distinct']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
