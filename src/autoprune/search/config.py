"""The settings of a pruning run: one typed dataclass shared by the Python API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..criteria import list_criteria
from ..errors import AutopruneError
from ..graph import SCOPES
from ..train import TrainConfig
from ..transfer import TRANSFER_ORDERS
from .candidates import OBJECTIVES
from .granularity import check_granularity
from .schedules import ALLOCATIONS, SCHEDULES
from .scorers import SCORERS


def default_criteria() -> tuple[str, ...]:
    """Every registered criterion except the controls (``random``): the seed method's pool."""
    return tuple(n for kind in ("magnitude", "similarity", "saliency") for n in list_criteria(kind))


# channels_last off: on the CPU it halves the training speed of the small CIFAR / MNIST nets;
# turn it on for GPU runs.
def _recovery() -> TrainConfig:
    return TrainConfig(lr=0.01, channels_last=False, progress=False)


def _finetune() -> TrainConfig:
    return TrainConfig(lr=0.01, channels_last=False)


# A linear head on frozen features takes a higher rate than the whole network.
def _head_training() -> TrainConfig:
    return TrainConfig(lr=0.05, channels_last=False, progress=False)


def _adaptation() -> TrainConfig:
    return TrainConfig(lr=0.01, channels_last=False, progress=False)


def default_schedule(transfer: bool) -> str:
    """Saliency-then-similarity for transfer runs (the I2CT finding), else the whole pool."""
    return "saliency-then-similarity" if transfer else "auto"


