"""Parameter-free layers that pruning has to understand.

:class:`ChannelPadShortcut` is the CIFAR ResNet "option A" shortcut (subsample, then zero-pad
channels) written as a gather with zero fill. A plain ``F.pad`` can only say "p zeros on each
side", so pruning either stage would have to drag the other along; an explicit channel map
lets the engine prune the channels before and after the shortcut independently, and the map
shrinks with them. :class:`ChannelSplit` is a channel split whose piece sizes shrink with
the channels pruned from each piece.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelPadShortcut(nn.Module):
    """``out[:, k] = x[:, ::s, ::s][:, index[k]]``, or zero where ``index[k] == -1``.

    Built dense it equals ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, pad_lo, pad_hi))``. The map is
    architecture, not a weight: it is a non-persistent buffer, and saving records it with the
    layer's shape.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels ({out_channels}) < in_channels ({in_channels})")
        pad_lo = (out_channels - in_channels) // 2
        index = torch.full((out_channels,), -1, dtype=torch.long)
        index[pad_lo : pad_lo + in_channels] = torch.arange(in_channels)
        self.stride = stride
        self.in_channels = in_channels
        self.register_buffer("index", index, persistent=False)

    @property
    def out_channels(self) -> int:
        return self.index.numel()

    def set_index(self, index: torch.Tensor, in_channels: int) -> None:
        """Replace the channel map (used by pruning and loading)."""
        index = index.to(dtype=torch.long, device=self.index.device)
        if index.numel() and int(index.max()) >= in_channels:
            raise ValueError("channel map points past the input channels")
        self.in_channels = in_channels
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # One zero channel appended at position in_channels serves every -1 entry.
        x = F.pad(x, (0, 0, 0, 0, 0, 1))
        gather = torch.where(self.index < 0, self.in_channels, self.index)
        return x.index_select(1, gather)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class ChannelSplit(nn.Module):
    """``torch.split(x, sizes, dim)`` whose sizes follow pruning.

    A split written in a model's code (``x.chunk(2, 1)``, ``x.split(self.width, 1)``, or on the
    last dim of a channels-last map after a Linear: MambaOut) keeps its sizes when channels are
    pruned; the pruning graph rewrites it into this layer, which the graph tells which input
    channels are gone.
    """

    def __init__(self, sizes: list[int], dim: int = 1) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.dim = dim

    def remove(self, idxs: list[int]) -> None:
        """Input channels ``idxs`` are gone: each piece loses those that were in it."""
        self.sizes = shrink_sizes(self.sizes, idxs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, self.sizes, dim=self.dim)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, dim={self.dim}"


def shrink_sizes(sizes: list[int], idxs: list[int]) -> list[int]:
    """Sizes of consecutive pieces after channels ``idxs`` of their concatenation are gone."""
    bounds = torch.tensor(sizes).cumsum(0)
    piece = torch.bucketize(torch.as_tensor(idxs, dtype=torch.long), bounds, right=True)
    lost = torch.bincount(piece, minlength=len(sizes))
    return [s - int(n) for s, n in zip(sizes, lost, strict=True)]
