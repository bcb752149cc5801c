"""Similarity criteria: a channel whose filters others can stand in for is redundant.

All three score on the concatenated producer filters (see ``_features``), through their Gram
matrix; lowest = most redundant. ``euclidean`` and ``cosine`` follow LAASP: each filter's
summed distance to all others. ``fpgm`` is the distance to the geometric median of the
filters (He et al. 2019), computed by Weiszfeld's iteration rather than approximated by the
summed distances.
"""

from __future__ import annotations

from typing import Any

import torch

from ..graph import ChannelGroup
from ._base import register_criterion
from ._features import filter_gram

_WEISZFELD_STEPS = 100


def _pairwise_distances(gram: torch.Tensor) -> torch.Tensor:
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).fill_diagonal_(0)
    return d2.sqrt()


def median_distances(gram: torch.Tensor, steps: int = _WEISZFELD_STEPS) -> torch.Tensor:
    """Distance of every point to the geometric median of all, from their Gram matrix.

    Weiszfeld's iteration keeps the median a weighted mean of the points, ``m = P.T w / sum(w)``,
    so every distance follows from ``gram = P P.T``: each step costs channels^2, not
    channels x features.
    """
    n = gram.shape[0]
    weights = torch.full((n,), 1.0 / n, dtype=gram.dtype)
    tiny = 1e-12 * float(gram.diagonal().max().clamp_min(1e-30))
    for _ in range(steps):
        gw = gram @ weights
        d2 = (gram.diagonal() - 2 * gw + weights @ gw).clamp_min(0)
        inv = 1.0 / d2.clamp_min(tiny).sqrt()
        new = inv / inv.sum()
        done = bool((new - weights).abs().max() < 1e-9)
        weights = new
        if done:
            break
    gw = gram @ weights
    return (gram.diagonal() - 2 * gw + weights @ gw).clamp_min(0).sqrt()


@register_criterion("fpgm", kind="similarity")
def fpgm(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """Distance of each channel's filters to their geometric median."""
    return median_distances(filter_gram(group)).float()


@register_criterion("euclidean", kind="similarity")
def euclidean(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """Sum of Euclidean distances from each channel's filters to all others'."""
    return _pairwise_distances(filter_gram(group)).sum(dim=1).float()


@register_criterion("cosine", kind="similarity")
def cosine(group: ChannelGroup, **state: Any) -> torch.Tensor:
    """Sum of cosine distances (1 - cos) from each channel's filters to all others'."""
    gram = filter_gram(group)
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    cos = (gram / norms[:, None] / norms[None, :]).fill_diagonal_(1.0)
    return (1.0 - cos).sum(dim=1).float()
