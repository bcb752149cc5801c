"""A user's own ``Dataset`` or ``DataLoader`` of ``(inputs, targets)``, fed like our loaders.

Registered datasets come with their preprocessing; a user's data is taken as the model
expects it already: no resizing, no normalising, no augmentation beyond what it does itself.
Batches are moved to the model's device here, so data can live anywhere. A ``Dataset`` is
batched and shuffled by us, reproducibly from (seed, epoch); a ``DataLoader`` is iterated as
the user built it (its sampler's ``set_epoch`` is called, if it has one): a shuffling
``DataLoader`` without a seeded generator gives other batches, and another calibration set,
every run, so a run resumes bit for bit only from a ``Dataset`` or an unshuffled loader.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import AutopruneError
from ._base import ImageData
from .imagefolder import LazyImageFolder

Batch = tuple[torch.Tensor, torch.Tensor]
UserData = Dataset | DataLoader


def is_user_data(data: Any) -> bool:
    """A plain ``Dataset``/``DataLoader``, not one of ours (which carry their preprocessing)."""
    ours = (ImageData, LazyImageFolder)
    return isinstance(data, DataLoader | Dataset) and not isinstance(data, ours)


def split_batch(batch: Any, device: torch.device | None = None) -> Batch:
    """``(inputs, targets)`` of one collated batch, on ``device`` (CUDA: copied asynchronously)."""
    if not (isinstance(batch, Sequence) and len(batch) == 2):
        raise AutopruneError(
            f"a batch must be (inputs, targets), got {type(batch).__name__}"
            + (f" of {len(batch)}" if isinstance(batch, Sequence) else "")
            + ": make the dataset's items (input, target) pairs"
        )
    x, y = batch
    if not isinstance(x, torch.Tensor):
        raise AutopruneError(f"inputs must be one tensor per batch, got {type(x).__name__}")
    y = torch.as_tensor(y)
    if device is not None:
        blocking = device.type != "cuda"
        x, y = x.to(device, non_blocking=not blocking), y.to(device, non_blocking=not blocking)
    return x, y


class UserBatches:
    """Iterable of ``(x, y)`` on ``device`` from a user's data; the trainer's loader interface
    (``len``, ``set_epoch``, ``shard``) like :class:`~autoprune.data.BatchLoader`."""

    def __init__(
        self,
        data: UserData,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise AutopruneError(f"need batch size >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.epoch = 0
        self.part = (0, 1)

    def _loader(self) -> DataLoader:
        if isinstance(self.data, DataLoader):
            return self.data
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return DataLoader(
            self.data,
            batch_size=self.batch_size,
            shuffle=self.train,
            drop_last=self.train and len(self.data) >= self.batch_size,
            generator=generator,
        )

    def __len__(self) -> int:
        return len(self._loader())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        sampler = getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def shard(self, rank: int, world: int) -> UserBatches:
        """The ``rank``-th of ``world`` contiguous parts of every batch (see BatchLoader.shard)."""
        shard = copy.copy(self)
        shard.part = (rank, world)
        return shard

    def __iter__(self) -> Iterator[Batch]:
        rank, world = self.part
        for batch in self._loader():
            x, y = split_batch(batch, self.device)
            if world > 1:
                size = len(y) // world
                x, y = x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


def first_batches(
    data: UserData,
    size: int,
    *,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> list[Batch]:
    """``size`` samples held as batches on ``device``: a seeded random draw from a ``Dataset``
    (every run of one seed sees the same ones), the first ``size`` of a ``DataLoader``."""
    if isinstance(data, DataLoader):
        loader: DataLoader = data
    else:
        if not 0 < size <= len(data):
            raise AutopruneError(
                f"calibration size must be between 1 and the {len(data)} samples, got {size}"
            )
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(Subset(data, order[:size].tolist()), batch_size=batch_size)
    batches, taken = [], 0
    for batch in loader:
        x, y = split_batch(batch, torch.device(device))
        batches.append((x[: size - taken], y[: size - taken]))
        taken += len(batches[-1][1])
        if taken >= size:
            break
    if taken == 0:
        raise AutopruneError("the calibration data gave no samples")
    return batches
