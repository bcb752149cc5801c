"""Torch-Pruning's graph with our channel labels: where it may follow channels, and where not.

Torch-Pruning guesses how a reshape maps channels from the widths around it (and divides by
zero on a channel shuffle). Our labels (:mod:`._labels`) know: a reshape that keeps channels
whole needs no mapping, a flattened feature map read by a linear layer gets Torch-Pruning's
flatten mapping, and anything else is a *barrier*: the groups through it are frozen with the
reason, and the rest of the model still prunes. A plan of removals is cut in one go
(:meth:`LabelledGraph.cut`), after the splits, concats and shuffles it runs through have
shrunk their widths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning._helpers import GroupItem
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

from ._grouped import add_couplings
from ._labels import ChannelLabels
from ._shuffle import map_orders, shrink_orders
from ._split import map_splits_and_concats, shrink_pieces
from ._trace import TraceRecorder, meets_constant

# Nodes whose channels our labels follow; tp's own rules for them guess (its expand rule is for
# 5-D GQA repeats, its slice rule assumes channels-first; a slice dropping channels is a break).
_LABELLED_TYPES = (tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE)
_CONCATS = ("cat", "concat", "concatenate")


class LabelledGraph(tp.DependencyGraph):
    """A dependency graph whose reshapes are mapped by channel labels, not by guesses."""

    _mappings_held = False

    def __init__(
        self,
        labels: ChannelLabels,
        split_layers: dict[Any, nn.Module],
        ops: dict[Any, Any],
        layer_pruners: dict[nn.Module, tp.pruner.BasePruningFunc],
    ) -> None:
        super().__init__()
        self._labels = labels
        self.split_layers = split_layers  # grad_fn of a ChannelSplit's pieces -> the layer
        self._ops = ops  # every traced op by autograd node, in the order they ran
        self._layer_pruners = layer_pruners  # pruners of single layers (see ._grouped)
        self._own_in = {p.prune_in_channels for p in layer_pruners.values()}
        self._own_out = {p.prune_out_channels for p in layer_pruners.values()}

    def get_pruner_of_module(self, module: Any) -> tp.pruner.BasePruningFunc | None:
        """A layer's own pruner (a grouped conv's), else its class's."""
        own = self._layer_pruners.get(module) if isinstance(module, nn.Module) else None
        return own or super().get_pruner_of_module(module)

    def is_in_channel_pruning_fn(self, fn: Any) -> bool:
        return fn in self._own_in or super().is_in_channel_pruning_fn(fn)

    def is_out_channel_pruning_fn(self, fn: Any) -> bool:
        return fn in self._own_out or super().is_out_channel_pruning_fn(fn)

    def _build_dependency(self, module2node: dict[Any, tp.dependency.Node]) -> None:
        # Layers in the order they ran: groups are rooted at the first layer they reach (a
        # stem whose channels a shuffle spreads over two branches, not one of the branches).
        position = {fn: k for k, fn in enumerate(self._ops)}
        ordered = sorted(module2node.items(), key=lambda kv: position.get(kv[1].grad_fn, -1))
        module2node.clear()
        module2node.update(ordered)
        super()._build_dependency(module2node)
        by_grad_fn = {n.grad_fn: n for n in module2node.values()}
        for node in module2node.values():  # labels say where their channels go
            if node.type in _LABELLED_TYPES or self._token_concat(node):
                node.type = tp.ops.OPTYPE.ELEMENTWISE
        for grad_fn, stride in self._labels.flattens.items():
            node = by_grad_fn.get(grad_fn)
            if node is not None:
                _set_flatten(node, stride, nn.Linear, reverse=False)
        for grad_fn, stride in self._labels.unflattens.items():
            node = by_grad_fn.get(grad_fn)
            if node is not None:
                _set_flatten(node, stride, nn.modules.conv._ConvNd, reverse=True)
        map_splits_and_concats(module2node, self._labels)
        map_orders(module2node, self._labels.orders)
        add_couplings(self)

    def _token_concat(self, node: tp.dependency.Node) -> bool:
        """A concat the labels replayed along a dim other than the channels' (a class token
        joining the patch tokens): it keeps every channel where it is."""
        made_by = self._labels.made_by.get(node.grad_fn)
        return node.type == tp.ops.OPTYPE.CONCAT and made_by in _CONCATS

    @contextmanager
    def mappings_held(self) -> Iterator[None]:
        """Torch-Pruning updates every index mapping of the graph for each group it builds
        (quadratic in the concats of a DenseNet). Mappings change only when channels are cut:
        inside this block, which cuts none, one update serves every group."""
        if self._mappings_held:
            yield
            return
        _update_every_time(self)
        self._mappings_held = True
        try:
            yield
        finally:
            self._mappings_held = False

    def all_groups(self, root_types: tuple[type[nn.Module], ...]) -> list[tp.dependency.Group]:
        """Torch-Pruning's groups rooted at layers of ``root_types``."""
        with self.mappings_held():
            return list(self.get_all_groups(root_module_types=root_types))

    def cut(self, removals: Sequence[tuple[Any, Any, Sequence[int]]]) -> None:
        """Prune ``removals`` ((root layer, handler, root channels) each, all resolved against
        the model as it is) as one cut. Splits, concats (ours and the model's) and permuted
        reads first lose the channels cut."""
        if not removals:
            return
        with self.mappings_held():
            merged = _merge([self.get_pruning_group(*removal) for removal in removals])
        shrink_orders(merged, self._labels.orders)
        for fn, idxs in shrink_pieces(merged, self._labels).items():
            if fn in self.split_layers:
                self.split_layers[fn].remove(idxs)
        merged.prune()


_update_every_time = index_mapping.update_index_mapping


