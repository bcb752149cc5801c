"""The settings of a pruning run: one typed dataclass shared by the Python API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .._registry import Registry
from ..criteria import CRITERIA, list_criteria
from ..errors import AutopruneError
from ..graph import SCOPES
from ..measure.latency_table import TIMERS
from ..train import TrainConfig
from ..transfer import TRANSFER_ORDERS
from .candidates import OBJECTIVES
from .granularity import GRANULARITIES, check_granularity
from .schedules import ALLOCATIONS, SCHEDULES
from .scorers import SCORERS

# With a latency target the granularities before ``channel`` take this share of it: a layer's
# fixed cost stays until the layer goes. All of it (``macs_shares=(1, 0)``) did better on
# ResNet-56 and worse on MobileNetV2; blocks and channels competing every step in one pool
# did worse on both (docs/benchmarks/latency_shares*.md).
LATENCY_COARSE_SHARE = 0.75


def default_criteria() -> tuple[str, ...]:
    """Every registered criterion except the controls (``random``): the seed method's pool."""
    return tuple(n for kind in ("magnitude", "similarity", "saliency") for n in list_criteria(kind))


# channels_last off: slower on the CPU for the small CIFAR / MNIST nets; turn it on for GPU runs.
def _recovery() -> TrainConfig:
    return TrainConfig(lr=0.01, channels_last=False, progress=False)


def _finetune() -> TrainConfig:
    return TrainConfig(lr=0.01, channels_last=False)


# A linear head on frozen features takes a higher rate than the whole network.
def _head_training() -> TrainConfig:
    return TrainConfig(lr=0.05, channels_last=False, progress=False)


def _adaptation() -> TrainConfig:
    return TrainConfig(lr=0.01, channels_last=False, progress=False)