@dataclass
class PruneConfig:
    """How to prune; ``autoprune prune`` options map onto these fields.

    Fractions of MACs (``target_macs_reduction``, ``step``, ``recover_every``) are of the
    *original* model's MACs in ``scope`` (:mod:`autoprune.graph.scopes`: ``all``, the default,
    counts every conv, linear and attention matmul; ``conv`` and ``stem`` restrict both the
    groups pruned and the MACs counted). ``cap`` bounds what any group may lose, as a
    fraction of its original channels (one channel always stays), and ``channel_multiple``
    makes every group keep a multiple of that many channels. ``recovery`` and ``finetune``
    are the trainer settings for brief recovery during the search and the final fine-tune; the
    search sets their ``epochs``, ``max_steps`` and ``seed`` from ``recover_steps``,
    ``finetune_epochs`` and ``seed``. With ``distill`` both train on
    ``(1 - distill_weight) * CE + distill_weight * T^2 * KL(teacher || student)`` at
    temperature ``distill_temperature``, the teacher being the unpruned model.

    ``granularity`` lists what may be removed, coarse to fine (:mod:`.granularity`:
    ``block``, ``layer``, ``channel``, ``weight``); the structured ones share the MACs target
    by ``macs_shares`` (cumulative, in order; equal when empty), ``weight`` masks the smallest
    weights, ``weight_step`` of all conv and linear weights per step, until ``weight_sparsity``
    of them are zero; a step after which recovery leaves the calibration loss above
    ``weight_loss_limit`` times its value at the phase's start is undone and ends the phase
    (None: reach ``weight_sparsity`` whatever it costs).

    ``transfer`` replaces the classifier head (``transfer_head``, found when None) for the
    data's classes and adapts the model first (:mod:`autoprune.transfer`): ``head_steps`` of
    ``head_training`` on the head alone, then, if ``transfer_order`` says so, ``adapt_steps``
    of ``adaptation`` on the whole network. ``schedule=None`` means
    :func:`default_schedule` for this ``transfer`` setting.
    """

    target_macs_reduction: float = 0.5
    criteria: tuple[str, ...] = field(default_factory=default_criteria)
    schedule: str | None = None  # None: default_schedule(transfer)
    saliency_fraction: float = 0.5  # saliency-then-similarity: switch at this part of the target
    allocation: str = "uniform"  # fixed: "uniform" or "global"
    step: float = 0.01
    cap: float = 0.75
    # Every group keeps a multiple of this many channels: ONNX Runtime's and oneDNN's fast CPU
    # convolutions work on blocks of 8 or 16 channels (docs/benchmarks/speed.md measures it).
    channel_multiple: int = 1
    # Defaults measured by bench/objective_distill.py (ResNet-20, -50 % MACs, same budget):
    # distillation +5.2 points with "loss", +2.4 with "loss_per_mac"; "loss" best with it.
    objective: str = "loss"
    scorer: str = "fast"
    scorer_options: dict[str, Any] = field(default_factory=dict)
    calib_size: int = 512  # matched the exhaustive choice in 23/23 ResNet-56 decisions (bench)
    taylor_size: int = 256  # calibration images the taylor gradients are taken on
    recover_every: float = 0.02
    recover_steps: int = 50
    recovery: TrainConfig = field(default_factory=_recovery)
    finetune_epochs: int = 0
    finetune: TrainConfig = field(default_factory=_finetune)
    distill: bool = True
    distill_temperature: float = 4.0
    distill_weight: float = 0.5
    ignored_layers: tuple[str, ...] = ()
    granularity: tuple[str, ...] = ("channel",)
    macs_shares: tuple[float, ...] = ()
    weight_sparsity: float = 0.5
    weight_step: float = 0.05
    # Lenient: a safety net for collapse (VGG-19 went from 0.39 to 2,159 once small early
    # layers were forced), not a brake on healthy runs (ResNet-56 at 50 %: 0.06 -> 0.16).
    weight_loss_limit: float | None = 4.0
    scope: str = "all"
    transfer: bool = False  # the API also turns it on when the data's classes are not the head's
    transfer_order: str = "adapt-then-prune"
    transfer_head: str | None = None
    head_steps: int = 100
    head_training: TrainConfig = field(default_factory=_head_training)
    adapt_steps: int = 300
    adaptation: TrainConfig = field(default_factory=_adaptation)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule is None:
            self.schedule = default_schedule(self.transfer)
        self.criteria = _names(self.criteria)
        self.ignored_layers = _names(self.ignored_layers)
        self.granularity = _names(self.granularity)
        self.macs_shares = tuple(float(s) for s in self.macs_shares)
        _fraction("target_macs_reduction", self.target_macs_reduction, open_right=True)
        _fraction("step", self.step, open_right=True)
        _fraction("cap", self.cap)
        _fraction("recover_every", self.recover_every)
        _fraction("weight_sparsity", self.weight_sparsity, open_right=True)
        _fraction("weight_step", self.weight_step)
        if not 0.0 <= self.saliency_fraction <= 1.0:
            raise AutopruneError(
                f"saliency_fraction must be in [0, 1], got {self.saliency_fraction}"
            )
        for registry, name in (
            (SCHEDULES, self.schedule),
            (ALLOCATIONS, self.allocation),
            (OBJECTIVES, self.objective),
            (SCORERS, self.scorer),
            (TRANSFER_ORDERS, self.transfer_order),
            (SCOPES, self.scope),
        ):
            registry.entry(name)
        SCHEDULES.get(self.schedule).check(self)
        check_granularity(self)
        for name, low in (
            ("calib_size", 1),
            ("channel_multiple", 1),
            ("taylor_size", 1),
            ("recover_steps", 0),
            ("finetune_epochs", 0),
            ("head_steps", 0),
            ("adapt_steps", 0),
        ):
            if getattr(self, name) < low:
                raise AutopruneError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.weight_loss_limit is not None and self.weight_loss_limit <= 1:
            raise AutopruneError(
                f"weight_loss_limit must be > 1 (or None), got {self.weight_loss_limit}"
            )
        if self.distill_temperature <= 0 or not 0.0 <= self.distill_weight <= 1.0:
            raise AutopruneError("distill_temperature must be > 0 and distill_weight in [0, 1]")

    def for_transfer(self, *, schedule_chosen: bool) -> PruneConfig:
        """These settings for a transfer run: its default schedule unless one was chosen."""
        schedule = self.schedule if schedule_chosen else default_schedule(True)
        return replace(self, transfer=True, schedule=schedule)


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A comma-separated string (as the CLI gives it) or a sequence, as a tuple of names."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(s.strip() for s in items if s.strip())


def _fraction(name: str, value: float, *, open_right: bool = False) -> None:
    if not (0.0 < value < 1.0 if open_right else 0.0 < value <= 1.0):
        bound = "1)" if open_right else "1]"
        raise AutopruneError(f"{name} must be in (0, {bound}, got {value}")
