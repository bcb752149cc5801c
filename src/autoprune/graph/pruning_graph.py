"""The pruning graph: Torch-Pruning's dependency graph plus our rules, groups and checks."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
import torch_pruning as tp
from torch import nn

from ..errors import AutopruneError
from ._attention import HeadPruning, attention_groups
from ._coupled import channel_units
from ._params import ParamUse, drop_derived_caches
from ._rules import TP_DUMMY_OPS, member_kind
from .custom import registration_advice
from .groups import ChannelGroup, MacTable, Member, Removed
from .masking import MaskState
from .scopes import ScopeContext, list_scopes, scope_layers
from .units import remove_modules

Inputs = torch.Tensor | Sequence[torch.Tensor]
Selection = ChannelGroup | str | Mapping[ChannelGroup | str, Sequence[int] | torch.Tensor]
DEFAULT_PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
OUTPUT_REASON = "its channels are the model's output"


class PruningGraph:
    """Channel groups of a model, their exact MAC costs, and physical removal.

    Build it with :func:`build_graph`. ``groups()`` lists the prunable groups; ``frozen`` says
    why the others (the classifier's outputs, ignored layers, groups outside the scope, ...)
    are not. ``prune`` removes channels for good and refreshes the groups;
    :func:`~autoprune.graph.mask_channels` tries a removal without changing any weight.
    Attention layers add groups of whole heads and head dimensions (see ``._attention``).
    ``macs()`` counts the layers of the graph's ``scope`` (see :mod:`.scopes`).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        dependency_graph: tp.DependencyGraph,
        macs: MacTable,
        *,
        ignored: frozenset[nn.Module],
        root_types: tuple[type[nn.Module], ...],
        output_nodes: set[tp.dependency.Node],
        constant_nodes: set[tp.dependency.Node],
        barriers: dict[tp.dependency.Node, str],
        scope: str,
        scope_context: ScopeContext,
        params: dict[str, ParamUse],
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.masks = MaskState()
        self.scope = scope
        self._dg = dependency_graph
        self._all_macs = macs
        self._scope_context = scope_context
        self._in_scope = self._scope_layers(scope)
        self._macs = macs.restrict(self._in_scope)
        self._ignored = ignored
        self._root_types = root_types
        self._output_nodes = output_nodes
        self._constant_nodes = constant_nodes
        self._barriers = barriers
        self._params = params
        self._rank = {node: k for k, node in enumerate(barriers)}
        self._version = 0
        self._groups: dict[str, ChannelGroup] | None = None
        self._frozen: dict[str, str] = {}
        self._held: dict[str, str] = {}  # frozen by :meth:`freeze`, through every rebuild

    def copy(self) -> PruningGraph:
        """An independent graph on a deep copy of the model, built with the same options.

        What LAASP's reference does per candidate: prune the copy for real, leave this one be.
        """
        return self._build(copy.deepcopy(self.model))

    def _build(self, model: nn.Module) -> PruningGraph:
        """A graph of ``model`` (this one's, or a copy) with this graph's options."""
        from .build import build_graph  # the builder makes graphs of this class

        names = {m: n for n, m in self.model.named_modules()}
        graph = build_graph(
            model,
            self.example_inputs,
            ignored_layers=[names[m] for m in self._ignored if m in names],
            prunable_types=self._root_types,
            scope=self.scope,
        )
        graph._held, graph._groups = dict(self._held), None  # frozen groups stay frozen
        return graph

    def _scope_layers(self, scope: str) -> frozenset[nn.Module]:
        layers = [*self._all_macs.units, *self._all_macs.matmuls]
        return scope_layers(scope, self._scope_context, layers)

    def macs_by_scope(self) -> dict[str, int]:
        """MACs of the layers of every registered scope, as the model is now."""
        return {
            name: self._all_macs.restrict(self._scope_layers(name)).total()
            for name in list_scopes()
        }

    @property
    def version(self) -> int:
        """Bumped by every prune; groups and collected data from older versions are stale."""
        return self._version

    # ----------------------------------------------------------------------------- groups
    def groups(self) -> list[ChannelGroup]:
        """Every prunable group, in model order (cached until the next prune)."""
        if self._groups is None:
            self._collect()
        assert self._groups is not None
        return list(self._groups.values())

    def group(self, name: str) -> ChannelGroup:
        """The current group named ``name`` (names survive pruning)."""
        self.groups()
        assert self._groups is not None
        try:
            return self._groups[name]
        except KeyError:
            reason = self._frozen.get(name)
            if reason:
                raise AutopruneError(f"group {name!r} cannot be pruned: {reason}") from None
            raise AutopruneError(f"no channel group named {name!r}") from None

    def freeze(self, name: str, reason: str) -> None:
        """Never prune group ``name``; ``reason`` is shown where frozen groups are explained."""
        self._held[name], self._groups = reason, None

    @property
    def frozen(self) -> dict[str, str]:
        """Groups that are never pruned, with the reason (e.g. the classifier's outputs)."""
        self.groups()
        return dict(self._frozen)

    def _collect(self) -> None:
        names = {m: n for n, m in self.model.named_modules()}
        order = {m: i for i, m in enumerate(names)}
        groups: list[ChannelGroup] = []
        self._frozen = {}
        for tp_group in self._dg.all_groups(self._root_types):
            members, reason, barrier = self._members(tp_group, names)
            outs = [m for m in members if m.out_channels] or members
            name = min(outs, key=lambda m: order[m.module]).layer
            reason = reason or barrier
            if reason:
                self._frozen[name] = reason
                continue
            root = tp_group[0].dep
            channels = len(tp_group[0].idxs)
            units = channel_units(self._dg, root.target.module, root.handler, channels)
            if units is not None:
                members = [replace(m, group_idxs=units[m.group_idxs]) for m in members]
                channels = int(units.max()) + 1
            groups.append(
                ChannelGroup(
                    name,
                    sorted(members, key=lambda m: order[m.module]),
                    channels,
                    self._macs,
                    (root.target.module, root.handler),
                    self._version,
                    units,
                )
            )
        position = {g.name: (order[self.model.get_submodule(g.name)], 0) for g in groups}
        for attention in self._all_macs.matmuls:
            if attention not in self._ignored:
                heads = attention_groups(names[attention], attention, self._macs, self._version)
                position.update({g.name: (order[attention], k + 1) for k, g in enumerate(heads)})
                groups += heads
        groups.sort(key=lambda g: position[g.name])
        self._groups = {}
        for g in groups:
            if self._within_scope(g) and g.name not in self._held:
                self._groups[g.name] = g
            else:
                self._frozen[g.name] = self._held.get(g.name) or f"outside scope {self.scope!r}"

    def _within_scope(self, group: ChannelGroup) -> bool:
        """Whether every layer producing the group's channels is in the graph's scope."""
        costs = self._all_macs.units
        return all(
            m.module in self._in_scope
            for m in group.members
            if m.out_channels and m.module in costs
        )

    def _members(
        self, tp_group: tp.dependency.Group, names: dict[nn.Module, str]
    ) -> tuple[list[Member], str | None, str | None]:
        members: list[Member] = []
        reason: str | None = None
        first: tp.dependency.Node | None = None
        for item in tp_group.items:
            node, handler = item.dep.target, item.dep.handler
            module = node.module
            if isinstance(module, tp.ops._OutputOp) or (
                node in self._output_nodes and self._dg.is_out_channel_pruning_fn(handler)
            ):
                reason = reason or OUTPUT_REASON
            if node in self._barriers and (first is None or self._rank[node] < self._rank[first]):
                first = node  # the first break the trace met names the reason
            if isinstance(module, TP_DUMMY_OPS):
                if node in self._constant_nodes:
                    reason = reason or "its channels meet the model input or a constant tensor"
                continue
            if isinstance(module, tp.ops._OutputOp):
                continue
            if module in self._all_macs.matmuls:  # attention: its qkv reads, its proj writes
                members.append(self._attention_member(module, item, names[module]))
                continue
            if isinstance(module, nn.Parameter):
                member, why = self._param_member(module, item)
                reason = reason or why
                members.append(member)
                continue
            name = names.get(module) if isinstance(module, nn.Module) else None
            if name is None:
                reason = reason or f"its channels run through {type(module).__name__}"
                continue
            kind = member_kind(module)
            if module in self._ignored:
                reason = f"ignored layer {name!r}"
            elif kind is None:
                why = f"layer {name!r} ({type(module).__name__}) cannot lose channels"
                reason = reason or why + registration_advice(module)
            members.append(
                Member(
                    layer=name,
                    kind=kind or "other",
                    in_channels=self._dg.is_in_channel_pruning_fn(handler),
                    out_channels=self._dg.is_out_channel_pruning_fn(handler),
                    module=module,
                    idxs=torch.as_tensor(item.idxs, dtype=torch.long),
                    group_idxs=torch.as_tensor(item.root_idxs, dtype=torch.long),
                )
            )
        return members, reason, self._barriers[first] if first is not None else None

    def _param_member(
        self, param: nn.Parameter, item: tp.dependency.group.GroupItem
    ) -> tuple[Member, str | None]:
        """A parameter outside a layer (see ``._params``): it holds channels but no MACs."""
        use = self._params[self._dg._param_to_name[param]]
        why = f"parameter {use.name!r} cannot lose channels: {use.problem}" if use.problem else None
        why = why and why + registration_advice(use.owner, self.model)
        if use.owner in self._ignored:
            why = f"ignored layer holding parameter {use.name!r}"
        member = Member(
            layer=use.name,
            kind="parameter",
            in_channels=False,
            out_channels=False,
            module=use.owner,
            idxs=torch.as_tensor(item.idxs, dtype=torch.long),
            group_idxs=torch.as_tensor(item.root_idxs, dtype=torch.long),
        )
        return member, why

    def _attention_member(
        self, module: nn.Module, item: tp.dependency.group.GroupItem, name: str
    ) -> Member:
        reads = self._dg.is_in_channel_pruning_fn(item.dep.handler)
        layer = module.qkv if reads else module.proj
        return Member(
            layer=f"{name}.{'qkv' if reads else 'proj'}",
            kind="linear",
            in_channels=reads,
            out_channels=not reads,
            module=layer,
            idxs=torch.as_tensor(item.idxs, dtype=torch.long),
            group_idxs=torch.as_tensor(item.root_idxs, dtype=torch.long),
        )

    # --------------------------------------------------------------------- selections, MACs
    def resolve(
        self, group: Selection, idxs: Sequence[int] | torch.Tensor | None = None
    ) -> list[tuple[ChannelGroup, torch.Tensor]]:
        """Check a removal and return it as (current group, sorted channel indices) pairs.

        Accepts ``(group, idxs)`` or ``({group: idxs, ...})``, groups as objects or names.
        Refuses duplicate or out-of-range indices, a group given twice, stale group objects
        and any removal that would leave a group without channels.
        """
        if isinstance(group, Mapping):
            if idxs is not None:
                raise TypeError("give channel indices inside the mapping, not as idxs")
            selection = group
        else:
            if idxs is None:
                raise TypeError("idxs is required when a single group is given")
            selection = {group: idxs}
        plan: list[tuple[ChannelGroup, torch.Tensor]] = []
        seen: set[str] = set()
        for key, ids in selection.items():
            g = self._current(key)
            if g.name in seen:
                raise AutopruneError(f"group {g.name!r} is selected twice")
            seen.add(g.name)
            t = torch.as_tensor(ids, dtype=torch.long).flatten()
            if t.unique().numel() != t.numel():
                raise AutopruneError(f"channel indices for group {g.name!r} repeat; give each once")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= g.channels):
                raise AutopruneError(
                    f"channel indices for group {g.name!r} must lie in [0, {g.channels})"
                )
            if t.numel() >= g.channels:
                raise AutopruneError(
                    f"removing {t.numel()} of {g.channels} channels would leave group "
                    f"{g.name!r} empty; keep at least 1"
                )
            plan.append((g, t.sort().values))
        return plan

    def _current(self, key: ChannelGroup | str) -> ChannelGroup:
        if isinstance(key, ChannelGroup):
            if key.version != self._version:
                raise AutopruneError(
                    f"group {key.name!r} is from before the last prune; "
                    f"use graph.group({key.name!r}) for its current state"
                )
            return key
        return self.group(key)

    def macs(
        self, group: Selection | None = None, idxs: Sequence[int] | torch.Tensor | None = None
    ) -> int:
        """MACs of the scope's conv and linear layers and attention matmuls, now or after
        removing a selection (``scope="all"``: the model's, as ``FlopCounterMode`` counts them).

        Exact for any combination of groups, including layers whose input and output
        channels sit in two different selected groups (their savings are not additive).
        """
        removed: Removed = {}
        for g, ids in self.resolve(group, idxs) if group is not None else []:
            for module, (a, b) in g.removed(ids).items():
                ra, rb = removed.get(module, (0, 0))
                removed[module] = (ra + a, rb + b)
        return self._macs.total(removed)

    # ---------------------------------------------------------------------------- pruning
    def prune(self, group: Selection, idxs: Sequence[int] | torch.Tensor | None = None) -> None:
        """Physically remove channels (same arguments as :meth:`resolve`).

        The model stays a plain ``nn.Module`` (it trains, scripts and exports); previously
        returned groups become stale, ``groups()``/``group(name)`` give the new ones.
        """
        plan = self.resolve(group, idxs)
        if self.masks.active:
            raise AutopruneError("remove the active channel masks before pruning")
        version = self._version + 1
        # Heads go first (they cut no channel of any group); then every channel removal is
        # resolved against the model as it is, and each layer is cut once with the union of
        # its indices: no mapping goes stale halfway through a plan.
        plan = [(g, ids) for g, ids in plan if ids.numel()]
        channels = []
        for g, ids in plan:
            module, handler = g.root
            if isinstance(handler, HeadPruning):
                handler(module, ids.tolist())
            else:
                channels.append((module, handler, g.root_channels(ids)))
        self._dg.cut(channels)
        if plan:
            drop_derived_caches(self.model)
            self._version, self._groups = version, None

    def remove_modules(self, paths: Sequence[str]) -> None:
        """Replace whole blocks or layers by the identity (:mod:`.units`), for good.

        Their inputs and outputs must have the same shape. The graph is traced again: groups
        that ran through the removed modules change, and keep their names where their first
        layer is still there.
        """
        if self.masks.active:
            raise AutopruneError("remove the active channel masks before pruning")
        remove_modules(self.model, paths)
        version = self._version + 1
        self.__dict__.update(self._build(self.model).__dict__)
        self._version, self._groups = version, None

    def module_macs(self, modules: Iterable[nn.Module]) -> int:
        """MACs (of the scope) of the layers inside ``modules``: what removing them saves."""
        inside = {m for module in modules for m in module.modules()}
        layers = sum(self._macs.layer_macs(m) for m in self._macs.units if m in inside)
        matmuls = sum(self._macs.matmul_macs(a, {}) for a in self._macs.matmuls if a in inside)
        return layers + matmuls
