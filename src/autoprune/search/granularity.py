"""Granularities: what the search removes, from whole blocks down to single weights.

Pruning a network at one granularity leaves long chains of thin layers (channels only) or
very sparse dense layers (weights only); multi-grain pruning (MGP, Kollek et al. 2021) works
coarse to fine instead. A run goes through ``config.granularity`` in the registered order
(``rank``), each until its goal, with recovery in between:

- ``block`` and ``layer`` (:mod:`autoprune.graph.units`): every removable unit is a
  candidate, tried by letting its input pass through; goal: a share of the MACs target;
- ``channel``: the schedule's (group, criterion) candidates, as in a channel-only run; goal:
  the MACs target (it is the last structured granularity, so it finishes the MACs);
- ``weight`` (:mod:`autoprune.graph.sparsity`): steps of ``weight_step`` of all conv and
  linear weights, taken from one layer by magnitude or spread over every layer by a score
  comparable across layers (LAMP, global magnitude); goal: ``weight_sparsity``, unless
  recovery cannot hold the loss under ``weight_loss_limit`` times its value when the phase
  began (:attr:`Granularity.loss_limit`): then the step is undone and the phase ends early.

Candidates are scored by the same scorer on the same calibration loss; with the
``loss_per_mac`` objective weight candidates count parameters instead of MACs. Adding a
granularity is one registered class here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..errors import AutopruneError
from ..graph import PruningGraph
from ..graph.sparsity import (
    MASK,
    mask_weights,
    masked_count,
    sparse_macs,
    weight_layers,
    zeroed,
)
from ..graph.units import find_units, substitute_identity
from ..measure import count_params
from .candidates import Candidate, GrainCandidate
from .schedules import TOLERANCE, Schedule, SearchContext, Step, choose

if TYPE_CHECKING:
    from .config import PruneConfig

EMPTY = torch.zeros(0, dtype=torch.long)
MAX_LAYER_SPARSITY = 0.99  # a layer keeps at least 1 % of its weights


class Granularity(ABC):
    """One phase of a run: proposes its steps until ``goal`` and applies them.

    ``structured`` granularities save dense MACs (their goal is a MACs reduction); ``counts``
    names what the summary counts of them.
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
        return ctx.reduction >= self.goal - TOLERANCE

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


GRANULARITIES: Registry[type[Granularity]] = Registry("granularity")


def check_granularity(config: PruneConfig) -> None:
    """Refuse unknown, repeated or out-of-order granularities and ill-formed MACs shares."""
    names = config.granularity
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
    structured = [n for n in names if GRANULARITIES.get(n).structured]
    if shares and (
        len(shares) != len(structured) or min(shares) <= 0 or abs(sum(shares) - 1) > 1e-6
    ):
        raise AutopruneError(
            f"macs_shares: one positive share per structured granularity "
            f"({', '.join(structured)}) summing to 1, got {list(shares)}"
        )


def plan(config: PruneConfig, schedule: Schedule) -> list[Granularity]:
    """The run's granularities in order, each with its goal: structured ones share the MACs
    target (``macs_shares``, equal by default), ``weight`` aims at ``weight_sparsity``."""
    structured = [n for n in config.granularity if GRANULARITIES.get(n).structured]
    shares = config.macs_shares or [1.0] * len(structured)
    total = sum(shares)
    goals = {
        n: config.target_macs_reduction * min(1.0, s / total)
        for n, s in zip(structured, accumulate(shares), strict=True)
    }
    return [
        GRANULARITIES.get(n)(n, config, goals.get(n, config.weight_sparsity), schedule)
        for n in config.granularity
    ]


def _ignored(paths: Sequence[str], ignored: Sequence[str]) -> bool:
    """Whether a path is, holds or lies inside an ignored layer."""
    return any(
        p == i or p.startswith(i + ".") or i.startswith(p + ".") for p in paths for i in ignored
    )


# --------------------------------------------------------------------------- blocks, layers
@dataclass(frozen=True)
class UnitCandidate(GrainCandidate):
    """Replacing the modules at ``paths`` by the identity (``group`` names the unit)."""

    paths: tuple[str, ...] = ()

    def _modules(self, graph: PruningGraph) -> list[nn.Module]:
        return [graph.model.get_submodule(p) for p in self.paths]

    def trial(self, graph: PruningGraph) -> AbstractContextManager[Any]:
        return substitute_identity(self._modules(graph))

    def changed(self, graph: PruningGraph) -> list[nn.Module]:
        return self._modules(graph)

    def prune(self, graph: PruningGraph) -> None:
        graph.remove_modules(self.paths)

    def removal(self) -> dict[str, torch.Tensor]:
        return dict.fromkeys(self.paths, EMPTY)


