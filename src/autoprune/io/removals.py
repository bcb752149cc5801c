"""How each granularity's removals are saved and loaded: one ``arch.json`` key per entry.

Channels need no entry (the recorded layer shapes say what is left); a granularity whose
removals the shapes cannot express (blocks and layers replaced by the identity, weight masks)
registers here, next to its find, trial and apply (:mod:`autoprune.search.granularity`).
Loading restores the entries in ``rank`` order (coarse to fine: a mask cannot go on a layer
that is then removed), before the layers are shrunk to their saved shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._registry import Registry


@dataclass(frozen=True)
class SavedRemovals:
    """``read`` lists a model's removals (JSON: layer paths); ``restore`` makes a freshly built
    dense model hold them again."""

    read: Callable[[nn.Module], list[str]]
    restore: Callable[[nn.Module, list[str]], None]


REMOVALS: Registry[SavedRemovals] = Registry("saved removal")


def _in_order() -> list[tuple[str, SavedRemovals]]:
    entries = sorted(REMOVALS, key=lambda e: e.meta["rank"])
    return [(e.name, e.obj) for e in entries]


def read_removals(model: nn.Module) -> dict[str, list[str]]:
    """``arch.json``'s removal keys for ``model``."""
    return {key: saved.read(model) for key, saved in _in_order()}


def restore_removals(model: nn.Module, record: Mapping[str, Any]) -> None:
    """Put ``record``'s removals back into the dense ``model`` (absent keys: none removed)."""
    for key, saved in _in_order():
        saved.restore(model, record.get(key, []))
