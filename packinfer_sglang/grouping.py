"""Groups running decode requests by the radix-tree node they share (PackInfer, Sec. 3).

Every running request holds a node of SGLang's radix tree (``req.last_node``): the end of its
cached prompt. Requests whose nodes lie under a common node ``n`` share the ``depth(n)`` tokens of
the path root→n, at the same KV pool slots. Grouping them at ``n`` lets the packed kernel read
that prefix once per tile instead of once per request, saving ``(count(n) - 1) * depth(n)`` token
reads, where ``count(n)`` is the number of running requests under ``n``.

A grouping is a cut of the tree: each request joins the group of at most one ancestor. The best
cut is found by a bottom-up dynamic program over the nodes on the requests' paths:

    best(n) = max(own(n), sum(best(c) for c in children(n)))
    own(n)  = net(count(n), depth(n))   if depth(n) >= min_prefix_tokens and count(n) >= min_group_size
              0                         otherwise

where ``net`` is the saving in KV tokens net of what packing adds (:mod:`.kernels.cost_model`; without a
cost model, the plain ``(count - 1) * depth``); a node is taken only when ``own(n) > 0``.

Requests of no group form groups of one with an empty prefix (their whole context is suffix).
Complexity: O(sum of path lengths in nodes), pure Python on the host, once per decode step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .kernels.cost_model import PackingCost


class DecodeGroups(NamedTuple):
    """Result of :func:`form_groups` for a batch of ``num_tokens`` decode requests.

    ``order`` lists batch rows so that each group's requests are contiguous: packed row ``i`` is
    batch row ``order[i]``; group ``g`` is packed rows ``group_indptr[g]:group_indptr[g+1]`` and
    shares its first ``prefix_lens[g]`` tokens (positions ``0:prefix_lens[g]``).
    """

    order: np.ndarray  # [num_tokens] int64
    group_indptr: np.ndarray  # [num_groups + 1] int32
    prefix_lens: np.ndarray  # [num_groups] int32, tokens

    @property
    def num_groups(self) -> int:
        return len(self.prefix_lens)

    @property
    def is_identity(self) -> bool:
        return bool((self.order == np.arange(len(self.order))).all())

    @property
    def shared_token_reads_saved(self) -> int:
        """Token reads the grouping saves over flat decode (per KV head, per layer)."""
        return int(((np.diff(self.group_indptr) - 1) * self.prefix_lens).sum())


def ungrouped(num_tokens: int) -> DecodeGroups:
    """Every request its own group, batch order kept."""
    return DecodeGroups(np.arange(num_tokens, dtype=np.int64), np.arange(num_tokens + 1, dtype=np.int32),
                        np.zeros(num_tokens, dtype=np.int32))


def _paths(nodes):
    """Per request, its path of non-root nodes (root side first), and each node's token depth."""
    depth: dict[int, int] = {}
    paths = []
    for node in nodes:
        path = []
        while node is not None and node.parent is not None:  # the root has no parent
            path.append(node)
            node = node.parent
        path.reverse()
        d = 0
        for n in path:
            d = depth.setdefault(id(n), d + len(n.key))
        paths.append(path)
    return paths, depth


def form_groups(
    nodes: Sequence, seq_lens: Sequence[int], min_prefix_tokens: int, min_group_size: int,
    cost: PackingCost | None = None,
) -> DecodeGroups:
    """Forms decode groups (see module docstring).

    Args:
        nodes: per request, its radix-tree node (``req.last_node``; ``None`` or the root: no prefix).
        seq_lens: per request, its current length in tokens including the token being decoded; a
            group's prefix is clamped to ``min(seq_len) - 1`` so every request keeps a suffix.
        min_prefix_tokens, min_group_size: a node is a candidate group only above both.
        cost: the gate; a candidate is taken only when packing it saves bytes net (``None``: any
            shared prefix counts as saving).

    Returns:
        :class:`DecodeGroups`; groups are ordered by their first request's batch row, members in
        batch order, so an already grouped batch gives the identity ``order``.
    """
    paths, depth = _paths(nodes)
    count: dict[int, int] = defaultdict(int)
    children: dict[int, dict[int, object]] = defaultdict(dict)
    members: dict[int, list[int]] = defaultdict(list)  # requests whose path ends at the node
    by_id = {}
    for i, path in enumerate(paths):
        parent = 0  # key 0: the virtual root
        for n in path:
            count[id(n)] += 1
            children[parent][id(n)] = n
            by_id[id(n)] = n
            parent = id(n)
        members[parent].append(i)

    best: dict[int, int] = {}
    take: dict[int, bool] = {}
    for nid in sorted(by_id, key=lambda k: -depth[k]):  # children before parents
        below = sum(best[c] for c in children[nid])
        ok = depth[nid] >= min_prefix_tokens and count[nid] >= min_group_size
        own = (cost.net_saving_tokens(count[nid], depth[nid]) if cost else (count[nid] - 1) * depth[nid]) if ok else 0
        take[nid] = own > 0 and own > below
        best[nid] = max(own, below)

    groups: list[tuple[list[int], int]] = []
    stack = [0]
    while stack:
        nid = stack.pop()
        if nid and take[nid]:
            groups.append((_subtree_members(nid, children, members), depth[nid]))
            continue
        groups.extend(([i], 0) for i in members[nid])
        stack.extend(children[nid])
    return _pack(groups, seq_lens, len(nodes))


def _subtree_members(nid, children, members) -> list[int]:
    out, stack = [], [nid]
    while stack:
        n = stack.pop()
        out.extend(members[n])
        stack.extend(children[n])
    return out


def _pack(groups, seq_lens, num_tokens) -> DecodeGroups:
    groups = [(sorted(m), p) for m, p in groups]
    groups.sort(key=lambda g: g[0][0])
    order = np.fromiter((i for m, _ in groups for i in m), dtype=np.int64, count=num_tokens)
    sizes = np.array([len(m) for m, _ in groups], dtype=np.int64)
    prefix = np.array([min([p] + [int(seq_lens[i]) - 1 for i in m]) if p else 0 for m, p in groups],
                      dtype=np.int32)
    indptr = np.zeros(len(groups) + 1, dtype=np.int32)
    indptr[1:] = np.cumsum(sizes)
    return DecodeGroups(order, indptr, np.maximum(prefix, 0))


def slots_of_path(node) -> torch.Tensor:
    """Pool slots of the path root→``node`` of a radix tree (host copy), int64."""
    parts = []
    while node is not None and node.parent is not None:
        parts.append(node.value)
        node = node.parent
    return torch.cat(parts[::-1]).cpu() if parts else torch.empty(0, dtype=torch.int64)
