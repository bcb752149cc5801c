"""Training and fine-tuning."""

from .config import TrainConfig
from .optim import build_optimizer
from .schedules import SCHEDULES
from .trainer import (
    EpochRecord,
    LossFn,
    TrainResult,
    cross_entropy,
    distillation,
    fit,
    task_loss,
)

__all__ = [
    "SCHEDULES",
    "EpochRecord",
    "LossFn",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "cross_entropy",
    "distillation",
    "fit",
    "task_loss",
]
