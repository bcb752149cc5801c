"""Your own layer types: tell autoprune once how one loses channels, and every part follows.

Torch-Pruning takes ``customized_pruners={MyLayer: MyPruner()}`` per call; here a layer type is
registered once (:func:`register_layer`) with a :class:`LayerPruner` that *declares* what a
layer of that type is: which dim of each of its tensors holds its output or input channels,
the int attributes that count them, and its MACs as a function of its channels. From that
declaration alone the graph couples it (a leaf op: its internals are sealed from the trace),
physical pruning slices its tensors, masking zeroes its inputs, the MAC table predicts its cost
after any removal (checked against torch's counter when the graph is built), save/load records
its shape and ONNX export runs its own forward.

A layer with raw per-channel parameters used element-wise (``x * self.scale + self.bias``)
needs no registration: the graph follows such parameters by itself (see ``._params``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

import torch
import torch_pruning as tp
from torch import nn

from ..errors import AutopruneError
from ..measure.complexity import count_macs

if TYPE_CHECKING:
    from ._trace import TraceRecorder

L = TypeVar("L", bound="type[LayerPruner]")
P = TypeVar("P", bound="LayerPruner")


class LayerPruner:
    """How a layer type loses channels: subclass it, declare, and :func:`register_layer` it.

    ``out_dims`` / ``in_dims``: ``{tensor name: dim}`` for every parameter or buffer (dotted
    names reach into sublayers) whose ``dim`` indexes the layer's output / input channels.
    ``per_channel``: its input and output channels are the same ones (a scale, a bias): one
    group runs through it and only ``out_dims`` is used. ``out_attribute`` / ``in_attribute``:
    int attributes counting the channels (e.g. ``"out_channels"``), kept up to date by pruning
    and restored by :func:`autoprune.load`. ``channel_dim``: the dim of the layer's input and
    output holding channels (1 for feature maps, -1 for ``(batch, tokens, dim)``).

    Masking a removal zeroes the removed channels of the layer's input, so the layer's output
    must depend on an input channel only through terms that vanish when it is zero (true of
    convolutions, matmuls and anything per channel); override :meth:`masked_input` otherwise.
    """

    out_dims: ClassVar[Mapping[str, int]] = {}
    in_dims: ClassVar[Mapping[str, int]] = {}
    per_channel: ClassVar[bool] = False
    out_attribute: ClassVar[str | None] = None
    in_attribute: ClassVar[str | None] = None
    channel_dim: ClassVar[int] = 1

    def macs(self, layer: nn.Module, in_channels: int, out_channels: int) -> int:
        """MACs per output position (output elements / output channels) with these channels,
        as ``torch.utils.flop_counter`` counts the forward (FLOPs / 2, no bias, no
        element-wise ops). Checked against the counter when a graph is built."""
        return 0

    def masked_input(self, layer: nn.Module, x: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
        """The input that makes ``layer`` compute what it would with channels ``idxs`` removed;
        a layer overriding this is masked one removal at a time (no stacked scoring)."""
        return x.index_fill(self.channel_dim, idxs, 0.0)

    def out_channels(self, layer: nn.Module) -> int | None:
        return _count(layer, self.out_attribute, self.out_dims)

    def in_channels(self, layer: nn.Module) -> int | None:
        if self.per_channel:
            return self.out_channels(layer)
        return _count(layer, self.in_attribute, self.in_dims)

    @property
    def stackable(self) -> bool:
        """Whether masking is the default zeroing, which a stacked pass can do per sample."""
        return type(self).masked_input is LayerPruner.masked_input


# Layer type -> its pruner. Looked up along the MRO: registering a base covers its subclasses.
LAYER_PRUNERS: dict[type[nn.Module], LayerPruner] = {}
# Every type looked up so far -> its pruner or None: the MAC table asks for every layer at every
# prediction, the masks at every forward.
_FOUND: dict[type, LayerPruner | None] = {}


@overload
def register_layer(layer_type: type[nn.Module]) -> Callable[[L], L]: ...
@overload
def register_layer(layer_type: type[nn.Module], pruner: P) -> P: ...
def register_layer(
    layer_type: type[nn.Module], pruner: LayerPruner | None = None
) -> Callable[[L], L] | LayerPruner:
    """Register how ``layer_type`` is pruned: ``register_layer(MyLayer, MyPruner())``, or as a
    class decorator ``@register_layer(MyLayer)`` on a :class:`LayerPruner` subclass.

    Registering a type twice raises ``ValueError``.
    """
    if pruner is not None:
        _add(layer_type, pruner)
        return pruner

    def decorator(cls: L) -> L:
        _add(layer_type, cls())
        return cls

    return decorator


def _add(layer_type: type[nn.Module], pruner: LayerPruner) -> None:
    if not isinstance(pruner, LayerPruner):
        raise TypeError(f"register_layer needs a LayerPruner, got {type(pruner).__name__}")
    if layer_type in LAYER_PRUNERS:
        raise ValueError(f"a pruner for {layer_type.__name__} is already registered")
    LAYER_PRUNERS[layer_type] = pruner
    _FOUND.clear()


def layer_pruner(module: nn.Module) -> LayerPruner | None:
    """The registered pruner of ``module``'s type (or of its nearest registered base)."""
    cls = type(module)
    if cls not in _FOUND:
        _FOUND[cls] = next((LAYER_PRUNERS[t] for t in cls.__mro__ if t in LAYER_PRUNERS), None)
    return _FOUND[cls]


