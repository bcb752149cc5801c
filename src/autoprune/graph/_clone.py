"""A pruning graph over a copy of its model, without tracing the copy again.

Tracing is the expensive part of :func:`~.build.build_graph` (and the one that can differ
between runs of a model with data-dependent control flow). A clone deep-copies the graph
object itself: the model, Torch-Pruning's nodes and dependencies, our labels and MAC table
all come over in one pass, so every reference to a layer in the analysis points at the
copy's layer of the same name. What is shared, not copied: autograd nodes (keys of the
analysis; they cannot be copied) and Torch-Pruning's own pruning functions, which its graph
recognises by identity.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from ..errors import AutopruneError
from .pruning_graph import PruningGraph

FRAMES_PER_NODE = 16  # deepcopy frames per node link followed (dicts, lists, dependencies)


def clone_graph(graph: PruningGraph) -> PruningGraph:
    """An independent graph (same groups, names, frozen groups and options) over a deep copy
    of ``graph.model``; pruning one leaves the other as it was. Refused while masks are on:
    the copy would inherit hooks that act on the original's mask state."""
    if graph.masks.active:
        raise AutopruneError("remove the active channel masks before cloning the graph")
    dg = graph._dg
    shared: list[Any] = [dg.ops, *dg.REGISTERED_PRUNERS.values()]
    shared += [node.grad_fn for node in dg.module2node.values()]
    shared += list(dg._ops)  # every traced op, by autograd node
    memo = {id(obj): obj for obj in shared if obj is not None}
    # The copy recurses along the nodes' links (a few frames per op): a large model's graph
    # runs deeper than Python's default limit. These frames are Python's, not the C stack's.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, FRAMES_PER_NODE * len(dg.module2node) + limit))
    try:
        return copy.deepcopy(graph, memo)
    finally:
        sys.setrecursionlimit(limit)
