"""What a model is trained and judged on: its loss, how its output is read, its metric.

Scoring candidates, Taylor saliency, recovery, fine-tuning and evaluation all compute "the
loss of the model on a batch"; they all do it through one :class:`Task`, so a model whose
``forward`` returns a tuple or a dict, or whose loss is not cross-entropy (a regression head,
a segmentation loss), prunes like a classifier does:

- ``output_adapter(outputs) -> Tensor`` picks the prediction out of what ``forward`` returns.
  The default, :func:`default_adapter`, takes a tensor as is, the first element of a tuple or
  list, and ``logits`` or ``out`` of a dict (or an object with a ``logits`` attribute, like a
  Hugging Face output).
- ``loss_fn(prediction, targets) -> Tensor`` is either per sample (shape ``[B]``) or the batch
  mean (a scalar), like ``F.cross_entropy`` with either reduction. Default: cross-entropy.
- ``metric(prediction, targets) -> Tensor`` scores each sample (1 correct, 0 wrong); its mean
  is the "accuracy" of reports. Default: top-1 accuracy when the loss is the default and the
  targets are class indices; with a custom loss none unless given, and reports show the loss.
- ``loss_floor``: the least one sample's loss can be (0 for cross-entropy, MSE, BCE). Knowing
  it lets the fast scorer stop scoring a candidate once its loss so far already loses to one
  scored on every image. Default: 0 for the default loss; unknown (``None``) for a custom one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import AutopruneError

OutputAdapter = Callable[[Any], torch.Tensor]
TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]

OUTPUT_KEYS = ("logits", "out")  # what the default adapter looks for in a dict output


def default_adapter(outputs: Any) -> torch.Tensor:
    """The prediction in ``outputs``: a tensor, a tuple's first, a dict's ``logits``/``out``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        key = next((k for k in OUTPUT_KEYS if k in outputs), None)
        if key is None:
            raise AutopruneError(
                f"the model returned a dict with keys {sorted(map(str, outputs))} and none of "
                f"{', '.join(OUTPUT_KEYS)}: pass output_adapter=lambda out: out['your_key']"
            )
        return default_adapter(outputs[key])
    if isinstance(outputs, Sequence) and not isinstance(outputs, str) and outputs:
        return default_adapter(outputs[0])
    if isinstance(getattr(outputs, "logits", None), torch.Tensor):
        return outputs.logits
    raise AutopruneError(
        f"cannot read a prediction from the model's {type(outputs).__name__} output: pass "
        "output_adapter=fn, with fn(outputs) returning the tensor the loss is computed on"
    )


def top1(prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """1 where the highest score is the target class; None where targets are not class indices."""
    if prediction.dim() != 2 or targets.dim() != 1 or targets.is_floating_point():
        return None
    return (prediction.argmax(1) == targets).float()


@dataclass(frozen=True)
class Task:
    """The loss, output adapter and metric every loss in autoprune is computed with."""

    loss_fn: TaskLoss | None = None  # None: cross-entropy
    output_adapter: OutputAdapter = default_adapter
    metric: Metric | None = None
    loss_floor: float | None = None

    def __post_init__(self) -> None:
        if self.loss_fn is None:
            if self.metric is None:
                object.__setattr__(self, "metric", top1)
            if self.loss_floor is None:
                object.__setattr__(self, "loss_floor", 0.0)

    @classmethod
    def of(
        cls,
        task: Task | None = None,
        loss_fn: TaskLoss | None = None,
        output_adapter: OutputAdapter | None = None,
    ) -> Task:
        """``task``, or one made of the shortcuts; both at once is refused."""
        if task is not None:
            if loss_fn is not None or output_adapter is not None:
                raise AutopruneError("pass either task= or loss_fn=/output_adapter=, not both")
            return task
        return cls(loss_fn, output_adapter or default_adapter)

    @property
    def classification(self) -> bool:
        """Cross-entropy on class scores: distillation matches softened class probabilities."""
        return self.loss_fn is None

    def prediction(self, outputs: Any) -> torch.Tensor:
        return self.output_adapter(outputs)

    def losses(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """Loss per sample (float32, ``[B]``) of a model's raw ``outputs``.

        A ``loss_fn`` that returns only the batch mean is called once per sample here.
        """
        pred = self.prediction(outputs)
        if self.loss_fn is None:  # per pixel for dense targets: their mean per sample
            loss = F.cross_entropy(pred.float(), targets, reduction="none")
            return loss.reshape(len(targets), -1).mean(1)
        loss = _per_sample(self.loss_fn(pred, targets), len(targets))
        if loss is not None:
            return loss
        parts = zip(pred.split(1), targets.split(1), strict=True)
        return torch.stack([self.loss_fn(p, t).float().mean() for p, t in parts])

    def loss_sum(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """Summed loss over the batch (float32 scalar): what scorers add up per image."""
        if self.loss_fn is None:
            return self.losses(outputs, targets).sum()
        loss = self.loss_fn(self.prediction(outputs), targets)
        per_sample = _per_sample(loss, len(targets))
        return per_sample.sum() if per_sample is not None else loss.float() * len(targets)

    def mean_loss(
        self, outputs: Any, targets: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Batch-mean loss to train on (``label_smoothing`` applies to cross-entropy only)."""
        pred = self.prediction(outputs)
        if self.loss_fn is None:
            return F.cross_entropy(pred, targets, label_smoothing=label_smoothing)
        loss = self.loss_fn(pred, targets)
        per_sample = _per_sample(loss, len(targets))
        return loss if per_sample is None else per_sample.mean()

    def correct(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor | None:
        """Summed metric over the batch; None where the task has no metric for these targets."""
        if self.metric is None:
            return None
        scores = self.metric(self.prediction(outputs), targets)
        return None if scores is None else scores.sum()


def _per_sample(loss: torch.Tensor, batch: int) -> torch.Tensor | None:
    """A loss per sample (``[B]``; the mean over any further dimensions, as an unreduced
    ``F.mse_loss`` gives them), or None for a scalar, the batch mean."""
    if loss.dim() == 0:
        return None
    if loss.shape[0] != batch:
        raise AutopruneError(
            f"loss_fn returned shape {tuple(loss.shape)}: return a scalar (the batch mean) or "
            f"one loss per sample ({batch})"
        )
    return loss.float().reshape(batch, -1).mean(1)


CLASSIFICATION = Task()
