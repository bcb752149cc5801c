"""Training inside a pruning run: brief recovery between steps and the final fine-tune.

Both train the model being pruned with the masks of weight pruning held, from the epoch after
the last one drawn (``SearchState.data_epochs``), so that successive trainings see different
batches and a resumed run draws exactly what an uninterrupted one would. With ``distill`` they
learn from the unpruned model as well (:func:`autoprune.train.distillation`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..data import BatchLoader, UserBatches
from ..task import CLASSIFICATION, Task
from ..train import LossFn, TrainConfig, TrainResult, distillation, fit
from .calibration import CalibrationSet
from .config import PruneConfig
from .granularity.weight import masks_held
from .state import SearchState

Loader = BatchLoader | UserBatches
Recover = Callable[[nn.Module], None]  # trains the model being pruned in place, briefly


@dataclass
class SearchData:
    """A run's data, ready to use; every part may be missing.

    ``train(train_config)`` gives shuffled, augmented training batches at that config's batch
    size and memory layout (for recovery and fine-tuning); ``calib`` is the calibration set
    candidates are scored on; ``val`` the held-out batches accuracies are measured on.
    ``task`` is the loss, output adapter and metric of all of them (the calibration set
    carries the same one).
    """

    train: Callable[[TrainConfig], Loader] | None = None
    calib: CalibrationSet | None = None
    val: Loader | None = None
    dataset: str | None = None
    task: Task = field(default=CLASSIFICATION)


class Trainer:
    """The run's trainings on ``data.train``; ``state`` is the run's, read and advanced here."""

    def __init__(
        self,
        config: PruneConfig,
        data: SearchData,
        state: SearchState,
        teacher: nn.Module | None,
    ) -> None:
        self.config, self.data, self.state, self.teacher = config, data, state, teacher

    def recover(self, model: nn.Module) -> None:
        """Brief training with a fresh optimizer (the parameters changed shape): the default
        ``recover`` of :class:`~autoprune.search.Pruner` in :func:`run_search`."""
        assert self.data.train is not None
        config = self.config
        loader = self.data.train(config.recovery)
        epochs = math.ceil(config.recover_steps / len(loader))
        train_config = replace(
            config.recovery,
            epochs=epochs,
            max_steps=config.recover_steps,
            seed=config.seed,
            progress=False,
        )
        self._fit(model, loader, train_config, epoch_offset=self.state.data_epochs)
        self.state.data_epochs += epochs

    def finetune(
        self,
        model: nn.Module,
        checkpoint: str | os.PathLike[str] | None,
        *,
        resumed: bool,
        progress: bool,
    ) -> TrainResult:
        """``finetune_epochs`` of the final fine-tune, checkpointed to ``checkpoint``."""
        assert self.data.train is not None
        config = self.config
        loader = self.data.train(config.finetune)
        train_config = replace(
            config.finetune,
            epochs=config.finetune_epochs,
            max_steps=None,
            seed=config.seed,
            progress=progress,
        )
        return self._fit(
            model,
            loader,
            train_config,
            epoch_offset=self.state.data_epochs,
            val_loader=self.data.val,
            checkpoint=checkpoint,
            resume=resumed,
        )

    def _fit(
        self, model: nn.Module, loader: Loader, train_config: TrainConfig, **kwargs: Any
    ) -> TrainResult:
        loss_fn, task = self._loss_fn(train_config), self.data.task
        with masks_held(model):
            result = fit(model, loader, train_config, loss_fn=loss_fn, task=task, **kwargs)
        # One memory layout outside training, so a resumed run computes bit for bit the same.
        model.to(memory_format=torch.contiguous_format)
        return result

    def _loss_fn(self, train_config: TrainConfig) -> LossFn | None:
        """The task's loss, or mixed with distillation from the unpruned model."""
        if self.teacher is None:
            return None
        config = self.config
        return distillation(
            self.teacher,
            config.distill_temperature,
            config.distill_weight,
            train_config.label_smoothing,
            self.data.task,
        )
