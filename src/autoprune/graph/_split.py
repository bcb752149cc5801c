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

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch_pruning as tp
from torch_pruning import _helpers

from ..layers import shrink_sizes
from ._labels import ChannelLabels

Range = tuple[int, int, int]  # (start in the source, width, start in the target)


@dataclass(frozen=True)
class PiecewiseMapping:
    """Index ``i`` of the source maps to ``i - src + dst`` for every range holding it.

    The ranges are read when the mapping is applied: pruning changes the widths
    (:func:`shrink_pieces`), not the mapping."""

    ranges: Callable[[], list[Range]]
    reverse: bool = False

    def __call__(self, idxs: Sequence[_helpers._HybridIndex]) -> list[_helpers._HybridIndex]:
        """Each (index, root index) pair once: a tensor read by several pieces maps a channel
        to several places, and repeats would multiply along every such edge (CoaT, CPU-bone)."""
        out: dict[tuple[int, int], None] = {}
        ranges = self.ranges()
        for i in idxs:
            for src, width, dst in ranges:
                a, b = (dst, src) if self.reverse else (src, dst)
                if a <= i.idx < a + width:
                    out[(i.idx - a + b, i.root_idx)] = None
        return [_helpers._HybridIndex(idx=k, root_idx=r) for k, r in out]


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
) -> list[Range]:
    """How channels of ``source`` land in ``target`` (one of them a split or a concat)."""
    pieces = labels.splits.get(source.grad_fn)
    starts = _offsets(pieces) if pieces is not None else [0]
    inputs = labels.concats.get(target.grad_fn)
    if inputs is not None:
        widths = labels.concat_widths[target.grad_fn]
        at = _offsets(widths)
        return [
            (starts[nr] if pieces is not None else 0, widths[j], at[j])
            for j, (fn, nr) in enumerate(inputs)
            if fn is source.grad_fn
        ]
    assert pieces is not None
    return [(starts[nr], pieces[nr], 0) for nr in _reads(target, source.grad_fn)]


def map_splits_and_concats(
    module2node: dict[Any, tp.dependency.Node], labels: ChannelLabels
) -> None:
    """Replace Torch-Pruning's split and concat index mappings by ours (see the module doc)."""
    ours = {fn for fn in (*labels.splits, *labels.concats)}
    for node in module2node.values():
        if node.grad_fn in ours:
            node.enable_index_mapping = False  # Torch-Pruning leaves its mappings alone
    for node in module2node.values():
        for target in node.outputs:
            if node.grad_fn not in labels.splits and target.grad_fn not in labels.concats:
                continue
            ranges = functools.partial(_edge_ranges, node, target, labels)
            for dep in node.dependencies:
                if dep.target is target:
                    dep.index_mapping = [PiecewiseMapping(ranges), None]
            for dep in target.dependencies:
                if dep.target is node:
                    dep.index_mapping = [PiecewiseMapping(ranges, reverse=True), None]


def shrink_pieces(group: tp.dependency.Group, labels: ChannelLabels) -> dict[Any, list[int]]:
    """Before ``group`` is pruned: the widths of the splits and concats it runs through lose
    its channels. Returns the channels each split loses (its input's), by autograd node."""
    gone: dict[Any, set[int]] = {}
    for item in group.items:
        fn = item.dep.target.grad_fn
        if fn in labels.splits or fn in labels.concats:
            gone.setdefault(fn, set()).update(item.idxs)
    for fn, idxs in gone.items():
        sizes = labels.splits[fn] if fn in labels.splits else labels.concat_widths[fn]
        sizes[:] = shrink_sizes(sizes, sorted(idxs))
    return {fn: sorted(idxs) for fn, idxs in gone.items() if fn in labels.splits}
