"""Devices in one place: which one to run on, and moving what a user passes to the model's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .errors import AutopruneError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; an unavailable device is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutopruneError(f"device {name!r} asked for, but CUDA is not available here; use cpu")
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are (CPU for a model without any)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def follow(value: Any, model: nn.Module) -> Any:
    """``value`` (a tensor, or tensors nested in tuples, lists and dicts) on the model's device."""
    device = model_device(model)
    return tree_map_only(torch.Tensor, lambda t: t.to(device), value)
