"""Channel groups: the unit the search removes channels from, with exact MAC accounting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch
from torch import nn

from ._grouped import reruns
from ._rules import CONV_TYPES
from .custom import registered_macs

Removed = dict[nn.Module, tuple[int, int]]  # layer -> (out-channels removed, in-channels removed)


@dataclass(frozen=True, eq=False)
class Member:
    """One layer of a group and which of its sides the group's channels run through.

    ``idxs[k]`` is a channel of that side and ``group_idxs[k]`` the group channel it belongs
    to (a group channel can own several: a flattened feature map feeds ``h * w`` inputs of a
    linear layer). Per-channel layers (BatchNorm, depthwise convs) touch both sides at once.
    ``mask_output``: masking zeroes these outputs (an attention layer's q/k/v rows, whose only
    reader is the attention itself) instead of leaving them to the consumers.
    """

    layer: str
    kind: str
    in_channels: bool
    out_channels: bool
    module: nn.Module = field(repr=False)
    idxs: torch.Tensor = field(repr=False)
    group_idxs: torch.Tensor = field(repr=False)
    mask_output: bool = False

    @property
    def consumer(self) -> bool:
        """Reads the group's channels and mixes them into others (conv, linear, shortcut input)."""
        return self.in_channels and not self.out_channels

    @property
    def mask_site(self) -> str | None:
        """Where masking acts on this member: ``input`` (a consumer's), ``output``,
        ``layernorm`` (recomputed on the kept channels), ``pruned`` (the layer run as pruned:
        a weight-standardising conv, a one-group GroupNorm) or None (nothing to do)."""
        if self.mask_output:
            return "output"
        if self.kind == "layernorm":
            return "layernorm"
        if self.in_channels and reruns(self.module):
            return "pruned"
        return "input" if self.consumer else None

    def count(self, group_idxs: torch.Tensor) -> int:
        """How many of this member's channels go when ``group_idxs`` go."""
        return int(torch.isin(self.group_idxs, group_idxs).sum())


class MacTable:
    """MACs of every conv and linear layer as a function of its current weight shape, and of
    every attention layer's two matmuls as a function of its ``qkv`` and ``proj`` shapes.

    ``units[layer] * w.shape[0] * w.shape[1]`` is exactly what ``FlopCounterMode`` counts for a
    layer (FLOPs / 2, bias excluded) on the traced inputs; the unit holds however many channels
    are removed, so predictions stay exact after any number of pruning steps. An attention
    layer's ``q @ k^T`` and ``attn @ v`` cost ``tokens^2`` MACs per query/key and per value
    feature; with ``qkv`` rows = 2 x query + value features and ``proj`` inputs = value
    features, that is ``unit * (qkv rows + proj inputs) / 2`` (``matmuls``). ``other``: MACs
    no layer owns (the matmuls of an attention written by hand); they do not change, since the
    graph freezes the channels such ops read, and count only when the table is the model's.
    """

    def __init__(
        self,
        units: Mapping[nn.Module, int],
        matmuls: Mapping[nn.Module, tuple[nn.Module, nn.Module, int]] | None = None,
        other: int = 0,
    ) -> None:
        self.units = dict(units)
        self.matmuls = dict(matmuls or {})  # attention -> (qkv, proj, unit)
        self.other = other
        self._readers = {layer: a for a, (q, p, _) in self.matmuls.items() for layer in (q, p)}

    def restrict(self, layers: frozenset[nn.Module]) -> MacTable:
        """The table of ``layers`` only (a scope): its MACs are theirs alone."""
        units = {m: u for m, u in self.units.items() if m in layers}
        matmuls = {a: t for a, t in self.matmuls.items() if a in layers}
        whole = len(units) == len(self.units) and len(matmuls) == len(self.matmuls)
        return MacTable(units, matmuls, self.other if whole else 0)

    def matmul_macs(self, attention: nn.Module, removed: Removed) -> int:
        qkv, proj, unit = self.matmuls[attention]
        rows = qkv.weight.shape[0] - removed.get(qkv, (0, 0))[0]
        values = proj.weight.shape[1] - removed.get(proj, (0, 0))[1]
        return unit * (rows + values) // 2

    def layer_macs(self, module: nn.Module, out_removed: int = 0, in_removed: int = 0) -> int:
        custom = registered_macs(module, out_removed, in_removed)  # a user's layer type
        if custom is not None:
            return self.units[module] * custom
        w0, w1 = module.weight.shape[:2]
        if isinstance(module, CONV_TYPES):
            if module.transposed:  # weight is (in, out / groups, ...)
                w0, w1 = w0 - in_removed, w1 - out_removed
            elif module.groups == module.in_channels and w1 == 1:
                w0 -= out_removed  # depthwise: one input channel per filter, always
            else:  # a grouped conv loses the same inputs in every group
                w0, w1 = w0 - out_removed, w1 - in_removed // module.groups
        else:
            w0, w1 = w0 - out_removed, w1 - in_removed
        return self.units[module] * w0 * w1

    def total(self, removed: Removed | None = None) -> int:
        removed = removed or {}
        layers = sum(self.layer_macs(m, *removed.get(m, (0, 0))) for m in self.units)
        return layers + sum(self.matmul_macs(a, removed) for a in self.matmuls) + self.other

    def saved(self, removed: Removed) -> int:
        pairs = [(m, r) for m, r in removed.items() if m in self.units]
        saved = sum(self.layer_macs(m) - self.layer_macs(m, *r) for m, r in pairs)
        touched = {self._readers[m] for m in removed if m in self._readers}
        return saved + sum(self.matmul_macs(a, {}) - self.matmul_macs(a, removed) for a in touched)


