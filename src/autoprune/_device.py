"""Device choice in one place."""

from __future__ import annotations

import torch

from .errors import AutopruneError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; an unavailable device is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutopruneError(f"device {name!r} asked for, but CUDA is not available here; use cpu")
    return device
