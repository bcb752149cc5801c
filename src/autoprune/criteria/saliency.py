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

The same terms per image predict the loss a removal leaves (:meth:`TaylorAccumulator.
predicted_loss`), with no forward pass: the fast scorer scores only the best predicted
candidates (:mod:`autoprune.search.scorers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AutopruneError
from ..graph import ChannelGroup, PruningGraph
from ..graph.masking import site_dim
from ..task import CLASSIFICATION, Task
from ._base import register_criterion


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
        self._per_image: dict[nn.Module, dict[int, torch.Tensor]] = {}  # [images, channels]
        self._losses: list[torch.Tensor] = []  # per image, one tensor per batch (collect only)
        self._classification = True
        self._by_group: dict[str, torch.Tensor] = {}
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
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], task: Task = CLASSIFICATION
    ) -> TaylorAccumulator:
        """Run forward and backward on ``(inputs, targets)`` batches; parameter grads untouched.

        The gradients are those of ``task``'s batch-mean loss (the default: cross-entropy on
        a tensor, a tuple's first, a dict's ``logits``); its per-image losses are kept for
        :meth:`predicted_loss`.

        The model's mode is kept: call ``model.eval()`` first for frozen BatchNorm statistics.
        """
        self._classification = task.classification
        with self, torch.enable_grad():
            for inputs, targets in batches:
                outputs = self.graph.model(inputs)
                self._losses.append(task.losses(outputs, targets).detach().double().cpu())
                loss = task.mean_loss(outputs, targets)
                if self._inputs:
                    torch.autograd.grad(loss, self._inputs, allow_unused=True)
                self._inputs = []
        return self

    @property
    def image_losses(self) -> torch.Tensor | None:
        """The loss per image of the collected batches, in their order (None before
        :meth:`collect`)."""
        return torch.cat(self._losses) if self._losses else None

    def saliency(self, group: ChannelGroup) -> torch.Tensor:
        """Per channel of ``group``: sum over batches of |first-order loss change|."""
        self._check_fresh(group)
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

    def predicted_loss(self, group: ChannelGroup, idxs: torch.Tensor) -> float | None:
        """The mean loss over the collected images with ``idxs`` of ``group`` removed, predicted
        from the gradients alone; None unless :meth:`collect` gathered them.

        Per image, removing the channels changes the loss by ``d = -sum(a * dl/da)`` to first
        order. Cross-entropy is a logistic function of the true class's log-odds, so ``d`` is
        read as a linear step in those log-odds and the loss taken on the logistic curve: a
        confident image (small loss, small gradient) can still flip, and a removal that helps
        an image is not charged for it. Other losses take ``d + d**2 / 2`` (the empirical
        Fisher as the curvature: Liu et al., Group Fisher Pruning, ICML 2021). How well it
        ranks a search's candidates: docs/benchmarks/search_speed.md.
        """
        self._check_fresh(group)
        loss = self.image_losses
        if loss is None:
            return None
        d = -self._image_terms(group)[:, idxs].sum(dim=1)
        if self._classification:
            # 1 - p(true class); float32 cannot tell p from 1 closer than its epsilon (the
            # loss of a confident image reads 0), and dividing by that noise ranks at random
            wrong = (-torch.expm1(-loss)).clamp_min(torch.finfo(torch.float32).eps)
            log_odds = torch.log(wrong) + loss  # of a wrong class: log((1 - p) / p)
            change = F.softplus(log_odds + d / wrong) - loss
        else:
            change = d + d * d / 2
        return float((loss + change).mean())

    def _check_fresh(self, group: ChannelGroup) -> None:
        if group.version != self.version:
            raise AutopruneError(
                "taylor data was collected before the model was last pruned; collect it again"
            )

    def _image_terms(self, group: ChannelGroup) -> torch.Tensor:
        """``[images, group channels]``: per image, ``a * dl/da`` summed over the group's
        consumers, scaled from the batch-mean loss's gradient to the image's own."""
        if group.name not in self._by_group:
            sizes = [len(v) for v in self._losses]
            terms = torch.zeros(sum(sizes), group.channels, dtype=torch.float64)
            for m in group.members:
                per_batch = self._per_image.get(m.module, {}) if m.consumer else {}
                if len(per_batch) != len(sizes):
                    continue
                scaled = [t.double() * n for t, n in zip(per_batch.values(), sizes, strict=True)]
                terms.index_add_(1, m.group_idxs, torch.cat(scaled)[:, m.idxs])
            self._by_group[group.name] = terms
        return self._by_group[group.name]

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
        terms = (a * g).detach()
        # the batch sums reduce as they always did, not from the per-image ones: taylor's
        # saliency (and the channels it picks) stays bit for bit what it was
        s = terms.sum(dim=[d for d in range(a.dim()) if d != dim]).cpu()
        sums = self._sums.setdefault(module, {})
        sums[batch] = sums[batch] + s if batch in sums else s
        if dim != 0:  # images along dim 0: keep each one's terms
            rest = [d for d in range(a.dim()) if d not in (0, dim)]
            t = (terms.sum(dim=rest) if rest else terms).cpu()
            per_image = self._per_image.setdefault(module, {})
            per_image[batch] = per_image[batch] + t if batch in per_image else t


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
