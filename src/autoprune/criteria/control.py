"""Control criteria: baselines any real criterion must beat."""

from __future__ import annotations

import zlib
from typing import Any

import torch

from ..graph import ChannelGroup
from ._base import register_criterion


@register_criterion("random", kind="control")
def random(group: ChannelGroup, *, seed: int = 0, **state: Any) -> torch.Tensor:
    """Uniform random scores, reproducible per (seed, group name)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(group.name.encode()))
    return torch.rand(group.channels, generator=generator)
