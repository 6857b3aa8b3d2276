"""Which decode groups to relocate into contiguous KV slot ranges, and where (pure, host numpy).

Terms. An *owner* holds pool slots: a radix-tree node (``node.value``) or a running request's
*tail*, its row ``req_to_token[req, cache_protected_len:kv_allocated_len]`` (tokens outside the
tree). A group's *prefix* is the owners on its members' common tree path; a member's *suffix* is
its tree nodes below that path plus its tail. A *run* is a maximal stretch of consecutive slots.

Fragmentation. ``count_runs`` per group prefix and per request suffix (:func:`layout_fragmentation`).

Cost model (per relocated part: a group's prefix, or one member's suffix), all in bytes:

- copy cost, paid once: every moved token's K and V of every layer is read and written,
  ``copy = 2 * n_moved * token_bytes``, ``token_bytes = 2 * num_layers * num_kv_heads * head_dim
  * dtype_bytes``;
- saving, per decode step: the kernel reads a work item's KV chunk (``chunk_tokens`` slots) by
  base + length when the chunk is one run, else through an index list. A token in a gathered chunk
  costs, per index read, ``index_bytes`` (its int32 slot id) plus ``gather_penalty * 2 * head_dim
  * dtype_bytes`` (the extra cost of an indexed K/V row over a streamed one; 0 until measured on a
  GPU). After relocation the part is one run, so every gathered token stops paying. Index reads per
  token and layer: a suffix token is read once per KV head; a prefix token once per KV head and
  per prefix tile, ``ceil(active_members / requests_per_tile)``
  (:func:`~packinfer_sglang.kernels.launch.requests_per_tile`: the packed kernel's prefix tiles);
- horizon: a member is expected to decode ``remaining_steps[i]`` more tokens (the caller caps
  ``max_new_tokens - generated`` at ``PACKINFER_COMPACT_HORIZON``); the prefix saves while any
  member runs, with the tile count falling as members finish; a suffix saves while its request runs.
  Tokens decoded after the move are placed by SGLang's allocator (with placement on, in the
  headroom below) and are not counted either way.

A part is moved when ``saving * steps >= min_gain * copy``. Break-even for a suffix with
``gather_penalty = 0``: copy ``4 * L * H * D * b`` per token against ``L * H * index_bytes`` per
step, i.e. ``4 * head_dim * dtype_bytes / index_bytes`` steps (256 for bf16, head_dim 128); a prefix
divides that by its tile count. Index bytes alone rarely pay within a request's life; the term
that can is ``gather_penalty`` (from the kernel's scattered-vs-compacted timing on a GPU). Groups are placed, best net gain first (ties: group
index), each into the smallest free page run that fits it whole (ties: lowest start), until
``max_tokens`` tokens are moved; a group with no fitting run is skipped.

Headroom. In a group's span the prefix comes first, then each moved member's suffix followed by
``ceil(remaining_steps / page_size)`` free pages (not claimed), when a run holds the span with them
(else the parts lie back to back). Placement reserves those pages in place, so the suffix grows as
one run and later plans find nothing gathered. Without headroom the next member's suffix starts
right after, every suffix continues elsewhere, the break lands inside a chunk, and every plan moves
every suffix again (the H100 server run: 17665 tokens a plan, growing by the tokens decoded since). Decisions depend only on
the inputs (no ids of Python objects, no clocks), so every tensor-parallel rank, holding the same
tree, requests and allocator state, takes the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..kernels.launch import BLOCK_N, PREFIX_BLOCK_M, requests_per_tile


class Owner(NamedTuple):
    """Slots held by one owner, in token-position order."""

    key: tuple  # ("node", node.id) or ("tail", rid): deterministic on every rank
    slots: np.ndarray  # [num_tokens] int64 pool slots; starts on a page boundary


class GroupLayout(NamedTuple):
    """Where one decode group's KV lies now."""

    prefix: list[Owner]  # tree nodes of the common path, root side first
    suffixes: list[list[Owner]]  # per member (group order): its nodes below the prefix, then its tail
    remaining_steps: np.ndarray  # [group_size] int64: expected decode steps left per member


class Fragmentation(NamedTuple):
    """Result of :func:`layout_fragmentation`; runs and lengths in slots/tokens."""

    prefix_runs: np.ndarray  # [num_groups] int64 (0 for an empty prefix)
    prefix_lens: np.ndarray  # [num_groups] int64 tokens
    suffix_runs: np.ndarray  # [num_requests] int64, requests in group order
    suffix_lens: np.ndarray  # [num_requests] int64 tokens

    def summary(self) -> dict:
        """Totals for a benchmark's per-step log: runs, tokens, and runs per 1000 tokens."""
        runs = int(self.prefix_runs.sum() + self.suffix_runs.sum())
        tokens = int(self.prefix_lens.sum() + self.suffix_lens.sum())
        return {"groups": len(self.prefix_runs), "requests": len(self.suffix_runs),
                "prefix_runs": int(self.prefix_runs.sum()), "suffix_runs": int(self.suffix_runs.sum()),
                "tokens": tokens, "runs_per_1k_tokens": 1000.0 * runs / max(tokens, 1)}


