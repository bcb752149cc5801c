"""What a pruning run saves to resume: its state record, and what a resumed run must share.

Everything of a run that is not in the original model is in :class:`SearchState` (the
removals applied, in order, and counters) plus the weights. A resumed run rebuilds the
original model, replays the removals and loads the weights, so it ends exactly where an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import torch
from torch import nn

from .config import PruneConfig
from .scorers import Scorer

STATE_FORMAT = 5  # 3: the starting model's digest; 4: latency checks; 5: resolved defaults
Removal = list[tuple[str, torch.Tensor]]


@dataclass
class SearchState:
    """Everything of a run that is not in the original model; saved after every iteration."""

    # per iteration: (granularity, its removal as (name, idxs) pairs)
    applied: list[tuple[str, Removal]] = field(default_factory=list)
    iteration: int = 0
    grain: int = 0  # index of the granularity being worked on (config.granularities)
    grain_loss: float | None = None  # calibration loss when that granularity began
    # granularity -> why it ended before its goal (Granularity.loss_limit)
    ended_early: dict[str, str] = field(default_factory=dict)
    data_epochs: int = 0  # training epochs drawn so far: the next training starts after them
    next_recovery: float = 0.0  # MACs reduction at which the next recovery is due
    loss: float | None = None  # calibration loss of the model now
    phase: str = "search"  # search -> finetune -> done
    baseline: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    # the pruned model measured on the way to a latency target and at it (LatencyTarget.check)
    latency_checks: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("search_s", "recovery_s", "finetune_s"), 0.0)
    )
    total_s: float = 0.0

    def update(self, saved: dict[str, Any]) -> None:
        """Take the saved fields in place: whoever holds this object sees the resumed state."""
        for f in fields(self):
            setattr(self, f.name, saved[f.name])


def comparable(config: PruneConfig, scorer: Scorer) -> dict[str, Any]:
    """The settings a resumed run must share with the saved one, as JSON values: the config,
    and every setting of the scorer, so that a changed scorer default is not resumed into."""
    values = asdict(config.resolved())
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