def _count(layer: nn.Module, attribute: str | None, dims: Mapping[str, int]) -> int | None:
    if attribute is not None:
        return int(getattr(layer, attribute))
    for name, dim in dims.items():
        return _tensor(layer, name).shape[dim]
    return None


def _tensor(layer: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    module = layer.get_submodule(owner)
    tensor = module._parameters.get(attr, module._buffers.get(attr))
    if tensor is None:
        raise AutopruneError(
            f"{type(layer).__name__} has no parameter or buffer {name!r}; fix the dims its "
            "LayerPruner declares"
        )
    return tensor


def _slice(layer: nn.Module, dims: Mapping[str, int], idxs: Sequence[int]) -> None:
    for name, dim in dims.items():
        owner, _, attr = name.rpartition(".")
        module = layer.get_submodule(owner)
        old = _tensor(layer, name)
        keep = torch.ones(old.shape[dim], dtype=torch.bool, device=old.device)
        keep[list(idxs)] = False
        new = old.detach()[(slice(None),) * (dim % old.dim()) + (keep,)].clone()
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = new


class _TPPruner(tp.pruner.BasePruningFunc):
    """A :class:`LayerPruner` as Torch-Pruning's pruning function for its layer type.

    A per-channel layer's two sides are one function, which is how Torch-Pruning couples a
    layer's input and output channels. ``widths``: traced (in, out) of layers without tensors.
    """

    def __init__(self, spec: LayerPruner) -> None:
        super().__init__()
        self.spec = spec
        self.widths: dict[nn.Module, list[int]] = {}
        if spec.per_channel:
            self.prune_in_channels = self.prune_out_channels  # type: ignore[method-assign]

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        _slice(layer, self.spec.out_dims, idxs)
        self._resize(layer, self.spec.out_attribute, 1, len(idxs))
        if self.spec.per_channel:
            self._resize(layer, None, 0, len(idxs))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        _slice(layer, self.spec.in_dims, idxs)
        self._resize(layer, self.spec.in_attribute, 0, len(idxs))
        return layer

    def _resize(self, layer: nn.Module, attribute: str | None, side: int, removed: int) -> None:
        if attribute is not None:
            setattr(layer, attribute, int(getattr(layer, attribute)) - removed)
        if layer in self.widths:
            self.widths[layer][side] -= removed

    def get_out_channels(self, layer: nn.Module) -> int | None:
        found = self.spec.out_channels(layer)
        return found if found is not None else self.widths.get(layer, [None, None])[1]

    def get_in_channels(self, layer: nn.Module) -> int | None:
        found = self.spec.in_channels(layer)
        return found if found is not None else self.widths.get(layer, [None, None])[0]


class CustomLayers:
    """The registered layers of one model while its graph is built: their Torch-Pruning
    pruners, trace hooks that record their MAC units, and the check of their MAC formulas."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {m: spec for m in model.modules() if (spec := layer_pruner(m)) is not None}
        self.covered = {s for m in self.layers for s in m.modules()}  # they and their sublayers
        tps = {id(spec): _TPPruner(spec) for spec in self.layers.values()}
        self.pruners = {type(m): tps[id(spec)] for m, spec in self.layers.items()}
        self._first_call: dict[nn.Module, tuple[tuple, int]] = {}

    @property
    def root_types(self) -> tuple[type[nn.Module], ...]:
        """Types whose outputs root groups, as convs' do: those mixing channels."""
        return tuple({type(m) for m, spec in self.layers.items() if not spec.per_channel})

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    def hooks(self, recorder: TraceRecorder) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks that give ``recorder`` each layer's MAC unit, call order and labels."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            dim = self.layers[module].channel_dim
            positions = output.numel() // output.shape[dim]
            recorder.order.setdefault(module, len(recorder.order))
            recorder.mac_units[module] += positions
            recorder.labels.start(output, dim)
            if module not in self._first_call:
                self._first_call[module] = (tuple(a.detach() for a in args), positions)
                self.pruners[type(module)].widths[module] = [args[0].shape[dim], output.shape[dim]]

        return [m.register_forward_hook(hook) for m in self.layers]

    def check(self, names: Mapping[nn.Module, str]) -> None:
        """Refuse a layer whose declared tensors or attributes disagree with the channels its
        traced input and output have, or whose MAC formula is not what torch's counter
        measures on the traced input (pruning or predictions would go wrong)."""
        for module in self._first_call:
            spec, name = self.layers[module], names[module]
            traced_in, traced_out = self.pruners[type(module)].widths[module]
            sides = [(spec.out_dims, spec.out_attribute, traced_out, "output")]
            if not spec.per_channel:
                sides.append((spec.in_dims, spec.in_attribute, traced_in, "input"))
            for dims, attribute, width, side in sides:
                found = {f"{n!r} dim {d}": _tensor(module, n).shape[d] for n, d in dims.items()}
                if attribute is not None:
                    found[f"attribute {attribute!r}"] = int(getattr(module, attribute))
                for what, size in found.items():
                    if size != width:
                        raise AutopruneError(
                            f"layer {name!r}: {what} counts {size} channels but its {side} has "
                            f"{width} (dim {spec.channel_dim}); fix {type(spec).__name__}"
                        )
            self._check_macs(module, name)

    def _check_macs(self, module: nn.Module, name: str) -> None:
        args, positions = self._first_call[module]
        measured = count_macs(module, args)
        declared = positions * registered_macs(module)
        if measured != declared:
            spec = type(self.layers[module]).__name__
            raise AutopruneError(
                f"layer {name!r}: {spec}.macs() gives {declared} MACs on the traced input but "
                f"torch counts {measured}; make macs() return MACs per output position "
                f"({positions} here), and declare the attributes counting its channels"
            )


def registered_macs(module: nn.Module, out_removed: int = 0, in_removed: int = 0) -> int | None:
    """MACs per output position of a registered layer after a removal; None for other layers."""
    spec = layer_pruner(module)
    if spec is None:
        return None
    cin, cout = spec.in_channels(module), spec.out_channels(module)
    if cin is None or cout is None:  # no tensor or attribute counts them: see check()
        return 0
    return spec.macs(module, cin - in_removed, cout - out_removed)


def shape_attributes(module: nn.Module) -> dict[str, Any] | None:
    """What save/load keeps of a registered layer: its channel-count attributes (its tensors'
    shapes are kept for every layer); None for other layers."""
    spec = layer_pruner(module)
    if spec is None:
        return None
    names = (spec.out_attribute, None if spec.per_channel else spec.in_attribute)
    return {a: int(getattr(module, a)) for a in names if a is not None}


def filter_rows(module: nn.Module) -> torch.Tensor | None:
    """A registered layer's filters for the weight-based criteria: every output-channel
    tensor with its channels first, flattened and joined, ``(out_channels, -1)``; None for
    other layers (and registered ones with no such tensor)."""
    spec = layer_pruner(module)
    if spec is None or not spec.out_dims:
        return None
    tensors = [_tensor(module, n).detach().movedim(d, 0) for n, d in spec.out_dims.items()]
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def registration_advice(layer: nn.Module, model: nn.Module | None = None) -> str:
    """What lifts a freeze by ``layer`` (or by a parameter it holds): registering its type;
    for the model itself, moving the parameter into a layer of its own type first. Nothing for
    torch's own types (those are autoprune's to support)."""
    if layer is model:
        return " (move it into a layer of its own type and register that with register_layer)"
    if type(layer).__module__.split(".")[0] == "torch":
        return ""
    return f" (register {type(layer).__name__} with autoprune.register_layer)"
