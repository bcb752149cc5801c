"""A finished pruning run read back from its directory, refused with a hint when it is not one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AutopruneError
from ..search import RunDir

# What a report reads from summary.json (written by autoprune.search.summary.summarize).
SUMMARY_KEYS = (
    "model",
    "baseline",
    "pruned",
    "macs_reduction",
    "params_reduction",
    "layers",
    "criteria_chosen",
    "iterations",
    "timings",
)
WHAT_TO_GIVE = "give the --out directory of a finished `autoprune prune` run"


@dataclass(frozen=True)
class Run:
    """A finished run: its directory, ``summary.json``, and ``history.jsonl`` (one record per
    iteration; empty when the model met the target before any pruning)."""

    path: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config") or {}


def read_run(path: str | os.PathLike[str]) -> Run:
    """The finished run in ``path``; an AutopruneError that says what to give instead when
    ``path`` is not one (missing, unfinished, another command's directory, edited files)."""
    files = RunDir(path)
    if not files.path.is_dir():
        raise AutopruneError(f"{files.path} is not a directory: {WHAT_TO_GIVE}")
    if not files.summary.exists():
        hint = (
            "the run has not finished: finish it with `autoprune prune ... --resume`, then report"
            if files.state.exists()
            else WHAT_TO_GIVE
        )
        raise AutopruneError(f"{files.path} holds no summary.json: {hint}")
    summary = _parse(_read_text(files.summary), files.summary, WHAT_TO_GIVE)
    missing = [k for k in SUMMARY_KEYS if k not in summary] if isinstance(summary, dict) else []
    if not isinstance(summary, dict) or missing:
        lacks = f" (it lacks {', '.join(missing)})" if missing else ""
        raise AutopruneError(
            f"{files.summary} is not a pruning run's summary{lacks}: {WHAT_TO_GIVE}"
        )
    lines = _read_text(files.history).splitlines() if files.history.exists() else []
    history = [_parse(line, files.history, "rerun the pruning") for line in lines if line.strip()]
    if len(history) != summary["iterations"]:
        raise AutopruneError(
            f"{files.history} holds {len(history)} iterations but summary.json says "
            f"{summary['iterations']}: the directory was changed after the run; rerun the pruning"
        )
    return Run(files.path, summary, history)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise AutopruneError(f"cannot read {path}: {error}") from None


def _parse(text: str, path: Path, hint: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AutopruneError(f"{path} is not valid JSON ({error}): {hint}") from None
