"""Blocks and layers removed for good: the model surgery the pruning graph re-traces after.

Finding and trying such units is the ``block``/``layer`` granularity's job
(:mod:`autoprune.search.granularity.units`); here is only what the graph itself needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class RemovedLayer(nn.Identity):
    """A block or layer the search removed. Saving records its path, and loading puts one back
    in place of the dense model's module (:mod:`autoprune.io.removals`)."""


def remove_modules(model: nn.Module, paths: Sequence[str]) -> None:
    """Replace the modules at ``paths`` by :class:`RemovedLayer`, for good."""
    for path in paths:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, RemovedLayer())


def removed_paths(model: nn.Module) -> list[str]:
    """Where ``model`` holds a :class:`RemovedLayer`: what saving records."""
    return [name for name, m in model.named_modules() if isinstance(m, RemovedLayer)]
