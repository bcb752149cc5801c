"""Our rules on top of Torch-Pruning: pruners for layers it does not know, and which layers a
prunable group may contain.

Torch-Pruning couples channels through every op it traces; what it cannot know is how a layer
of ours maps channels (:class:`ChannelPadShortcut`), that a layer carries channels one to one
through reshapes it cannot follow (patch unfolding, layer scales: :data:`CHANNELWISE_TYPES`),
or that a user's layer must stay as it is (an ignored layer with parameters of its own). All
are told to it here as "customized pruners"; attention layers have theirs in ``._attention``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..attention import PatchFold, PatchUnfold
from ..layers import ChannelPadShortcut
from .custom import layer_pruner

CONV_TYPES = (nn.modules.conv._ConvNd,)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)

# Module types whose parameters Torch-Pruning knows how to slice. A layer of any other type
# that owns parameters cannot be pruned correctly and must be ignored by the user.
TP_PARAM_TYPES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.LSTM,
)

# Torch-Pruning's stand-ins for functional ops (add, cat, view, ...): they carry channels and
# own nothing, so they are never members of a group.
TP_DUMMY_OPS = (
    tp.ops._ElementWiseOp,
    tp.ops._ReshapeOp,
    tp.ops._ConcatOp,
    tp.ops._SplitOp,
    tp.ops._UnbindOp,
    tp.ops._ExpandOp,
    tp.ops._SliceOp,
)


# Channel-wise layers whose statistics run across the channels (an RMS over them, GRN's mean
# of the channel norms): zeroing a channel is not its removal, so masking runs them as pruned
# (``._grouped.run_as_pruned``).
ACROSS_CHANNELS = (
    "timm.layers.norm.RmsNorm",
    "timm.layers.norm.RmsNormFp32",
    "timm.layers.norm.RmsNorm2d",
    "timm.layers.norm.RmsNorm2dFp32",
    "timm.layers.norm_act.RmsNormAct2d",
    "timm.layers.norm_act.RmsNormAct2dFp32",
    "timm.layers.grn.GlobalResponseNorm",
)

# Layers that carry channels one to one but move them between dims (a feature map's dim 1,
# tokens' last dim), or scale each channel by a parameter of their own. Torch-Pruning sees
# each as one layer whose input and output channels are the same ones (their internals are
# hidden from its trace). Foreign classes are named "module.QualName", so their library need
# not be importable.
CHANNELWISE_TYPES: tuple[type[nn.Module] | str, ...] = (
    PatchUnfold,
    PatchFold,
    "timm.models.efficientformer.Flat",
    "timm.layers.layer_scale.LayerScale",
    "timm.layers.layer_scale.LayerScale2d",
    "timm.layers.evo_norm.EvoNorm2dB0",  # EvoNorms: per channel, or per group (``._grouped``)
    "timm.layers.evo_norm.EvoNorm2dB1",
    "timm.layers.evo_norm.EvoNorm2dB2",
    "timm.layers.evo_norm.EvoNorm2dS0",
    "timm.layers.evo_norm.EvoNorm2dS1",
    "timm.layers.evo_norm.EvoNorm2dS2",
    "timm.models.metaformer.Scale",  # views its scale to a ``shape`` of its own (``._grouped``)
    *ACROSS_CHANNELS,
)


def matches(module: nn.Module, types: tuple[type[nn.Module] | str, ...]) -> bool:
    """Whether ``module`` is an instance of one of ``types`` (classes or "module.QualName")."""
    for cls in type(module).__mro__:
        if cls in types or f"{cls.__module__}.{cls.__qualname__}" in types:
            return True
    return False


def channels_of(tensor: torch.Tensor) -> int:
    """Channels of an activation: dim 1 of a feature map, the last dim of (batch, tokens, dim)."""
    return tensor.shape[-1] if tensor.dim() == 3 else tensor.shape[1]


def channelwise_dim(module: nn.Module, output: torch.Tensor) -> int:
    """Where a channel-wise layer's output holds its channels: the last dim of tokens, and of a
    channels-last map its own 1-D parameters broadcast over (timm's ``LayerScale`` in MambaOut);
    dim 1 otherwise, or where both fit and the class says ``2d``."""
    own = [p.numel() for p in module.parameters(recurse=False) if p.dim() == 1]
    if output.dim() == 3 or not own or output.shape[-1] != own[0]:
        return -1 if output.dim() == 3 else 1
    return 1 if output.shape[1] == own[0] and "2d" in type(module).__name__.lower() else -1


def member_kind(module: nn.Module) -> str | None:
    """How masking and MAC accounting treat a group member; None: the group cannot be pruned.

    ``conv``/``linear``/``shortcut`` mix channels (their in- and out-channels are separate),
    ``depthwise``/``norm``/``channelwise`` act per channel, ``layernorm`` normalises across
    the channels.
    Grouped convs and GroupNorms lose channels in blocks (see ``._grouped``): a grouped conv
    mixes within its groups (``conv``), a depthwise conv with a multiplier and a GroupNorm
    act per block of channels. Transposed grouped convs, attention and recurrent layers are
    left alone: removing one channel from them is not a per-channel change.
    """
    spec = layer_pruner(module)  # a user's registered layer type (see .custom)
    if spec is not None:
        return "channelwise" if spec.per_channel else "custom"
    if isinstance(module, ChannelPadShortcut):
        return "shortcut"
    if isinstance(module, CONV_TYPES):
        if module.groups == 1:
            return "conv"
        if module.transposed:
            return None
        return "depthwise" if module.groups == module.in_channels else "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (*NORM_TYPES, nn.GroupNorm)):
        return "norm"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "layernorm"
    if matches(module, CHANNELWISE_TYPES):
        return "channelwise"
    return None


class ChannelPadPruner(tp.pruner.BasePruningFunc):
    """Prunes a :class:`ChannelPadShortcut`: its in- and out-channels are separate dependencies.

    Removing output channels drops entries of the channel map; removing input channel ``c``
    turns the outputs that copied ``c`` into zero channels (exactly what they become when ``c``
    is gone) and renumbers the rest. So the stages before and after an option-A shortcut are
    two groups instead of one.
    """

    TARGET_MODULES = ChannelPadShortcut

    def prune_out_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> nn.Module:
        keep = torch.ones(layer.out_channels, dtype=torch.bool)
        keep[list(idxs)] = False
        layer.set_index(layer.index[keep.to(layer.index.device)], layer.in_channels)
        return layer

    def prune_in_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> nn.Module:
        keep = torch.ones(layer.in_channels, dtype=torch.bool)
        keep[list(idxs)] = False
        renumber = torch.full((layer.in_channels + 1,), -1, dtype=torch.long)
        renumber[:-1][keep] = torch.arange(int(keep.sum()))
        # index -1 reads renumber[-1] == -1: zero channels stay zero channels.
        index = renumber.to(layer.index.device)[layer.index]
        layer.set_index(index, int(keep.sum()))
        return layer

    def get_out_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.in_channels


class OpaquePruner(tp.pruner.BasePruningFunc):
    """Stands in for an ignored layer Torch-Pruning cannot prune: a black box of known width.

    Its in- and out-channels are separate dependencies, so the black box does not couple what
    comes before it with what comes after; every group touching it is frozen by the graph, so
    the prune functions are never reached.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channels: dict[nn.Module, tuple[int, int]] = {}  # (in, out), filled while tracing

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError(f"{type(layer).__name__} is ignored and cannot be pruned")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError(f"{type(layer).__name__} is ignored and cannot be pruned")

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return self.channels.get(layer, (None, None))[1]

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return self.channels.get(layer, (None, None))[0]


class ChannelwisePruner(tp.pruner.BasePruningFunc):
    """Prunes a :data:`CHANNELWISE_TYPES` layer: one set of channels in and out.

    Its own 1-D parameters (a layer scale's ``gamma``) lose the pruned entries; a
    parameter-free layer's width is the one traced, kept up to date here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channels: dict[nn.Module, int] = {}  # traced widths of parameter-free layers

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        for name, p in list(layer.named_parameters(recurse=False)):
            if p.dim() == 1:
                keep = torch.ones(p.numel(), dtype=torch.bool)
                keep[list(idxs)] = False
                sliced = p.detach()[keep.to(p.device)].clone()
                setattr(layer, name, nn.Parameter(sliced, requires_grad=p.requires_grad))
        if layer in self.channels:
            self.channels[layer] -= len(idxs)
        if isinstance(getattr(layer, "normalized_shape", None), tuple):  # timm's RmsNorm2d
            layer.normalized_shape = (layer.normalized_shape[0] - len(idxs),)
        return layer

    prune_in_channels = prune_out_channels  # one set of channels: Torch-Pruning couples them

    def get_out_channels(self, layer: nn.Module) -> int | None:
        own = [p.numel() for p in layer.parameters(recurse=False) if p.dim() == 1]
        return own[0] if own else self.channels.get(layer)

    get_in_channels = get_out_channels


class ScaledConvPruner(tp.pruner.function.ConvPruner):
    """Prunes a conv subclass with parameters of its own along its output channels (timm's
    ``ScaledStdConv2d`` and its ``gain``): Torch-Pruning slices ``weight`` and ``bias`` only,
    which would leave the others a size too big for the forward. Given to each such layer by
    ``._grouped.layer_pruners``."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        out = layer.out_channels
        keep = torch.ones(out, dtype=torch.bool)
        keep[list(idxs)] = False
        super().prune_out_channels(layer, idxs)
        for name, p in list(layer.named_parameters(recurse=False)):
            if name not in ("weight", "bias") and p.dim() and p.shape[0] == out:
                sliced = p.detach()[keep.to(p.device)].clone()
                setattr(layer, name, nn.Parameter(sliced, requires_grad=p.requires_grad))
        return layer
