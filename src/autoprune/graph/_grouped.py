"""Layers whose channels can only go in blocks, and layers that must be re-run to be masked.

A grouped conv (``groups`` g, ``a`` inputs and ``b`` outputs per group) stays a grouped conv
with g groups only if every group loses the same positions: input ``i`` goes with every
``i % a + j * a`` and output ``o`` with every ``o % b + j * b``. A depthwise conv with
multiplier k (``groups == in_channels``, ``out = k * in``) reads input ``i`` into outputs
``k*i .. k*i+k-1``: they go together, and its group count follows its inputs. A GroupNorm (or a
timm EvoNorm ``S`` layer) with several groups normalises each block of ``C / G`` channels on
its own: only whole blocks go, and the others' statistics stay what they were. Each rule is an
edge from the layer to itself in Torch-Pruning's graph, so every traversal (the groups, the
units of ``._coupled``, a removal) takes the partners along; the pruners here then cut the
blocks and keep the group counts right.

Masking by zeroing is exact only for layers that treat channels one by one. A conv that
standardises its weight over its inputs in ``forward`` (timm's ``StdConv2d``,
``ScaledStdConv2d``) and a one-group GroupNorm see every input channel in their statistics:
masking runs them as they would be pruned (:func:`run_as_pruned`) on the kept channels. Such
convs are traced as one op, so their weight arithmetic is not mistaken for channel moves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ._rules import (
    ACROSS_CHANNELS,
    CONV_TYPES,
    ChannelwisePruner,
    ScaledConvPruner,
    channelwise_dim,
    matches,
)
from ._shuffle import _canonical

Rule = Callable[[nn.Module, int], Iterable[int]]  # (layer, channel) -> channels going with it

# Conv subclasses whose ``forward`` only pads its input: zeroing their input channels is exact.
PADDING_CONVS = ("timm.layers.conv2d_same.Conv2dSame",)
_PLAIN_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}


def reruns_weight(module: nn.Module) -> bool:
    """Whether a conv computes its weight in its own ``forward`` (weight standardisation):
    masked by :func:`run_as_pruned`, traced as one op."""
    return (
        isinstance(module, CONV_TYPES)
        and not module.transposed
        and type(module).forward not in _PLAIN_FORWARDS
        and not matches(module, PADDING_CONVS)
    )


def _depthwise(conv: nn.Module) -> bool:
    """Depthwise with any multiplier: one input channel per group."""
    return conv.groups > 1 and conv.groups == conv.in_channels


def _norm_groups(module: nn.Module) -> tuple[int, int] | None:
    """(channels, groups) of a normalisation layer with groups of channels, else None."""
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_groups
    groups = getattr(module, "groups", None)
    if isinstance(groups, int) and not isinstance(module, CONV_TYPES):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            return weight.numel(), groups
    return None


# ------------------------------------------------------------------------------- rules
def _in_positions(conv: nn.Module, c: int) -> range:
    per_group = conv.in_channels // conv.groups
    return range(c % per_group, conv.in_channels, per_group)


def _out_positions(conv: nn.Module, c: int) -> range:
    per_group = conv.out_channels // conv.groups
    return range(c % per_group, conv.out_channels, per_group)


def _multiplied(conv: nn.Module, c: int) -> range:
    k = conv.out_channels // conv.in_channels
    return range(k * c, k * c + k)


def _source(conv: nn.Module, c: int) -> tuple[int]:
    return (c // (conv.out_channels // conv.in_channels),)


def _norm_block(norm: nn.Module, c: int) -> range:
    channels, groups = _norm_groups(norm)  # type: ignore[misc]
    size = channels // groups
    return range(c // size * size, c // size * size + size)


@dataclass(frozen=True)
class Coupling:
    """Removing channel ``c`` on side ``trigger`` removes ``rule(layer, c)`` on ``handler``."""

    trigger: str  # "in" or "out"
    handler: str
    rule: Rule


def couplings(module: nn.Module) -> list[Coupling]:
    """The blocks ``module``'s channels go in (empty: one by one, or Torch-Pruning's rule)."""
    if isinstance(module, CONV_TYPES):
        if module.transposed or module.groups == 1:
            return []
        if _depthwise(module):
            if module.out_channels == module.in_channels:
                return []  # Torch-Pruning couples both sides of a plain depthwise conv
            return [Coupling("in", "out", _multiplied), Coupling("out", "in", _source)]
        return [Coupling("in", "in", _in_positions), Coupling("out", "out", _out_positions)]
    shape = _norm_groups(module)
    if shape is not None and 1 < shape[1] < shape[0]:
        return [Coupling("out", "out", _norm_block)]
    return []


@dataclass(frozen=True)
class BlockMapping:
    """A Torch-Pruning index mapping: each channel to its block (``rule``), read from the layer
    as it is now (pruning shrinks the blocks, not the rule).

    A block is emitted once, with the root channel of the first index in it: the others meet
    it at the layer, where ``._coupled`` merges their roots. One entry per index and root
    would make a whole group's traversal (every root channel at once) quadratic in the width.
    """

    module: nn.Module
    rule: Rule

    def __call__(self, idxs: Sequence[Any]) -> list[Any]:
        blocks: dict[Iterable[int], Any] = {}
        for i in idxs:
            blocks.setdefault(self.rule(self.module, i.idx), i.root_idx)
        return _canonical((j, root) for block, root in blocks.items() for j in block)


def add_couplings(dg: tp.DependencyGraph) -> None:
    """Give every layer with blocks (:func:`couplings`) its edges to itself."""
    for node in dg.module2node.values():
        if not isinstance(node.module, nn.Module):
            continue
        pruner = dg.get_pruner_of_module(node.module)
        for c in couplings(node.module):
            trigger = getattr(pruner, f"prune_{c.trigger}_channels")
            handler = getattr(pruner, f"prune_{c.handler}_channels")
            dep = tp.dependency.Dependency(trigger, handler, source=node, target=node)
            dep.index_mapping = [BlockMapping(node.module, c.rule), None]
            node.dependencies.append(dep)


# ------------------------------------------------------------------------------ pruners
def _keep(size: int, idxs: Sequence[int], device: torch.device) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[list(idxs)] = False
    return keep.nonzero().flatten().to(device)


def _slice_own(layer: nn.Module, size: int, keep: torch.Tensor, skip: Iterable[str] = ()) -> None:
    """Cut the 1-D (or leading-dim) parameters and buffers of ``layer`` that hold ``size``
    channels, other than ``skip``."""
    for name, p in list(layer.named_parameters(recurse=False)):
        if name not in skip and p.dim() and p.shape[0] == size:
            sliced = p.detach().index_select(0, keep.to(p.device)).clone()
            setattr(layer, name, nn.Parameter(sliced, requires_grad=p.requires_grad))
    for name, b in list(layer.named_buffers(recurse=False)):
        if name not in skip and b is not None and b.dim() and b.shape[0] == size:
            setattr(layer, name, b.index_select(0, keep.to(b.device)).clone())


class GroupedConvPruner(ScaledConvPruner):
    """A grouped or depthwise-with-multiplier conv: its inputs go in the blocks of
    :func:`couplings`. A grouped conv keeps its groups and loses positions within each; a
    depthwise conv loses groups with its inputs. Its outputs (and per-output parameters such
    as a ``gain``) are cut as any conv's."""

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        idxs = sorted(set(idxs))
        if _depthwise(layer):
            layer.in_channels -= len(idxs)
            layer.groups -= len(idxs)
            return layer
        per_group = layer.in_channels // layer.groups
        positions = sorted({i % per_group for i in idxs})
        if len(positions) * layer.groups != len(idxs):
            raise RuntimeError(f"grouped conv inputs {idxs} are not whole position sets")
        keep = _keep(per_group, positions, layer.weight.device)
        layer.weight = nn.Parameter(
            layer.weight.detach().index_select(1, keep).clone(),
            requires_grad=layer.weight.requires_grad,
        )
        layer.in_channels -= len(idxs)
        return layer


