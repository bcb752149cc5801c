"""Scorers: the calibration loss of every candidate removal of one search step.

LAASP judges each (group, criterion) candidate by the loss of the model with those channels
gone. ``exhaustive`` does what the paper's code does, a pruned deep copy per candidate, and is
kept as the baseline the benchmarks compare with. ``fast`` (the default) gets the same
decisions for a fraction of the work, each trick switchable so its effect can be measured:

- masking (:func:`~autoprune.graph.mask_channels`) instead of copies: exact, no weight moves;
- a shortlist: where candidates carry a loss predicted from gradients
  (:meth:`~autoprune.criteria.TaylorAccumulator.predicted_loss`, when ``taylor`` is among the
  criteria, whose gradients it reuses), only the best predicted ``shortlist`` share of them
  is scored at all, and then any other whose prediction beats the best loss measured (a
  candidate predicted to win is never left unscored). Halving keeps as many per round as it
  would of all the candidates, so a shortlisted candidate is never dropped where it would have
  survived among all (its rank among fewer can only be better): the shortlist changes a
  decision only where the prediction leaves the winner out;
- prefix caching (:mod:`._prefix`): layers that run before a candidate's first masked layer
  are computed once per batch, not once per candidate;
- successive halving: every candidate is scored on the first ``min_images`` images, the best
  ``keep`` fraction on twice as many, and so on until the survivors have seen the whole set.
  All candidates of a round see the same images, so the comparison is paired: its noise is
  that of a loss *difference*, far smaller than that of the losses themselves;
- candidate stacking (:mod:`._trials`): the candidates of a cut run in one forward pass, the
  batch repeated once per candidate, each copy with its own channels masked; on a GPU this
  turns hundreds of small passes into a few large ones;
- bf16 autocast (``precision``), for every round, or for ranking only: the best few are then
  scored again in fp32 on the whole set, so the losses compared at the end are fp32's;
- a lower bound: losses are never below the task's ``loss_floor`` (0 for cross-entropy), so
  a candidate's loss so far bounds its loss on the whole set from below; once that bound loses
  to a candidate already scored on every image, the rest of its images cannot save it, and it
  is dropped. Exact: no decision changes. One candidate, the best after the first round, is
  scored on every image ahead of the others to set the bar;
- hardest images first: halving takes the images in order of the current model's loss, highest
  first (the Taylor criterion's pass measured it on the images it ran on; a pass of the
  scorer's own covers the rest). A trained model classifies most images confidently and a
  small removal barely moves their loss; the differences between candidates come from the
  few uncertain images, so early rounds on those rank like the whole set does
  (docs/benchmarks/scorer_tricks.md measures it on ResNet-56). Survivors still see every
  image: their losses are exact.

Under a process group (``torchrun``) both scorers share the work out: each rank scores every
``world_size``-th candidate (``fast``: of those still in the race, round by round) on the same
images, the losses are all-gathered, and every rank returns the same list. A candidate's loss
is computed exactly as in one process, so the decisions do not depend on the number of ranks.

Adding a scorer is one registered class with this call signature; options are its fields.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .. import distributed
from .._forward import eval_mode
from .._registry import Registry
from ..errors import AutopruneError
from ..graph import PruningGraph
from ._prefix import CallProfile, CutPoint, plan_cuts
from ._trials import PRECISIONS, TrialPlan, autocast, default_precision, score_batch
from .calibration import CalibrationSet
from .candidates import Candidate, Objective  # Objective: lower is better

DEFAULT_SCORER = "fast"


class Scorer(Protocol):
    """Calibration loss per candidate, in the candidates' order.

    A candidate dropped before seeing the whole calibration set gets ``inf``, so the argmin of
    ``objective(loss, candidate)`` over the returned values is always a fully scored candidate;
    its partial estimate and how many images it saw are in ``last_stats``. ``last_stats`` also
    holds what the step cost (candidates, images evaluated, seconds, rounds), for the history.
    """

    last_stats: dict[str, Any]

    def __call__(
        self,
        graph: PruningGraph,
        candidates: Sequence[Candidate],
        calib: CalibrationSet,
        objective: Objective,
    ) -> list[float]: ...


SCORERS: Registry[Callable[..., Scorer]] = Registry("scorer")


def list_scorers() -> list[str]:
    return SCORERS.names()


def create_scorer(name: str = DEFAULT_SCORER, **options: Any) -> Scorer:
    """A scorer by name; ``options`` are its fields (e.g. ``halving=False``)."""
    cls = SCORERS.get(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as e:
        known = ", ".join(inspect.signature(cls).parameters) or "(none)"
        raise AutopruneError(f"scorer {name!r}: {e}; its options: {known}") from None
    return cls(**options)


@SCORERS.register("exhaustive")
@dataclass
class ExhaustiveScorer:
    """LAASP's reference: a deep copy per candidate, pruned for real, run on the whole set.

    Slow on purpose; it is the ground truth ``fast`` is measured against. The copy's graph is
    built afresh with the original's ignored layers and root types, so the group of the same
    name couples the same layers.
    """

    last_stats: dict[str, Any] = field(default_factory=dict, init=False)

    def __call__(
        self,
        graph: PruningGraph,
        candidates: Sequence[Candidate],
        calib: CalibrationSet,
        objective: Objective,
    ) -> list[float]:
        _check_scorable(graph, calib)
        start = time.perf_counter()

        def loss(candidate: Candidate) -> float:
            pruned = graph.copy()
            candidate.prune(pruned)
            return calib.loss(pruned.model)

        losses = distributed.share_map(loss, candidates)
        self.last_stats = {
            "scorer": "exhaustive",
            "candidates": len(candidates),
            "images": len(candidates) * calib.size,
            "rounds": 1,
            "seconds": time.perf_counter() - start,
        }
        return losses


@SCORERS.register("fast")
@dataclass
class FastScorer:
    """Masking + prefix caching + stacking + successive halving; same winner as ``exhaustive``.

    ``prefix_cache``, ``stack``, ``halving``, ``hard_first`` and ``channels_last`` switch the
    tricks (masking is always on). ``shortlist``: the share of the candidates with a
    ``predicted_loss`` that are scored, the best by that prediction (at least ``min_keep``;
    1: all), and after them any other predicted to beat the best of their measured losses;
    the others get ``inf``. Halving starts with ``min_images`` images and keeps
    ``keep`` of the candidates per round (counted over all of them, shortlisted or not), never
    fewer than ``min_keep``; once that few are left they go straight to the whole set.
    ``hard_first`` orders the images for halving by the current model's loss (the set's
    ``image_losses`` for the images they cover, one extra pass over the others: ``last_stats``'
    ``ordering_images``; the reordered copy is held during the call).
    ``bound`` (with halving, where the task knows its ``loss_floor``) scores the best after
    the first round on every image ahead of the others, then drops any candidate whose loss so
    far, plus the floor on the images it has not seen, already loses to it by objective: such a
    candidate cannot win, so the bound changes no decision (the leader stays to the end).
    Images go hardest first, as with ``hard_first``, so the bound bites early.
    ``max_batch`` splits calibration batches into forwards of at most that many images
    (memory: the cached prefix of a batch is held while its candidates run). ``stack_bytes``
    caps a stacked pass's largest activation (default :func:`._trials.default_stack_bytes`:
    a share of a GPU's memory; no stacking on a CPU). ``precision`` is a key of
    :data:`._trials.PRECISIONS`: ``fp32``, ``bf16`` or ``bf16-ranking`` (bf16 while halving
    ranks, down to the whole set; the best ``min_keep`` then re-scored in fp32, the others
    ``inf``); default :func:`._trials.default_precision` (``bf16-ranking`` on a CPU with
    native bf16, else ``fp32``).
    ``channels_last`` runs 4-D inputs in that memory format: CPU convolutions are several
    times faster on small batches, and losses differ from NCHW's by float rounding only.
    """

    prefix_cache: bool = True
    halving: bool = True
    # Halving from 64 images in their own order, keeping half: starting from the hardest few
    # and keeping a quarter is cheaper per iteration but drops exhaustive winners over a whole
    # search. Per iteration: docs/benchmarks/scorer_tricks.md; over whole searches (decisions
    # shared with the exhaustive scorer, accuracy): docs/benchmarks/search_quality*.md. Racing
    # instead of ranking (out at a few standard errors of the paired per-image loss
    # difference) was not kept: per-image differences are heavy-tailed, so few candidates
    # leave the race early.
    hard_first: bool = False
    bound: bool = True
    min_images: int = 64
    # Which share keeps the exhaustive scorer's choice: docs/benchmarks/search_speed.md.
    shortlist: float = 0.2
    keep: float = 0.5
    min_keep: int = 4
    max_batch: int | None = None
    stack_bytes: int | None = None
    precision: str | None = None
    channels_last: bool = True
    stack: bool = True
    last_stats: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        shares_ok = 0 < self.keep <= 1 and 0 < self.shortlist <= 1
        if not shares_ok or self.min_images < 1 or self.min_keep < 1:
            raise AutopruneError(
                "fast scorer: need 0 < keep <= 1, 0 < shortlist <= 1, min_images >= 1 and "
                f"min_keep >= 1, got keep={self.keep}, shortlist={self.shortlist}, "
                f"min_images={self.min_images}, min_keep={self.min_keep}"
            )
        if self.max_batch is not None and self.max_batch < 1:
            raise AutopruneError(f"fast scorer: max_batch must be >= 1, got {self.max_batch}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise AutopruneError(
                f"fast scorer: precision {self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )

    def __call__(
        self,
        graph: PruningGraph,
        candidates: Sequence[Candidate],
        calib: CalibrationSet,
        objective: Objective,
    ) -> list[float]:
        _check_scorable(graph, calib)
        start = time.perf_counter()
        total = calib.size
        sums = [0.0] * len(candidates)  # summed loss (calib.task's) over the images seen so far
        seen = [0] * len(candidates)
        alive = self.shortlisted(candidates, objective)
        shortlisted = len(alive)
        field = len(candidates)  # how many halving would keep of all of them: rounds keep that
        done = rounds = evaluated = bounded = 0
        floor = calib.task.loss_floor if self.bound and self.halving else None
        leader: int | None = None  # with a floor: scored ahead on every image, the bound's
        leader_sums: dict[int, float] = {}  # its summed loss at each stop of the rounds
        with eval_mode(graph.model), torch.no_grad():
            sample = self._layout(calib.batches[0][0][:2])
            ranking, final = PRECISIONS[self.precision or default_precision(sample.device)]
            profile = CallProfile.record(graph.model, sample) if self.prefix_cache else None
            cuts = plan_cuts([c.changed(graph) for c in candidates], profile)
            plan = TrialPlan.build(graph, candidates, sample, self.stack, self.stack_bytes)
            reorder = (
                self.halving
                and (self.hard_first or floor is not None)
                and len(candidates) > self.min_keep
            )
            ordering = 0  # images run to order the set
            if reorder:
                calib, ordering = self._hardest_first(graph.model, calib)
            while alive and done < total:
                stop = self._next_stop(done, total, len(alive))
                running = [i for i in alive if i != leader]
                with autocast(sample.device, ranking):
                    self._round(plan, cuts, running, calib, (done, stop), sums)
                for i in alive:
                    seen[i] = stop
                evaluated += (stop - done) * len(running)
                done, rounds = stop, rounds + 1
                if leader is not None:
                    sums[leader] = leader_sums[done]
                if done >= total:
                    break
                if floor is not None:
                    if leader is None:
                        leader = self._survivors(
                            {i: sums[i] / done for i in alive}, candidates, objective, 1
                        )[0]
                        with autocast(sample.device, ranking):
                            leader_sums = self._run_ahead(plan, cuts, leader, calib, done, sums)
                        evaluated += total - done
                    best = objective(leader_sums[total] / total, candidates[leader])
                    left = floor * (total - done)
                    out = {
                        i
                        for i in alive
                        if objective((sums[i] + left) / total, candidates[i]) > best
                    }
                    alive, bounded = [i for i in alive if i not in out], bounded + len(out)
                field = max(self.min_keep, math.ceil(self.keep * field))
                alive = self._survivors(
                    {i: sums[i] / done for i in alive}, candidates, objective, field
                )
                if leader is not None and leader not in alive:
                    alive = sorted([*alive, leader])
            unscored = [i for i, k in enumerate(seen) if not k]
            winners = self.predicted_winners(
                candidates, objective, {i: sums[i] / total for i in alive}, unscored
            )
            if winners:  # predicted to beat the finalists: scored on the whole set as they were
                with autocast(sample.device, ranking):
                    self._round(plan, cuts, winners, calib, (0, total), sums)
                for i in winners:
                    seen[i] = total
                evaluated, rounds = evaluated + total * len(winners), rounds + 1
                alive = sorted([*alive, *winners])
            if alive and final != ranking:  # the best few again, all images in the final dtype
                alive = self._survivors(
                    {i: sums[i] / total for i in alive}, candidates, objective, self.min_keep
                )
                exact = set(alive)
                for i in alive:
                    sums[i] = 0.0
                with autocast(sample.device, final):
                    self._round(plan, cuts, alive, calib, (0, total), sums)
                evaluated, rounds = evaluated + total * len(alive), rounds + 1
            else:
                exact = {i for i, k in enumerate(seen) if k == total}
        self.last_stats = {
            "scorer": "fast",
            "candidates": len(candidates),
            "images": evaluated + ordering,
            "ordering_images": ordering,
            "rounds": rounds,
            "cut_points": sum(bool(c.candidates) for c in cuts),
            "stacked": len(plan.pieces),
            "seconds": time.perf_counter() - start,
            "images_per_candidate": seen,
            "estimates": [
                s / k if k else (math.inf if c.predicted_loss is None else c.predicted_loss)
                for s, k, c in zip(sums, seen, candidates, strict=True)
            ],
            "shortlisted": shortlisted,
            "predicted_winners": len(winners),
            "bounded": bounded,
            "fully_scored": len(exact),
        }
        return [sums[i] / total if i in exact else math.inf for i in range(len(candidates))]

    def _round(
        self,
        plan: TrialPlan,
        cuts: list[CutPoint],
        alive: list[int],
        calib: CalibrationSet,
        images: tuple[int, int],
        sums: list[float],
    ) -> None:
        """Adds the losses of ``alive`` on ``images`` (a range) to ``sums``; this rank scores
        its share and the shares are merged."""
        mine = [alive[i] for i in distributed.my_share(alive)]
        added = torch.zeros(len(sums), dtype=torch.float64, device=calib.batches[0][0].device)
        for x, y in calib.slices(*images, self.max_batch):
            score_batch(plan, cuts, set(mine), self._layout(x), y, calib.task, added)
        values = added.tolist()  # the round's one wait for the device
        for i, value in distributed.merge_shares({i: sums[i] + values[i] for i in mine}).items():
            sums[i] = value

    def _run_ahead(
        self,
        plan: TrialPlan,
        cuts: list[CutPoint],
        leader: int,
        calib: CalibrationSet,
        done: int,
        sums: list[float],
    ) -> dict[int, float]:
        """``leader`` alone on the images from ``done`` to the end, in the rounds' steps: its
        summed loss at each stop the rounds can make (twice as many images, or all).
        ``sums`` is left as it was."""
        at, total, before = {}, calib.size, sums[leader]
        while done < total:
            stop = self._doubled(done, total)
            self._round(plan, cuts, [leader], calib, (done, stop), sums)
            done, at[stop] = stop, sums[leader]
        sums[leader] = before
        return at

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _hardest_first(self, model: nn.Module, calib: CalibrationSet) -> tuple[CalibrationSet, int]:
        """The set reordered by ``model``'s loss per image, highest first, and the images run
        to get them: ``calib``'s ``image_losses`` give the first images' (rank 0's, so every
        rank orders alike), a pass the rest."""

        def losses(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return calib.task.losses(model(self._layout(x)), y).double().cpu()

        known = calib.image_losses
        if known is None or len(known) > calib.size:
            known = torch.empty(0, dtype=torch.float64)
        known = distributed.all_gather(known.double().cpu())[0]
        rest = list(calib.slices(len(known), calib.size))
        per_image = torch.cat([known, *distributed.share_map(losses, rest)])
        order = torch.argsort(per_image, descending=True, stable=True)
        return calib.reordered(order), calib.size - len(known)

    def _next_stop(self, done: int, total: int, alive: int) -> int:
        """How many images the next round's candidates will have seen."""
        if not self.halving or alive <= self.min_keep:
            return total
        return self._doubled(done, total)

    def _doubled(self, done: int, total: int) -> int:
        return min(max(self.min_images, 2 * done), total)

    def shortlisted(self, candidates: Sequence[Candidate], objective: Objective) -> list[int]:
        """The candidates to score first: those without a predicted loss, and the best
        ``shortlist`` share (at least ``min_keep``) of those with one, by objective on the
        prediction."""
        predicted = {
            i: c.predicted_loss for i, c in enumerate(candidates) if c.predicted_loss is not None
        }
        kept = max(self.min_keep, math.ceil(self.shortlist * len(predicted)))
        best = self._survivors(predicted, candidates, objective, kept)
        return sorted({*best, *(i for i in range(len(candidates)) if i not in predicted)})

    @staticmethod
    def predicted_winners(
        candidates: Sequence[Candidate],
        objective: Objective,
        measured: dict[int, float],
        unscored: Sequence[int],
    ) -> list[int]:
        """Those of ``unscored`` whose predicted loss beats every ``measured`` one, by
        objective. The prediction mostly underestimates a removal's loss, so one that loses to
        the best measured loss even so is not expected to win."""
        if not measured:
            return []
        best = min(objective(loss, candidates[i]) for i, loss in measured.items())
        return [
            i
            for i in unscored
            if (p := candidates[i].predicted_loss) is not None
            and objective(p, candidates[i]) < best
        ]

    @staticmethod
    def _survivors(
        losses: dict[int, float], candidates: Sequence[Candidate], objective: Objective, kept: int
    ) -> list[int]:
        """The best ``kept`` of the live candidates, by objective on the same images."""
        ranked = sorted(losses, key=lambda i: (objective(losses[i], candidates[i]), i))
        return sorted(ranked[:kept])


def _check_scorable(graph: PruningGraph, calib: CalibrationSet) -> None:
    if graph.masks.active:
        raise AutopruneError("remove the active channel masks before scoring candidates")
    if calib.size == 0:
        raise AutopruneError("the calibration set is empty")
