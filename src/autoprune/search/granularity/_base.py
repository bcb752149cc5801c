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
        return choose(ctx, candidates) if candidates else None

    @property
    def members(self) -> tuple[Granularity, ...]:
        """The granularities whose steps this phase takes (:class:`Pooled`: several)."""
        return (self,)

    def member(self, name: str) -> Granularity:
        """The member that applies a step of granularity ``name``."""
        return next(m for m in self.members if m.name == name)

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


class Pooled(Granularity):
    """Structured granularities in one phase: every step scores all their candidates together
    and takes the best by the objective (loss per ms or per MAC saved), so a model loses
    blocks while they cost less per saving than channels do, and channels where they cost
    less. A fixed split of the target suits one model and not another
    (docs/benchmarks/latency_shares*.md). Each step is applied by its candidate's member."""

    def __init__(
        self, members: Sequence[Granularity], config: PruneConfig, goal: float, schedule: Schedule
    ) -> None:
        super().__init__("+".join(m.name for m in members), config, goal, schedule)
        self._members = tuple(members)

    @property
    def members(self) -> tuple[Granularity, ...]:
        return self._members

    @property
    def needs_calibration(self) -> bool:
        return any(m.needs_calibration for m in self._members)

    def candidates(self, ctx: SearchContext) -> list[Candidate]:
        return [c for m in self._members for c in m.candidates(ctx)]

    def apply(self, graph: PruningGraph, removal: Mapping[str, torch.Tensor]) -> None:
        raise TypeError("a pool's steps are applied by its members: use member(step.granularity)")

    def settle(self, graph: PruningGraph, calib: CalibrationSet | None) -> bool:
        """The first member's that settles (units: the norm statistics re-estimated), after
        every step, channels' too: the loss each block candidate is compared with is then of
        the model with its statistics estimated as the candidate's are."""
        return any(m.settle(graph, calib) for m in self._members)


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
    """The run's phases in order, each with its goal: structured granularities share the
    target (MACs, or predicted latency) by ``config.target_shares``, or pool for the whole of
    it (``config.pooled``); ``weight`` aims at ``weight_sparsity``."""
    structured = config.structured_granularities
    target = config.target_latency_reduction or config.target_macs_reduction
    if config.pooled:
        pool = [GRANULARITIES.get(n)(n, config, target, schedule) for n in structured]
        rest = [n for n in config.granularities if n not in structured]
        return [
            Pooled(pool, config, target, schedule),
            *(GRANULARITIES.get(n)(n, config, config.weight_sparsity, schedule) for n in rest),
        ]
    shares = config.target_shares
    total = sum(shares)
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
