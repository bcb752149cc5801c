"""Accuracy and loss of a model on a loader."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .._forward import eval_mode
from ..task import CLASSIFICATION, Task


@dataclass(frozen=True)
class EvalResult:
    accuracy: float | None  # percent; None where the task has no metric (a custom loss)
    loss: float  # mean of the task's loss (cross-entropy by default)
    samples: int


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    task: Task = CLASSIFICATION,
) -> EvalResult:
    """Metric (%, top-1 accuracy by default) and mean loss over all batches, in eval mode."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct: float | None = 0.0
    samples = 0
    with eval_mode(model):
        for x, y in batches:
            outputs = model(x)
            loss_sum += task.loss_sum(outputs, y).double().cpu()
            hits = task.correct(outputs, y)
            correct = None if hits is None or correct is None else correct + float(hits)
            samples += len(y)
    if samples == 0:
        raise ValueError("evaluate() got no batches")
    accuracy = None if correct is None else 100.0 * correct / samples
    return EvalResult(accuracy, float(loss_sum) / samples, samples)
