"""The original CIFAR ResNet (He et al. 2016, section 4.2), as in akamaster's reference code.

Module names match https://github.com/akamaster/pytorch_resnet_cifar10 so its checkpoints
load after stripping ``module.``. Shortcut option "A" (the paper's parameter-free one) is a
:class:`~autoprune.layers.ChannelPadShortcut`, which the pruning engine understands; option "B"
is a 1x1 conv + BN projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import AutopruneError
from ..layers import ChannelPadShortcut
from ._registry import register_model


def _shortcut_a(in_planes: int, planes: int, stride: int) -> nn.Module:
    return ChannelPadShortcut(in_planes, planes, stride)


def _shortcut_b(in_planes: int, planes: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


SHORTCUTS: dict[str, Callable[[int, int, int], nn.Module]] = {"A": _shortcut_a, "B": _shortcut_b}


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; the shortcut is an identity unless shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = SHORTCUTS[shortcut](in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _make_stage(
    in_planes: int, planes: int, blocks: int, stride: int, shortcut: str
) -> nn.Sequential:
    rest = (BasicBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1))
    return nn.Sequential(BasicBlock(in_planes, planes, stride, shortcut), *rest)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16-32-64 channels in three stages of n blocks."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise AutopruneError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, ...), got {depth}")
        if shortcut not in SHORTCUTS:
            known = ", ".join(repr(k) for k in SHORTCUTS)
            raise AutopruneError(f"unknown shortcut option {shortcut!r}; use one of {known}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(16, 16, n, 1, shortcut)
        self.layer2 = _make_stage(16, 32, n, 2, shortcut)
        self.layer3 = _make_stage(32, 64, n, 2, shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # akamaster's _weights_init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


@register_model("resnet20", description="CIFAR ResNet-20 (3 blocks per stage), 0.27M params")
def resnet20(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(20, num_classes, shortcut)


@register_model("resnet32", description="CIFAR ResNet-32 (5 blocks per stage), 0.46M params")
def resnet32(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(32, num_classes, shortcut)


@register_model("resnet44", description="CIFAR ResNet-44 (7 blocks per stage), 0.66M params")
def resnet44(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(44, num_classes, shortcut)


@register_model("resnet56", description="CIFAR ResNet-56 (9 blocks per stage), 0.85M params")
def resnet56(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(56, num_classes, shortcut)


@register_model("resnet110", description="CIFAR ResNet-110 (18 blocks per stage), 1.7M params")
def resnet110(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(110, num_classes, shortcut)
