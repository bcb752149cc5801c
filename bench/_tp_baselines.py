"""Torch-Pruning's own pruners, run through its own API to a MACs target, for bench/quality.py.

Torch-Pruning prunes a ratio of channels, not a MACs budget. Its ``BasePruner`` is stepped with
a small ratio increment (``iterative_steps``) and, in interactive mode, one group at a time;
MACs are counted after each group and pruning stops as soon as the reduction lies within the
tolerance of the target. A group whose removal would jump past the window (one channel of a
wide residual stream can be 2 % of the MACs) is put back and skipped; TP's later steps retry it.

The CIFAR ResNet's option-A shortcut (``F.pad`` of channels) is something Torch-Pruning cannot
prune: it couples the stages around the pad with an offset it has no rule for. The model goes
through autoprune's rewrite (:func:`~autoprune.graph.normalize_model`, a no-op for the zoo's
ResNets, which are built with :class:`~autoprune.layers.ChannelPadShortcut`), and TP receives
autoprune's pruner for that layer as a customized pruner: the only way TP runs on this model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from autoprune.graph import normalize_model
from autoprune.graph._rules import ChannelPadPruner
from autoprune.layers import ChannelPadShortcut
from autoprune.measure import count_macs
from autoprune.search.calibration import CalibrationSet


@dataclass(frozen=True)
class TPMethod:
    """A Torch-Pruning importance and ranking; every other setting is TP's default."""

    importance: Callable[[], tp.importance.Importance]
    global_pruning: bool = False
    gradients: bool = False  # the importance reads loss gradients


TP_METHODS = {
    "tp-l1-local": TPMethod(lambda: tp.importance.GroupMagnitudeImportance(p=1)),
    "tp-l1-global": TPMethod(lambda: tp.importance.GroupMagnitudeImportance(p=1), True),
    "tp-taylor": TPMethod(tp.importance.GroupTaylorImportance, gradients=True),
    "tp-random": TPMethod(tp.importance.RandomImportance),
}
MAX_RATIO = 0.75  # no group loses more than 3/4 of its channels: autoprune's default cap
STEPS = 150  # the channel ratio grows by MAX_RATIO / STEPS = 0.5 % per step


def prune_with_tp(
    model: nn.Module,
    example: torch.Tensor,
    method: str,
    target: float,
    tolerance: float,
    calib: CalibrationSet | None,
) -> nn.Module:
    """A pruned copy of ``model`` whose MACs reduction is within ``tolerance`` of ``target``.

    ``calib`` feeds the gradients a Taylor importance needs, taken afresh before every step.
    """
    spec = TP_METHODS[method]
    if spec.gradients and calib is None:
        raise ValueError(f"{method} needs calibration data for its gradients")
    model = normalize_model(copy.deepcopy(model), example)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.BasePruner(
        model,
        example,
        spec.importance(),
        global_pruning=spec.global_pruning,
        pruning_ratio=MAX_RATIO,
        max_pruning_ratio=MAX_RATIO,
        iterative_steps=STEPS,
        ignored_layers=[classifier],
        customized_pruners={ChannelPadShortcut: ChannelPadPruner()},
    )
    dense = count_macs(model, example)
    low, high = (1 - target - tolerance) * dense, (1 - target + tolerance) * dense
    for _ in range(STEPS):
        if calib is not None and spec.gradients:
            _gradients(model, calib)
        for group in pruner.step(interactive=True):
            undo = _undo_point(group)
            group.prune(record_history=False)
            macs = count_macs(model, example)
            if macs < low:
                undo()
            elif macs <= high:
                model.zero_grad(set_to_none=True)
                return model
    raise RuntimeError(f"{method}: {STEPS} Torch-Pruning steps did not reach -{target:.1%} MACs")


def _gradients(model: nn.Module, calib: CalibrationSet) -> None:
    """Loss gradients on the calibration images, BatchNorm statistics untouched."""
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x, y in calib.batches:
            F.cross_entropy(model(x), y).backward()


def _undo_point(group: tp.dependency.Group) -> Callable[[], None]:
    """A way to take back pruning ``group``. TP prunes a layer by giving it new tensors and
    widths, never by editing a tensor in place, so the layers' old attributes restore it."""
    layers = {dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.Module)}
    saved = [
        (m, {**vars(m), "_parameters": dict(m._parameters), "_buffers": dict(m._buffers)})
        for m in layers
    ]

    def undo() -> None:
        for module, state in saved:
            vars(module).clear()
            vars(module).update(state)

    return undo
