"""Accuracy and loss of a model on a loader."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # percent
    loss: float  # mean cross-entropy
    samples: int


@torch.no_grad()
def evaluate_batches(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> EvalResult:
    """Top-1 accuracy (%) and mean cross-entropy over all batches, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = 0
    samples = 0
    try:
        for x, y in batches:
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
            correct += int((logits.argmax(1) == y).sum())
            samples += y.numel()
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("evaluate() got no batches")
    return EvalResult(100.0 * correct / samples, float(loss_sum) / samples, samples)
