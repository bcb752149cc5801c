"""Landing the fixed schedule on its goal: the nearest plan of the allocation, then corrected.

An allocation rule (uniform, global) offers a family of plans growing with one index. On a
small model one index step moves several groups at once and can jump past the tolerance
(issue 15), so the plan on either side nearest the goal is corrected: one group's count, or
two groups' at once (one gives back channels while the other takes more), moves to where the
exact MACs of the whole plan land within the tolerance, changing as few channels as possible.
Each group still loses a prefix of its criterion order: the criterion chooses which channels go,
only how many per group changes. Where no plan found lands, the final goal is refused with the
nearest reductions instead of returning one a percent off.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import AutopruneError

if TYPE_CHECKING:
    from .schedules import SearchContext

TOLERANCE = 0.005  # the final reduction lands within this of the target (fraction of MACs)
PAIR_WINDOW = 8  # a two-group move shifts the first group by at most this many channels

# A family of removals, growing with its index: index -> channels to remove per group.
Plans = tuple[int, Callable[[int], dict[str, int]]]
Counts = tuple[int, ...]  # channels removed per group, in the order of ``Landing.names``


@dataclass(frozen=True)
class Ranked:
    """Each group's channels in the order the criterion removes them: the MACs of a plan are
    those of the channels it will remove (in a group whose channels cost unequal MACs, a split
    feeding branches of different widths, any other ``k`` channels would mislead)."""

    order: Mapping[str, torch.Tensor]

    def removal(self, counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
        return {g: self.order[g][:k].sort().values for g, k in counts.items() if k}


def land(
    ctx: SearchContext, plans: Plans, goal: float, ranked: Ranked, *, final: bool
) -> dict[str, int]:
    """The plan nearest ``goal``: the allocation's own when it lands within the tolerance, else
    its nearest plan corrected. Short of landing, the nearest plan found for an intermediate
    goal (a recovery milestone); an :class:`AutopruneError` for the ``final`` one."""
    landing = Landing(ctx, ranked, goal)
    n, plan = plans
    # the first plan reaching the goal (the last if none does)
    lo = min(n - 1, _first(lambda i: landing.reduction(landing.counts(plan(i))) >= goal, n))
    starts = [landing.counts(plan(i)) for i in (lo - 1, lo) if i >= 0]
    starts = [c for c in starts if landing.removes(c)]
    if not starts:
        raise AutopruneError("every group is at its cap: nothing is left to prune")
    counts = landing.correct(min(starts, key=landing.distance))
    if final and not landing.lands(counts):
        raise AutopruneError(landing.refusal())
    return dict(zip(landing.names, counts, strict=True))


class Landing:
    """Plans as counts per group, their exact reductions (each computed once), and the moves
    that bring one within the tolerance of ``goal``."""

    def __init__(self, ctx: SearchContext, ranked: Ranked, goal: float) -> None:
        self.ctx, self.ranked, self.goal = ctx, ranked, goal
        limits = ctx.limits()
        self.names = tuple(limits)
        self.limits = tuple(limits.values())
        self.now = ctx.reduction
        self._reductions: dict[Counts, float] = {}

    def counts(self, plan: Mapping[str, int]) -> Counts:
        return tuple(plan.get(name, 0) for name in self.names)

    def reduction(self, counts: Counts) -> float:
        if counts not in self._reductions:
            removal = self.ranked.removal(dict(zip(self.names, counts, strict=True)))
            macs = self.ctx.graph.macs(removal) if removal else self.ctx.graph.macs()
            self._reductions[counts] = 1.0 - macs / self.ctx.original_macs
        return self._reductions[counts]

    def distance(self, counts: Counts) -> float:
        return abs(self.reduction(counts) - self.goal)

    def lands(self, counts: Counts) -> bool:
        return self.distance(counts) <= TOLERANCE + 1e-12

    def removes(self, counts: Counts) -> bool:
        return self.reduction(counts) > self.now

    def correct(self, start: Counts) -> Counts:
        """Move from ``start`` while the moves come closer to the goal, until one lands."""
        counts = start
        while not self.lands(counts):
            moved = min(self._moves(counts), key=lambda c: self._preference(c, start))
            if self.distance(moved) >= self.distance(counts):
                break
            counts = moved
        return counts

    def _preference(self, counts: Counts, start: Counts) -> tuple[bool, float, float]:
        """Landing plans first, the fewest channels changed from ``start`` among them; then the
        nearest to the goal."""
        changed = sum(abs(a - b) for a, b in zip(counts, start, strict=True))
        lands = self.lands(counts)
        return (not lands, changed if lands else self.distance(counts), self.distance(counts))

    def _moves(self, counts: Counts) -> list[Counts]:
        """One group moved to the goal; failing that, also two groups (the first by at most
        :data:`PAIR_WINDOW` channels). Only plans that remove something."""
        moves = [c for i in range(len(counts)) for c in self._along(counts, i)]
        if not any(self.lands(c) for c in moves):
            moves += self._pairs(counts)
        return [c for c in moves if self.removes(c)] or [counts]

    def _pairs(self, counts: Counts) -> list[Counts]:
        moves = []
        for i, (now, limit) in enumerate(zip(counts, self.limits, strict=True)):
            for k in range(max(0, now - PAIR_WINDOW), min(limit, now + PAIR_WINDOW) + 1):
                if k != now:
                    moved = _with(counts, i, k)
                    moves += [
                        c for j in range(len(counts)) if j != i for c in self._along(moved, j)
                    ]
        return moves

    def _along(self, counts: Counts, i: int) -> list[Counts]:
        """Group ``i``'s count (the others as in ``counts``) landing closest to its own, or,
        where none lands, the two around the goal. The reduction grows with the count."""
        limit = self.limits[i]

        def first(above: float) -> int:  # the least count whose reduction exceeds ``above``
            return _first(lambda k: self.reduction(_with(counts, i, k)) > above, limit + 1)

        least = first(self.goal - TOLERANCE - 1e-12)
        most = first(self.goal + TOLERANCE + 1e-12) - 1
        if least <= most:
            return [_with(counts, i, min(max(counts[i], least), most))]
        return [_with(counts, i, k) for k in (least - 1, least) if 0 <= k <= limit]

    def refusal(self) -> str:
        """Why the goal cannot be met, with the nearest reductions below and above it."""
        seen = [r for r in self._reductions.values() if r > self.now]
        below = max((r for r in seen if r < self.goal), default=None)
        above = min((r for r in seen if r > self.goal), default=None)
        nearest = " and ".join(f"{100 * r:.2f} %" for r in (below, above) if r is not None)
        return (
            f"schedule 'fixed' finds no plan within {100 * TOLERANCE:.1f} % of a "
            f"{100 * self.goal:.1f} % MACs reduction (the channels are too coarse at the cap): "
            f"the nearest reach {nearest}; set target_macs_reduction near one of them"
        )


def _with(counts: Counts, i: int, k: int) -> Counts:
    return (*counts[:i], k, *counts[i + 1 :])


def _first(holds: Callable[[int], bool], end: int) -> int:
    """The least ``k`` in ``[0, end)`` where ``holds`` (false up to some point, true after):
    a binary search; ``end`` where it never holds."""
    lo, hi = 0, end
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return lo
