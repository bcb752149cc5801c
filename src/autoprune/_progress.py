"""Progress display for long work (training, evaluation, search), built on rich.

On a terminal it is a live bar with the fields the caller reports; in a log (CI, nohup) rich
draws nothing live, so callers also print one summary line per epoch or iteration.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class Bar:
    """One task on a live progress display; ``update(n, **fields)`` advances it."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def update(self, advance: int = 1, **fields: str | float) -> None:
        if self._progress is not None and self._task is not None:
            text = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
            )
            self._progress.update(self._task, advance=advance, info=text)


@contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True) -> Iterator[Bar]:
    """A live bar on an interactive stderr; a silent no-op otherwise or when disabled."""
    if not enabled or not sys.stderr.isatty():
        yield Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        yield Bar(progress, progress.add_task(description, total=total, info=""))
