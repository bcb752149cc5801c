"""Random but learnable images, for tests and smoke runs without any files.

Each class has its own mean colour with a coarse pattern on top; samples are that image plus
pixel noise, so a small model's loss falls within a few steps. Fully determined by ``seed``;
the two splits share the class images but not the samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._base import SPLITS, DatasetInfo, ImageData, register_dataset

_NOISE = 32.0  # pixel noise std, against class colours and patterns spanning 160


def synthetic_info(
    root: Path | None, num_classes: int = 10, channels: int = 3, image_size: int = 32, **_: Any
) -> DatasetInfo:
    classes = tuple(f"class{i}" for i in range(num_classes))
    size = (image_size, image_size)
    return DatasetInfo(
        "synthetic", num_classes, channels, size, (0.5,) * channels, (0.25,) * channels, classes
    )


@register_dataset(
    "synthetic",
    info=synthetic_info,
    description="random learnable images for tests (kwargs num_classes, channels, image_size, "
    "size, seed); needs no files",
)
def load_synthetic(
    root: Path,
    split: str,
    download: bool,
    num_classes: int = 10,
    channels: int = 3,
    image_size: int = 32,
    size: int = 256,
    seed: int = 0,
) -> ImageData:
    """``size`` images per split."""
    info = synthetic_info(root, num_classes, channels, image_size)
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(num_classes, channels, 1, 1, generator=g)
    coarse = F.interpolate(torch.rand(num_classes, channels, 4, 4, generator=g), info.image_size)
    patterns = 48 + 160 * (0.6 * colour + 0.4 * coarse)
    split_seed = torch.randint(2**62, (len(SPLITS),), generator=g)[SPLITS.index(split)]
    g.manual_seed(int(split_seed))
    labels = torch.randperm(size, generator=g) % num_classes
    noise = torch.randn(size, channels, image_size, image_size, generator=g) * _NOISE
    images = (patterns[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
    return ImageData(info, images, labels)
