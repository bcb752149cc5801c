"""Schedules decide what one iteration removes; one registry, one class per schedule.

``auto`` and ``saliency-then-similarity`` are loss-aware: every candidate the allowed criteria
offer is scored on the calibration set and the best one is applied (LAASP; I2CT for the
switch from saliency to similarity criteria). ``fixed`` is the baseline without any loss
evaluation: one criterion, channels allocated by an allocation rule (``uniform``: the same
fraction of every group; ``global``: channels ranked across groups), data-free when the
criterion is.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .._registry import Registry
from ..criteria import CRITERIA, list_criteria, score, select
from ..errors import AutopruneError
from ..graph import PruningGraph, mask_channels
from ._allocations import ALLOCATIONS
from ._landing import TOLERANCE, Ranked, land
from .candidates import (
    OBJECTIVES,
    Candidate,
    Objective,
    channels_for,
    criteria_state,
    make_candidates,
    removable,
    with_predictions,
)

if TYPE_CHECKING:
    from .calibration import CalibrationSet
    from .config import PruneConfig
    from .latency_target import LatencyTarget
    from .scorers import Scorer


@dataclass
class SearchContext:
    """The run as a schedule sees it when proposing a step."""

    graph: PruningGraph
    config: PruneConfig
    calib: CalibrationSet | None
    scorer: Scorer | None
    original_macs: int
    original_channels: dict[str, int]
    loss: float | None  # calibration loss of the model as it is now
    next_recovery: float | None  # reduction at which recovery is due next (None: no recovery)
    latency: LatencyTarget | None = None  # with a latency target: candidates cost by it

    @property
    def reduction(self) -> float:
        return 1.0 - self.graph.macs() / self.original_macs

    def objective(self) -> Objective:
        """The configured objective for the next step, from the loss as it is now."""
        step_ms = math.inf if self.latency is None else self.config.step * self.latency.dense_ms
        return OBJECTIVES.get(self.config.search_objective)(self.loss, step_ms)

    @property
    def achieved(self) -> float:
        """The reduction the target is in: of the MACs, or of the predicted latency."""
        return self.reduction if self.latency is None else self.latency.reduction

    @property
    def progress(self) -> float:
        """The part of the target reached: of the MACs, or of the predicted latency."""
        if self.latency is not None:
            return self.latency.progress
        return self.reduction / self.config.target_macs_reduction

    @property
    def remaining_macs(self) -> float:
        return self.config.target_macs_reduction * self.original_macs - (
            self.original_macs - self.graph.macs()
        )

    def limits(self) -> dict[str, int]:
        cap, multiple = self.config.cap, self.config.channel_multiple
        return {
            g.name: removable(g, self.original_channels[g.name], cap, multiple)
            for g in self.graph.groups()
        }


@dataclass
class Step:
    """What one iteration removes and how it was chosen.

    ``removal`` is ``{group: channel indices}`` for channels; the other granularities
    (:mod:`.granularity`) say what theirs holds.
    """

    removal: dict[str, torch.Tensor]
    criteria: tuple[str, ...]
    loss: float | None  # calibration loss with the removal applied (None without data)
    candidates: int
    stats: dict[str, Any] = field(default_factory=dict)
    granularity: str = "channel"


class Schedule(ABC):
    """Proposes each iteration's removal. Subclasses register with ``@SCHEDULES.register``."""

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    @classmethod
    def check(cls, config: PruneConfig) -> None:
        """Refuse settings this schedule cannot work with (called when the config is made)."""
        if not config.criteria:
            raise AutopruneError("give at least one criterion")
        for name in config.criteria:
            CRITERIA.entry(name)

    @property
    @abstractmethod
    def needs_calibration(self) -> bool: ...

    @abstractmethod
    def propose(self, ctx: SearchContext) -> Step: ...

    def candidates(self, ctx: SearchContext) -> list[Candidate]:
        """What a loss-aware schedule scores to choose its step; others score none."""
        raise AutopruneError(
            f"schedule {self.config.schedule!r} scores no candidates: it proposes its step "
            "directly (use a loss-aware schedule, e.g. 'auto', to see candidates)"
        )


SCHEDULES: Registry[type[Schedule]] = Registry("prune schedule")


