"""Building the pruning graph: one traced forward, Torch-Pruning's dependency graph with our
pruners, labels and checks, and the MAC table (see :class:`~.pruning_graph.PruningGraph`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch_pruning as tp
from torch import nn

from .._forward import kept_modes
from ..errors import AutopruneError
from ..layers import ChannelPadShortcut
from ..measure.complexity import as_inputs, count_macs
from ._attention import AttentionPruner, attention_modules
from ._barriers import LabelledGraph, check_ops
from ._fx import normalize_model
from ._grouped import layer_pruners, reruns_weight
from ._params import drop_derived_caches, parameter_uses
from ._rules import (
    CHANNELWISE_TYPES,
    TP_PARAM_TYPES,
    ChannelPadPruner,
    ChannelwisePruner,
    OpaquePruner,
    matches,
)
from ._trace import TraceRecorder, sealed
from .custom import CustomLayers
from .groups import MacTable
from .pruning_graph import DEFAULT_PRUNABLE_TYPES, Inputs, PruningGraph
from .scopes import ScopeContext


def build_graph(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    ignored_layers: Iterable[str | nn.Module] = (),
    prunable_types: tuple[type[nn.Module], ...] = DEFAULT_PRUNABLE_TYPES,
    scope: str = "all",
) -> PruningGraph:
    """Trace ``model`` once and find its groups of coupled channels.

    ``model`` is first passed through :func:`normalize_model` (channel-dim ``F.pad``
    shortcuts become :class:`ChannelPadShortcut` layers); use ``graph.model`` afterwards.
    ``ignored_layers`` (names or modules; a container means all its layers) keep their shape:
    every group touching them is frozen. Groups are rooted at ``prunable_types`` outputs. The
    classifier's outputs and the model input's channels are never pruned. ``scope`` (a name
    from :data:`~autoprune.graph.scopes.SCOPES`) limits the groups and the MACs counted.
    """
    inputs = as_inputs(example_inputs)
    model = normalize_model(model, inputs)
    ignored = _resolve_ignored(model, ignored_layers)
    attention = attention_modules(model)
    channelwise = [m for m in model.modules() if matches(m, CHANNELWISE_TYPES)]
    custom = CustomLayers(model)
    black_boxes = _black_boxes(model, ignored, {*attention, *channelwise, *custom})
    opaque, per_channel = OpaquePruner(), ChannelwisePruner()
    pruners: dict[type, tp.pruner.BasePruningFunc] = {ChannelPadShortcut: ChannelPadPruner()}
    pruners.update({type(m): opaque for m in black_boxes})
    pruners.update({type(m): AttentionPruner() for m in attention})
    pruners.update({type(m): per_channel for m in channelwise})
    pruners.update(custom.pruners)
    shortcuts = [m for m in model.modules() if isinstance(m, ChannelPadShortcut)]
    recorder = TraceRecorder(model, [*black_boxes, *shortcuts], attention, channelwise, custom)
    opaque.channels = recorder.widths  # filled by the forward, read by tp's shape inference
    per_channel.channels = recorder.channels
    users = custom.pruners  # a user's registered layer types keep their own pruners
    own = {m: p for m, p in layer_pruners(model, channelwise).items() if type(m) not in users}
    rerun = [m for m in model.modules() if reruns_weight(m) and type(m) not in users]
    sealed_layers = [*attention, *channelwise, *custom, *rerun]
    try:  # kept_modes: tp's trace leaves the model in eval
        with torch.enable_grad(), kept_modes(model), recorder, sealed(sealed_layers):
            dg = LabelledGraph(recorder.labels, recorder.split_layers, recorder.ops, own)
            dg.build_dependency(model, inputs, customized_pruners=pruners, verbose=False)
    finally:
        drop_derived_caches(model)
    custom.check({m: n for n, m in model.named_modules()})
    constant_nodes, barriers = check_ops(dg, recorder)
    matmuls = {a: (a.qkv, a.proj, recorder.attention_units[a]) for a in attention}
    modelled = MacTable(recorder.mac_units, matmuls).total()
    other = max(0, count_macs(model, inputs) - modelled)  # e.g. matmuls of hand-written attention
    graph = PruningGraph(
        model,
        inputs,
        dg,
        MacTable(recorder.mac_units, matmuls, other),
        ignored=ignored,
        root_types=(*prunable_types, *custom.root_types),
        output_nodes={n for n in dg.module2node.values() if n.grad_fn in recorder.outputs},
        constant_nodes=constant_nodes,
        barriers=barriers,
        scope=scope,
        scope_context=ScopeContext(model, dict(recorder.order), frozenset(attention)),
        params=parameter_uses(dg, recorder, model),
    )
    graph.groups()  # surface coupling errors now, not at the first use
    return graph


def _resolve_ignored(model: nn.Module, layers: Iterable[str | nn.Module]) -> frozenset[nn.Module]:
    modules = dict(model.named_modules())
    found: set[nn.Module] = set()
    present = set(modules.values())
    for layer in layers:
        if isinstance(layer, str):
            if layer not in modules:
                raise AutopruneError(f"ignored_layers: the model has no layer named {layer!r}")
            layer = modules[layer]
        elif layer not in present:
            raise AutopruneError(f"ignored_layers: {type(layer).__name__} is not part of the model")
        found.update(layer.modules())
    return frozenset(found)


def _black_boxes(
    model: nn.Module, ignored: frozenset[nn.Module], known: set[nn.Module]
) -> list[nn.Module]:
    """Ignored layers with parameters of their own that Torch-Pruning has no pruner for.

    ``known``: layers with pruners of ours (attention, channel-wise), never black boxes. The
    parameters of other such layers are traced as unwrapped parameters (see ``._params``).
    """
    return [
        m
        for m in model.modules()
        if m in ignored
        and not isinstance(m, (*TP_PARAM_TYPES, ChannelPadShortcut))
        and m not in known
        and next(m.parameters(recurse=False), None) is not None
    ]
