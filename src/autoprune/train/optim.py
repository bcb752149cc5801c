"""Optimizer construction."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD (nesterov by default) with no weight decay on norms and biases.

    Decaying BN scales and biases only fights the normalisation; every recipe we compare with
    (timm, Torch-Pruning's benchmarks) excludes them, and so do we: 1-d parameters are exempt.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
    )
