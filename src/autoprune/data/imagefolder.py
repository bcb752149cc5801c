"""Image folders in the ImageNet layout: ``root/{train,val|test}/<class>/*.{jpg,jpeg,png}``.

Small sets are decoded once into memory (an :class:`ImageData`); sets whose pixels would not fit
comfortably are a :class:`LazyImageFolder` that decodes per item, for a DataLoader with workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import AutopruneError, DataNotFoundError
from ._base import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, ImageData, register_dataset

EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}
# Above this many bytes of decoded uint8 pixels, a split is decoded per item instead.
EAGER_MAX_BYTES = 2 << 30
_LAYOUT = "ROOT/train/<class>/*.jpg|jpeg|png and ROOT/val/<class>/... (or ROOT/test/<class>/...)"


def read_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to RGB uint8 [H, W, 3], resized (bilinear) to ``size`` = (H, W) if given."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise AutopruneError(f"cannot read image {path}: {e}; remove or replace it") from e
    if size is not None and rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.array(rgb)  # a writable copy, so torch.from_numpy does not warn


class LazyImageFolder(Dataset):
    """Like :class:`ImageData` but decodes each image on access; it has no ``images`` tensor."""

    def __init__(self, info: DatasetInfo, paths: Sequence[Path], labels: torch.Tensor) -> None:
        self.info = info
        self.paths = list(paths)
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = read_image(self.paths[index], self.info.image_size)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), int(self.labels[index])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> LazyImageFolder:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return LazyImageFolder(self.info, [self.paths[i] for i in idx.tolist()], self.labels[idx])

    def __repr__(self) -> str:
        return f"LazyImageFolder({self.info.name!r}, n={len(self)}, size={self.info.image_size})"


def _no_images(folder: Path) -> str:
    return f"no .jpg/.jpeg/.png images in the class folders of {folder}; expected {_LAYOUT}"


def _split_dir(root: Path, split: str) -> Path | None:
    return next((root / d for d in SPLIT_DIRS[split] if (root / d).is_dir()), None)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())


def _scan(root: Path) -> tuple[list[Path], tuple[str, ...]]:
    """The existing split dirs (train first) and the union of their class folders, sorted.

    The union keeps label numbers identical across splits even if one split lacks a class.
    """
    dirs = [d for d in (_split_dir(root, s) for s in SPLIT_DIRS) if d is not None]
    if not dirs:
        raise DataNotFoundError(
            f"no image folder at {root}: expected {_LAYOUT.replace('ROOT', str(root))}; "
            "pass --data-root DIR pointing to it"
        )
    classes = sorted({c.name for d in dirs for c in d.iterdir() if c.is_dir()})
    return dirs, tuple(classes)


def _size(
    image_size: int | Sequence[int] | None, dirs: list[Path], classes: Sequence[str]
) -> tuple[int, int]:
    """(H, W) from ``image_size``, else the size of the first image of the first split."""
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return int(h), int(w)
    for c in classes:
        files = _images(dirs[0] / c) if (dirs[0] / c).is_dir() else []
        if files:
            h, w, _ = read_image(files[0]).shape
            return h, w
    raise DataNotFoundError(_no_images(dirs[0]))


def imagefolder_info(
    root: Path | None, image_size: int | Sequence[int] | None = None, **_: Any
) -> DatasetInfo:
    """Classes and image size from the folders; without a root, a placeholder with 0 classes."""
    if root is None:
        return DatasetInfo("imagefolder", 0, 3, (0, 0), IMAGENET_MEAN, IMAGENET_STD)
    dirs, classes = _scan(root)
    size = _size(image_size, dirs, classes)
    return DatasetInfo("imagefolder", len(classes), 3, size, IMAGENET_MEAN, IMAGENET_STD, classes)


@register_dataset(
    "imagefolder",
    info=imagefolder_info,
    description="your own images: ROOT/{train,val|test}/<class>/*.jpg|jpeg|png, "
    "resized to one size (kwarg image_size, default: the first image's)",
)
def load_imagefolder(
    root: Path,
    split: str,
    download: bool,
    image_size: int | Sequence[int] | None = None,
    lazy: bool | None = None,
) -> ImageData | LazyImageFolder:
    """``lazy``: decode per item; default: only when the decoded split exceeds EAGER_MAX_BYTES."""
    info = imagefolder_info(root, image_size)
    folder = _split_dir(root, split)
    if folder is None:
        names = " or ".join(f"{root / d}" for d in SPLIT_DIRS[split])
        raise DataNotFoundError(
            f"no {split} split: expected {names} with one folder per class; "
            "pass --data-root DIR pointing to the folder that holds them"
        )
    paths, labels = [], []
    for label, name in enumerate(info.classes):
        files = _images(folder / name) if (folder / name).is_dir() else []
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataNotFoundError(_no_images(folder))
    y = torch.tensor(labels, dtype=torch.int64)
    h, w = info.image_size
    if lazy is None:
        lazy = len(paths) * 3 * h * w > EAGER_MAX_BYTES
    if lazy:
        return LazyImageFolder(info, paths, y)
    pixels = np.empty((len(paths), h, w, 3), np.uint8)
    for i, path in enumerate(paths):
        pixels[i] = read_image(path, (h, w))
    return ImageData(info, torch.from_numpy(pixels).permute(0, 3, 1, 2), y)
