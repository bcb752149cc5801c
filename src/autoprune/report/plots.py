"""The report's plots: adding one is one function here, registered with ``@PLOTS.register``.

A plot draws into the empty matplotlib ``Figure`` it is given and returns False when the run
has nothing for it to show (a data-free run has no accuracies; a run that met its target
before pruning has no iterations): the report then leaves it out. Its registration says which
report section shows it (``summary``, ``layers`` or ``iterations``) and its caption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .._registry import Registry
from ._run import Run

PlotFn = Callable[[Run, Figure], bool]
PLOTS: Registry[PlotFn] = Registry("plot")

BEFORE, AFTER = "#b0b0b0", "C0"  # grey: the original model; blue: the pruned one


@PLOTS.register(
    "before_after", section="summary", title="Accuracy, MACs and parameters before and after"
)
def before_after(run: Run, fig: Figure) -> bool:
    base, pruned = run.summary["baseline"], run.summary["pruned"]
    panels = [
        ("top-1 accuracy (%)", base["accuracy"], pruned["accuracy"], "{:.2f}"),
        ("MACs (millions)", base["macs"] / 1e6, pruned["macs"] / 1e6, "{:.2f}"),
        ("parameters (thousands)", base["params"] / 1e3, pruned["params"] / 1e3, "{:.1f}"),
    ]
    shown = [p for p in panels if p[1] is not None and p[2] is not None]
    fig.set_size_inches(3.0 * len(shown), 3.2)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, (label, before, after, fmt) in zip(axes, shown, strict=True):
        bars = ax.bar(["baseline", "pruned"], [before, after], color=[BEFORE, AFTER])
        ax.bar_label(bars, labels=[fmt.format(v) for v in (before, after)])
        ax.set_title(label, fontsize="medium")
        ax.margins(y=0.15)
    return True


@PLOTS.register("channels", section="layers", title="Output channels per layer")
def channels(run: Run, fig: Figure) -> bool:
    layers = run.summary["layers"]
    if not layers:
        return False
    fig.set_size_inches(max(6.0, 2.0 + 0.3 * len(layers)), 4.0)
    ax = fig.subplots()
    x = range(len(layers))
    ax.bar(x, [layer["before"] for layer in layers], color=BEFORE, label="before")
    ax.bar(x, [layer["after"] for layer in layers], color=AFTER, label="after")
    ax.set_xticks(x, [layer["name"] for layer in layers], rotation=60, ha="right")
    ax.set_ylabel("output channels")
    ax.legend()
    return True


@PLOTS.register(
    "progress", section="iterations", title="MACs reduction and calibration loss per iteration"
)
def progress(run: Run, fig: Figure) -> bool:
    history = run.history
    if not history:
        return False
    with_loss = any(h["loss"] is not None for h in history)
    fig.set_size_inches(7.0, 5.5 if with_loss else 3.2)
    axes: Sequence[Axes] = fig.subplots(2 if with_loss else 1, 1, sharex=True, squeeze=False)[:, 0]
    its = [0] + [h["iteration"] for h in history]
    reduction = [0.0] + [100 * h["macs_reduction"] for h in history]
    axes[0].plot(its, reduction, marker="o", color=AFTER)
    target = run.config.get("target_macs_reduction")
    if target is not None:
        axes[0].axhline(100 * target, linestyle="--", color=BEFORE, label="target")
        axes[0].legend(loc="lower right")
    axes[0].set_ylabel("MACs reduction (%)")
    if with_loss:
        _loss_panel(axes[1], run.summary["baseline"].get("calib_loss"), history)
    axes[-1].set_xlabel("iteration")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return True


def _loss_panel(ax: Axes, start: float | None, history: Sequence[dict[str, Any]]) -> None:
    """The loss after each removal; where a recovery followed, the line drops at the same
    iteration to the loss after it."""
    points = [(0, start)] if start is not None else []
    recovered = []
    for h in history:
        points.append((h["iteration"], h["loss"]))
        if h["loss_recovered"] is not None:
            recovered.append((h["iteration"], h["loss_recovered"]))
            points.append(recovered[-1])
    ax.plot(*zip(*points, strict=True), marker=".", color="C1", label="after the removal")
    if recovered:
        ax.scatter(*zip(*recovered, strict=True), color="C2", zorder=3, label="after recovery")
    ax.set_ylabel("calibration loss")
    ax.legend()


@PLOTS.register("criteria", section="iterations", title="Criteria that chose the removed channels")
def criteria(run: Run, fig: Figure) -> bool:
    """One row per criterion of the pool; criteria that picked the same channels share a
    column."""
    history = run.history
    if not history:
        return False
    pool = list(run.config.get("criteria") or [])
    names = pool + [c for c in run.summary["criteria_chosen"] if c not in pool]
    fig.set_size_inches(7.0, 1.2 + 0.35 * len(names))
    ax = fig.subplots()
    for row, name in enumerate(names):
        its = [h["iteration"] for h in history if name in h["criteria"]]
        ax.scatter(its, [row] * len(its), color=f"C{row % 10}", s=40)
    counts = run.summary["criteria_chosen"]
    ax.set_yticks(range(len(names)), [f"{n} ({counts.get(n, 0)})" for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0.5, len(history) + 0.5)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.3)
    return True
