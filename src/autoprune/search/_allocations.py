"""How the ``fixed`` schedule spreads a removal over the groups: its allocation rules.

Each rule turns the model as it is into a sequence of plans (channels per group), ordered by
how much they remove; :func:`._landing.land` picks the one that lands on the goal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .._registry import Registry
from ..criteria import score
from ._landing import Plans

if TYPE_CHECKING:
    from .schedules import SearchContext

Allocation = Callable[["SearchContext", str, Mapping[str, Any]], Plans]
ALLOCATIONS: Registry[Allocation] = Registry("allocation")


@ALLOCATIONS.register("uniform", description="the same fraction of every group's channels")
def uniform(ctx: SearchContext, criterion: str, state: Mapping[str, Any]) -> Plans:
    """Plans by ratio ``r`` of the original channels: each group loses ``floor(r * original)``
    in all (fewer where its cap stops it). The ratios tried are every one where a count moves."""
    groups = ctx.graph.groups()
    limits = ctx.limits()
    original = {g.name: ctx.original_channels[g.name] for g in groups}
    removed = {g.name: original[g.name] - g.channels for g in groups}
    ratios = sorted(
        {
            j / original[name]
            for name in original
            for j in range(removed[name], removed[name] + limits[name] + 1)
        }
    )

    def plan(i: int) -> dict[str, int]:
        r = ratios[i]
        return {
            name: min(limits[name], max(0, math.floor(r * original[name] + 1e-9) - removed[name]))
            for name in original
        }

    return len(ratios), plan


@ALLOCATIONS.register("global", description="channels ranked across groups by normalised score")
def global_ranking(ctx: SearchContext, criterion: str, state: Mapping[str, Any]) -> Plans:
    """Plans by the ``k`` lowest channels of all groups, each group's scores divided by their
    mean so groups of different scale compare; a group at its cap is passed over."""
    limits = ctx.limits()
    names, values = [], []
    for group in ctx.graph.groups():
        s = score(group, criterion, **state).double()
        names += [group.name] * group.channels
        values.append(s / s.mean().clamp_min(1e-30))
    order = torch.argsort(torch.cat(values), stable=True).tolist()
    taken: dict[str, int] = dict.fromkeys(limits, 0)
    eligible = []
    for i in order:
        if taken[names[i]] < limits[names[i]]:
            taken[names[i]] += 1
            eligible.append(names[i])

    def plan(k: int) -> dict[str, int]:
        counts = dict.fromkeys(limits, 0)
        for name in eligible[:k]:
            counts[name] += 1
        return counts

    return len(eligible) + 1, plan
