"""What every granularity is (:class:`Granularity`), their registry, and a run's plan."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, ClassVar

import torch

from ..._registry import Registry
from ...errors import AutopruneError
from ...graph import PruningGraph
from ..candidates import Candidate
from ..schedules import TOLERANCE, Schedule, SearchContext, Step, choose

if TYPE_CHECKING:
    from ..calibration import CalibrationSet
    from ..config import PruneConfig

EMPTY = torch.zeros(0, dtype=torch.long)  # the indices of a removal that names whole modules


class Granularity(ABC):
    """One phase of a run: proposes its steps until ``goal`` and applies them.

    ``structured`` granularities save dense MACs; their goal is a reduction of what the target
    is in (MACs, or the predicted latency with a latency target). ``counts`` names what the
    summary counts of them.
    """

    structured: ClassVar[bool] = True
    counts: ClassVar[str]
    recover_every_step: ClassVar[bool] = False
    # A step leaving the calibration loss (after recovery) above this multiple of the loss the
    # phase began with is undone, and the phase ends; None: the goal is reached at any cost.
    loss_limit: float | None = None

    def __init__(self, name: str, config: PruneConfig, goal: float, schedule: Schedule) -> None:
        self.name, self.config, self.goal, self.schedule = name, config, goal, schedule

    @property
    def needs_calibration(self) -> bool:
        return True

    def reached(self, ctx: SearchContext) -> bool:
        return ctx.achieved >= self.goal - TOLERANCE

    @abstractmethod
    def candidates(self, ctx: SearchContext) -> Sequence[Candidate]:
        """What the next step chooses from (empty: nothing left to offer)."""

    def propose(self, ctx: SearchContext) -> Step | None:
        """The next step, or None when this granularity has nothing left to offer."""
        candidates = self.candidates(ctx)
        return choose(ctx, candidates, self.name) if candidates else None

    @abstractmethod
    def apply(self, graph: PruningGraph, removal: Mapping[str, torch.Tensor]) -> None:
        """Apply a step's removal physically (also when a resumed run replays it)."""

    def count(self, removal: Mapping[str, torch.Tensor]) -> int:
        return sum(int(idxs.numel()) for idxs in removal.values())

    def settle(self, graph: PruningGraph, calib: CalibrationSet | None) -> bool:
        """Bring the model to the state this granularity's candidates are scored in, at the
        phase's start and after each of its steps; whether anything changed (the calibration
        loss is then measured again)."""
        return False


GRANULARITIES: Registry[type[Granularity]] = Registry("granularity")


def check_granularity(config: PruneConfig) -> None:
    """Refuse unknown, repeated or out-of-order granularities and ill-formed MACs shares."""
    names = config.granularities
    if not names:
        raise AutopruneError("give at least one granularity")
    ranks = [GRANULARITIES.entry(n).meta["rank"] for n in names]
    if len(set(names)) != len(names) or ranks != sorted(ranks):
        order = sorted(GRANULARITIES.names(), key=lambda n: GRANULARITIES.entry(n).meta["rank"])
        raise AutopruneError(
            f"granularities run coarse to fine, each once: give them in the order "
            f"{','.join(order)}, got {','.join(names)}"
        )
    shares = config.macs_shares
    structured = config.structured_granularities
    if shares and (
        len(shares) != len(structured) or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6
    ):
        raise AutopruneError(
            f"macs_shares: one share (0 or more) per structured granularity "
            f"({', '.join(structured)}) summing to 1, got {list(shares)}"
        )


def plan(config: PruneConfig, schedule: Schedule) -> list[Granularity]:
    """The run's granularities in order, each with its goal: structured ones share the target
    (MACs, or predicted latency) by ``config.target_shares``, ``weight`` aims at
    ``weight_sparsity``."""
    structured = config.structured_granularities
    shares = config.target_shares
    total = sum(shares)
    target = config.target_latency_reduction or config.target_macs_reduction
    goals = {
        n: target * min(1.0, s / total) for n, s in zip(structured, accumulate(shares), strict=True)
    }
    return [
        GRANULARITIES.get(n)(n, config, goals.get(n, config.weight_sparsity), schedule)
        for n in config.granularities
    ]


def touches_ignored(paths: Sequence[str], ignored: Sequence[str]) -> bool:
    """Whether a path is, holds or lies inside an ignored layer."""
    return any(
        p == i or p.startswith(i + ".") or i.startswith(p + ".") for p in paths for i in ignored
    )
