"""The ``channel`` granularity: the schedule's (group, criterion) candidates, as in a
channel-only run. Its goal is the whole target (it is the last structured granularity, so it
finishes it); candidates are tried by channel masks and applied by the pruning graph,
and saving needs no record of its own: the saved layer shapes are what is left.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...graph import PruningGraph
from ..candidates import Candidate
from ..schedules import SearchContext, Step
from ._base import GRANULARITIES, Granularity


@GRANULARITIES.register("channel", rank=2, description="channel groups, by the schedule")
class Channel(Granularity):
    counts = "channels"

    @property
    def needs_calibration(self) -> bool:
        return self.schedule.needs_calibration

    def candidates(self, ctx: SearchContext) -> list[Candidate]:
        return self.schedule.candidates(ctx)

    def propose(self, ctx: SearchContext) -> Step | None:
        return self.schedule.propose(ctx)

    def apply(self, graph: PruningGraph, removal: Mapping[str, torch.Tensor]) -> None:
        graph.prune(dict(removal))
