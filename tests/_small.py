"""The small synthetic task the pruning tests share: a smallcnn-sized run takes seconds."""

from __future__ import annotations

import torch

from autoprune.data import ImageData, load_dataset
from autoprune.train import TrainConfig

BRIEF = TrainConfig(batch_size=32, lr=0.01, channels_last=False, progress=False)
# About six iterations and three recoveries on a smallcnn at 16 x 16 pixels.
SMALL = {
    "target_macs_reduction": 0.3,
    "step": 0.05,
    "recover_every": 0.1,
    "recover_steps": 2,
    "calib_size": 32,
    "recovery": BRIEF,
}


def synthetic_task(channels: int = 1, num_classes: int = 10) -> tuple[ImageData, ImageData]:
    """128 training and 64 test images of 16 x 16 pixels."""
    options = {"num_classes": num_classes, "channels": channels, "image_size": 16}
    return (
        load_dataset("synthetic", "train", size=128, **options),
        load_dataset("synthetic", "test", size=64, **options),
    )


TRAIN, VAL = synthetic_task()
EXAMPLE = torch.zeros(1, 1, 16, 16)
