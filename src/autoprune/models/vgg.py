"""VGG with batch norm for 32x32 inputs (the usual CIFAR variant).

The conv stacks are torchvision's configurations A/B/D/E; the five max-pools bring a 32x32
input down to 1x1, so a single ``Linear(512, num_classes)`` replaces ImageNet VGG's three
fully connected layers (and their 100M+ parameters). Convs keep their bias, as in torchvision
and kuangliu's pytorch-cifar, whose CIFAR VGG checkpoints have this exact key layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import init_weights
from ._registry import register_model

# Channel counts; "M" is a 2x2 max-pool.
CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"],
}


def _make_features(cfg: list[int | str], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(v, int)
            layers += [
                nn.Conv2d(in_channels, v, 3, padding=1),
                nn.BatchNorm2d(v),
                nn.ReLU(),
            ]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` (flat conv-BN-ReLU / max-pool list, torchvision layout) -> ``classifier``."""

    def __init__(self, cfg: str, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = _make_features(CFGS[cfg], in_channels)
        last = [v for v in CFGS[cfg] if v != "M"][-1]
        self.classifier = nn.Linear(int(last), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg11_bn", description="CIFAR VGG-11 with BN (config A), 9.2M params")
def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG("A", num_classes, in_channels)


@register_model("vgg13_bn", description="CIFAR VGG-13 with BN (config B), 9.4M params")
def vgg13_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG("B", num_classes, in_channels)


@register_model("vgg16_bn", description="CIFAR VGG-16 with BN (config D), 14.7M params")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG("D", num_classes, in_channels)


@register_model("vgg19_bn", description="CIFAR VGG-19 with BN (config E), 20.0M params")
def vgg19_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG("E", num_classes, in_channels)
