"""A pruning run's directory: state for resume, ``summary.json``, ``history.jsonl``, ``model/``.

Every file is written whole through a temporary file and a rename, so a run killed at any
moment leaves the previous or the new version of each, never half of one. The state file
(:mod:`autoprune.io.state`, no pickle) is the authority: ``history.jsonl`` is rewritten from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .. import distributed
from ..errors import AutopruneError
from ..io import load, save
from ..io._atomic import write_text_atomic
from ..io.model_io import ARCH_FILE
from ..io.state import load_state, save_state


class RunDir:
    """The files of one run under ``path``.

    Under a process group only rank 0 writes (every rank holds the same model and state);
    every rank reads, so for resuming on several machines ``path`` must be on a filesystem
    they share.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.state = self.path / "state.safetensors"
        self.finetune_state = self.path / "finetune_state.safetensors"
        self.summary = self.path / "summary.json"
        self.history = self.path / "history.jsonl"
        self.model = self.path / "model"

    def load(self, resume: bool) -> dict[str, Any] | None:
        """The saved state to continue from, or None for a new run.

        A directory holding a run is never overwritten: without ``resume`` it is refused.
        """
        if not self.state.exists():
            return None
        if not resume:
            raise AutopruneError(
                f"{self.path} already holds a pruning run: resume it (--resume / resume=True) "
                "or choose another output directory"
            )
        return load_state(self.state)

    def checkpoint(self, state: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        if not distributed.is_main():
            return
        save_state(self.state, dict(state))
        write_text_atomic(self.history, "".join(json.dumps(h) + "\n" for h in history))

    def write_outputs(
        self, model: nn.Module, summary: Mapping[str, Any], input_size: Sequence[int] | None
    ) -> None:
        """The pruned model (``autoprune.load`` reads it back) and ``summary.json``."""
        if not distributed.is_main():
            return
        metadata = {
            "pruned": {k: summary[k] for k in ("macs_reduction", "params_reduction")},
            "accuracy": summary["pruned"]["accuracy"],
        }
        save(model, self.model, input_size=input_size, metadata=metadata)
        write_text_atomic(self.summary, json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())


def load_run_model(path: str | os.PathLike[str]) -> nn.Module:
    """The pruned model of the run in ``path`` (its ``model/``), or the model that
    :func:`autoprune.io.save` wrote to ``path``: commands that take a run take a bare model too."""
    run = RunDir(path)
    for candidate in (run.model, run.path):
        if (candidate / ARCH_FILE).exists():
            return load(candidate)
    if run.state.exists():
        raise AutopruneError(
            f"{run.path} holds an unfinished pruning run: finish it with `autoprune prune ... "
            "--resume`, which writes its model/"
        )
    raise AutopruneError(
        f"{run.path} holds no model: give a finished pruning run (with a model/ directory) or "
        "a directory written by autoprune.io.save"
    )
