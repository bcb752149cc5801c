"""A whole pruning run: a :class:`~.pruner.Pruner` stepped to the target, with recovery,
fine-tuning, and the run directory (checkpointed after every step, so it can resume).

Under a process group (``torchrun``) every rank runs this on the same model; rank 0 alone
writes the run directory and shows progress, every rank reads it to resume.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from .._device import follow
from .._progress import progress_bar
from ..io.model_io import check_savable
from ..models.spec import copy_model, model_label
from ._display import Reporter
from .config import PruneConfig
from .pruner import Inputs, Pruner
from .run import RunDir
from .summary import layer_widths, measure, run_summary
from .training import Recover, SearchData, Trainer


@dataclass
class PruneResult:
    """The pruned model (a plain, physically smaller ``nn.Module``), the run's summary (as in
    ``summary.json``) and one history record per iteration (as in ``history.jsonl``)."""

    model: nn.Module
    summary: dict[str, Any]
    history: list[dict[str, Any]]


def run_search(
    model: nn.Module,
    example_inputs: Inputs,
    config: PruneConfig,
    data: SearchData,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    transfer: dict[str, Any] | None = None,
    recover: Recover | None = None,
) -> PruneResult:
    """Prune a copy of ``model`` to ``config.target_macs_reduction``; ``model`` is not changed.

    Recovery is ``recover(model)`` when given (your own training step), else
    ``config.recover_steps`` of ``config.recovery`` on ``data.train`` (none without either).
    With ``out_dir`` the run is checkpointed there after every iteration and its outputs are
    written at the end; ``resume=True`` continues a run from there (a finished one is
    returned as it is). ``transfer`` (what :mod:`autoprune.transfer` did before) goes into
    the summary as it is.
    """
    return _Run(model, example_inputs, config, data, out_dir, progress, transfer, recover).run(
        resume
    )


class _Run:
    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        config: PruneConfig,
        data: SearchData,
        out_dir: str | os.PathLike[str] | None,
        progress: bool,
        transfer: dict[str, Any] | None,
        recover: Recover | None,
    ) -> None:
        self.start = time.perf_counter()
        self.transfer, self.config, self.data = transfer, config, data
        self.model_name = model_label(model)
        self.example_inputs = follow(example_inputs, model)
        self.run_dir = RunDir(out_dir) if out_dir is not None else None
        if self.run_dir is not None:  # a model that cannot be written fails now, not at the end
            check_savable(model, _input_size(self.example_inputs))
        self.progress = progress and distributed.is_main()
        teacher = copy_model(model).eval().requires_grad_(False) if config.distill else None
        self.pruner = Pruner(model, self.example_inputs, config, calib_data=data.calib)
        if teacher is not None:  # all ranks learn from rank 0's teacher
            distributed.broadcast_weights(teacher)
        self.trainer = Trainer(config, data, self.pruner.state, teacher)
        if recover is None and data.train is not None and config.recover_steps > 0:
            recover = self.trainer.recover
        self.pruner.recover = recover
        self.scope_macs = self.pruner.graph.macs_by_scope()
        self.widths = layer_widths(self.pruner.model)

    def run(self, resume: bool) -> PruneResult:
        pruner, state = self.pruner, self.pruner.state
        saved = self.run_dir.load(resume) if self.run_dir is not None else None
        distributed.barrier()  # every rank has looked before rank 0 writes the first state
        if saved is not None:
            assert self.run_dir is not None
            pruner.load_state_dict(saved, source=str(self.run_dir.path))
            if state.phase == "done":
                return PruneResult(pruner.model, self.run_dir.read_summary(), state.history)
        else:
            pruner.start()
            state.baseline = {**self._measure(), "calib_loss": state.loss}
            self._checkpoint()
        self._search()
        if state.phase == "finetune":
            self._finetune(resumed=saved is not None)
        return self._finish()

    def _search(self) -> None:
        """Steps until every granularity has reached its goal or has nothing to offer."""
        pruner, state = self.pruner, self.pruner.state
        latency = pruner.latency
        target = self.config.target_latency_reduction or self.config.target_macs_reduction

        def reduction() -> float:
            return pruner.macs_reduction if latency is None else latency.reduction

        label = "MACs" if latency is None else "latency"
        with progress_bar("pruning", 1000, enabled=self.progress) as bar:
            reporter = Reporter(bar, self.progress, target, reduction(), label)
            while state.phase == "search":
                entry = pruner.step()
                if entry is None:
                    state.phase = "finetune"
                self._checkpoint()
                if entry is not None:
                    reporter.log(entry, reduction())

    def _finetune(self, resumed: bool) -> None:
        config, state, model = self.config, self.pruner.state, self.pruner.model
        if config.finetune_epochs and self.data.train is not None:
            t0 = time.perf_counter()
            checkpoint = self.run_dir.finetune_state if self.run_dir is not None else None
            result = self.trainer.finetune(
                model, checkpoint, resumed=resumed, progress=self.progress
            )
            earlier = sum(r.seconds for r in result.history[: result.resumed_from_epoch or 0])
            state.timings["finetune_s"] = earlier + time.perf_counter() - t0
            distributed.check_in_sync(model, "after fine-tuning")
            state.loss = self.pruner.calib_loss("after fine-tuning")
        state.phase = "done"

    def _measure(self) -> dict[str, Any]:
        return measure(self.pruner.model, self.example_inputs, self.data)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.pruner.state.total_s += now - self.start
        self.start = now

    def _checkpoint(self) -> None:
        self._tick()
        if self.run_dir is None:
            return
        self.run_dir.checkpoint(self.pruner.state_dict(), self.pruner.history)
        self.pruner.saved_to = str(self.run_dir.state)

    def _finish(self) -> PruneResult:
        self._tick()
        summary = run_summary(
            self.pruner,
            model_name=self.model_name,
            data=self.data,
            example_inputs=self.example_inputs,
            widths_before=self.widths,
            scope_macs=self.scope_macs,
        )
        if self.transfer is not None:
            summary["transfer"] = self.transfer
        if self.run_dir is not None:
            self.run_dir.write_outputs(self.pruner.model, summary, _input_size(self.example_inputs))
            self._checkpoint()
        return PruneResult(self.pruner.model, summary, self.pruner.history)


def _input_size(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[int] | None:
    return list(example_inputs.shape[1:]) if isinstance(example_inputs, torch.Tensor) else None
