"""A small, fast CNN for 28x28 grey images (Fashion-MNIST), the model of the CPU demo.

Three conv-BN-ReLU stages (32, 64, 128 channels) with 2x2 max-pools between them, then global
average pooling and a linear classifier: about 7.5 MMACs and 94k parameters, so one epoch on
a laptop CPU takes seconds and leaves plenty of channels for pruning to find.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import ConvBNAct, init_weights
from ._registry import register_model


class SmallCNN(nn.Module):
    """``stage1 -> pool -> stage2 -> pool -> stage3 -> global pool -> classifier``."""

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
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c3, num_classes)
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
    description="3-stage CNN for Fashion-MNIST (32-64-128 channels), 94k params, 7.5 MMACs",
)
def smallcnn(
    num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)
) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, widths)
