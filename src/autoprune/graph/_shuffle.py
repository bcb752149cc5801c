"""Channels read in another order: a channel shuffle, a flip, any permutation by reshapes.

Labels (:mod:`._labels`) show a layer reading channels ``order[j]`` at position ``j``. The edge
into that layer then maps each channel to its new position, and back. A channel shuffle
(ShuffleNet: ``view(b, g, c // g, h, w).transpose(1, 2)``) only stays a shuffle if every one of
the ``g`` groups loses the same channels, so channel ``c`` is coupled with ``c + k * c // g``
at the view that splits them: removing them together leaves the shuffle of the remaining
channels equal to the old shuffle restricted to them. Both mappings read the current order,
which pruning shrinks (:func:`shrink_orders`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch_pruning import _helpers

Index = _helpers._HybridIndex


@dataclass(eq=False)
class Permuted:
    """Position ``j`` of what a layer reads holds channel ``order[j]`` of the tensor before the
    reshapes; ``groups > 1``: the order came from splitting channels into ``groups`` rows."""

    order: torch.Tensor
    groups: int = 1
    split_by: Any = None  # autograd node of the reshape that split the channels into rows
    positions: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index()

    def _index(self) -> None:
        self.positions = {}
        for j, c in enumerate(self.order.tolist()):
            self.positions.setdefault(int(c), []).append(j)

    def remove(self, idxs: Sequence[int]) -> None:
        """Channels ``idxs`` (before the reshapes) are gone: the order of the rest, renumbered."""
        gone = torch.as_tensor(sorted(set(idxs)), dtype=torch.long)
        kept = self.order[~torch.isin(self.order, gone)]
        self.order = kept - torch.searchsorted(gone, kept)
        self._index()


@dataclass(frozen=True)
class OrderMapping:
    """Channel ``c`` before the reshapes -> the positions holding it; reversed, position
    ``j`` -> channel ``order[j]``."""

    permuted: Permuted
    reverse: bool = False

    def __call__(self, idxs: Sequence[Index]) -> list[Index]:
        if self.reverse:
            order = self.permuted.order
            return _canonical((int(order[i.idx]), i.root_idx) for i in idxs)
        positions = self.permuted.positions
        return _canonical((j, i.root_idx) for i in idxs for j in positions.get(i.idx, ()))


@dataclass(frozen=True)
class PartnerMapping:
    """Channel ``c`` -> the channels in its column of the ``groups`` rows (itself included)."""

    permuted: Permuted

    def __call__(self, idxs: Sequence[Index]) -> list[Index]:
        groups = self.permuted.groups
        inner = len(self.permuted.order) // groups
        return _canonical(
            (i.idx % inner + k * inner, i.root_idx) for i in idxs for k in range(groups)
        )


def _canonical(pairs: Iterable[tuple[int, Any]]) -> list[Index]:
    """Sorted and without repeats: a traversal around a loop through a shuffle meets the same
    indices again and must see them as the same (or it never ends)."""
    unique = dict.fromkeys(pairs)
    return [Index(idx=i, root_idx=r) for i, r in sorted(unique, key=lambda p: (p[0], str(p[1])))]


def _compose(dep: Any, mapping: Any, first: bool) -> None:
    """Run ``mapping`` before (``first``) or after the mapping already on ``dep``."""
    current = next((m for m in dep.index_mapping if m is not None), None)
    if current is None:
        dep.index_mapping = [mapping, None]
    else:
        dep.index_mapping = [mapping, current] if first else [current, mapping]


def map_orders(module2node: dict[Any, tp.dependency.Node], orders: dict[Any, Permuted]) -> None:
    """Put the order and partner mappings on the edges around every permuted read."""
    by_grad_fn = {n.grad_fn: n for n in module2node.values()}
    for grad_fn, permuted in orders.items():
        node = by_grad_fn.get(grad_fn)
        if node is None:
            continue
        for reader in node.outputs:
            for dep in node.dependencies:
                if dep.target is reader:
                    _compose(dep, OrderMapping(permuted), first=True)
            for dep in reader.dependencies:
                if dep.target is node:
                    _compose(dep, OrderMapping(permuted, reverse=True), first=False)
        split = by_grad_fn.get(permuted.split_by)
        if permuted.groups < 2 or split is None:
            continue
        for source in split.inputs:
            for dep in source.dependencies:
                if dep.target is split:
                    _compose(dep, PartnerMapping(permuted), first=False)
            for dep in split.dependencies:
                if dep.target is source:
                    _compose(dep, PartnerMapping(permuted), first=True)


def shrink_orders(group: tp.dependency.Group, orders: dict[Any, Permuted]) -> None:
    """Before ``group`` is pruned: every permuted read it runs through loses its channels."""
    gone: dict[Any, set[int]] = {}
    for item in group.items:
        fn = item.dep.target.grad_fn
        if fn in orders:
            gone.setdefault(fn, set()).update(item.idxs)
    for fn, idxs in gone.items():
        orders[fn].remove(sorted(idxs))