def _cli(
    help: str,
    *,
    choices: Registry[Any] | None = None,
    option: str | None = None,
    aliases: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A field's command-line option (``autoprune prune``): help text, the registry its names
    come from, the option's name when not ``--field-name``, and other names it answers to
    (:mod:`autoprune.cli._config_options` reads them). A ``TrainConfig`` field's option sets
    its learning rate."""
    return {
        "help": help,
        "choices": choices,
        "option": option,
        "aliases": aliases,
    }


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
    ``block``, ``layer``, ``channel``, ``weight``; None: ``channel``, or ``block,channel`` with a
    latency target); the structured ones share the target by ``macs_shares`` (cumulative, in
    order; a share of 0: only what the ones before leave; when empty: equal, but with a latency
    target the coarser ones take :data:`LATENCY_COARSE_SHARE` of it and ``channel`` the
    rest), ``weight`` masks the smallest weights, ``weight_step`` of all conv and linear
    weights per step, until ``weight_sparsity`` of them are zero; a step after which recovery
    leaves the calibration loss above ``weight_loss_limit`` times its value at the phase's
    start is undone and ends the phase
    (None: reach ``weight_sparsity`` whatever it costs). ``adapt_norms``: blocks and layers
    are scored, and the chosen one applied, with BatchNorm statistics re-estimated on the
    calibration images (:mod:`.granularity.norm_stats`); ``break_unit_ties``: of those whose
    losses the calibration images cannot tell apart, the one removing the fewest parameters
    (:func:`.granularity.units.fewest_params_of_tied`). ``verify_graph``: before channels are
    pruned, every group loses one unit on a copy and those whose pruned outputs differ from the
    masked ones are frozen (:func:`autoprune.graph.verify_groups`).

    ``transfer`` replaces the classifier head (``transfer_head``, found when None) for the
    data's classes and adapts the model first (:mod:`autoprune.transfer`): ``head_steps`` of
    ``head_training`` on the head alone, then, if ``transfer_order`` says so, ``adapt_steps``
    of ``adaptation`` on the whole network. ``schedule=None`` means
    :func:`default_schedule` for this ``transfer`` setting.
    """

    target_macs_reduction: float = field(
        default=0.5,
        metadata=_cli(
            "Fraction of the MACs to remove (0.5 = half).",
            option="--target-macs",
            aliases=("--target-flops",),
        ),
    )
    target_latency_reduction: float | None = field(
        default=None,
        metadata=_cli(
            "Fraction of the predicted latency on --latency-backend at --latency-batch to "
            "remove (0.5 = 2x faster), instead of --target-macs (0: a MACs target).",
            option="--target-latency",
        ),
    )
    latency_backend: str = field(
        default="eager",
        metadata=_cli("With --target-latency: the backend to be fast on.", choices=TIMERS),
    )
    latency_batch: int = field(
        default=1, metadata=_cli("With --target-latency: the batch size to be fast at.")
    )
    criteria: tuple[str, ...] = field(
        default_factory=default_criteria,
        metadata=_cli("Comma-separated criteria pool.", choices=CRITERIA),
    )
    schedule: str | None = field(
        default=None,
        metadata=_cli(
            "Default: auto; saliency-then-similarity when transferring.", choices=SCHEDULES
        ),
    )
    saliency_fraction: float = field(
        default=0.5, metadata=_cli("saliency-then-similarity: switch at this part of the target.")
    )
    allocation: str = field(
        default="uniform", metadata=_cli("With --schedule fixed.", choices=ALLOCATIONS)
    )
    step: float = field(
        default=0.01, metadata=_cli("MACs one iteration removes, as a fraction of the original.")
    )
    cap: float = field(
        default=0.75, metadata=_cli("Most of a group's original channels that may go.")
    )
    # ONNX Runtime's and oneDNN's fast CPU convolutions work on blocks of 8 or 16 channels.
    channel_multiple: int = field(
        default=1,
        metadata=_cli(
            "Keep a multiple of this many channels per group (8 or 16: faster CPU inference, "
            "see docs/benchmarks/speed.md)."
        ),
    )
    # The default objective with distillation: docs/benchmarks/objective_distill.md.
    objective: str | None = field(
        default=None,
        metadata=_cli(
            "Default: loss; loss_per_latency with --target-latency (its steps snap to the "
            "backend's widths, so their sizes vary).",
            choices=OBJECTIVES,
        ),
    )
    scorer: str = field(default="fast", metadata=_cli("", choices=SCORERS))
    scorer_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_cli("The scorer's settings as JSON, e.g. '{\"keep\": 0.75}'."),
    )
    # How often the fast scorer agrees with the exhaustive one: docs/benchmarks/search_quality.md.
    calib_size: int = field(
        default=512, metadata=_cli("Calibration images candidates are scored on.")
    )
    taylor_size: int = field(
        default=256, metadata=_cli("Calibration images taylor's gradients are taken on.")
    )
    recover_every: float = field(
        default=0.02, metadata=_cli("Recover each time this fraction of the MACs is gone.")
    )
    recover_steps: int = field(default=50, metadata=_cli("Optimizer steps per recovery (0: none)."))
    recovery: TrainConfig = field(
        default_factory=_recovery, metadata=_cli("Recovery learning rate.", option="--lr")
    )
    finetune_epochs: int = field(
        default=0, metadata=_cli("Epochs of fine-tuning after the search.")
    )
    finetune: TrainConfig = field(
        default_factory=_finetune,
        metadata=_cli("Fine-tuning learning rate.", option="--finetune-lr"),
    )
    distill: bool = field(
        default=True, metadata=_cli("Distil from the unpruned model while training.")
    )
    distill_temperature: float = field(default=4.0, metadata=_cli("Distillation temperature."))
    distill_weight: float = field(
        default=0.5, metadata=_cli("Weight of the distillation term (the task loss has the rest).")
    )
    ignored_layers: tuple[str, ...] = field(
        default=(), metadata=_cli("Comma-separated layers to keep unpruned.")
    )
    granularity: tuple[str, ...] | None = field(
        default=None,
        metadata=_cli(
            "What to remove, coarse to fine, comma-separated (e.g. block,layer,channel,weight); "
            "default: channel, block,channel with --target-latency.",
            choices=GRANULARITIES,
        ),
    )
    macs_shares: tuple[float, ...] = field(
        default=(),
        metadata=_cli(
            "Comma-separated shares of the target per structured granularity (default: equal; "
            "with --target-latency blocks and layers take 0.75, channels the rest; a share of "
            "0: only what the ones before leave)."
        ),
    )
    weight_sparsity: float = field(
        default=0.5, metadata=_cli("With --granularity ...,weight: the share of weights zeroed.")
    )
    weight_step: float = field(
        default=0.05, metadata=_cli("With ...,weight: the share of all weights one step zeroes.")
    )
    # A safety net for collapse, not a brake on healthy runs: docs/benchmarks/multigrain.md.
    weight_loss_limit: float | None = field(
        default=4.0,
        metadata=_cli(
            "With ...,weight: undo the step and end the weight phase where recovery leaves the "
            "calibration loss above this multiple of its value at the phase's start (0: reach "
            "--weight-sparsity at any cost)."
        ),
    )
    adapt_norms: bool = field(
        default=True,
        metadata=_cli(
            "Score and apply block and layer removals with BatchNorm statistics re-estimated "
            "on the calibration images (adaptive BN)."
        ),
    )
    break_unit_ties: bool = field(
        default=False,
        metadata=_cli(
            "Where block (layer) removals' calibration losses differ by less than one standard "
            "error of their per-image difference, remove the one with the fewest parameters."
        ),
    )
    verify_graph: bool = field(
        default=True,
        metadata=_cli(
            "Before pruning channels, prune one of every group on a copy and freeze the groups "
            "whose pruned outputs differ from the masked ones (see graph/_verify.py)."
        ),
    )
    scope: str = field(
        default="all",
        metadata=_cli(
            "Layers pruned and MACs counted (stem: a hybrid's stem conv and MobileNetV2 blocks).",
            choices=SCOPES,
        ),
    )
    # the API also turns it on when the data's classes are not the head's
    transfer: bool = field(
        default=False,
        metadata=_cli(
            "Replace the classifier for --data's classes and adapt before pruning (also "
            "automatic when the checkpoint's classes differ)."
        ),
    )
    transfer_order: str = field(
        default="adapt-then-prune", metadata=_cli("", choices=TRANSFER_ORDERS)
    )
    transfer_head: str | None = field(
        default=None, metadata=_cli("The classifier layer to replace (default: found).")
    )
    head_steps: int = field(
        default=100, metadata=_cli("Transfer: steps training the new head alone.")
    )
    head_training: TrainConfig = field(
        default_factory=_head_training,
        metadata=_cli("Transfer: learning rate of the new head.", option="--head-lr"),
    )
    adapt_steps: int = field(
        default=300,
        metadata=_cli("Transfer (adapt-then-prune): steps training the whole network."),
    )
    adaptation: TrainConfig = field(
        default_factory=_adaptation,
        metadata=_cli("Transfer: learning rate adapting the whole network.", option="--adapt-lr"),
    )
    seed: int = field(default=0, metadata=_cli("Seed of every random choice of the run."))

    def __post_init__(self) -> None:
        if self.schedule is None:
            self.schedule = default_schedule(self.transfer)
        self.criteria = _names(self.criteria)
        self.ignored_layers = _names(self.ignored_layers)
        if self.granularity is not None:
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
            (OBJECTIVES, self.search_objective),
            (SCORERS, self.scorer),
            (TRANSFER_ORDERS, self.transfer_order),
            (SCOPES, self.scope),
            (TIMERS, self.latency_backend),
        ):
            registry.entry(name)
        SCHEDULES.get(self.schedule).check(self)
        check_granularity(self)
        for name, low in (
            ("calib_size", 1),
            ("latency_batch", 1),
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
        _check_latency_target(self)
        if self.distill_temperature <= 0 or not 0.0 <= self.distill_weight <= 1.0:
            raise AutopruneError("distill_temperature must be > 0 and distill_weight in [0, 1]")

    @property
    def search_objective(self) -> str:
        """``objective``, or its default for this target (left None in the field, so that a
        ``replace`` changing the target changes the default too)."""
        if self.objective is not None:
            return self.objective
        return "loss" if self.target_latency_reduction is None else "loss_per_latency"

    @property
    def granularities(self) -> tuple[str, ...]:
        """``granularity``, or its default for this target (resolved on use, like
        :attr:`search_objective`): blocks first with a latency target, whose per-layer fixed
        cost no channel removal takes away."""
        if self.granularity is not None:
            return self.granularity
        return ("channel",) if self.target_latency_reduction is None else ("block", "channel")

    @property
    def structured_granularities(self) -> list[str]:
        """The granularities that remove dense computation (and share the target), in order."""
        return [n for n in self.granularities if GRANULARITIES.get(n).structured]

    @property
    def target_shares(self) -> tuple[float, ...]:
        """Each structured granularity's share of the target: ``macs_shares``, else equal, but
        with a latency target the ones before ``channel`` share :data:`LATENCY_COARSE_SHARE`."""
        structured = self.structured_granularities
        if self.macs_shares or not structured:
            return self.macs_shares
        coarse = len(structured) - 1
        if self.target_latency_reduction is None or structured[-1:] != ["channel"] or not coarse:
            return (1.0 / len(structured),) * len(structured)
        return (LATENCY_COARSE_SHARE / coarse,) * coarse + (1 - LATENCY_COARSE_SHARE,)

    def resolved(self) -> PruneConfig:
        """These settings with the defaults that follow the target filled in, as the run uses
        them: what the summary and a saved state record."""
        return replace(
            self,
            granularity=self.granularities,
            macs_shares=self.target_shares,
            objective=self.search_objective,
        )

    def for_transfer(self, *, schedule_chosen: bool) -> PruneConfig:
        """These settings for a transfer run: its default schedule unless one was chosen."""
        schedule = self.schedule if schedule_chosen else default_schedule(True)
        return replace(self, transfer=True, schedule=schedule)


def _check_latency_target(config: PruneConfig) -> None:
    """A latency target works with the structured granularities (blocks, layers, channels by a
    loss-aware schedule); its objective (``loss_per_latency``) needs one."""
    if config.target_latency_reduction is None:
        if config.objective and OBJECTIVES.entry(config.objective).meta.get("target") == "latency":
            raise AutopruneError(
                f"objective {config.objective!r} needs target_latency_reduction (--target-latency)"
            )
        return
    _fraction("target_latency_reduction", config.target_latency_reduction, open_right=True)
    names = config.granularities
    unstructured = [n for n in names if not GRANULARITIES.get(n).structured]
    if unstructured or (config.schedule == "fixed" and "channel" in names):
        raise AutopruneError(
            "target_latency_reduction works with the structured granularities (block, layer, "
            "channel) and, for channels, a loss-aware schedule (auto, "
            "saliency-then-similarity); use target_macs_reduction for "
            f"{', '.join(unstructured) or 'the fixed schedule'}"
        )


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A comma-separated string (as the CLI gives it) or a sequence, as a tuple of names."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(s.strip() for s in items if s.strip())


def _fraction(name: str, value: float, *, open_right: bool = False) -> None:
    if not (0.0 < value < 1.0 if open_right else 0.0 < value <= 1.0):
        bound = "1)" if open_right else "1]"
        raise AutopruneError(f"{name} must be in (0, {bound}, got {value}")