class DepthwiseParamsPruner(tp.pruner.function.DepthwiseConvPruner):
    """A plain depthwise conv with per-channel parameters of its own (a depthwise
    ``ScaledStdConv2d``'s ``gain``): cut them with its filters."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.out_channels, idxs, layer.weight.device)
        _slice_own(layer, layer.out_channels, keep, skip=("weight", "bias"))
        return super().prune_out_channels(layer, idxs)

    prune_in_channels = prune_out_channels


class GroupNormPruner(tp.pruner.function.GroupNormPruner):
    """A GroupNorm loses whole groups (see :func:`couplings`): ``num_groups`` follows."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        size = layer.num_channels // layer.num_groups
        layer.num_groups -= len(set(idxs)) // size
        return super().prune_out_channels(layer, idxs)

    prune_in_channels = prune_out_channels


class GroupedChannelwisePruner(ChannelwisePruner):
    """A channel-wise layer with buffers (EvoNorm ``B``'s ``running_var``), groups (EvoNorm
    ``S``) or a ``shape`` its parameter is viewed to (metaformer's ``Scale``): all lose the
    pruned channels, ``groups`` the whole groups gone."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        channels, groups = _norm_groups(layer) or (_own_width(layer), 1)
        if groups > 1:
            layer.groups -= len(set(idxs)) // (channels // groups)
        shape = getattr(layer, "shape", None)
        if isinstance(shape, tuple) and shape and shape[0] == channels:
            layer.shape = (channels - len(set(idxs)), *shape[1:])
        keep = _keep(channels, idxs, next(layer.parameters()).device)
        _slice_own(
            layer, channels, keep, skip=[n for n, _ in layer.named_parameters(recurse=False)]
        )
        return super().prune_out_channels(layer, idxs)

    prune_in_channels = prune_out_channels


def _own_width(module: nn.Module) -> int:
    return next(p.numel() for p in module.parameters(recurse=False) if p.dim() == 1)


def _own_params(module: nn.Module) -> bool:
    return any(n not in ("weight", "bias") for n, _ in module.named_parameters(recurse=False))


def _conv_pruner(module: nn.Module) -> tp.pruner.BasePruningFunc | None:
    if module.transposed:
        return None
    if _depthwise(module) and module.out_channels == module.in_channels:
        return DepthwiseParamsPruner() if _own_params(module) else None
    if module.groups > 1:
        return GroupedConvPruner()
    return ScaledConvPruner() if _own_params(module) else None


def _norm_pruner(module: nn.Module) -> tp.pruner.BasePruningFunc | None:
    if isinstance(module, nn.GroupNorm):
        return GroupNormPruner() if module.num_groups > 1 else None
    buffers = any(b is not None and b.dim() == 1 for b in module.buffers(recurse=False))
    shaped = isinstance(getattr(module, "shape", None), tuple)
    return GroupedChannelwisePruner() if buffers or shaped or _norm_groups(module) else None


def layer_pruners(
    model: nn.Module, channelwise: Iterable[nn.Module]
) -> dict[nn.Module, tp.pruner.BasePruningFunc]:
    """Pruners of single layers that differ from their class's (by the layer's groups)."""
    found: dict[nn.Module, tp.pruner.BasePruningFunc | None] = {}
    for m in model.modules():
        if isinstance(m, CONV_TYPES):
            found[m] = _conv_pruner(m)
        elif isinstance(m, nn.GroupNorm):
            found[m] = _norm_pruner(m)
    for m in channelwise:
        found[m] = _norm_pruner(m)
    return {m: p for m, p in found.items() if p is not None}


# ------------------------------------------------------------------------------ masking
def _pruner_for(module: nn.Module) -> tp.pruner.BasePruningFunc:
    pruner = _conv_pruner(module) if isinstance(module, CONV_TYPES) else _norm_pruner(module)
    if pruner is None and matches(module, ACROSS_CHANNELS):
        return ChannelwisePruner()
    return pruner or tp.pruner.function.PrunerBox[tp.ops.module2type(module)]


def run_as_pruned(
    module: nn.Module, idxs: torch.Tensor, args: tuple, output: torch.Tensor
) -> torch.Tensor:
    """``module``'s output with input channels ``idxs`` physically gone: a conv's whole
    output, a per-channel layer's kept channels (the others are zero). The layer is cut on a
    shallow copy; its own parameters are untouched."""
    x = args[0]
    dim = channelwise_dim(module, output) if matches(module, ACROSS_CHANNELS) else 1
    keep = _keep(x.shape[dim], idxs.tolist(), x.device)
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    pruner = _pruner_for(module)
    if isinstance(module, CONV_TYPES):
        pruner.prune_in_channels(clone, idxs.tolist())
        return clone.forward(x.index_select(1, keep), *args[1:])
    pruner.prune_out_channels(clone, idxs.tolist())
    y = clone.forward(x.index_select(dim, keep), *args[1:])
    return output.new_zeros(output.shape).index_copy(dim, keep, y)


def reruns(module: nn.Module) -> bool:
    """Whether masking runs ``module`` as pruned (:func:`run_as_pruned`) where it reads a
    group's channels: a weight-standardising conv, a one-group GroupNorm, a norm across the
    channels (:data:`~._rules.ACROSS_CHANNELS`)."""
    one_group = isinstance(module, nn.GroupNorm) and module.num_groups == 1
    return reruns_weight(module) or one_group or matches(module, ACROSS_CHANNELS)
