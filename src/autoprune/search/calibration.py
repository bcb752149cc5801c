"""The calibration set: the fixed images every candidate of a search step is judged on.

Candidates are compared by their loss on the *same* images, so the set is drawn once, without
augmentation, and held on the model's device. It is class-balanced and interleaved by class,
so that every prefix of it is balanced too: a scorer that judges candidates on the first few
dozen images before it spends the rest on the survivors sees every class early.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import ImageData, LazyImageFolder, make_loader
from ..errors import AutopruneError
from ..measure import evaluate_batches
from ..task import CLASSIFICATION, Task

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CalibrationSet:
    """Fixed, un-augmented ``(inputs, targets)`` batches on the model's device, and the
    :class:`~autoprune.task.Task` their loss is computed with."""

    batches: list[Batch]
    task: Task = field(default=CLASSIFICATION)
    # The current model's loss per image for the first images of the set, where a pass already
    # computed it (the Taylor criterion's): the fast scorer orders the images by it instead of
    # running a pass of its own over them.
    image_losses: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return sum(len(y) for _, y in self.batches)

    @classmethod
    def from_data(
        cls,
        data: ImageData | LazyImageFolder,
        size: int,
        *,
        batch_size: int = 128,
        seed: int = 0,
        device: str | torch.device = "cpu",
        input_size: int | None = None,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        task: Task = CLASSIFICATION,
    ) -> CalibrationSet:
        """``size`` training images, the same number per class where the classes allow it.

        Deterministic from ``seed``; ``input_size``, ``channels``, ``mean`` and ``std`` are
        passed to :func:`~autoprune.data.make_loader` like for training, so the images look as
        the model expects them.
        """
        if not 0 < size <= len(data):
            raise AutopruneError(
                f"calibration size must be between 1 and the {len(data)} images of the split, "
                f"got {size}"
            )
        subset = data.subset(stratified_order(data.labels, seed)[:size])
        loader = make_loader(
            subset,
            batch_size,
            train=False,
            augment=False,
            device=device,
            input_size=input_size,
            channels=channels,
            mean=mean,
            std=std,
        )
        return cls(list(loader), task)

    def loss(self, model: nn.Module) -> float:
        """Mean loss of ``model`` over the whole set (eval mode, no grad)."""
        return evaluate_batches(model, self.batches, self.task).loss

    def reordered(self, order: torch.Tensor) -> CalibrationSet:
        """The images at positions ``order``, in that order, batched like this set (a copy)."""
        x = torch.cat([x for x, _ in self.batches])
        y = torch.cat([y for _, y in self.batches])
        index = order.to(x.device)
        size = len(self.batches[0][1])
        batches = list(zip(x[index].split(size), y[index].split(size), strict=True))
        return CalibrationSet(batches, self.task)

    def slices(self, start: int, stop: int, max_batch: int | None = None) -> Iterator[Batch]:
        """Images ``start:stop`` of the set, in pieces of at most ``max_batch`` (views, no copies).

        Pieces never straddle two stored batches, so with ``max_batch=None`` they are the
        stored batches cut to the range.
        """
        offset = 0
        for x, y in self.batches:
            lo, hi = max(start, offset), min(stop, offset + len(y))
            step = max_batch or max(hi - lo, 1)
            for a in range(lo, hi, step):
                b = min(a + step, hi)
                yield x[a - offset : b - offset], y[a - offset : b - offset]
            offset += len(y)


def stratified_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """All indices, classes interleaved: the k-th image of every class before any (k+1)-th.

    Within a class the order is random, and so is the order of classes within one round, so
    every prefix holds each class equally often (up to one), until small classes run out.
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    order = torch.randperm(n, generator=generator)
    shuffled = labels[order]
    by_class = torch.argsort(shuffled, stable=True)  # positions grouped by class, random within
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - starts.repeat_interleave(counts)
    tiebreak = torch.rand(n, generator=generator, dtype=torch.float64)
    return order[torch.argsort(rank.double() + tiebreak)]
