"""Learning-rate schedules as pure functions of the step, one registry.

A schedule is ``factor(step, total_steps, warmup_steps) -> float`` multiplying the base rate.
Pure functions keep ``LambdaLR``'s state a few numbers, so resuming restores it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .._registry import Registry

Schedule = Callable[[int, int, int], float]
SCHEDULES: Registry[Schedule] = Registry("lr schedule")


def _warmup(step: int, warmup: int) -> float | None:
    return (step + 1) / warmup if step < warmup else None


@SCHEDULES.register("cosine", description="linear warm-up, then cosine decay to zero")
def cosine(step: int, total: int, warmup: int) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@SCHEDULES.register("onecycle", description="cosine rise over 25 % (or the warm-up), cosine fall")
def onecycle(step: int, total: int, warmup: int) -> float:
    rise = warmup or max(1, round(0.25 * total))
    start, floor = 1.0 / 25.0, 1.0 / 1e4
    if step < rise:
        return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * step / rise))
    progress = (step - rise) / max(1, total - rise)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@SCHEDULES.register("constant", description="the base rate throughout (after any warm-up)")
def constant(step: int, total: int, warmup: int) -> float:
    w = _warmup(step, warmup)
    return 1.0 if w is None else w
