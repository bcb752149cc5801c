"""First-order (Taylor) saliency: how much the loss moves when a channel is removed.

:class:`TaylorAccumulator` hooks the input of every consumer layer (conv, linear or shortcut
that reads a group's channels) and records, per batch and input channel,
``S = sum(a * dL/da)`` over the batch and all positions, where ``a`` is that layer's input.
For a conv or linear this equals ``sum(w * dL/dw)`` over the weight slice reading the channel
(chain rule), i.e. the first-order loss change when the channel is zeroed at that layer; and
zeroing it at every consumer is exactly what removing it does (see ``graph.masking``). So a
group channel's saliency is ``sum over batches of |sum over its consumers of S|``, the
``|w * dL/dw|`` of Molchanov et al. taken over the whole coupled group, including consumers
without weights (an option-A shortcut).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import AutopruneError
from ..graph import ChannelGroup, PruningGraph
from ..graph.masking import site_dim
from ..task import CLASSIFICATION
from ._base import register_criterion

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


class TaylorAccumulator:
    """Collects per-channel ``a * dL/da`` over calibration batches for the ``taylor`` criterion.

    Either let it drive the batches, ``TaylorAccumulator(graph).collect(batches)``, or use it
    as a context manager around your own loop: every forward of ``graph.model`` is one batch,
    and each ``loss.backward()`` (or ``torch.autograd.grad``) adds that batch's terms. Data
    collected before the model was pruned is refused, not silently misread.
    """

    def __init__(self, graph: PruningGraph) -> None:
        self.graph = graph
        self.batches = 0
        self.version = graph.version
        self._sums: dict[nn.Module, dict[int, torch.Tensor]] = {}
        self._inputs: list[torch.Tensor] = []  # this batch's hooked inputs (for collect)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> TaylorAccumulator:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.graph.model.register_forward_pre_hook(self._next_batch))
        dims: dict[nn.Module, int] = {}
        for group in self.graph.groups():
            for m in group.members:
                if m.consumer:
                    dims[m.module] = site_dim(m.module, m.kind)
        for module, dim in dims.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(dim)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._inputs = []

    def collect(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: LossFn = CLASSIFICATION.mean_loss,
    ) -> TaylorAccumulator:
        """Run forward and backward on ``(inputs, targets)`` batches; parameter grads untouched.

        ``loss_fn(outputs, targets)`` gets the model's raw outputs: a task's ``mean_loss``
        (the default: cross-entropy on a tensor, a tuple's first, a dict's ``logits``).

        The model's mode is kept: call ``model.eval()`` first for frozen BatchNorm statistics.
        """
        with self, torch.enable_grad():
            for inputs, targets in batches:
                loss = loss_fn(self.graph.model(inputs), targets)
                if self._inputs:
                    torch.autograd.grad(loss, self._inputs, allow_unused=True)
                self._inputs = []
        return self

    def saliency(self, group: ChannelGroup) -> torch.Tensor:
        """Per channel of ``group``: sum over batches of |first-order loss change|."""
        if group.version != self.version:
            raise AutopruneError(
                "taylor data was collected before the model was last pruned; collect it again"
            )
        per_batch: dict[int, torch.Tensor] = {}
        for m in group.members:
            if not m.consumer:
                continue
            for batch, sums in self._sums.get(m.module, {}).items():
                acc = per_batch.setdefault(batch, torch.zeros(group.channels, dtype=sums.dtype))
                acc.index_add_(0, m.group_idxs, sums[m.idxs])
        if not per_batch:
            raise AutopruneError(
                f"no gradients reached group {group.name!r}: run forward and backward passes "
                "on calibration batches inside the TaylorAccumulator"
            )
        return torch.stack([v.abs() for v in per_batch.values()]).sum(dim=0)

    def _next_batch(self, module: nn.Module, args: tuple) -> None:
        self.batches += 1
        self._inputs = []

    def _hook(self, dim: int) -> Callable[[nn.Module, tuple], tuple | None]:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if not (torch.is_grad_enabled() and x.requires_grad):
                return None
            y = x.view_as(x)  # its own autograd node: gradients from this layer only
            batch, a = self.batches, x.detach()
            y.register_hook(lambda g: self._add(module, batch, a, g, dim))
            self._inputs.append(y)
            return (y, *args[1:])

        return hook

    def _add(
        self, module: nn.Module, batch: int, a: torch.Tensor, g: torch.Tensor, dim: int
    ) -> None:
        dim = dim % a.dim()
        s = (a * g).sum(dim=[d for d in range(a.dim()) if d != dim]).detach().cpu()
        sums = self._sums.setdefault(module, {})
        sums[batch] = sums[batch] + s if batch in sums else s


@register_criterion("taylor", kind="saliency", needs_data=True)
def taylor(
    group: ChannelGroup, *, taylor: TaylorAccumulator | None = None, **state: Any
) -> torch.Tensor:
    """First-order Taylor saliency; needs ``taylor=TaylorAccumulator(graph).collect(batches)``."""
    if taylor is None:
        raise AutopruneError(
            "criterion 'taylor' needs calibration data: pass "
            "taylor=TaylorAccumulator(graph).collect(batches)"
        )
    return taylor.saliency(group)