class LossAware(Schedule):
    """Score every candidate the allowed criteria offer; apply the best (LAASP)."""

    needs_calibration = True

    @abstractmethod
    def criteria(self, progress: float) -> tuple[str, ...]:
        """The criteria allowed at ``progress`` (the part of the target reached so far)."""

    def propose(self, ctx: SearchContext) -> Step:
        candidates, state = self._offer(ctx)
        taylor = state.get("taylor")  # its pass measured the current model's loss per image
        return choose(
            ctx,
            candidates,
            fill=state if ctx.latency is None else None,
            image_losses=None if taylor is None else taylor.image_losses,
        )

    def candidates(self, ctx: SearchContext) -> list[Candidate]:
        """Every (group, criterion) removal of about one step allowed at this point."""
        return self._offer(ctx)[0]

    def _offer(self, ctx: SearchContext) -> tuple[list[Candidate], dict[str, Any]]:
        """The candidates, and what their criteria needed (:func:`criteria_state`)."""
        cfg = self.config
        if ctx.calib is None or ctx.scorer is None or ctx.loss is None:
            raise AutopruneError(f"schedule {cfg.schedule!r} needs calibration data")
        allowed = self.criteria(ctx.progress)
        state = criteria_state(ctx.graph, allowed, ctx.calib, cfg.seed, cfg.taylor_size)
        if ctx.latency is not None:
            candidates = ctx.latency.candidates(allowed, ctx.limits(), state, cfg.step)
        else:
            candidates = self._macs_candidates(ctx, allowed, state)
        return _offered(with_predictions(ctx.graph, candidates, state)), state

    def _macs_candidates(
        self, ctx: SearchContext, allowed: tuple[str, ...], state: dict[str, Any]
    ) -> list[Candidate]:
        """Each saving about one step of the MACs (the last step: what is left)."""
        cfg = self.config
        step, remaining = cfg.step * ctx.original_macs, ctx.remaining_macs
        candidates = make_candidates(
            ctx.graph, allowed, min(step, remaining), ctx.limits(), state, cfg.channel_multiple
        )
        if remaining < step:  # the last step: keep candidates that land on the target, if any
            slack = TOLERANCE * ctx.original_macs
            landing = [c for c in candidates if abs(remaining - c.macs_saved) <= slack]
            candidates = landing or candidates
        return candidates


def _offered(candidates: list[Candidate]) -> list[Candidate]:
    if not candidates:
        raise AutopruneError("every group is at its cap: nothing is left to prune")
    return candidates


def _fill(
    ctx: SearchContext,
    candidates: Sequence[Candidate],
    losses: Sequence[float],
    step: Step,
    state: Mapping[str, Any],
    objective: Objective,
) -> Step:
    """Where no group can give a whole step (a model of many small groups: DenseNet, NASNet),
    the best candidate's step is topped up with the next best candidates of other groups, in
    the scorer's ranking, until the step's MACs are saved (the last one shrunk to fit, its
    criterion choosing fewer channels); the loss of the whole removal is then measured.
    Without this such a model takes one small iteration per group.

    The best candidate stays the first choice, so a step one group can give is unchanged.
    """
    assert ctx.calib is not None and ctx.scorer is not None  # choose() has checked
    goal = min(ctx.config.step * ctx.original_macs, ctx.remaining_macs)
    slack = TOLERANCE * ctx.original_macs
    current = ctx.graph.macs()
    removal, criteria = dict(step.removal), list(step.criteria)
    saved = current - ctx.graph.macs(removal)
    if saved >= goal - slack:
        return step
    ranked = _ranking(candidates, losses, ctx.scorer.last_stats, objective)
    for candidate in ranked:
        if candidate.group in removal:
            continue
        idxs = candidate.idxs
        if candidate.macs_saved > goal - saved + slack:  # too many: fewer of the same choice
            group = ctx.graph.group(candidate.group)
            n = channels_for(group, goal - saved, len(idxs), ctx.config.channel_multiple)
            if n < 1:
                continue
            idxs = select(group, candidate.criteria[0], n, **state)
        trial = {**removal, candidate.group: idxs}
        with_it = current - ctx.graph.macs(trial)
        if with_it > goal + slack:
            continue
        removal, saved = trial, with_it
        criteria += [c for c in candidate.criteria if c not in criteria]
        if saved >= goal - slack:
            break
    if len(removal) == 1:
        return step
    with mask_channels(ctx.graph, removal):
        loss = ctx.calib.loss(ctx.graph.model)
    stats = {**step.stats, "filled_groups": len(removal) - 1}
    return Step(removal, tuple(criteria), loss, step.candidates, stats, step.granularity)


def _ranking(
    candidates: Sequence[Candidate],
    losses: Sequence[float],
    stats: Mapping[str, Any],
    objective: Objective,
) -> list[Candidate]:
    """The candidates as the scorer ranked them (``stats``: its ``last_stats``): those that saw
    more calibration images (the survivors of successive halving) first, then by the objective
    on the images they saw."""
    n = len(candidates)
    seen = stats.get("images_per_candidate") or [0] * n
    losses = stats.get("estimates") or losses

    def key(i: int) -> tuple[float, float, int]:
        value = objective(losses[i], candidates[i]) if math.isfinite(losses[i]) else math.inf
        return (-seen[i], value, i)

    return [candidates[i] for i in sorted(range(n), key=key)]


