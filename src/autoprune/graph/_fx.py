"""Rewrite option-A shortcuts written with ``F.pad`` into :class:`ChannelPadShortcut` layers.

A channel-dim ``F.pad`` ties the channels before and after it together with an offset that only
"p zeros on each side" can express, so Torch-Pruning merges the stages around it (and with them
the whole network) into one group. Users write it in a lambda (akamaster's ``LambdaLayer``) or
directly in ``forward``; either way the layer whose own code contains the pad is traced with
torch.fx (its children stay opaque), the pad and the strided subsample before it become one
``ChannelPadShortcut`` submodule, and the traced layer replaces the original in its parent.
Only layers that contain such a pad change; their children keep their names and objects.
Channel splits in a layer's own code (``x.chunk(2, 1)``, ``torch.split(x, self.width, 1)``)
are rewritten the same way, into :class:`ChannelSplit` layers whose sizes follow pruning.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.fx.passes.shape_prop import ShapeProp

from .._forward import eval_mode, run_eval
from ..errors import AutopruneError
from ..layers import ChannelPadShortcut, ChannelSplit
from ..measure.complexity import as_inputs
from ..models.spec import carry_spec
from ._attention import is_attention
from ._foreign import adapt_foreign_layers
from .custom import layer_pruner

NORMALIZED_ATTR = "_autoprune_rewritten"
"""Attribute set on the model :func:`normalize_model` returned, naming the rewritten layers
("" is the model itself); loaders re-apply :func:`normalize_model` when they see it."""

_PAD_FUNCTIONS = (F.pad, torch._C._nn.pad, torch.constant_pad_nd)
_PAD_ARGS = ("input", "pad", "mode", "value")


class _ShallowTracer(fx.Tracer):
    """Traces one layer's own ``forward``; every child module stays a single call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _channel_pad(node: fx.Node) -> tuple[int, int] | None:
    """(before, after) zero channels added by a constant-zero pad of dim 1 of a 4-D tensor."""
    if node.op != "call_function" or node.target not in _PAD_FUNCTIONS:
        return None
    names = ("input", "pad", "value") if node.target is torch.constant_pad_nd else _PAD_ARGS
    params = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    pad, mode, value = params.get("pad"), params.get("mode"), params.get("value")
    if not isinstance(pad, Sequence) or len(pad) != 6 or not all(isinstance(p, int) for p in pad):
        return None
    if mode not in (None, "constant") or value not in (None, 0):
        return None
    if any(pad[:4]) or min(pad[4:]) < 0 or not any(pad[4:]):
        return None
    return pad[4], pad[5]


def _subsample(node: Any) -> tuple[fx.Node, int]:
    """``x[:, :, ::s, ::s]`` -> (x, s); any other node -> (node, 1)."""
    if (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[1], tuple)
        and len(node.args[1]) == 4
        and all(isinstance(s, slice) for s in node.args[1])
    ):
        full, full2, s1, s2 = node.args[1]
        spatial = s1 == s2 and s1.start is None and s1.stop is None and isinstance(s1.step, int)
        if full == full2 == slice(None) and spatial and s1.step > 1:
            return node.args[0], s1.step
    return node, 1


_SPLITS = {"split", "chunk", "split_with_sizes"}
_SPLIT_FUNCTIONS = (torch.split, torch.chunk, torch.Tensor.split, torch.Tensor.chunk)


def _split_dim(node: fx.Node, root: nn.Module) -> int | None:
    """The channel dim ``node`` splits (or chunks), its sizes fixed in the code: dim 1, or the
    last dim of a Linear's output (channels last); None for any other node."""
    method = node.op == "call_method" and node.target in _SPLITS
    if not method and not (node.op == "call_function" and node.target in _SPLIT_FUNCTIONS):
        return None
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    source = node.args[0]
    after_linear = (
        isinstance(source, fx.Node)
        and source.op == "call_module"
        and isinstance(root.get_submodule(str(source.target)), nn.Linear)
    )
    return dim if dim == 1 or (dim == -1 and after_linear) else None


def _find_pads(module: nn.Module) -> fx.GraphModule | None:
    """The module traced shallowly, when its own code pads or splits channels; else None.
    Layers with pruners of their own (attention, registered types) keep their code."""
    if (
        type(module).__module__.startswith("torch.")
        or isinstance(module, (ChannelPadShortcut, ChannelSplit))
        or is_attention(module)
        or layer_pruner(module) is not None
    ):
        return None
    try:
        graph = _ShallowTracer().trace(module)
    except Exception:  # not traceable (data-dependent control flow): the graph check reports it
        return None
    if not any(_channel_pad(n) or _split_dim(n, module) is not None for n in graph.nodes):
        return None
    for node in graph.nodes:  # annotations become mangled names TorchScript cannot resolve
        node.type = None
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    _keep_plain_attrs(module, gm)
    return gm.train(module.training)


def _keep_plain_attrs(module: nn.Module, gm: fx.GraphModule) -> None:
    """Carry the layer's plain attributes (ints, flags) onto its rewrite: a parent's code may
    read them (timm's ``LocalWindowAttention`` reads ``self.attn.resolution``), and a
    GraphModule keeps only what its own graph uses, through a deepcopy only what ``meta``
    names."""
    plain = {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_")
        and k not in vars(gm)
        and not isinstance(v, (torch.Tensor, nn.Module))
    }
    for key, value in plain.items():
        setattr(gm, key, value)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(plain)


