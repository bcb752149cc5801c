"""What a pruned layer's shape is, as plain JSON, and how to put it back on a fresh layer.

Pruning shrinks layers in place: their tensors and the attributes that describe them
(``out_channels``, ``num_features``, ...). Saving records, for every layer of a registered type,
those attributes plus the shapes of its own parameters and buffers; loading rebuilds the dense
model, then gives each recorded layer empty tensors of the recorded shapes and the recorded
attributes, so the state_dict loads strictly. A new layer type is one decorated function that
returns the attributes to keep (a tensor-valued attribute comes back as a tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import CheckpointError
from ..graph._attention import attention_adapter
from ..graph.custom import shape_attributes
from ..layers import ChannelPadShortcut, ChannelSplit

LayerRecord = dict[str, Any]
Recorder = Callable[[Any], LayerRecord]
R = TypeVar("R", bound=Recorder)

# Module type -> function returning its shape-defining attributes. Looked up along the MRO, so
# registering a base class (``_ConvNd``) covers its subclasses (Conv1d/2d/3d, transposed).
LAYER_SHAPES: dict[type[nn.Module], Recorder] = {}
TYPE, TENSORS = "type", "tensors"


def register_layer_shape(*types: type[nn.Module]) -> Callable[[R], R]:
    """Register ``fn(module) -> {attribute: value}`` for ``types``; registering twice raises."""

    def decorator(fn: R) -> R:
        for t in types:
            if t in LAYER_SHAPES:
                raise ValueError(f"a layer shape for {t.__name__} is already registered")
            LAYER_SHAPES[t] = fn
        return fn

    return decorator


def recorder_for(module: nn.Module) -> Recorder | None:
    """The registered recorder; else, for layers the pruning graph changes by rules of its own
    (attention heads), one that keeps what those rules change; for any other module owning
    tensors (a layer scale, a ViT's ``cls_token``) or sizes (:func:`_sizes`), those."""
    if shape_attributes(module) is not None:  # a user's registered layer type
        return shape_attributes
    found = next((LAYER_SHAPES[t] for t in type(module).__mro__ if t in LAYER_SHAPES), None)
    if found is not None:
        return found
    adapter = attention_adapter(module)
    if adapter is not None:
        return lambda m: {a: getattr(m, a) for a in adapter.attributes}
    if _own_tensors(module) or _sizes(module):  # layer scales, cls tokens, norms: their sizes
        return _sizes
    return None


def _sizes(module: nn.Module) -> LayerRecord:
    """A layer of unknown type keeps its ``groups`` count, the ``shape`` it views its
    parameter to and its ``normalized_shape``, where it has them: the pruning graph changes
    them (timm's EvoNorm ``S`` loses whole groups, metaformer's ``Scale`` and timm's RmsNorm
    channels; see graph._grouped and graph._rules)."""
    sizes = {name: getattr(module, name, None) for name in ("groups", "shape", "normalized_shape")}
    return {
        name: value
        for name, value in sizes.items()
        if isinstance(value, int) or (isinstance(value, tuple) and _ints(value))
    }


def _ints(values: tuple) -> bool:
    return all(isinstance(v, int) for v in values)


@register_layer_shape(nn.modules.conv._ConvNd)
def _conv(m: nn.modules.conv._ConvNd) -> LayerRecord:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}


@register_layer_shape(nn.modules.batchnorm._NormBase)
def _batch_norm(m: nn.modules.batchnorm._NormBase) -> LayerRecord:
    return {"num_features": m.num_features}


@register_layer_shape(nn.Linear)
def _linear(m: nn.Linear) -> LayerRecord:
    return {"in_features": m.in_features, "out_features": m.out_features}


@register_layer_shape(nn.LayerNorm)
def _layer_norm(m: nn.LayerNorm) -> LayerRecord:
    return {"normalized_shape": list(m.normalized_shape)}


@register_layer_shape(nn.GroupNorm)
def _group_norm(m: nn.GroupNorm) -> LayerRecord:
    return {"num_groups": m.num_groups, "num_channels": m.num_channels}


@register_layer_shape(ChannelPadShortcut)
def _channel_pad(m: ChannelPadShortcut) -> LayerRecord:
    return {"in_channels": m.in_channels, "index": m.index.tolist()}


@register_layer_shape(ChannelSplit)
def _channel_split(m: ChannelSplit) -> LayerRecord:
    return {"sizes": list(m.sizes)}


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and persistent buffers: what its state_dict entries hold."""
    skip = module._non_persistent_buffers_set
    buffers = {n: b for n, b in module._buffers.items() if b is not None and n not in skip}
    params = {n: p for n, p in module._parameters.items() if p is not None}
    return {**params, **buffers}


def record_layers(model: nn.Module) -> dict[str, LayerRecord]:
    """``{layer name: {"type", attributes..., "tensors": {name: shape}}}`` for registered types."""
    layers = {}
    for name, module in model.named_modules():
        recorder = recorder_for(module)
        if recorder is not None:
            tensors = {n: list(t.shape) for n, t in _own_tensors(module).items()}
            layers[name] = {TYPE: type(module).__name__, **recorder(module), TENSORS: tensors}
    return layers


def _as_attribute(value: Any, current: Any) -> Any:
    """A JSON value in the type of the attribute it replaces (tensor, tuple or plain)."""
    if isinstance(current, torch.Tensor):
        return torch.tensor(value, dtype=current.dtype, device=current.device)
    return tuple(value) if isinstance(current, tuple) else value


def apply_layers(model: nn.Module, layers: dict[str, LayerRecord]) -> None:
    """Resize each recorded layer in place; parameters shared between layers stay shared."""
    # id(old tensor) -> (old, new); holding `old` keeps its id from being reused meanwhile.
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, record in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"the saved model has a layer {name!r} that the rebuilt model lacks; "
                "the model factory or its code changed since saving"
            ) from None
        record = dict(record)
        kind, shapes = record.pop(TYPE), record.pop(TENSORS)
        tensors = _own_tensors(module)
        if kind != type(module).__name__ or set(shapes) != set(tensors):
            raise CheckpointError(
                f"layer {name!r} was saved as a {kind} with tensors {sorted(shapes)} but the "
                f"rebuilt model has a {type(module).__name__} with {sorted(tensors)}; the model "
                "factory or its code changed since saving"
            )
        for attr, value in record.items():
            setattr(module, attr, _as_attribute(value, getattr(module, attr)))
        for tname, shape in shapes.items():
            old = tensors[tname]
            if list(old.shape) != shape:
                if id(old) not in replaced:
                    replaced[id(old)] = (old, _empty_like(old, shape))
                store = module._parameters if tname in module._parameters else module._buffers
                store[tname] = replaced[id(old)][1]


def _empty_like(old: torch.Tensor, shape: list[int]) -> torch.Tensor:
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        return nn.Parameter(new, requires_grad=old.requires_grad)
    return new