class _Units(Granularity):
    """Every block or layer whose removal stays within the MACs target is a candidate."""

    kind: ClassVar[str]

    def candidates(self, ctx: SearchContext) -> list[GrainCandidate]:
        graph = ctx.graph
        room = ctx.remaining_macs + TOLERANCE * ctx.original_macs
        candidates = []
        for unit in find_units(graph.model, graph.example_inputs):
            if unit.kind != self.kind or _ignored(unit.paths, self.config.ignored_layers):
                continue
            saved = graph.module_macs(graph.model.get_submodule(p) for p in unit.paths)
            if 0 < saved <= room:
                candidates.append(UnitCandidate(unit.name, (), EMPTY, saved, paths=unit.paths))
        return candidates

    def apply(self, graph: PruningGraph, removal: Mapping[str, torch.Tensor]) -> None:
        graph.remove_modules(list(removal))

    def count(self, removal: Mapping[str, torch.Tensor]) -> int:
        return 1


@GRANULARITIES.register(
    "block", rank=0, description="residual blocks and runs of layers between equal shapes"
)
class Block(_Units):
    kind = "block"
    counts = "blocks"


@GRANULARITIES.register("layer", rank=1, description="one conv + norm + activation, stride 1")
class Layer(_Units):
    kind = "layer"
    counts = "layers"


# ---------------------------------------------------------------------------------- channels
@GRANULARITIES.register("channel", rank=2, description="channel groups, by the schedule")
class Channel(Granularity):
    counts = "channels"

    @property
    def needs_calibration(self) -> bool:
        return self.schedule.needs_calibration

    def candidates(self, ctx: SearchContext) -> list[Candidate]:
        return self.schedule.candidates(ctx)

    def reached(self, ctx: SearchContext) -> bool:
        """The MACs goal, or with a latency target the predicted latency's."""
        return super().reached(ctx) if ctx.latency is None else ctx.latency.reached()

    def propose(self, ctx: SearchContext) -> Step | None:
        return self.schedule.propose(ctx)

    def apply(self, graph: PruningGraph, removal: Mapping[str, torch.Tensor]) -> None:
        graph.prune(dict(removal))


# ----------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class WeightCandidate(GrainCandidate):
    """Masking the weights at flat positions ``idxs`` of the layer named ``group``."""

    def trial(self, graph: PruningGraph) -> AbstractContextManager[Any]:
        return zeroed(graph.model.get_submodule(self.group), self.idxs)

    def changed(self, graph: PruningGraph) -> list[nn.Module]:
        return [graph.model.get_submodule(self.group)]

    def prune(self, graph: PruningGraph) -> None:
        mask_weights(graph.model.get_submodule(self.group), self.idxs)


