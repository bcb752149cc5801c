"""What one search iteration chooses among: a step of channels per (group, criterion).

Each group not at its cap offers, for every criterion allowed now, the channels that criterion
would remove first, sized so the step saves about the same MACs in every group. Criteria that
pick the same channels in a group are one candidate (they cost one evaluation). The objective
turns a candidate's calibration loss into the number the search minimises.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._registry import Registry
from ..criteria import TaylorAccumulator, select
from ..errors import AutopruneError
from ..graph import ChannelGroup, PruningGraph

if TYPE_CHECKING:
    from .calibration import CalibrationSet


@dataclass(frozen=True)
class Candidate:
    """Removing ``idxs`` (sorted) from ``group``, as ``criteria`` would; saves ``macs_saved``.

    The other granularities subclass :class:`GrainCandidate` and override the methods; channel
    candidates are tried by :func:`~autoprune.graph.mask_channels`.
    """

    group: str  # ChannelGroup.name in the current PruningGraph
    criteria: tuple[str, ...]  # every criterion in the pool that picks exactly these channels
    idxs: torch.Tensor
    macs_saved: int  # exact (ChannelGroup.macs_saved)
    params_saved: int = 0  # set where no MACs are saved (weights): loss_per_mac divides by it
    latency_saved: float = 0.0  # predicted ms, with a latency target (:mod:`.latency_target`)
    # the calibration loss after the removal, predicted from gradients (:func:`with_predictions`)
    predicted_loss: float | None = None

    def changed(self, graph: PruningGraph) -> list[nn.Module]:
        """The modules whose computation the trial changes first (the prefix cache cuts there):
        every member with a mask site (``Member.mask_site``) holding a removed channel."""
        group = graph.group(self.group)
        return [m.module for m in group.members if m.mask_site and m.count(self.idxs)]

    def prune(self, graph: PruningGraph) -> None:
        """Apply the removal physically (what the ``exhaustive`` scorer does to a copy)."""
        graph.prune(self.group, self.idxs)

    def removal(self) -> dict[str, torch.Tensor]:
        """What a :class:`~.schedules.Step` applies: ``{name: indices}``."""
        return {self.group: self.idxs}


@dataclass(frozen=True)
class GrainCandidate(Candidate, ABC):
    """A candidate of another granularity than channels (:mod:`.granularity`): it tries its
    removal in place itself, as a context manager that restores the model on exit."""

    @abstractmethod
    def trial(self, graph: PruningGraph) -> AbstractContextManager[Any]: ...


# (loss with the candidate removed, candidate) -> value to minimise; never lower for a higher
# loss (the fast scorer's halving and bound rely on it)
Objective = Callable[[float, Candidate], float]
# (loss before the step, one step's predicted ms: inf without a latency target) -> objective
OBJECTIVES: Registry[Callable[..., Objective]] = Registry("objective")


@OBJECTIVES.register("loss", description="calibration loss after the removal (LAASP)")
def loss_objective(base_loss: float, step_ms: float = math.inf) -> Objective:
    """The loss itself: every candidate saves about the same MACs, so compare losses."""
    return lambda loss, candidate: loss


@OBJECTIVES.register("loss_per_mac", description="loss increase per MAC (weights: parameter) saved")
def loss_per_mac(base_loss: float, step_ms: float = math.inf) -> Objective:
    """Loss increase over ``base_loss`` (the model before this step) per MAC the step saves:
    fairer where one channel of a group saves far more than the step (a stem group). Weight
    candidates save no dense MACs: theirs is per parameter saved."""

    def objective(loss: float, candidate: Candidate) -> float:
        return per_saving(loss - base_loss, max(1, candidate.macs_saved or candidate.params_saved))

    return objective


def per_saving(increase: float, saved: float) -> float:
    """A loss ``increase`` per unit ``saved``; a decrease times the saving instead, so that of
    two removals that lower the loss the one saving more wins (the ratio would pick the one
    saving least). Never lower for a higher loss, as an objective must be."""
    return increase / saved if increase >= 0 else increase * saved


@OBJECTIVES.register(
    "loss_per_latency",
    description="loss increase per ms of predicted latency saved",
    target="latency",
)
def loss_per_latency(base_loss: float, step_ms: float = math.inf) -> Objective:
    """Loss increase over ``base_loss`` per millisecond the step is predicted to save (with a
    latency target only): steps snap to the widths the backend likes, so their sizes vary.
    A saving counts up to one step's ``step_ms``: the ratio alone favours the largest
    removals (a block, the stem's residual channels), whose damage no later step undoes.
    Counting a block's whole saving ranks blocks by loss per ms: better on MobileNetV2, worse
    on ResNet-56 (docs/benchmarks/latency_shares*.md)."""

    def objective(loss: float, candidate: Candidate) -> float:
        return per_saving(loss - base_loss, max(1e-9, min(candidate.latency_saved, step_ms)))

    return objective


def removable(group: ChannelGroup, original_channels: int, cap: float, multiple: int = 1) -> int:
    """How many more channels ``group`` may lose: up to ``cap`` of its original ones, keeping
    ``group.min_kept`` (a channel for every layer), and leaving a multiple of ``multiple`` (none
    when fewer than that are left)."""
    allowed = math.floor(cap * original_channels + 1e-9) - (original_channels - group.channels)
    n = max(0, min(allowed, group.channels - group.min_kept))
    kept = -(-(group.channels - n) // multiple) * multiple  # rounded up to the multiple
    return max(0, group.channels - kept)


def channels_for(group: ChannelGroup, macs: float, limit: int, multiple: int = 1) -> int:
    """The number of channels (at most ``limit``, leaving a multiple of ``multiple``) whose
    removal saves closest to ``macs``; 0 if no such number is allowed."""
    first = group.channels % multiple or multiple  # the fewest that leave a multiple
    count = (limit - first) // multiple + 1  # allowed numbers: first + k * multiple, k < count
    if count < 1:
        return 0

    def saved(k: int) -> int:
        return group.macs_saved(torch.arange(first + k * multiple))

    lo, hi = 0, count - 1
    while lo < hi:  # smallest k saving at least ``macs`` (savings grow with k)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if saved(mid) >= macs else (mid + 1, hi)
    if lo > 0 and macs - saved(lo - 1) < saved(lo) - macs:
        lo -= 1
    return first + lo * multiple


def criteria_state(
    graph: PruningGraph,
    criteria: Iterable[str],
    calib: CalibrationSet | None,
    seed: int,
    taylor_size: int,
) -> dict[str, Any]:
    """What the criteria need besides the weights: gradients for ``taylor``, a seed for ``random``.

    Gradients are collected afresh every call (BatchNorm frozen), since the model changed since
    the last one, on the first ``taylor_size`` calibration images: a backward pass costs twice
    a forward, and every iteration pays it.
    """
    state: dict[str, Any] = {"seed": seed}
    if "taylor" in criteria:
        if calib is None:
            raise AutopruneError("criterion 'taylor' needs calibration data: pass train_data")
        graph.model.eval()
        batches = calib.slices(0, min(taylor_size, calib.size))
        state["taylor"] = TaylorAccumulator(graph).collect(batches, calib.task)
    return state


def with_predictions(
    graph: PruningGraph, candidates: Iterable[Candidate], state: Mapping[str, Any]
) -> list[Candidate]:
    """The channel candidates with their ``predicted_loss``, where the criteria's state holds
    gradients (``taylor``): the fast scorer scores the best predicted ones only."""
    taylor: TaylorAccumulator | None = state.get("taylor")
    if taylor is None:
        return list(candidates)
    return [
        c
        if isinstance(c, GrainCandidate)
        else replace(c, predicted_loss=taylor.predicted_loss(graph.group(c.group), c.idxs))
        for c in candidates
    ]


def make_candidates(
    graph: PruningGraph,
    criteria: Iterable[str],
    macs: float,
    limits: Mapping[str, int],
    state: Mapping[str, Any],
    multiple: int = 1,
) -> list[Candidate]:
    """One candidate per group and distinct channel choice, each saving about ``macs`` and
    leaving a multiple of ``multiple`` channels.

    A criterion that does not apply to a group (``bn_scale`` where there is no BatchNorm,
    ``taylor`` where no gradient arrives) offers nothing there instead of stopping the search.
    """
    criteria = tuple(criteria)
    candidates = []
    for group in graph.groups():
        limit = limits.get(group.name, 0)
        if limit < 1:
            continue
        n = channels_for(group, macs, limit, multiple)
        if n < 1:
            continue
        for idxs, names in distinct_choices(group, criteria, n, state):
            candidates.append(Candidate(group.name, names, idxs, group.macs_saved(idxs)))
    return candidates


def distinct_choices(
    group: ChannelGroup, criteria: Iterable[str], n: int, state: Mapping[str, Any]
) -> list[tuple[torch.Tensor, tuple[str, ...]]]:
    """The distinct sets of ``n`` channels the criteria would remove from ``group``, each with
    the criteria that chose it; a criterion that does not apply there offers nothing."""
    picks: dict[tuple[int, ...], list[str]] = {}
    for name in criteria:
        try:
            idxs = select(group, name, n, **state)
        except AutopruneError:
            continue
        picks.setdefault(tuple(idxs.tolist()), []).append(name)
    return [(torch.tensor(k, dtype=torch.long), tuple(v)) for k, v in picks.items()]
