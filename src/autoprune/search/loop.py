"""The pruning loop: propose, apply physically, recover every ``recover_every``, checkpoint.

Every source of randomness is a function of the seed and of counters in the state (criteria
and the calibration set use the seed; each training draws its batches and its per-epoch seed
from the training epochs drawn before it), and the state saved after each iteration holds
everything else (the removals applied, in order, and the weights). So a resumed run ends
exactly where an uninterrupted one would: it rebuilds the original model, replays the removals
and loads the weights. Between trainings the weights are kept in the default memory layout,
so a replayed model computes bit for bit like the uninterrupted one.

Under a process group (``torchrun``) every rank runs this loop on the same model: candidates
are scored in shares and the losses all-gathered (see :mod:`.scorers`), so all ranks apply the
same removal; training is data parallel. A checksum of the weights is compared across ranks
after every iteration. Rank 0 alone writes the run directory and shows progress; every rank
reads it to resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch
from torch import nn

from .. import distributed
from .._progress import Bar, console, progress_bar
from ..data import BatchLoader
from ..errors import AutopruneError
from ..graph import build_graph, scope_report
from ..graph.sparsity import masks_held, restore_weights
from ..measure import count_macs, count_params, evaluate_batches
from ..train import LossFn, TrainConfig, TrainResult, distillation, fit
from ._reach import refuse_unreachable
from .calibration import CalibrationSet
from .config import PruneConfig
from .granularity import GRANULARITIES, Granularity, accounting, plan
from .run import RunDir, layer_widths, summarize
from .schedules import SCHEDULES, SearchContext, Step
from .scorers import Scorer, create_scorer

STATE_FORMAT = 3  # 3: the starting model's digest
Removal = list[tuple[str, torch.Tensor]]


@dataclass
class SearchData:
    """A run's data, ready to use; every part may be missing.

    ``train(train_config)`` gives shuffled, augmented training batches at that config's batch
    size and memory layout (for recovery and fine-tuning); ``calib`` is the calibration set
    candidates are scored on; ``val`` the held-out batches accuracies are measured on.
    """

    train: Callable[[TrainConfig], BatchLoader] | None = None
    calib: CalibrationSet | None = None
    val: BatchLoader | None = None
    dataset: str | None = None


@dataclass
class PruneResult:
    """The pruned model (a plain, physically smaller ``nn.Module``), the run's summary (as in
    ``summary.json``) and one history record per iteration (as in ``history.jsonl``)."""

    model: nn.Module
    summary: dict[str, Any]
    history: list[dict[str, Any]]


@dataclass
class SearchState:
    """Everything of a run that is not in the original model; saved after every iteration."""

    # per iteration: (granularity, its removal as (name, idxs) pairs)
    applied: list[tuple[str, Removal]] = field(default_factory=list)
    iteration: int = 0
    grain: int = 0  # index of the granularity being worked on (config.granularity)
    grain_loss: float | None = None  # calibration loss when that granularity began
    # granularity -> why it ended before its goal (Granularity.loss_limit)
    ended_early: dict[str, str] = field(default_factory=dict)
    data_epochs: int = 0  # training epochs drawn so far: the next training starts after them
    next_recovery: float = 0.0  # MACs reduction at which the next recovery is due
    loss: float | None = None  # calibration loss of the model now
    phase: str = "search"  # search -> finetune -> done
    baseline: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("search_s", "recovery_s", "finetune_s"), 0.0)
    )
    total_s: float = 0.0


def run_search(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    config: PruneConfig,
    data: SearchData,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    transfer: dict[str, Any] | None = None,
) -> PruneResult:
    """Prune a copy of ``model`` to ``config.target_macs_reduction``; ``model`` is not changed.

    With ``out_dir`` the run is checkpointed there after every iteration and its outputs are
    written at the end; ``resume=True`` continues a run from there (a finished one is
    returned as it is). ``transfer`` (what :mod:`autoprune.transfer` did before) goes into
    the summary as it is.
    """
    return _Search(model, example_inputs, config, data, out_dir, progress, transfer).run(resume)


class _Search:
    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        config: PruneConfig,
        data: SearchData,
        out_dir: str | os.PathLike[str] | None,
        progress: bool,
        transfer: dict[str, Any] | None = None,
    ) -> None:
        self.start = time.perf_counter()
        self.transfer = transfer
        self.original = model
        self.example_inputs = example_inputs
        self.config = config
        self.data = data
        self.run_dir = RunDir(out_dir) if out_dir is not None else None
        self.progress = progress and distributed.is_main()
        self.schedule = SCHEDULES.get(config.schedule)(config)
        self.grains = plan(config, self.schedule)
        if any(g.needs_calibration for g in self.grains) and data.calib is None:
            raise AutopruneError(
                f"schedule {config.schedule!r} with criteria {', '.join(config.criteria)} and "
                f"granularity {','.join(config.granularity)} needs data: pass train_data or "
                "calib_data (only schedule 'fixed' with a data-free criterion, on channels "
                "alone, runs on example inputs alone)"
            )
        self.recovering = data.train is not None and config.recover_steps > 0
        self.scorer = create_scorer(config.scorer, **config.scorer_options)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False) if config.distill else None
        self.graph = build_graph(
            copy.deepcopy(model),
            example_inputs,
            ignored_layers=config.ignored_layers,
            scope=config.scope,
        )
        self.scope_macs = self.graph.macs_by_scope()
        for net in (self.graph.model, self.teacher):  # all ranks start from rank 0's weights
            if net is not None:
                distributed.broadcast_weights(net)
        self.start_weights = weights_digest(self.graph.model)
        self.original_macs = self.graph.macs()
        self.original_channels = {g.name: g.channels for g in self.graph.groups()}
        self.widths = layer_widths(self.graph.model)
        self.state = SearchState(next_recovery=config.recover_every)

    # ----------------------------------------------------------------------------- driver
    def run(self, resume: bool) -> PruneResult:
        saved = self.run_dir.load(resume) if self.run_dir is not None else None
        distributed.barrier()  # every rank has looked before rank 0 writes the first state
        if saved is not None:
            self._restore(saved)
            if self.state.phase == "done":
                assert self.run_dir is not None
                return PruneResult(
                    self.graph.model, self.run_dir.read_summary(), self.state.history
                )
        else:
            if "channel" in self.config.granularity:
                self._check_reachable()
            self.state.loss = self._calib_loss("before pruning")
            self.state.baseline = {**self._measure(self.graph.model), "calib_loss": self.state.loss}
            self._checkpoint()
        self._search()
        if self.state.phase == "finetune":
            self._finetune(resumed=saved is not None)
        return self._finish()

    def _search(self) -> None:
        """The granularities in turn, each until its goal or until it has nothing to offer."""
        target = self.config.target_macs_reduction
        with progress_bar("pruning", 1000, enabled=self.progress) as bar:
            reporter = _Reporter(bar, self.progress, target, self._reduction())
            while self.state.phase == "search":
                if self.state.grain == len(self.grains):
                    self.state.phase = "finetune"
                    self._checkpoint()
                    break
                entry = self._iterate(self.grains[self.state.grain])
                if entry is None:  # this granularity is done: on to the next
                    self.state.grain += 1
                    self.state.grain_loss = None
                    self._checkpoint()
                    continue
                reporter.log(entry, self._reduction())

    def _context(self) -> SearchContext:
        state = self.state
        return SearchContext(
            self.graph,
            self.config,
            self.data.calib,
            self.scorer,
            self.original_macs,
            self.original_channels,
            state.loss,
            state.next_recovery if self.recovering else None,
        )

    def _iterate(self, grain: Granularity) -> dict[str, Any] | None:
        """One iteration of ``grain``: propose, check, apply, recover when due, checkpoint.
        None (and nothing done) when ``grain`` has reached its goal, has nothing to offer, or
        its step cost more than its ``loss_limit`` allows (then the step is undone)."""
        state, config = self.state, self.config
        t0 = time.perf_counter()
        if state.grain_loss is None:
            state.grain_loss = state.loss
        ctx = self._context()
        step = None if grain.reached(ctx) else grain.propose(ctx)
        if step is None:
            return None
        self._check_finite(step.loss, "with the chosen removal")
        limited = grain.loss_limit is not None and state.grain_loss is not None
        before = (state.loss, copy.deepcopy(self.graph.model.state_dict())) if limited else None
        self._apply(grain, step.removal)
        reduction = self._reduction()
        entry = self._record(grain, step, reduction, time.perf_counter() - t0)
        state.timings["search_s"] += entry["seconds"]
        state.loss = step.loss
        due = grain.recover_every_step or reduction >= state.next_recovery - 1e-12
        if self.recovering and (due or grain.reached(self._context())):
            t1 = time.perf_counter()
            self._recover()
            state.loss = self._calib_loss("after recovery")
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
        distributed.check_in_sync(self.graph.model, f"at iteration {state.iteration}")
        self._checkpoint()
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
        restore_weights(self.graph.model, weights)
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
        return {
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

    # --------------------------------------------------------------------------- training
    def _recover(self) -> None:
        """Brief training with a fresh optimizer (the parameters changed shape)."""
        assert self.data.train is not None
        config = self.config
        loader = self.data.train(config.recovery)
        epochs = math.ceil(config.recover_steps / len(loader))
        train_config = replace(
            config.recovery,
            epochs=epochs,
            max_steps=config.recover_steps,
            seed=config.seed,
            progress=False,
        )
        self._fit(loader, train_config, epoch_offset=self.state.data_epochs)
        self.state.data_epochs += epochs

    def _finetune(self, resumed: bool) -> None:
        config = self.config
        if config.finetune_epochs and self.data.train is not None:
            t0 = time.perf_counter()
            loader = self.data.train(config.finetune)
            train_config = replace(
                config.finetune,
                epochs=config.finetune_epochs,
                max_steps=None,
                seed=config.seed,
                progress=self.progress,
            )
            checkpoint = self.run_dir.finetune_state if self.run_dir is not None else None
            result = self._fit(
                loader,
                train_config,
                epoch_offset=self.state.data_epochs,
                val_loader=self.data.val,
                checkpoint=checkpoint,
                resume=resumed,
            )
            earlier = sum(r.seconds for r in result.history[: result.resumed_from_epoch or 0])
            self.state.timings["finetune_s"] = earlier + time.perf_counter() - t0
            distributed.check_in_sync(self.graph.model, "after fine-tuning")
            self.state.loss = self._calib_loss("after fine-tuning")
        self.state.phase = "done"

    def _fit(self, loader: BatchLoader, train_config: TrainConfig, **kwargs: Any) -> TrainResult:
        model = self.graph.model
        with masks_held(model):
            result = fit(model, loader, train_config, loss_fn=self._loss_fn(train_config), **kwargs)
        # One memory layout outside training, so a resumed run computes bit for bit the same.
        model.to(memory_format=torch.contiguous_format)
        return result

    def _loss_fn(self, train_config: TrainConfig) -> LossFn | None:
        """Cross-entropy, or mixed with distillation from the unpruned model."""
        if self.teacher is None:
            return None
        config = self.config
        return distillation(
            self.teacher,
            config.distill_temperature,
            config.distill_weight,
            train_config.label_smoothing,
        )

    # ---------------------------------------------------------------------- measurements
    def _reduction(self) -> float:
        return 1.0 - self.graph.macs() / self.original_macs

    def _calib_loss(self, when: str) -> float | None:
        if self.data.calib is None:
            return None
        loss = self.data.calib.loss(self.graph.model)
        self._check_finite(loss, when)
        return loss

    def _check_finite(self, loss: float | None, when: str) -> None:
        if loss is None or math.isfinite(loss):
            return
        where = (
            f"the last good state (after {self.state.iteration} iterations) is saved in "
            f"{self.run_dir.state}"
            if self.run_dir is not None and self.run_dir.state.exists()
            else "nothing was saved (no output directory)"
        )
        raise AutopruneError(
            f"calibration loss is {loss} {when} at iteration {self.state.iteration + 1}: "
            f"stopping; {where}"
        )

    def _measure(self, model: nn.Module) -> dict[str, Any]:
        ev = evaluate_batches(model, self.data.val) if self.data.val is not None else None
        return {
            "macs": count_macs(model, self.example_inputs),
            "params": count_params(model),
            "accuracy": ev.accuracy if ev else None,
            "loss": ev.loss if ev else None,
        }

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

    # ------------------------------------------------------------------ state and outputs
    def _tick(self) -> None:
        now = time.perf_counter()
        self.state.total_s += now - self.start
        self.start = now

    def _checkpoint(self) -> None:
        self._tick()
        if self.run_dir is None:
            return
        state = {
            "format": STATE_FORMAT,
            "config": _comparable(self.config, self.scorer),
            "start_weights": self.start_weights,
            **asdict(self.state),
            "model": self.graph.model.state_dict(),
        }
        self.run_dir.checkpoint(state, self.state.history)

    def _restore(self, saved: dict[str, Any]) -> None:
        config, before = _comparable(self.config, self.scorer), saved.pop("config")
        changed = sorted(k for k in config.keys() | before.keys() if config.get(k) != before.get(k))
        if changed or saved.pop("format") != STATE_FORMAT:
            raise AutopruneError(
                f"cannot resume {self.run_dir.path if self.run_dir else ''}: it was started with "
                f"other settings ({', '.join(changed) or 'format'}); use the same ones or "
                "another output directory"
            )
        if saved.pop("start_weights") != self.start_weights:
            raise AutopruneError(
                f"cannot resume {self.run_dir.path if self.run_dir else ''}: it was started from "
                "a model with other weights; pass the same model or use another output directory"
            )
        weights = saved.pop("model")
        self.state = SearchState(**saved)
        grains = {g.name: g for g in self.grains}
        for name, removal in self.state.applied:
            self._apply(grains[name], dict(removal))
        device = next(self.graph.model.parameters()).device
        self.graph.model.load_state_dict({k: v.to(device) for k, v in weights.items()})
        distributed.check_in_sync(self.graph.model, "after resuming")

    def _finish(self) -> PruneResult:
        model = self.graph.model
        pruned = {**self._measure(model), "calib_loss": self.state.loss}
        self._tick()
        summary = summarize(
            model_name=_model_name(self.original),
            dataset=self.data.dataset,
            baseline=self.state.baseline,
            pruned=pruned,
            widths_before=self.widths,
            widths_after=layer_widths(model),
            history=self.state.history,
            timings={**self.state.timings, "total_s": self.state.total_s},
            config=asdict(self.config),
        )
        summary["ended_early"] = self.state.ended_early
        summary["scopes"] = scope_report(self.scope_macs, self.graph.macs_by_scope())
        extra = accounting(
            model,
            self.graph.example_inputs,
            self.state.baseline["params"],
            pruned["macs"],
            self.state.history,
        )
        summary["pruned"]["sparse_macs"] = extra.pop("sparse_macs")
        summary.update(extra)
        if self.transfer is not None:
            summary["transfer"] = self.transfer
        if self.run_dir is not None:
            self.run_dir.write_outputs(model, summary, _input_size(self.example_inputs))
            self._checkpoint()
        return PruneResult(model, summary, self.state.history)


def _comparable(config: PruneConfig, scorer: Scorer) -> dict[str, Any]:
    """The settings a resumed run must share with the saved one, as JSON values: the config,
    and every setting of the scorer, so that a changed scorer default is not resumed into."""
    values = asdict(config)
    for train in ("recovery", "finetune"):
        values[train].pop("progress")
    if is_dataclass(scorer):
        values["scorer_settings"] = {
            f.name: getattr(scorer, f.name) for f in fields(scorer) if f.init
        }
    return json.loads(json.dumps(values))


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the state dict (names, shapes, dtypes, bytes): a run resumes only from the
    model it started from, not from a retrained one of the same architecture. Bytes, not
    :func:`distributed.checksum`'s float sums, whose reduction order differs across devices."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None: strict JSON (``inf`` marks dropped candidates)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _model_name(model: nn.Module) -> str:
    arch = getattr(model, "autoprune_arch", None) or {}
    return str(arch.get("name") or arch.get("factory") or type(model).__name__)


def _input_size(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[int] | None:
    return list(example_inputs.shape[1:]) if isinstance(example_inputs, torch.Tensor) else None


class _Reporter:
    """The live bar (on a terminal) and one log line per iteration on stderr."""

    def __init__(self, bar: Bar, enabled: bool, target: float, start: float) -> None:
        self.bar, self.enabled, self.target = bar, enabled, target
        self.start, self.t0, self.shown = start, time.perf_counter(), round(1000 * start / target)
        bar.update(self.shown)

    def log(self, entry: dict[str, Any], reduction: float) -> None:
        if not self.enabled:
            return
        done = min(1000, round(1000 * reduction / self.target))
        where = "groups" if entry["granularity"] == "channel" else "layers"
        what = entry["group"] or f"{len(entry['removed'])} {where}"
        unit = (
            entry["granularity"]
            if entry["count"] == 1
            else GRANULARITIES.get(entry["granularity"]).counts
        )
        loss = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"
        self.bar.update(
            done - self.shown,
            iter=entry["iteration"],
            macs=f"-{100 * reduction:.1f}%",
            group=what,
            crit=",".join(entry["criteria"]),
            loss=loss,
        )
        self.shown = done
        line = (
            f"iter {entry['iteration']:>3}  MACs -{100 * reduction:5.1f}%  {what} "
            f"-{entry['count']} {unit} ({','.join(entry['criteria'])})  calib loss {loss}"
        )
        if entry["loss_recovered"] is not None:
            line += f" -> {entry['loss_recovered']:.4f} recovered"
        elapsed = time.perf_counter() - self.t0
        gained = reduction - self.start
        eta = elapsed * max(0.0, self.target - reduction) / gained if gained > 0 else 0.0
        line += f"  {entry['seconds'] + entry['recovery_s']:.1f}s  eta {_clock(eta)}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