class OwnerMove(NamedTuple):
    key: tuple
    old_pages: np.ndarray  # [n] int64 page ids (slots when page_size == 1), position order
    new_first_page: int  # the owner's pages become new_first_page + arange(n)


class GroupMove(NamedTuple):
    group: int
    owners: tuple[OwnerMove, ...]  # the claimed pages are the owners' new pages
    first_page: int  # the group's span first_page : first_page + num_pages, headroom included
    num_pages: int
    headroom_pages: int  # pages of the span left free after relocated suffixes (not claimed)
    tokens: int  # slots holding KV that are copied
    copy_bytes: float
    saved_bytes: float


class CompactionPlan(NamedTuple):
    moves: tuple[GroupMove, ...]
    skipped: tuple[tuple[int, str], ...]  # (group, reason) for candidates not moved

    @property
    def tokens(self) -> int:
        return sum(m.tokens for m in self.moves)


@dataclass(frozen=True)
class CostModel:
    """Parameters of the cost rule (module docstring). Sizes per rank: ``num_kv_heads`` is the
    rank's share under tensor parallelism. ``prefix_block_m`` and ``chunk_tokens`` default to the
    packed kernel's prefix launch (:mod:`packinfer_sglang.kernels.launch`), which runs every plan
    with groups: compaction only moves groups."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    gqa_group_size: int = 1
    prefix_block_m: int = PREFIX_BLOCK_M
    chunk_tokens: int = BLOCK_N
    index_bytes: int = 4
    gather_penalty: float = 0.0
    min_gain: float = 1.0

    def __post_init__(self):
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype_bytes, self.gqa_group_size,
               self.prefix_block_m, self.chunk_tokens) < 1:
            raise ValueError(f"cost model sizes must be >= 1: {self}")

    @property
    def token_bytes(self) -> int:
        """K and V of one token, all layers and KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def read_saving_bytes(self) -> float:
        """Bytes one index read of a gathered token costs over a base+length read."""
        return self.index_bytes + self.gather_penalty * 2 * self.head_dim * self.dtype_bytes

    def copy_bytes(self, num_tokens: int) -> float:
        return 2.0 * num_tokens * self.token_bytes

    def prefix_reads(self, remaining_steps: np.ndarray) -> float:
        """Index reads of one prefix token per layer, summed over the horizon."""
        per_tile = requests_per_tile(self.gqa_group_size, self.prefix_block_m)
        steps = np.sort(np.asarray(remaining_steps, dtype=np.int64))[::-1]  # longest first
        active = np.arange(1, len(steps) + 1)
        # between the (k+1)-th and k-th longest remaining, k members are active
        spans = steps - np.append(steps[1:], 0)
        return float(self.num_kv_heads * (spans * -(-active // per_tile)).sum())

    def suffix_reads(self, remaining_steps: int) -> float:
        return float(self.num_kv_heads * remaining_steps)


def count_runs(slots: np.ndarray) -> int:
    """Maximal runs of consecutive slots (``0`` for an empty list)."""
    slots = np.asarray(slots)
    return 0 if len(slots) == 0 else 1 + int(np.count_nonzero(np.diff(slots) != 1))


def gathered_tokens(slots: np.ndarray, chunk_tokens: int) -> int:
    """Tokens in ``chunk_tokens``-long chunks (from the range start) that are not one run."""
    slots = np.asarray(slots)
    if len(slots) < 2:
        return 0
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1  # positions starting a new run
    chunks = np.unique(breaks[breaks % chunk_tokens != 0] // chunk_tokens)
    lens = np.minimum(chunk_tokens, len(slots) - chunks * chunk_tokens)
    return int(lens.sum())


def _cat(owners: list[Owner]) -> np.ndarray:
    return np.concatenate([o.slots for o in owners]) if owners else np.zeros(0, np.int64)


def layout_fragmentation(layouts: list[GroupLayout]) -> Fragmentation:
    """Runs and tokens per group prefix and per request suffix (see :class:`Fragmentation`)."""
    pre = [_cat(g.prefix) for g in layouts]
    suf = [_cat(s) for g in layouts for s in g.suffixes]
    arr = lambda xs: np.array(xs, dtype=np.int64)
    return Fragmentation(arr([count_runs(s) for s in pre]), arr([len(s) for s in pre]),
                         arr([count_runs(s) for s in suf]), arr([len(s) for s in suf]))


def _part_gain(owners, claimed, reads, cost: CostModel):
    """(owners to move, tokens, copy bytes, saved bytes) of one part, or ``None`` if it does not pay."""
    slots = _cat(owners)
    gathered = gathered_tokens(slots, cost.chunk_tokens)
    movable = [o for o in owners if o.key not in claimed]
    if gathered == 0 or not movable:
        return None
    tokens = sum(len(o.slots) for o in movable)
    saved = cost.num_layers * reads * cost.read_saving_bytes * gathered
    copy = cost.copy_bytes(tokens)
    return (movable, tokens, copy, saved) if saved >= cost.min_gain * copy else None


def _group_proposal(layout: GroupLayout, claimed: set, cost: CostModel, page_size: int):
    """(parts, tokens, copy bytes, saved bytes); ``parts`` is a list of ``(owners, headroom_pages)``,
    the prefix first, then each moved member's suffix with the pages its remaining tokens fill."""
    prefix = _part_gain(layout.prefix, claimed, cost.prefix_reads(layout.remaining_steps), cost)
    parts = [(prefix, 0)] if prefix else []
    for s, r in zip(layout.suffixes, layout.remaining_steps):
        gain = _part_gain(s, claimed, cost.suffix_reads(int(r)), cost)
        if gain:
            parts.append((gain, -(-int(r) // page_size)))
    out, seen = [], set()
    for p, room in parts:
        owners = [o for o in p[0] if o.key not in seen]
        seen.update(o.key for o in owners)
        if owners:
            out.append((owners, room))
    return out, *(sum(p[k] for p, _ in parts) for k in (1, 2, 3))


def _lay_out(parts, first: int, with_room: bool, page_size: int) -> tuple[OwnerMove, ...]:
    """Owner moves for parts laid out back to back from page ``first``, each followed by its
    headroom when ``with_room``."""
    moves, at = [], first
    for owners, room in parts:
        for o in owners:
            pages = (o.slots[::page_size] // page_size).astype(np.int64)
            moves.append(OwnerMove(o.key, pages, at))
            at += len(pages)
        at += room if with_room else 0
    return tuple(moves)


def plan_compaction(layouts: list[GroupLayout], free_runs: np.ndarray, page_size: int, cost: CostModel,
                    max_tokens: int, frozen: frozenset = frozenset(), headroom: bool = True) -> CompactionPlan:
    """Chooses the groups to relocate and their target page ranges (module docstring).

    Args:
        layouts: per decode group, where its KV lies (``compaction.collect_layouts``).
        free_runs: ``[num_runs, 2]`` int64 ``(first_page, num_pages)`` of the allocator's free pages
            (``compaction_alloc.free_page_runs``); pages are slots when ``page_size == 1``.
        page_size: tokens per page; every owner's slots start on a page boundary.
        cost: the cost model; max_tokens: cap on tokens copied by this plan.
        frozen: owner keys that must not move (held by someone the relocator cannot rewrite).
        headroom: leave ``ceil(remaining_steps / page_size)`` free pages after each relocated suffix
            (when the group's span still fits a free run), so that placement continues the suffix in
            place and the next plan finds it one run.

    Returns:
        :class:`CompactionPlan`; ``free_runs`` is not modified.
    """
    claimed: set = set(frozen)
    proposals = []
    for g, layout in enumerate(layouts):
        parts, tokens, copy, saved = _group_proposal(layout, claimed, cost, page_size)
        if parts:
            claimed.update(o.key for owners, _ in parts for o in owners)  # a shared owner goes to the first
            proposals.append((g, parts, tokens, copy, saved))
    proposals.sort(key=lambda p: (-(p[4] - cost.min_gain * p[3]), p[0]))
    runs = [list(map(int, r)) for r in np.asarray(free_runs, dtype=np.int64).reshape(-1, 2)]
    moves, skipped, budget = [], [], max_tokens
    for g, parts, tokens, copy, saved in proposals:
        need = sum(-(-len(o.slots) // page_size) for owners, _ in parts for o in owners)
        room = sum(r for _, r in parts) if headroom else 0
        if tokens > budget:
            skipped.append((g, "over max_tokens"))
            continue
        fits = [i for i, (_, n) in enumerate(runs) if n >= need + room] or \
            [i for i, (_, n) in enumerate(runs) if n >= need]
        if not fits:
            skipped.append((g, f"no free run of {need} pages"))
            continue
        best = min(fits, key=lambda i: (runs[i][1], runs[i][0]))
        room = room if runs[best][1] >= need + room else 0
        first = runs[best][0]
        runs[best] = [first + need + room, runs[best][1] - need - room]
        owner_moves = _lay_out(parts, first, room > 0, page_size)
        moves.append(GroupMove(g, owner_moves, first, need + room, room, tokens, copy, saved))
        budget -= tokens
    return CompactionPlan(tuple(moves), tuple(skipped))
