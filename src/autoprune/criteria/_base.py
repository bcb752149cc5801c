"""The criterion registry and the two calls everything else uses: ``score`` and ``select``.

A criterion maps a :class:`~autoprune.graph.ChannelGroup` to one score per group channel,
lower = removed first. It sees the whole group, so coupled layers are judged together.
Adding one is one decorated function in one file::

    @register_criterion("my_norm", kind="magnitude")
    def my_norm(group: ChannelGroup, **state) -> torch.Tensor: ...

``state`` carries whatever data-driven criteria need (e.g. ``taylor=TaylorAccumulator``);
criteria ignore keys they do not use, so one state can be passed to all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._registry import Registry
from ..errors import AutopruneError
from ..graph import ChannelGroup

Criterion = Callable[..., torch.Tensor]
KINDS = ("magnitude", "similarity", "saliency", "control")

CRITERIA: Registry[Criterion] = Registry("criterion")


def register_criterion(
    name: str, kind: str, needs_data: bool = False
) -> Callable[[Criterion], Criterion]:
    """Register ``fn(group, **state) -> Tensor[group.channels]`` under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"criterion kind must be one of {KINDS}, got {kind!r}")
    return CRITERIA.register(name, kind=kind, needs_data=needs_data)


def list_criteria(kind: str | None = None, *, needs_data: bool | None = None) -> list[str]:
    """Registered criterion names, optionally only one kind or only data-free ones."""
    return [
        e.name
        for e in CRITERIA
        if (kind is None or e.meta["kind"] == kind)
        and (needs_data is None or e.meta["needs_data"] == needs_data)
    ]


def score(group: ChannelGroup, name: str, **state: Any) -> torch.Tensor:
    """One score per channel of ``group`` by criterion ``name`` (lower = prune first); the
    channels that keep each layer of an unevenly mapped group alive come last
    (:meth:`ChannelGroup.keep_layers`)."""
    scores = CRITERIA.get(name)(group, **state)
    if scores.shape != (group.channels,):
        raise RuntimeError(
            f"criterion {name!r} returned shape {tuple(scores.shape)} for group {group.name!r} "
            f"with {group.channels} channels"
        )
    return group.keep_layers(scores) if group.layer_coverages else scores


def select(group: ChannelGroup, criterion: str, n: int, **state: Any) -> torch.Tensor:
    """The ``n`` channels ``criterion`` would remove first, sorted ascending.

    Ties go to the lower channel index, so the choice is deterministic.
    """
    if not 0 <= n < group.channels:
        raise AutopruneError(
            f"cannot select {n} of {group.channels} channels of group {group.name!r}; "
            f"choose 0 to {group.channels - 1}"
        )
    order = torch.argsort(score(group, criterion, **state), stable=True)
    return order[:n].sort().values
