"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs.

The stem and the second stage keep stride 1 (ImageNet uses 2 and 2), so a 32x32 image reaches
the last stage at 4x4 instead of 1x1. Channel widths scale with ``width_mult`` and are rounded
to multiples of 8, as in the paper and torchvision.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import ConvBNAct, init_weights, make_divisible
from ._registry import register_model

# (expansion t, output channels c, repeats n, first stride s)
CIFAR_CFG: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual when shapes allow."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand: int, act: str = "relu6"
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, act=act))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride=stride, groups=hidden, act=act),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """``features`` (stem, inverted residuals, 1x1 head conv) -> global pool -> ``classifier``."""

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNAct(in_channels, channels, 3, act="relu6")]
        for t, c, n, s in CIFAR_CFG:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(ConvBNAct(channels, last_channels, 1, act="relu6"))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model(
    "mobilenetv2",
    description="MobileNetV2 for 32x32 inputs (stride-1 stem), 2.24M params",
)
def mobilenetv2(
    num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3
) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult, in_channels)
