"""Channel splits and concats, mapped by which output each consumer actually reads.

Torch-Pruning pairs a split's pieces with its consumers, and a concat's inputs with its
offsets, by the order it happened to discover them while walking the autograd graph backwards;
a consumer reading two pieces, or one tensor concatenated twice, is not expressible at all.
Here every edge into a concat or out of a split gets one mapping built from what the trace
recorded: which piece (autograd ``output_nr``) sits at which concat position, with its width.

A split written in a model's code keeps its sizes when channels are pruned, so only splits
made by :class:`~autoprune.layers.ChannelSplit` (the graph rewrites ``split``/``chunk`` on
dim 1 into one, see ``._fx``) can lose channels; the groups through any other channel split
are frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch_pruning as tp
from torch_pruning import _helpers

from ._labels import ChannelLabels

Range = tuple[int, int, int]  # (start in the source, width, start in the target)


@dataclass(frozen=True)
class PiecewiseMapping:
    """Index ``i`` of the source maps to ``i - src + dst`` for every range holding it."""

    ranges: tuple[Range, ...]
    reverse: bool = False

    def __call__(self, idxs: Sequence[_helpers._HybridIndex]) -> list[_helpers._HybridIndex]:
        out = []
        for i in idxs:
            for src, width, dst in self.ranges:
                a, b = (dst, src) if self.reverse else (src, dst)
                if a <= i.idx < a + width:
                    out.append(_helpers._HybridIndex(idx=i.idx - a + b, root_idx=i.root_idx))
        return out


def _offsets(sizes: Sequence[int]) -> list[int]:
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return offsets


def _reads(node: tp.dependency.Node, grad_fn: Any) -> list[int]:
    """Which outputs (``output_nr``) of ``grad_fn`` the op behind ``node`` reads."""
    nexts = getattr(node.grad_fn, "next_functions", ())
    return sorted({nr for fn, nr in nexts if fn is grad_fn})


def _edge_ranges(
    source: tp.dependency.Node, target: tp.dependency.Node, labels: ChannelLabels
) -> list[Range] | None:
    """How channels of ``source`` land in ``target``; None: not an edge of ours."""
    pieces = labels.splits.get(source.grad_fn)
    inputs = labels.concats.get(target.grad_fn)
    if pieces is None and inputs is None:
        return None
    starts = _offsets(pieces) if pieces is not None else [0]
    if inputs is not None:
        at = _offsets([w for _, _, w in inputs])
        return [
            (starts[nr] if pieces is not None else 0, width, at[j])
            for j, (fn, nr, width) in enumerate(inputs)
            if fn is source.grad_fn
        ]
    assert pieces is not None
    return [(starts[nr], pieces[nr], 0) for nr in _reads(target, source.grad_fn)]


def map_splits_and_concats(module2node: dict[Any, tp.dependency.Node], labels: ChannelLabels) -> None:
    """Replace Torch-Pruning's split and concat index mappings by ours (see the module doc)."""
    for node in module2node.values():
        if node.grad_fn in labels.splits or node.grad_fn in labels.concats:
            node.enable_index_mapping = False  # Torch-Pruning leaves its mappings alone
    for node in module2node.values():
        for target in node.outputs:
            ranges = _edge_ranges(node, target, labels)
            if ranges is None:
                continue
            for dep in node.dependencies:
                if dep.target is target:
                    dep.index_mapping = [PiecewiseMapping(tuple(ranges)), None]
            for dep in target.dependencies:
                if dep.target is node:
                    dep.index_mapping = [PiecewiseMapping(tuple(ranges), reverse=True), None]
