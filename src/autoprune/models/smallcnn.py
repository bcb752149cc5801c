"""A small, fast CNN for 28x28 grey images (Fashion-MNIST), the model of the CPU demo.

Three conv-BN-ReLU stages (32, 64, 128 channels) with 2x2 max-pools between them, a 3x3
adaptive max-pool, and a linear classifier on the flattened 128x3x3 map: 7.4 MMACs and 104k
parameters. Keeping that coarse spatial map (rather than global average pooling) is what gets
it to a useful accuracy after one SGD epoch (one-cycle, peak lr 0.2, batch 128, no
augmentation) on two CPU cores; the demo (``autoprune demo``) prints what it reaches.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import ConvBNAct, init_weights
from ._registry import register_model


class SmallCNN(nn.Module):
    """``stage1 -> pool -> stage2 -> pool -> stage3 -> 3x3 pool -> flatten -> classifier``.

    The adaptive pool makes any input of at least 12x12 pixels give the same 3x3 map.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (32, 64, 128),
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stage1 = ConvBNAct(in_channels, c1, 3)
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = ConvBNAct(c1, c2, 3)
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = ConvBNAct(c2, c3, 3)
        self.pool = nn.AdaptiveMaxPool2d(3)
        self.classifier = nn.Linear(c3 * 9, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stage1(x))
        x = self.pool2(self.stage2(x))
        x = self.pool(self.stage3(x))
        return self.classifier(torch.flatten(x, 1))


@register_model(
    "smallcnn",
    input_size=(1, 28, 28),
    dataset="fashion-mnist",
    description="3-stage CNN for Fashion-MNIST (32-64-128 channels), 104k params, 7.4 MMACs",
)
def smallcnn(
    num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)
) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, widths)