def _capture_inputs(
    model: nn.Module, example_inputs: tuple, targets: dict[str, nn.Module]
) -> dict[str, tuple]:
    """The positional inputs of each target's first call. A layer called with keyword
    arguments (coat's ``crpe(q, v, size=size)``) is left out: shape propagation feeds
    placeholders by position only, so such a layer keeps its code."""
    captured: dict[str, tuple] = {}
    keyworded: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if kwargs:
                keyworded.add(name)
            captured.setdefault(name, args)

        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in targets.items()]
    try:
        run_eval(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: args for name, args in captured.items() if name not in keyworded}


def _rewrite(gm: fx.GraphModule, args: tuple) -> None:
    with eval_mode(gm), torch.no_grad():  # a fresh model trains: BatchNorm would see batch 1
        ShapeProp(gm).propagate(*args)
    pads = [n for n in gm.graph.nodes if _channel_pad(n)]
    for k, node in enumerate(n for n in pads if len(n.meta["tensor_meta"].shape) == 4):
        before, after = _channel_pad(node)  # type: ignore[misc]
        source, stride = _subsample(node.args[0])
        in_channels = source.meta["tensor_meta"].shape[1]
        out_channels = in_channels + before + after
        layer = ChannelPadShortcut(in_channels, out_channels, stride)
        index = torch.full((out_channels,), -1, dtype=torch.long)
        index[before : before + in_channels] = torch.arange(in_channels)
        layer.set_index(index, in_channels)
        layer.train(gm.training)  # join the model in its mode, as if it had been built with it
        name = "channel_pad" if k == 0 else f"channel_pad{k}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, layer)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (source,))
        sliced = node.args[0]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if sliced is not source and not sliced.users:
            gm.graph.erase_node(sliced)
    _rewrite_splits(gm)
    gm.graph.lint()
    gm.recompile()


def _rewrite_splits(gm: fx.GraphModule) -> None:
    """Channel splits of 4-D maps (and of channels-last tokens) become :class:`ChannelSplit`
    layers (shape-propagated)."""
    splits = [(n, _split_dim(n, gm)) for n in gm.graph.nodes]
    found = [
        (n, d)
        for n, d in splits
        if d is not None
        and len(n.args[0].meta["tensor_meta"].shape) in ((4,) if d == 1 else (3, 4))
    ]
    for k, (node, dim) in enumerate(found):
        sizes = [int(m.shape[dim]) for m in node.meta["tensor_meta"]]
        name = "channel_split" if k == 0 else f"channel_split{k}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, ChannelSplit(sizes, dim))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


# Attributes that autoprune.io reads from a model; they move with a rewritten top-level module.
_CARRIED_ATTRS = ("autoprune_metadata",)


def normalize_model(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None
) -> nn.Module:
    """Rewrite channel-dim ``F.pad`` shortcuts into :class:`ChannelPadShortcut` layers, and
    foreign layers no tracer can follow into prunable equivalents (:mod:`._foreign`).

    Returns ``model`` itself, untouched, when nothing needs rewriting (every zoo model).
    Otherwise the layers containing such a pad are replaced in place (a pad in the model's own
    ``forward`` makes the returned model a new :class:`torch.fx.GraphModule`); the result
    computes exactly what the original did and names the rewritten layers in
    ``NORMALIZED_ATTR``. ``example_inputs`` are needed then, to learn each pad's input width.
    """
    adapted = adapt_foreign_layers(model)
    found = {name: gm for name, m in model.named_modules() if (gm := _find_pads(m)) is not None}
    if not found:
        if adapted:
            setattr(model, NORMALIZED_ATTR, (*getattr(model, NORMALIZED_ATTR, ()), *adapted))
        return model
    if example_inputs is None:
        names = ", ".join(repr(n) for n in found)
        raise AutopruneError(
            f"layers {names} pad channels with F.pad; pass example_inputs to normalize_model "
            "so they can be rewritten"
        )
    inputs = as_inputs(example_inputs)
    original = model
    modules = dict(model.named_modules())
    captured = _capture_inputs(model, inputs, {name: modules[name] for name in found})
    done = [name for name in found if name in captured]  # a layer never called stays as is
    # Parents first, each found in the current tree, so a rewritten parent gets the new child.
    for name in sorted(done, key=lambda n: n.count(".") if n else -1):
        gm = found[name]
        _rewrite(gm, captured[name])
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, gm)
        else:
            model = gm
    rewritten = tuple(getattr(model, NORMALIZED_ATTR, ())) + tuple(adapted) + tuple(done)
    # A rewritten top-level module must still say how it was built, or it cannot be saved.
    carried = {a: getattr(original, a) for a in _CARRIED_ATTRS if hasattr(original, a)}
    carried[NORMALIZED_ATTR] = rewritten
    carry_spec(original, model)
    for attr, value in carried.items():
        setattr(model, attr, value)
    if isinstance(model, fx.GraphModule):  # a GraphModule's deepcopy keeps only these
        model.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(carried)
    return model