def _update_unless_held(graph: tp.DependencyGraph) -> None:
    if not getattr(graph, "_mappings_held", False):
        _update_every_time(graph)


index_mapping.update_index_mapping = _update_unless_held  # read by get_pruning_group


def _has_pruning_op(group: tp.dependency.Group, dep: tp.dependency.Dependency, idxs: Any) -> bool:
    """Torch-Pruning's check, hashed: it scans the whole group for every edge it walks, which
    is quadratic where a group holds thousands of pieces (CoaT's serial and parallel blocks).
    What the group held at the last call is remembered; a group only grows while walked."""
    items = group._group
    seen = group.__dict__.get("_seen_ops")
    if seen is None or seen[0] > len(items):
        seen = group.__dict__["_seen_ops"] = [0, set()]
    for item in items[seen[0] :]:
        seen[1].add((item.dep.target, item.dep.handler, tuple(item.idxs)))
    seen[0] = len(items)
    return (dep.target, dep.handler, tuple(idxs)) in seen[1]


def _add_and_merge(group: tp.dependency.Group, dep: tp.dependency.Dependency, idxs: Any) -> None:
    """Torch-Pruning's merge of a walked group into one item per layer and handler, hashed (it
    scans the group and rebuilds the item's index list for every piece: quadratic). Indices
    keep their first occurrence per channel, as Torch-Pruning keeps them."""
    state = group.__dict__.get("_merged")
    if state is None or state[0] != len(group._group):
        state = group.__dict__["_merged"] = [0, {}]
        for pos, (d, known) in enumerate(group._group):
            if (d.target, d.handler) not in state[1]:
                group._group[pos] = GroupItem(dep=d, idxs=list(known))
                state[1][(d.target, d.handler)] = (pos, {i.idx for i in known})
    found = state[1].get((dep.target, dep.handler))
    if found is None:
        state[1][(dep.target, dep.handler)] = (len(group._group), set())
        group.add_dep(dep, [])
        found = state[1][(dep.target, dep.handler)]
    pos, seen = found
    merged = group._group[pos].idxs
    for index in idxs:
        if index.idx not in seen:
            seen.add(index.idx)
            merged.append(index)
    state[0] = len(group._group)


tp.dependency.Group.has_pruning_op = _has_pruning_op
tp.dependency.Group.add_and_merge = _add_and_merge


def _merge(groups: Sequence[tp.dependency.Group]) -> tp.dependency.Group:
    """One Torch-Pruning group cutting each layer once, with every index it loses in any of
    ``groups`` (all resolved against the same model) listed once: a reshape maps a block of
    root channels (a Linear's rows viewed as one channel) to one channel, and Torch-Pruning
    would subtract every repeat from the layer's width."""
    cuts: dict[tuple, tuple[tp.dependency.Dependency, dict[int, None]]] = {}
    for group in groups:
        for dep, idxs in group.items:
            key = (dep.target, dep.handler)
            cuts.setdefault(key, (dep, {}))[1].update(dict.fromkeys(idxs))
    merged = tp.dependency.Group()
    merged._DG = groups[0]._DG
    for dep, idxs in cuts.values():
        merged.add_dep(dep, sorted(idxs))
    return merged


def _set_flatten(
    node: tp.dependency.Node, stride: int, reader: type[nn.Module], *, reverse: bool
) -> None:
    """Channel ``c`` of ``node`` is inputs ``c*s .. c*s+s-1`` of the ``reader`` layers it
    feeds (a flattened map into a linear); ``reverse``: channels ``c*s .. c*s+s-1`` of
    ``node`` are input ``c`` of them (a linear's rows viewed as a map into a conv)."""
    for out in node.outputs:
        if not isinstance(out.module, reader):
            continue
        for dep in node.dependencies:
            if dep.target is out:
                dep.index_mapping[0] = _FlattenIndexMapping(stride=stride, reverse=reverse)
        for dep in out.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _FlattenIndexMapping(stride=stride, reverse=not reverse)


def check_ops(
    dg: tp.DependencyGraph, recorder: TraceRecorder
) -> tuple[set[tp.dependency.Node], dict[tp.dependency.Node, str]]:
    """Element-wise ops that meet a constant, and nodes where channels are not carried one to
    one (each with the reason a group through it is frozen)."""
    tokens_last = not dg._2d_4d
    by_grad_fn = {n.grad_fn: n for n in dg.module2node.values()}
    constants: set[tp.dependency.Node] = set()
    for node in dg.module2node.values():
        if not isinstance(node.module, tp.ops._ElementWiseOp):
            continue
        rec = recorder.ops.get(node.grad_fn)
        if rec is not None and not rec.internal and meets_constant(rec, tokens_last):
            constants.add(node)
    barriers: dict[tp.dependency.Node, str] = {}
    for brk in recorder.labels.breaks:
        node = by_grad_fn.get(brk.grad_fn)
        if node is not None and node not in barriers:
            layer = layer_before(node, dg)
            barriers[node] = (
                f"channels after layer {layer!r} cannot be followed through {brk.op!r} "
                f"({brk.detail})"
            )
    for grad_fn in recorder.labels.splits:
        node = by_grad_fn.get(grad_fn)
        if node is not None and grad_fn not in recorder.split_layers and node not in barriers:
            barriers[node] = (
                f"the split of channels after layer {layer_before(node, dg)!r} has sizes "
                "fixed in the model's code (torch.fx could not rewrite it)"
            )
    return constants, barriers


def layer_before(node: tp.dependency.Node, dg: tp.DependencyGraph) -> str:
    """Name of the nearest named layer feeding ``node`` (for reasons and errors)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        name = dg._module2name.get(n.module) if isinstance(n.module, nn.Module) else None
        if name is not None:
            return name
        stack.extend(n.inputs)
    return "<input>"
