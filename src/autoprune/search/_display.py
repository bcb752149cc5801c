"""What a pruning run shows while it works: a live bar (on a terminal) and a line per step."""

from __future__ import annotations

import time
from typing import Any

from .._progress import Bar, console
from .granularity import GRANULARITIES


class Reporter:
    """The live bar and one log line per iteration on stderr."""

    def __init__(
        self, bar: Bar, enabled: bool, target: float, start: float, label: str = "MACs"
    ) -> None:
        """``target`` and every ``reduction`` are fractions of ``label`` (MACs or latency)."""
        self.bar, self.enabled, self.target, self.label = bar, enabled, target, label
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
            f"iter {entry['iteration']:>3}  {self.label} -{100 * reduction:5.1f}%  {what} "
            f"-{entry['count']} {unit} ({','.join(entry['criteria'])})  calib loss {loss}"
        )
        if "latency_predicted_ms" in entry:
            line += f"  {entry['latency_predicted_ms']:.3f} ms predicted"
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
