"""Training settings shared by the Python API, the CLI, and recovery inside pruning."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """How to train; the CLI's ``train`` options map one-to-one onto these fields.

    ``max_steps`` caps the optimizer steps across epochs (brief recovery inside pruning uses a
    fraction of an epoch); the learning-rate schedule then spans those steps.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_fraction: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = True  # mixed precision where a GPU is used; ignored on the CPU
    channels_last: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError("warmup_fraction must be in [0, 1)")
