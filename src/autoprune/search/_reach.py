"""Refusing a MACs target the run cannot reach, with advice that can work.

The caps bound what each group may lose; frozen groups (the classifier's outputs, ignored
layers, patterns the graph cannot follow) lose nothing at any cap. Raising the cap is advice
only where it helps: when even every group down to one channel falls short, the message says
so and names what holds the MACs instead.
"""

from __future__ import annotations

import torch

from ..errors import AutopruneError
from ..graph import PruningGraph
from ..graph.pruning_graph import OUTPUT_REASON
from .candidates import removable

FROZEN_SHOWN = 3  # frozen groups named in a refusal
OUTPUT_ADVICE = (
    "A forward that returns hidden features keeps their width: prune a wrapper whose forward "
    "returns only the prediction"
)


def most_reduction(
    graph: PruningGraph, original_macs: int, original: dict[str, int], cap: float, multiple: int
) -> float:
    """The largest MACs reduction with every group at ``cap`` of its original channels."""
    at_cap = {
        g.name: torch.arange(removable(g, original[g.name], cap, multiple)) for g in graph.groups()
    }
    return 1.0 - graph.macs(at_cap) / original_macs


def refuse_unreachable(
    graph: PruningGraph,
    original_macs: int,
    original: dict[str, int],
    target: float,
    cap: float,
    multiple: int,
) -> None:
    """Raise an :class:`AutopruneError` when ``target`` is out of reach at ``cap``, saying
    whether a higher cap would help and, if not, why."""
    best = most_reduction(graph, original_macs, original, cap, multiple)
    if target <= best:
        return
    head = (
        f"a {100 * target:.1f} % MACs reduction is out of reach: with every group at its cap "
        f"({100 * cap:.0f} % of its channels) the most is {100 * best:.2f} %"
    )
    full = most_reduction(graph, original_macs, original, 1.0, multiple)
    if target <= full:
        raise AutopruneError(f"{head}; lower the target or raise the cap (cap=1.0 reaches it)")
    frozen = list(graph.frozen.items())
    why = "; ".join(f"{name!r}: {reason}" for name, reason in frozen[:FROZEN_SHOWN])
    more = f" (and {len(frozen) - FROZEN_SHOWN} more)" if len(frozen) > FROZEN_SHOWN else ""
    reach = (
        f"with every group down to one channel it is {100 * full:.2f} %; lower the target"
        if full > 0  # else a lower target is no advice: nothing can go at all
        else "no group of this model can lose a channel"
    )
    outputs = any(OUTPUT_REASON in reason for _, reason in frozen) and full <= 0
    raise AutopruneError(
        f"{head}, and no cap helps: {reach}. "
        + (f"Groups that cannot be pruned: {why}{more}" if frozen else "")
        + (f". {OUTPUT_ADVICE}" if outputs else "")
    )
