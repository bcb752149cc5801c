"""Similarity criteria: a channel whose filters others can stand in for is redundant.

All three score on the concatenated producer filters (see ``_features``); lowest = most
redundant. ``euclidean`` and ``cosine`` follow LAASP: each filter's summed distance to all
others. ``fpgm`` is the distance to the geometric median of the filters (He et al. 2019),
computed by Weiszfeld's iteration rather than approximated by the summed distances.
"""

from __future__ import annotations

from typing import Any

import torch

from ..graph import ChannelGroup
from ._base import register_criterion
from ._features import filter_matrix

_WEISZFELD_STEPS = 100


def geometric_median(points: torch.Tensor, steps: int = _WEISZFELD_STEPS) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to ``points`` (rows)."""
    median = points.mean(dim=0)
    scale = points.abs().max().clamp_min(1e-12)
    for _ in range(steps):
        dist = (points - median).norm(dim=1).clamp_min(1e-12 * scale)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() <= 1e-7 * scale:
            return new
        median = new
    return median


@register_criterion("fpgm", kind="similarity")
def fpgm(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """Distance of each channel's filters to their geometric median."""
    x = filter_matrix(group)
    return (x - geometric_median(x)).norm(dim=1)


@register_criterion("euclidean", kind="similarity")
def euclidean(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """Sum of Euclidean distances from each channel's filters to all others'."""
    x = filter_matrix(group)
    return torch.cdist(x[None], x[None])[0].sum(dim=1)


@register_criterion("cosine", kind="similarity")
def cosine(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """Sum of cosine distances (1 - cos) from each channel's filters to all others'."""
    x = filter_matrix(group)
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (1.0 - unit @ unit.T).sum(dim=1)
