"""Root channels that can only go together: the units a group is counted and removed in.

Torch-Pruning names a group's channels by its root layer's. Removing one root channel can take
others of the root with it: a ghost module concatenates ``x`` with a depthwise ``cheap(x)``, so
channel ``c`` of the first half and ``c`` of the second are one; a ``Linear(512, 4096)`` viewed
as ``(256, 4, 4)`` into a conv loses whole 16-row blocks. Counting such a group in root
channels makes every MACs prediction, cap and landing wrong (a run overshoots its target).

Torch-Pruning's own traversal meets the same layer channel by several paths, each carrying the
root channel it started from; it keeps the first. Here the traversal is replayed over all root
channels at once and the root channels meeting at any layer channel are merged (union-find):
the classes are the units.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch_pruning import _helpers
from torch_pruning.dependency.dependency import Dependency


def channel_units(
    dg: tp.DependencyGraph, module: Any, handler: Any, channels: int
) -> torch.Tensor | None:
    """Unit id (0..units-1, in order of first root channel) of every root channel of the
    group rooted at ``(module, handler)``, or None when every root channel is its own unit."""
    parent = list(range(channels))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    root = dg.module2node[module]
    start = [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(channels)]
    stack = [(Dependency(handler, handler, source=root, target=root), start)]
    first_root: dict[tuple[Any, Any, int], int] = {}
    done: set[tuple[Any, Any, tuple]] = set()
    visited: set[Any] = set()
    while stack:
        dep, idxs = stack.pop()
        visited.add(dep.target)
        for h in idxs:
            other = first_root.setdefault((dep.target, dep.handler, h.idx), h.root_idx)
            a, b = find(other), find(h.root_idx)
            if a != b:
                parent[max(a, b)] = min(a, b)
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            new = idxs
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            key = (new_dep.target, new_dep.handler, tuple(new))
            if not new or (new_dep.target in visited and key in done):
                continue
            done.add(key)
            stack.append((new_dep, new))
    roots = [find(i) for i in range(channels)]
    if all(r == i for i, r in enumerate(roots)):
        return None
    ids: dict[int, int] = {}
    return torch.tensor([ids.setdefault(r, len(ids)) for r in roots], dtype=torch.long)
