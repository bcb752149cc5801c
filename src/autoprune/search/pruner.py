"""The engine: a :class:`Pruner` takes one loss-aware (or fixed) step at a time.

It is the Torch-Pruning habit (``pruner = Pruner(model, example_inputs, config); pruner.step()``
inside your own loop) with autoprune's search: each :meth:`Pruner.step` scores the candidates
of the granularity being worked on, applies the best one physically and, when recovery is due
(every ``recover_every`` of the original MACs), calls ``recover`` on the model, which may be
your own training step. :func:`autoprune.prune` is a short loop over it.

Every source of randomness is a function of the seed and of counters in the state, and
:meth:`Pruner.state_dict` holds everything else (the removals applied, in order, and the
weights), so a pruner loaded from it continues exactly as the saved one would have.
Under a process group every rank steps the same pruner: candidates are scored in shares and
the losses all-gathered (:mod:`.scorers`), and the weights are compared after every step.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import distributed
from .._device import follow
from ..errors import AutopruneError
from ..graph import build_graph, verify_groups
from ..models.spec import copy_model
from ..task import Task
from ._reach import refuse_unreachable
from .calibration import CalibrationSet
from .candidates import Candidate
from .config import PruneConfig
from .granularity import Granularity, plan
from .granularity.weight import restore_weights
from .latency_target import latency_target_for
from .schedules import SCHEDULES, SearchContext, Step
from .scorers import create_scorer
from .state import STATE_FORMAT, SearchState, comparable, weights_digest
from .training import Recover

if TYPE_CHECKING:
    from ..feed import DataLike

Inputs = torch.Tensor | Sequence[torch.Tensor]


class Pruner:
    """Prunes a copy of ``model`` (:attr:`model`, the one to train) one step at a time.

    ``calib_data`` (a :class:`CalibrationSet`, a registered dataset's name, ``ImageData``, or
    a ``Dataset``/``DataLoader`` of ``(inputs, targets)``) gives the ``config.calib_size``
    samples candidates are scored on, with ``task``'s loss; only ``schedule="fixed"`` with a
    data-free criterion runs without. ``recover(model)``, when given, is called whenever
    recovery is due; the calibration loss is measured again after it. Train between steps
    through ``recover`` rather than after :meth:`step` returns: the step then records the loss
    its training reached, and a weight-pruning step that training cannot repair is undone.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        config: PruneConfig | None = None,
        task: Task | None = None,
        *,
        calib_data: CalibrationSet | DataLike | None = None,
        recover: Recover | None = None,
    ) -> None:
        self.config = config = config or PruneConfig()
        example_inputs = follow(example_inputs, model)  # the user's may be on another device
        self.calib = _calibration(model, calib_data, config, task)
        self.recover = recover
        self.schedule = SCHEDULES.get(config.schedule)(config)
        self.grains = plan(config, self.schedule)
        if any(g.needs_calibration for g in self.grains) and self.calib is None:
            raise AutopruneError(
                f"schedule {config.schedule!r} with criteria {', '.join(config.criteria)} and "
                f"granularity {','.join(config.granularities)} needs data: pass train_data or "
                "calib_data (only schedule 'fixed' with a data-free criterion, on channels "
                "alone, runs on example inputs alone)"
            )
        self.scorer = create_scorer(config.scorer, **config.scorer_options)
        self.graph = build_graph(
            copy_model(model),
            example_inputs,
            ignored_layers=config.ignored_layers,
            scope=config.scope,
        )
        distributed.broadcast_weights(self.graph.model)  # all ranks start from rank 0's weights
        check = config.verify_graph and "channel" in config.granularities
        self.frozen_by_verify = dict(verify_groups(self.graph)) if check else {}  # before pruning
        self.start_weights = weights_digest(self.graph.model)
        self.original_macs = self.graph.macs()
        self.original_channels = {g.name: g.channels for g in self.graph.groups()}
        self.latency = latency_target_for(self.graph, example_inputs, config)
        self.state = SearchState(next_recovery=config.recover_every)
        self.saved_to: str | None = None  # where the last state_dict was written, for errors
        self._started = False

    # ------------------------------------------------------------------------- the model
    @property
    def model(self) -> nn.Module:
        """The model being pruned: train this one (pruning replaces its layers' parameters)."""
        return self.graph.model

    @property
    def macs_reduction(self) -> float:
        """The fraction of the original MACs (in ``config.scope``) removed so far."""
        return 1.0 - self.graph.macs() / self.original_macs

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per step taken (what was removed, by which criteria, at what loss)."""
        return self.state.history

    @property
    def done(self) -> bool:
        return self.state.grain == len(self.grains)

    @property
    def granularity(self) -> Granularity | None:
        """The granularity the next step works on (None when every one is done)."""
        return None if self.done else self.grains[self.state.grain]

    # -------------------------------------------------------------------------- stepping
    def start(self) -> None:
        """Check the target can be reached and measure the starting calibration loss; done by
        the first step when not called (a loaded state has started already)."""
        if self._started:
            return
        if self.latency is None and "channel" in self.config.granularities:
            self._check_reachable()
        elif self.latency is not None and self.config.granularities == ("channel",):
            self.latency.check_reachable(self.context().limits())  # blocks reach further
        self.state.loss = self.calib_loss("before pruning")
        self._started = True

    def candidates(self) -> list[Candidate]:
        """What the next step chooses from (its granularity's candidates at this point)."""
        self.start()
        grain = self.granularity
        return [] if grain is None else list(grain.candidates(self.context()))

    def score(self, candidates: Sequence[Candidate]) -> list[float]:
        """Calibration losses of ``candidates`` applied one at a time (inf: dropped early)."""
        self.start()
        ctx = self.context()
        if self.calib is None or ctx.loss is None:
            raise AutopruneError("scoring candidates needs calibration data: pass calib_data")
        return list(self.scorer(self.graph, list(candidates), self.calib, ctx.objective()))

    def step(self) -> dict[str, Any] | None:
        """One step, applied physically (and recovery when due): its history record, or None
        when every granularity has reached its goal or has nothing left to offer."""
        self.start()
        while not self.done:
            entry = self._iterate(self.grains[self.state.grain])
            if entry is not None:
                if self.latency is not None:  # measured on the way: the landing as measured
                    self.latency.check_on_the_way(self.state.latency_checks, self.state.iteration)
                return entry
            self.state.grain += 1  # this granularity is done: on to the next
            self.state.grain_loss = None
            if self.done and self._measured_short():
                self.state.grain = len(self.grains) - 1  # the finest granularity goes on
        return None

    def _measured_short(self) -> bool:
        """With a latency target, whether the model measures short of it (the prediction
        then corrected: :meth:`LatencyTarget.check_at_the_end`)."""
        if self.latency is None or self.grains[-1].name in self.state.ended_early:
            return False
        return self.latency.check_at_the_end(self.state.latency_checks, self.state.iteration)

    def context(self) -> SearchContext:
        state = self.state
        return SearchContext(
            graph=self.graph,
            config=self.config,
            calib=self.calib,
            scorer=self.scorer,
            original_macs=self.original_macs,
            original_channels=self.original_channels,
            loss=state.loss,
            next_recovery=state.next_recovery if self.recover is not None else None,
            latency=self.latency,
        )

    def _iterate(self, grain: Granularity) -> dict[str, Any] | None:
        """Propose, check, apply, recover when due. None (and nothing done) when ``grain`` has
        reached its goal, has nothing to offer, or its step cost more than its ``loss_limit``
        allows (then the step is undone)."""
        state, config = self.state, self.config
        t0 = time.perf_counter()
        if state.grain_loss is None:
            if grain.settle(self.graph, self.calib):
                state.loss = self.calib_loss(f"as {grain.name} pruning began")
            state.grain_loss = state.loss
        ctx = self.context()
        step = None if grain.reached(ctx) else grain.propose(ctx)
        if step is None:
            return None
        self._check_finite(step.loss, "with the chosen removal")
        limited = grain.loss_limit is not None and state.grain_loss is not None
        before = (state.loss, copy.deepcopy(self.model.state_dict())) if limited else None
        self._apply(grain, step.removal)
        reduction = self.macs_reduction
        entry = self._record(grain, step, reduction, time.perf_counter() - t0)
        state.timings["search_s"] += entry["seconds"]
        state.loss = step.loss
        if grain.settle(self.graph, self.calib):
            state.loss = self.calib_loss("after the step")
        due = grain.recover_every_step or reduction >= state.next_recovery - 1e-12
        if self.recover is not None and (due or grain.reached(self.context())):
            t1 = time.perf_counter()
            self.recover(self.model)
            state.loss = self.calib_loss("after recovery")
            state.next_recovery = (math.floor(reduction / config.recover_every + 1e-9) + 1) * (
                config.recover_every
            )
            entry["loss_recovered"] = state.loss
            entry["recovery_s"] = round(time.perf_counter() - t1, 3)
            state.timings["recovery_s"] += entry["recovery_s"]
        if before is not None and self._over_limit(grain):
            self._undo(grain, *before)
            return None
        state.applied.append((grain.name, list(step.removal.items())))
        state.iteration += 1
        state.history.append(entry)
        distributed.check_in_sync(self.model, f"at iteration {state.iteration}")
        return entry

    def _over_limit(self, grain: Granularity) -> bool:
        state = self.state
        assert grain.loss_limit is not None and state.grain_loss is not None
        return state.loss is not None and state.loss > grain.loss_limit * state.grain_loss

    def _undo(self, grain: Granularity, loss: float | None, weights: dict[str, Any]) -> None:
        """Take back the step just applied (weights and masks as before) and end ``grain``."""
        why = (
            f"calibration loss {self.state.loss:.4g} after its step {self.state.iteration + 1} "
            f"is over {grain.loss_limit:g}x the {self.state.grain_loss:.4g} it began with; the "
            "step was undone"
        )
        restore_weights(self.model, weights)
        self.state.loss = loss
        self.state.ended_early[grain.name] = why
        warnings.warn(f"granularity {grain.name!r} ended before its goal: {why}", stacklevel=1)

    def _apply(self, grain: Granularity, removal: dict[str, torch.Tensor]) -> None:
        """Apply a removal; groups a block or layer removal renamed start at their width now."""
        grain.apply(self.graph, removal)
        for group in self.graph.groups():
            self.original_channels.setdefault(group.name, group.channels)

    def _record(
        self, grain: Granularity, step: Step, reduction: float, seconds: float
    ) -> dict[str, Any]:
        removed = {name: int(idxs.numel()) for name, idxs in step.removal.items()}
        channels = grain.name == "channel"
        unit = grain.structured and not channels  # a block or layer: its first module names it
        latency = (
            {} if self.latency is None else {"latency_predicted_ms": self.latency.predicted_ms()}
        )
        return {
            **latency,
            "iteration": self.state.iteration + 1,
            "granularity": grain.name,
            "group": next(iter(removed)) if len(removed) == 1 or unit else None,
            "criteria": list(step.criteria),
            "channels": sum(removed.values()) if channels else 0,
            "count": grain.count(step.removal),
            "removed": removed,
            "loss": step.loss,
            "loss_recovered": None,
            "macs_reduction": reduction,
            "candidates": step.candidates,
            "seconds": round(seconds, 3),
            "recovery_s": 0.0,
            "scorer": _json_safe(step.stats),
        }

    # ---------------------------------------------------------------------- measurements
    def calib_loss(self, when: str) -> float | None:
        """The model's loss on the calibration set (None without one); refuses a non-finite
        one, saying ``when`` it happened and what was saved."""
        if self.calib is None:
            return None
        loss = self.calib.loss(self.model)
        self._check_finite(loss, when)
        return loss

    def _check_finite(self, loss: float | None, when: str) -> None:
        if loss is None or math.isfinite(loss):
            return
        where = (
            f"the last good state (after {self.state.iteration} iterations) is saved in "
            f"{self.saved_to}"
            if self.saved_to is not None
            else "nothing was saved (no output directory)"
        )
        raise AutopruneError(
            f"calibration loss is {loss} {when} at iteration {self.state.iteration + 1}: "
            f"stopping; {where}"
        )

    def _check_reachable(self) -> None:
        """Refuse a target the caps make unreachable, with advice that can work."""
        cfg = self.config
        refuse_unreachable(
            self.graph,
            self.original_macs,
            self.original_channels,
            cfg.target_macs_reduction,
            cfg.cap,
            cfg.channel_multiple,
        )

    # ---------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue from here: settings (to refuse other ones), the starting
        weights' digest, the state (removals applied, counters, history) and the weights."""
        return {
            "format": STATE_FORMAT,
            "config": comparable(self.config, self.scorer),
            "start_weights": self.start_weights,
            **asdict(self.state),
            "latency_fit": None if self.latency is None else self.latency.fit_state(),
            "model": self.model.state_dict(),
        }

    def load_state_dict(self, saved: dict[str, Any], source: str = "") -> None:
        """Continue from ``state_dict()`` of a pruner made with the same model and settings:
        its removals are replayed on this one's model and its weights loaded. ``source`` names
        where it came from in errors."""
        saved = dict(saved)
        config, before = comparable(self.config, self.scorer), saved.pop("config")
        changed = sorted(k for k in config.keys() | before.keys() if config.get(k) != before.get(k))
        if changed or saved.pop("format") != STATE_FORMAT:
            raise AutopruneError(
                f"cannot resume {source}: it was started with other settings "
                f"({', '.join(changed) or 'format'}); use the same ones or another output "
                "directory"
            )
        if saved.pop("start_weights") != self.start_weights:
            raise AutopruneError(
                f"cannot resume {source}: it was started from a model with other weights; pass "
                "the same model or use another output directory"
            )
        if self.state.applied:
            raise AutopruneError("load a state into a new Pruner, not one that has pruned")
        weights, fit = saved.pop("model"), saved.pop("latency_fit", None)
        if self.latency is not None and fit is not None:  # decide as the saved run did
            self.latency.load_fit(fit)
        self.state.update(saved)
        grains = {g.name: g for g in self.grains}
        for name, removal in self.state.applied:
            self._apply(grains[name], dict(removal))
        device = next(self.model.parameters()).device
        self.model.load_state_dict({k: v.to(device) for k, v in weights.items()})
        distributed.check_in_sync(self.model, "after resuming")
        self._started = True


def _calibration(
    model: nn.Module, data: CalibrationSet | DataLike | None, config: PruneConfig, task: Task | None
) -> CalibrationSet | None:
    """The calibration set from ``data``, prepared as ``model`` expects its inputs."""
    if data is None or isinstance(data, CalibrationSet):
        return data
    from ..feed import calibration_for, get_data  # feed sits above search: imported on use

    return calibration_for(
        model,
        get_data(data, "train"),
        config.calib_size,
        seed=config.seed,
        task=task or Task(),
    )


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None: strict JSON (``inf`` marks dropped candidates)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
