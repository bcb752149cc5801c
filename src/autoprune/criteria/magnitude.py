"""Magnitude criteria: small filters and small BatchNorm scales matter least."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AutopruneError
from ..graph import ChannelGroup
from ._base import register_criterion
from ._features import filter_gram, filter_l1


@register_criterion("l1", kind="magnitude")
def l1(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """L1 norm of each channel's filters (Li et al. 2017), summed over producing layers."""
    return filter_l1(group).float()


@register_criterion("l2", kind="magnitude")
def l2(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """L2 norm of each channel's concatenated filters."""
    return filter_gram(group).diagonal().sqrt().float()


@register_criterion("bn_scale", kind="magnitude")
def bn_scale(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """|gamma| of the group's BatchNorm layers (network slimming), summed over them."""
    scores = torch.zeros(group.channels)
    found = False
    for m in group.members:
        bn = m.module
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.weight is not None:
            gamma = bn.weight.detach().abs().to(scores)
            scores.index_add_(0, m.group_idxs, gamma[m.idxs])
            found = True
    if not found:
        raise AutopruneError(f"group {group.name!r} has no affine BatchNorm for 'bn_scale'")
    return scores