@dataclass(frozen=True)
class SpreadWeightCandidate(GrainCandidate):
    """Masking weights in several layers at once: ``parts`` pairs a layer with its positions."""

    parts: tuple[tuple[str, torch.Tensor], ...] = ()

    def trial(self, graph: PruningGraph) -> AbstractContextManager[Any]:
        stack = ExitStack()
        for name, idxs in self.parts:
            stack.enter_context(zeroed(graph.model.get_submodule(name), idxs))
        return stack

    def changed(self, graph: PruningGraph) -> list[nn.Module]:
        return [graph.model.get_submodule(name) for name, _ in self.parts]

    def prune(self, graph: PruningGraph) -> None:
        for name, idxs in self.parts:
            mask_weights(graph.model.get_submodule(name), idxs)

    def removal(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al., ICLR 2021): a weight's square over the sum of the squares of the
    layer's weights at least as large. A layer's own scale cancels, so one global threshold
    spreads a step over the layers without emptying those whose weights are small."""
    squares = weight.detach().reshape(-1).double().pow(2)
    ordered, order = squares.sort()
    tails = ordered.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(squares)
    scores[order] = ordered / tails.clamp_min(torch.finfo(torch.float64).tiny)
    return scores


# How a step spread over every layer ranks the weights: lowest first, compared across layers.
SPREAD_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "lamp": lamp_scores,
    "global_magnitude": lambda weight: weight.detach().reshape(-1).abs().double(),
}


@GRANULARITIES.register("weight", rank=3, description="unstructured magnitude masks")
class Weight(Granularity):
    """Steps of ``weight_step`` of all conv and linear weights, from one layer by magnitude or
    spread over all by each of :data:`SPREAD_SCORES`; every step is followed by recovery (with
    the masks held). A layer keeps at least ``1 - MAX_LAYER_SPARSITY`` of its weights."""

    structured = False
    counts = "weights"
    recover_every_step = True

    def __init__(self, name: str, config: PruneConfig, goal: float, schedule: Schedule) -> None:
        super().__init__(name, config, goal, schedule)
        self.loss_limit = config.weight_loss_limit

    def _remaining(self, model: nn.Module) -> tuple[int, int]:
        masked, total = masked_count(model)
        return round(self.goal * total) - masked, total

    def reached(self, ctx: SearchContext) -> bool:
        return self._remaining(ctx.graph.model)[0] <= 0

    def candidates(self, ctx: SearchContext) -> list[GrainCandidate]:
        remaining, total = self._remaining(ctx.graph.model)
        step = min(max(1, round(self.config.weight_step * total)), remaining)
        layers = {
            name: module
            for name, module in weight_layers(ctx.graph.model).items()
            if not _ignored([name], self.config.ignored_layers)
        }
        offers: list[GrainCandidate] = []
        for name, module in layers.items():
            free = _free(module, module.weight.detach().abs().reshape(-1))
            n = min(step, int(free.isfinite().sum()))
            if n >= 1:
                idxs = torch.topk(free, n, largest=False).indices.sort().values.cpu()
                offers.append(WeightCandidate(name, ("magnitude",), idxs, 0, n))
        for criterion, score in SPREAD_SCORES.items():
            offers += _spread(layers, score, criterion, step)
        # Candidates that remove the whole step compare by loss alone; smaller ones only if
        # none can give the whole step.
        return [c for c in offers if c.params_saved == step] or offers

    def apply(self, graph: PruningGraph, removal: Mapping[str, torch.Tensor]) -> None:
        for name, idxs in removal.items():
            mask_weights(graph.model.get_submodule(name), idxs)


def _free(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` (flat, of ``module``'s weights) with inf where a weight may not be masked:
    masked already, or beyond the layer's ``MAX_LAYER_SPARSITY``."""
    scores = scores.clone()
    mask = getattr(module, MASK, None)
    if mask is not None:
        scores[~mask.reshape(-1)] = math.inf
    allowed = math.floor(MAX_LAYER_SPARSITY * scores.numel()) - int(scores.isinf().sum())
    if allowed < int(scores.isfinite().sum()):
        scores[scores.argsort()[max(0, allowed) :]] = math.inf
    return scores


def _spread(
    layers: Mapping[str, nn.Module],
    score: Callable[[torch.Tensor], torch.Tensor],
    criterion: str,
    step: int,
) -> list[GrainCandidate]:
    """The ``step`` weights with the lowest ``score`` over all ``layers``, as one candidate
    (none for a single layer: its own candidate is the same step)."""
    if len(layers) < 2:
        return []
    scores = [_free(m, score(m.weight)) for m in layers.values()]
    flat = torch.cat(scores)
    n = min(step, int(flat.isfinite().sum()))
    if n < 1:
        return []
    picked = torch.topk(flat, n, largest=False).indices
    parts, start = [], 0
    for name, layer_scores in zip(layers, scores, strict=True):
        end = start + layer_scores.numel()
        idxs = picked[(picked >= start) & (picked < end)] - start
        if idxs.numel():
            parts.append((name, idxs.sort().values.cpu()))
        start = end
    return [SpreadWeightCandidate("all layers", (criterion,), EMPTY, 0, n, parts=tuple(parts))]


def accounting(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    baseline_params: int,
    dense_macs: int,
    history: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """What summary.json reports of a multi-grain run: removals per granularity, non-zero
    parameters and the compression they give, weight sparsity and the sparse MACs estimate."""
    removed = {GRANULARITIES.get(n).counts: 0 for n in GRANULARITIES.names()}
    for entry in history:
        removed[GRANULARITIES.get(entry["granularity"]).counts] += entry["count"]
    nonzero = count_params(model, nonzero=True)
    masked, total = masked_count(model)
    return {
        "nonzero_params": nonzero,
        "compression_ratio": baseline_params / max(1, nonzero),
        "weight_sparsity": masked / max(1, total),
        "sparse_macs": sparse_macs(model, example_inputs, dense_macs),
        "removed": removed,
    }