def choose(
    ctx: SearchContext,
    candidates: Sequence[Candidate],
    granularity: str = "channel",
    fill: Mapping[str, Any] | None = None,
    image_losses: torch.Tensor | None = None,
) -> Step:
    """The candidate with the best objective on the calibration set, as the step to apply;
    with ``fill`` (the criteria's state), topped up from other groups where it saves less
    than a step (:func:`_fill`). ``image_losses``: the current model's loss per calibration
    image, where a pass already measured them (the scorer need not)."""
    if ctx.calib is None or ctx.scorer is None or ctx.loss is None:
        raise AutopruneError(f"granularity {granularity!r} needs calibration data")
    objective = ctx.objective()
    calib = replace(ctx.calib, image_losses=image_losses)
    losses = ctx.scorer(ctx.graph, candidates, calib, objective)
    values = [
        objective(v, c) if math.isfinite(v) else math.inf
        for v, c in zip(losses, candidates, strict=True)
    ]
    best = min(range(len(candidates)), key=values.__getitem__)  # first of equals: deterministic
    chosen = candidates[best]
    step = Step(
        chosen.removal(),
        chosen.criteria,
        losses[best],
        len(candidates),
        dict(ctx.scorer.last_stats),
        granularity,
    )
    return step if fill is None else _fill(ctx, candidates, losses, step, fill, objective)


@SCHEDULES.register("auto", description="the whole criteria pool every iteration (LAASP)")
class Auto(LossAware):
    def criteria(self, progress: float) -> tuple[str, ...]:
        return self.config.criteria


@SCHEDULES.register(
    "saliency-then-similarity",
    description="saliency criteria until saliency_fraction of the target, similarity after (I2CT)",
)
class SaliencyThenSimilarity(LossAware):
    @classmethod
    def check(cls, config: PruneConfig) -> None:
        super().check(config)
        for kind in ("saliency", "similarity"):
            if not _of_kind(config.criteria, kind):
                raise AutopruneError(
                    f"schedule 'saliency-then-similarity' needs a {kind} criterion "
                    f"({', '.join(list_criteria(kind))}) in the pool"
                )

    def criteria(self, progress: float) -> tuple[str, ...]:
        kind = "saliency" if progress < self.config.saliency_fraction else "similarity"
        return _of_kind(self.config.criteria, kind)


def _of_kind(names: tuple[str, ...], kind: str) -> tuple[str, ...]:
    return tuple(n for n in names if CRITERIA.entry(n).meta["kind"] == kind)


# ------------------------------------------------------------------------------------ fixed
@SCHEDULES.register(
    "fixed", description="one criterion, no loss evaluation, allocation uniform or global"
)
class Fixed(Schedule):
    """The baselines: prune to the target (to each recovery milestone when recovering) with one
    criterion, allocating channels by ``config.allocation``."""

    @classmethod
    def check(cls, config: PruneConfig) -> None:
        super().check(config)
        if len(config.criteria) != 1:
            raise AutopruneError(
                f"schedule 'fixed' takes exactly one criterion (e.g. l1), "
                f"got {', '.join(config.criteria)}"
            )
        if config.channel_multiple > 1:
            raise AutopruneError(
                "channel_multiple works with the loss-aware schedules (auto, "
                "saliency-then-similarity), not with 'fixed'"
            )

    @property
    def needs_calibration(self) -> bool:
        return bool(CRITERIA.entry(self.config.criteria[0]).meta["needs_data"])

    def propose(self, ctx: SearchContext) -> Step:
        cfg = self.config
        (criterion,) = cfg.criteria
        goal = cfg.target_macs_reduction
        if ctx.next_recovery is not None:
            goal = min(goal, ctx.next_recovery)
        state = criteria_state(ctx.graph, cfg.criteria, ctx.calib, cfg.seed, cfg.taylor_size)
        ranked = Ranked(
            {
                g.name: torch.argsort(score(g, criterion, **state), stable=True)
                for g in ctx.graph.groups()
            }
        )
        plans = ALLOCATIONS.get(cfg.allocation)(ctx, criterion, state)
        removal = ranked.removal(
            land(ctx, plans, goal, ranked, final=goal >= cfg.target_macs_reduction)
        )
        loss = None
        if ctx.calib is not None:
            with mask_channels(ctx.graph, removal):
                loss = ctx.calib.loss(ctx.graph.model)
        return Step(removal, cfg.criteria, loss, 1)
