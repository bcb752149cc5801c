"""Dataset metadata, the in-memory split type and the dataset registry.

A dataset is one decorated loader function ``fn(root, split, download, **kw) -> ImageData``;
registering it is all it takes for ``load_dataset`` and the CLI to know it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from .._registry import Registry
from ..errors import AutopruneError

if TYPE_CHECKING:
    from .imagefolder import LazyImageFolder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader need to know about a dataset without loading it."""

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()


class ImageData(Dataset):
    """One split held in memory as a uint8 tensor, so batches are one indexing op away.

    ``images`` is uint8 [N, C, H, W] on the CPU, ``labels`` int64 [N].
    """

    def __init__(self, info: DatasetInfo, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], not {images.dtype}{images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.info = info
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageData:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageData(self.info, self.images[idx], self.labels[idx])

    def __repr__(self) -> str:
        return f"ImageData({self.info.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


Loader = Callable[..., Dataset]
InfoSource = DatasetInfo | Callable[..., DatasetInfo]

DATASETS: Registry[Loader] = Registry("dataset")


def register_dataset(
    name: str, *, info: InfoSource, description: str
) -> Callable[[Loader], Loader]:
    """Register ``fn(root: Path, split: str, download: bool, **kw)`` under ``name``.

    ``info`` is the dataset's fixed :class:`DatasetInfo`, or, where it depends on the files or
    on keyword arguments (imagefolder, synthetic), a function ``info(root: Path | None, **kw)``.
    """
    return DATASETS.register(name, info=info, description=description)


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.names(pattern)


def dataset_info(name: str, root: str | Path | None = None, **kw: Any) -> DatasetInfo:
    """The dataset's info without loading its images.

    Datasets whose classes are only known from the files (imagefolder) read them from ``root``;
    without a root they return a best-effort info with ``num_classes=0``.
    """
    info = DATASETS.entry(name).meta["info"]
    if isinstance(info, DatasetInfo):
        return info
    return info(Path(root).expanduser() if root is not None else None, **kw)


def default_data_root() -> Path:
    """``$AUTOPRUNE_DATA_ROOT``, else ``~/.cache/autoprune-data``."""
    return Path(os.environ.get("AUTOPRUNE_DATA_ROOT") or "~/.cache/autoprune-data").expanduser()


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    download: bool = True,
    **kw: Any,
) -> ImageData | LazyImageFolder:
    """Load one split (``"train"`` or ``"test"``) of a registered dataset.

    Returns an :class:`ImageData`, or for image folders too big for memory a
    :class:`LazyImageFolder` with the same interface (``info``, ``labels``, ``__getitem__``,
    ``subset``) that decodes per item and has no ``images``.
    """
    if split not in SPLITS:
        raise AutopruneError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(root).expanduser() if root is not None else default_data_root()
    return DATASETS.get(name)(path, split, download, **kw)