class ChannelGroup:
    """Channels that must be removed together, and what removing them costs and saves.

    ``channels`` counts group channels; removing group channel ``c`` removes every member
    channel whose ``group_idxs`` entry is ``c``. ``units`` maps the root layer's channels to
    group channels where several root channels can only go together (see ``._coupled``).
    A group is valid until the graph is pruned: ask :meth:`PruningGraph.groups` (or
    ``graph.group(name)``) again after every prune.
    """

    def __init__(
        self,
        name: str,
        members: Sequence[Member],
        channels: int,
        macs: MacTable,
        root: tuple[nn.Module, Any],
        version: int,
        units: torch.Tensor | None = None,
    ) -> None:
        self.name = name
        self.members = tuple(members)
        self.channels = channels
        self.root = root  # (module, Torch-Pruning handler) the group is rebuilt from
        self.version = version
        self.cache: dict[Any, Any] = {}  # per-group derived data (criteria), dropped with it
        self._units = units  # root channel -> group channel, where several go together
        self._macs = macs
        self._multiplicity = {m: _multiplicity(m, channels) for m in self.members}

    def __repr__(self) -> str:
        return (
            f"ChannelGroup({self.name!r}, channels={self.channels}, "
            f"members={len(self.members)}, macs_per_channel={self.macs_per_channel})"
        )

    def root_channels(self, idxs: torch.Tensor) -> list[int]:
        """The root layer's channels that removing group channels ``idxs`` removes."""
        if self._units is None:
            return idxs.tolist()
        return torch.isin(self._units, idxs).nonzero().flatten().tolist()

    @property
    def layer_coverages(self) -> list[torch.Tensor]:
        """Each distinct set of group channels that one member's channels come from, where it
        is not the whole group (after channel shuffles, a later block's layers hang on a few
        group channels): removing all of a set would empty a layer."""
        if "coverages" not in self.cache:
            sets = {tuple(m.group_idxs.unique().tolist()) for m in self.members}
            self.cache["coverages"] = [
                torch.tensor(c) for c in sorted(sets) if 0 < len(c) < self.channels
            ]
        return self.cache["coverages"]

    @property
    def min_kept(self) -> int:
        """Group channels that always stay: one, and one per :attr:`layer_coverages` set."""
        return max(1, len(self.layer_coverages))

    def keep_layers(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` with the best channel of each coverage set raised above all others, so
        that any removal within :meth:`removable` counts leaves every layer a channel."""
        scores = scores.clone()
        top = scores.max() + 1
        for covered in self.layer_coverages:
            scores[covered[scores[covered].argmax()]] = top
        return scores

    @property
    def macs_per_channel(self) -> int:
        """MACs the first removed channel saves (later ones may save less: see macs_saved);
        where channels map unevenly (channel slices, shuffles), the group's average."""
        if all(self._multiplicity[m] is not None for m in self.members):
            return self.macs_saved(1)
        return self.macs_saved(torch.arange(self.channels)) // self.channels

    def removed(self, n_or_idxs: int | Sequence[int] | torch.Tensor) -> Removed:
        """Per layer, the (out, in) channels that removing ``n_or_idxs`` takes away.

        An int ``n`` stands for any ``n`` channels; that is exact when every group channel
        owns the same number of channels in each member, which holds for all but channel
        slices (there, pass the indices).
        """
        out: dict[nn.Module, list[int]] = {}
        if isinstance(n_or_idxs, Integral):
            n = int(n_or_idxs)
            counts = {m: _times(self._multiplicity[m], n, self.name) for m in self.members}
        else:
            idxs = torch.as_tensor(n_or_idxs, dtype=torch.long)
            counts = {m: m.count(idxs) for m in self.members}
        for m, k in counts.items():
            acc = out.setdefault(m.module, [0, 0])
            acc[0] += k if m.out_channels else 0
            acc[1] += k if m.in_channels else 0
        return {module: (a, b) for module, (a, b) in out.items()}

    def macs_saved(self, n_or_idxs: int | Sequence[int] | torch.Tensor) -> int:
        """Exact MACs saved by removing ``n`` (any) or the given channels of this group alone.

        Exact also when a layer has both sides in the group (depthwise convs, a conv inside a
        residual loop), where the saving is not linear in ``n``.
        """
        return self._macs.saved(self.removed(n_or_idxs))


def _multiplicity(member: Member, channels: int) -> int | None:
    counts = torch.bincount(member.group_idxs, minlength=channels)
    return int(counts[0]) if bool((counts == counts[0]).all()) else None


def _times(multiplicity: int | None, n: int, group: str) -> int:
    if multiplicity is None:
        raise ValueError(f"group {group!r} maps channels unevenly; pass channel indices")
    return multiplicity * n
