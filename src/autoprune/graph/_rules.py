"""Our rules on top of Torch-Pruning: pruners for layers it does not know, and which layers a
prunable group may contain.

Torch-Pruning couples channels through every op it traces; what it cannot know is how a layer
of ours maps channels (:class:`ChannelPadShortcut`) or that a user's layer must stay as it is
(an ignored layer with parameters of its own). Both are told to it here as "customized pruners".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..layers import ChannelPadShortcut

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


def member_kind(module: nn.Module) -> str | None:
    """How masking and MAC accounting treat a group member; None: the group cannot be pruned.

    ``conv``/``linear``/``shortcut`` mix channels (their in- and out-channels are separate),
    ``depthwise``/``norm`` act per channel, ``layernorm`` normalises across the channels.
    Grouped (non-depthwise) convs, GroupNorm, attention and recurrent layers are left alone:
    removing one channel from them is not a per-channel change.
    """
    if isinstance(module, ChannelPadShortcut):
        return "shortcut"
    if isinstance(module, CONV_TYPES):
        if module.groups == 1:
            return "conv"
        if module.groups == module.in_channels == module.out_channels:
            return "depthwise"
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, NORM_TYPES):
        return "norm"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "layernorm"
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
