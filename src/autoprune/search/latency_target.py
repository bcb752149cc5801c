"""A latency target: the search costs candidates by their predicted latency on the backend.

With ``config.target_latency_reduction`` the loss-aware search works as with a MACs target,
with the latency model (:mod:`autoprune.measure.latency_model`) in place of the MAC count:
every candidate saves about ``config.step`` of the dense model's predicted latency, the
schedule's progress and the stop rule are in predicted latency. The pruned model is measured
on the backend beside the dense one on the way (at :data:`CHECK_AT` of the target, predicted)
and when the prediction says the target is reached: every predicted saving is then scaled by
what was measured over what was predicted (at the end only when the model fell short, and the
search goes on, at most :data:`FINAL_CHECKS` times), so the search lands on the target as
measured, neither short of it nor past it.

Channel counts are snapped to what the backend's kernels like, learned from the tables rather
than fixed: a group may only lose a number of channels that saves more predicted latency than
every smaller number would. Where latency is flat between two widths (kernels working on
blocks of 8 or 16 channels) the widths in between are never kept.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import distributed
from .._forward import eval_mode
from ..errors import AutopruneError
from ..graph import ChannelGroup, PruningGraph
from ..measure.latency_model import (
    LatencyModel,
    Thinned,
    build_latency_model,
    channel_counts,
)
from ..measure.latency_table import TIMERS, median_rounds
from ..models.spec import copy_model
from .candidates import Candidate, distinct_choices
from .config import PruneConfig

TOLERANCE = 0.005  # the stop rule's slack, as a fraction of the dense predicted latency
ROUNDS = 3  # whole-model timings: median of this many rounds, models compared interleaved
THIN_KEEP = 0.5  # the thinner model the prediction is fitted through keeps this of each group
CHECK_AT = (0.5, 0.8)  # predicted progress at which the pruned model is measured on the way
FINAL_CHECKS = 3  # measurements once the prediction says done, at most
MEASURED_SLACK = 0.01  # a measured reduction this far under the target counts as reached
CORRECTION = (0.5, 2.0)  # the bounds of one correction of the predicted savings
LOAD_CHANGE = 1.5  # a check's dense timing this far from the fit's, either way: the load changed
REMEASURE = 2  # then measured again at most this many times, the closest to the fit's kept


class LatencyTarget:
    """The latency goal of a run on ``graph``'s model (the one being pruned, bound now)."""

    def __init__(
        self,
        model: LatencyModel,
        graph: PruningGraph,
        target: float,
        input_shape: tuple[int, ...],
        rounds: int = ROUNDS,
    ) -> None:
        self.model, self.graph, self.target, self.input_shape = model, graph, target, input_shape
        self.rounds = rounds
        self.dense = copy_model(graph.model)  # timed beside the pruned model at the end
        self.dense_ms = model.predict()

    @classmethod
    def build(
        cls,
        graph: PruningGraph,
        example_inputs: torch.Tensor,
        target: float,
        *,
        backend: str,
        batch: int,
        cap: float = 1.0,
    ) -> LatencyTarget:
        """Measure (or load) the tables of ``graph``'s model and fit the prediction through
        the dense model and copies each thinned in one region (:meth:`LatencyModel.fit_regions`)
        to :data:`THIN_KEEP` of each of its groups (within ``cap``), all timed interleaved."""
        model = build_latency_model(
            graph.model, example_inputs, backend=backend, batch=batch, rounds=ROUNDS
        )
        keep = max(THIN_KEEP, 1.0 - cap)
        by_region: dict[int, list[str]] = {}
        for group in graph.groups():
            region = _region(model, group)
            if region is not None:
                by_region.setdefault(region, []).append(group.name)
        names = {m: n for n, m in graph.model.named_modules()}
        copies, thinned = [], []
        for region, groups in by_region.items():
            thin = graph.copy()
            thin.prune({g: torch.arange(int(thin.group(g).channels * (1 - keep))) for g in groups})
            modules = dict(thin.model.named_modules())
            widths = {m: channel_counts(modules[names[m]]) for m in model.layers}
            copies.append(thin.model)
            thinned.append((region, model.tables_at(widths), model.region_channels(widths)[region]))
        input_shape = tuple(example_inputs.shape[1:])
        timed = [graph.model, *copies]
        with contextlib.ExitStack() as stack:
            for m in timed:
                stack.enter_context(eval_mode(m))
            timings = median_rounds(timed, input_shape, TIMERS.get(backend), batch, ROUNDS)
        dense_ms, *thin_ms = distributed.all_gather(timings)[0]  # every rank fits rank 0's
        model.dense_ms = dense_ms  # timed beside the thin copies: the same load
        model.fit_regions(Thinned(*t, ms) for t, ms in zip(thinned, thin_ms, strict=True))
        return cls(model, graph, target, input_shape)

    def fit_state(self) -> dict[str, Any]:
        """The fitted prediction (the tables are in the cache): what a resumed run reloads."""
        lm = self.model
        regional = {
            name: {str(r): v for r, v in getattr(lm, name).items()}  # JSON keys are strings
            for name in ("scales", "channel_ms")
        }
        return {
            **{k: getattr(lm, k) for k in ("dense_ms", "fixed_ms", "scale", "savings")},
            **regional,
        }

    def load_fit(self, fit: dict[str, Any]) -> None:
        """Predict as the run that saved :meth:`fit_state` did (call before any pruning)."""
        lm = self.model
        lm.dense_ms, lm.fixed_ms, lm.scale = fit["dense_ms"], fit["fixed_ms"], fit["scale"]
        lm.scales = {int(r): v for r, v in fit.get("scales", {}).items()}
        lm.channel_ms = {int(r): v for r, v in fit.get("channel_ms", {}).items()}
        lm.savings = fit.get("savings", 1.0)
        self.dense_ms = lm.predict()

    # ------------------------------------------------------------------------- progress
    def predicted_ms(self) -> float:
        """The model as it is now: its layers' widths, without the blocks and layers removed."""
        return self.model.predict(live=set(self.graph.model.modules()))

    def saved_whole(self, modules: Iterable[nn.Module]) -> float:
        """Milliseconds predicted to be saved by removing ``modules`` whole (a block, a layer)."""
        return self.model.saved_whole(modules)

    @property
    def reduction(self) -> float:
        """The fraction of the dense model's predicted latency removed so far."""
        return 1.0 - self.predicted_ms() / self.dense_ms

    @property
    def progress(self) -> float:
        return self.reduction / self.target

    def reached(self) -> bool:
        return self.reduction >= self.target - TOLERANCE

    def check_reachable(self, limits: Mapping[str, int]) -> None:
        """Refuse a target the caps make unreachable, with the most they allow."""
        removed: dict[Any, tuple[int, int]] = {}
        for group in self.graph.groups():
            for module, (a, b) in group.removed(torch.arange(limits.get(group.name, 0))).items():
                ra, rb = removed.get(module, (0, 0))
                removed[module] = (ra + a, rb + b)
        best = 1.0 - self.model.predict(removed) / self.dense_ms
        if self.target > best:
            raise AutopruneError(
                f"a {100 * self.target:.1f} % latency reduction is out of reach: with every "
                f"group at its cap the model predicts {100 * best:.1f} % on "
                f"{self.model.backend} at batch {self.model.batch}; lower the target or raise "
                "the cap"
            )

    def check_on_the_way(self, checks: list[dict[str, Any]], iteration: int) -> None:
        """Measure once the predicted progress passes one of :data:`CHECK_AT` above where the
        last check left it (not at the target: :meth:`check_at_the_end`) and scale the
        predicted savings to the measured ones, either way, appending the check to
        ``checks``. A correction down re-arms the points it falls below: one measurement
        taken while the load changed must not steer the rest of the search unchecked."""
        since = checks[-1].get("progress_after", 0.0) if checks else 0.0
        if any(since < at <= self.progress for at in CHECK_AT) and not self.reached():
            checks.append({"iteration": iteration, **self.check(final=False)})

    def check_at_the_end(self, checks: list[dict[str, Any]], iteration: int) -> bool:
        """Whether the model, its prediction at the target, measures short of it (the
        prediction then corrected, the check appended to ``checks``): once per step taken
        since the last check, at most :data:`FINAL_CHECKS` times."""
        finals = [c for c in checks if c.get("final")]
        if len(finals) >= FINAL_CHECKS or (finals and finals[-1]["iteration"] == iteration):
            return False
        checks.append({"iteration": iteration, "final": True, **self.check(final=True)})
        return bool(checks[-1]["short"])

    def check(self, final: bool) -> dict[str, Any]:
        """Measure the pruned model beside the dense one (rank 0's timing decides on every
        rank) and scale every predicted saving by measured over predicted, within
        :data:`CORRECTION` (``final``: only when short of the target), so the prediction of
        the model now is its measurement and the search goes on from there."""
        dense, pruned, again = self._measure_steady()
        measured, predicted = 1.0 - pruned / dense, self.reduction
        short = final and measured < self.target - MEASURED_SLACK
        if predicted > 0 and (short or not final):
            low, high = CORRECTION
            self.model.savings *= min(high, max(low, measured / predicted))
        return {
            "dense_measured_ms": dense,
            "measured_ms": pruned,
            "predicted_reduction": predicted,
            "measured_reduction": measured,
            "short": short,
            "savings": self.model.savings,
            "progress_after": self.progress,
            "remeasured": again,
        }

    def _measure_steady(self) -> tuple[float, float, int]:
        """:meth:`_measure` (rank 0's), again while the dense model times :data:`LOAD_CHANGE`
        off the fit's dense timing, at most :data:`REMEASURE` times, keeping the closest: two
        timings under another load do not compare as under this one (on a shared machine a
        burst can halve every saving through one correction)."""
        reference = self.model.dense_ms
        tries = [distributed.all_gather(self._measure())[0]]
        while len(tries) <= REMEASURE and not (
            1 / LOAD_CHANGE <= tries[-1][0] / reference <= LOAD_CHANGE
        ):
            tries.append(distributed.all_gather(self._measure())[0])
        dense, pruned = min(tries, key=lambda t: abs(math.log(t[0] / reference)))
        return dense, pruned, len(tries) - 1

    def _measure(self) -> tuple[float, float]:
        """The dense and the pruned model timed interleaved: median of ``rounds``."""
        lm, pruned = self.model, self.graph.model
        with eval_mode(self.dense), eval_mode(pruned):
            dense, measured = median_rounds(
                [self.dense, pruned],
                self.input_shape,
                TIMERS.get(lm.backend),
                lm.batch,
                self.rounds,
            )
        return dense, measured

    # ----------------------------------------------------------------------- candidates
    def options(self, group: ChannelGroup, limit: int) -> list[tuple[int, float]]:
        """The ``(channels removed, ms saved)`` a group may take: each saving more than every
        smaller removal (the widths the backend's kernels like)."""
        best, out = 0.0, []
        for n in range(1, limit + 1):
            saved = self.model.saved(group.removed(torch.arange(n)))
            if saved > best * (1 + 1e-9) + 1e-12:
                out.append((n, saved))
                best = saved
        return out

    def candidates(
        self,
        criteria: Iterable[str],
        limits: Mapping[str, int],
        state: Mapping[str, Any],
        step: float,
    ) -> list[Candidate]:
        """One candidate per group and distinct channel choice, each saving about ``step`` of
        the dense predicted latency (less on the last step: what is left to the target)."""
        graph, criteria = self.graph, tuple(criteria)
        remaining = (self.target - self.reduction) * self.dense_ms
        goal = min(step * self.dense_ms, remaining)
        candidates = []
        for group in graph.groups():
            options = self.options(group, limits.get(group.name, 0))
            if not options:
                continue
            n, saved = min(options, key=lambda o: abs(o[1] - goal))
            for idxs, names in distinct_choices(group, criteria, n, state):
                macs = group.macs_saved(idxs)
                candidates.append(Candidate(group.name, names, idxs, macs, latency_saved=saved))
        if goal < step * self.dense_ms:  # the last step: keep those landing on the target
            slack = TOLERANCE * self.dense_ms
            landing = [c for c in candidates if abs(goal - c.latency_saved) <= slack]
            candidates = landing or candidates
        return candidates

    # ------------------------------------------------------------------------ reporting
    def report(
        self, checks: Sequence[dict[str, Any]] = (), iteration: int | None = None
    ) -> dict[str, Any]:
        """The pruned model measured on the backend beside what the model predicts: the last
        check's timing where it measured the model as it is (``iteration``), else timed now
        as a check times it (rank 0's timing, again where the load changed)."""
        lm = self.model
        last = checks[-1] if checks else {}
        if last.get("final") and last["iteration"] == iteration:
            dense, measured = last["dense_measured_ms"], last["measured_ms"]
        else:
            dense, measured, _ = self._measure_steady()
        predicted = self.predicted_ms()
        return {
            "backend": lm.backend,
            "batch": lm.batch,
            "rounds": self.rounds,
            "dense_measured_ms": dense,
            "dense_predicted_ms": self.dense_ms,
            "predicted_ms": predicted,
            "measured_ms": measured,
            "prediction_error": predicted / measured - 1.0,
            "speedup_predicted": self.dense_ms / predicted,
            "speedup_measured": dense / measured,
            "tables_ratio": self.model.ratio,
            "fixed_ms": self.model.fixed_ms,
            "savings_correction": self.model.savings,
            "cache": self.model.cache_file,
        }


def latency_target_for(
    graph: PruningGraph, example_inputs: torch.Tensor | Sequence[torch.Tensor], config: PruneConfig
) -> LatencyTarget | None:
    """The latency target of ``config`` (None without one) for ``graph``'s model, on its
    backend and batch."""
    if config.target_latency_reduction is None:
        return None
    if not isinstance(example_inputs, torch.Tensor):
        raise AutopruneError("a latency target needs one input tensor; use target_macs_reduction")
    return LatencyTarget.build(
        graph,
        example_inputs,
        config.target_latency_reduction,
        backend=config.latency_backend,
        batch=config.latency_batch,
        cap=config.cap,
    )


def _region(model: LatencyModel, group: ChannelGroup) -> int | None:
    """The region a group thins: that of the modelled layers whose outputs it removes, the
    one with the most table time where they differ (None: it removes no modelled output)."""
    weights: dict[int, float] = {}
    for module, (out_removed, _) in group.removed(torch.arange(1)).items():
        if out_removed and module in model.layers:
            region = model.regions.get(module, 0)
            weights[region] = weights.get(region, 0.0) + model.layers[module].dense_ms
    return max(weights, key=weights.__getitem__) if weights else None
