"""MobileViT (Mehta and Rastegari 2022) -XXS, -XS and -S, written for structured pruning.

The architecture follows the widely used MIT-licensed reference implementation
(chinhsuanwu/mobilevit-pytorch): a stride-2 stem, seven MobileNetV2 blocks with SiLU, and after
the 5th, 6th and 7th a MobileViT block (local 3x3 and 1x1 convs, 2x2 patches through a
transformer of 4 heads of 8 dimensions, a 1x1 conv back, fusion with the block input by a 3x3
conv over their concatenation), a 1x1 conv, global pooling and a bias-free classifier.
Attention is a :class:`~autoprune.attention.MultiHeadAttention` whose head count and size are
attributes, and patches are unfolded by reshapes (no einops), so heads, head dimensions and
MLP widths can be pruned. Any input size works: maps whose sides are not even are resized to
the next even size inside a block, so 32 x 32 CIFAR images run (and 256 x 256 ImageNet ones).

``mobilevit_xxs`` loads the reference code's checkpoints (keys are renamed on load); its
registered preprocessing is that of the shared CIFAR-10 checkpoint: images upsampled to
64 x 64, ImageNet mean and std.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..attention import MultiHeadAttention, PatchFold, PatchUnfold
from ..data._base import IMAGENET_MEAN, IMAGENET_STD
from ._blocks import ConvBNAct
from ._registry import Preprocessing, register_model
from .mobilenetv2 import InvertedResidual

ACT = "silu"


class TransformerLayer(nn.Module):
    """Pre-norm attention and pre-norm MLP (Linear, SiLU, Linear), each with a residual add."""

    def __init__(self, dim: int, mlp_dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_dim))
        self.mlp.add_module("act", nn.SiLU())
        self.mlp.add_module("fc2", nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileViTBlock(nn.Module):
    """Local convs, global transformer over patches, and fusion with the block's input."""

    def __init__(
        self,
        channels: int,
        dim: int,
        depth: int,
        mlp_dim: int,
        num_heads: int = 4,
        head_dim: int = 8,
        patch_size: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels, 3, act=ACT)
        self.conv2 = ConvBNAct(channels, dim, 1, act=ACT)
        self.unfold = PatchUnfold(patch_size)
        self.transformer = nn.Sequential(
            *(TransformerLayer(dim, mlp_dim, num_heads, head_dim) for _ in range(depth))
        )
        self.fold = PatchFold(patch_size)
        self.conv3 = ConvBNAct(dim, channels, 1, act=ACT)
        self.conv4 = ConvBNAct(2 * channels, channels, 3, act=ACT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        size = (y.shape[2], y.shape[3])
        y = self.fold(self.transformer(self.unfold(y)), size)
        return self.conv4(torch.cat((self.conv3(y), x), 1))


class MobileViT(nn.Module):
    """``stem`` -> ``mv2[0..4]`` -> (``mvit[i]``, ``mv2[5 + i]``)... -> ``final_conv`` -> ``fc``.

    ``channels`` are the reference's eleven widths (stem, MobileNetV2 and MobileViT blocks,
    final conv), ``dims`` the three transformer widths; MLPs are 2x, 4x and 4x wide.
    """

    DEPTHS = (2, 4, 3)
    MLP_RATIOS = (2, 4, 4)

    def __init__(
        self,
        dims: tuple[int, int, int],
        channels: tuple[int, ...],
        num_classes: int = 1000,
        expansion: int = 4,
        num_heads: int = 4,
        head_dim: int = 8,
    ) -> None:
        super().__init__()
        c = channels
        self.stem = ConvBNAct(3, c[0], 3, stride=2, act=ACT)
        # (in, out, stride) of the seven MobileNetV2 blocks
        mv2 = [(c[0], c[1], 1), (c[1], c[2], 2), (c[2], c[3], 1), (c[2], c[3], 1)]
        mv2 += [(c[3], c[4], 2), (c[5], c[6], 2), (c[7], c[8], 2)]
        self.mv2 = nn.ModuleList(InvertedResidual(i, o, s, expansion, ACT) for i, o, s in mv2)
        self.mvit = nn.ModuleList(
            MobileViTBlock(ch, dim, depth, ratio * dim, num_heads, head_dim)
            for ch, dim, depth, ratio in zip(
                (c[5], c[7], c[9]), dims, self.DEPTHS, self.MLP_RATIOS, strict=True
            )
        )
        self.final_conv = ConvBNAct(c[9], c[10], 1, act=ACT)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[10], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mv2 = self.mv2  # constant indices: TorchScript cannot slice a ModuleList
        x = mv2[4](mv2[3](mv2[2](mv2[1](mv2[0](self.stem(x))))))
        x = self.mvit[0](x)
        x = self.mvit[1](self.mv2[5](x))
        x = self.mvit[2](self.mv2[6](x))
        return self.fc(torch.flatten(self.pool(self.final_conv(x)), 1))


# The reference implementation's key names -> ours (ConvBNAct, InvertedResidual, the
# transformer without its PreNorm wrappers). Keys already in our naming match none of them.
_REFERENCE_KEYS: tuple[tuple[str, str], ...] = (
    (r"^conv1\.0\.", "stem.conv."),
    (r"^conv1\.1\.", "stem.bn."),
    (r"^conv2\.0\.", "final_conv.conv."),
    (r"^conv2\.1\.", "final_conv.bn."),
    (r"^(mv2\.\d+\.conv)\.0\.", r"\1.0.conv."),
    (r"^(mv2\.\d+\.conv)\.1\.", r"\1.0.bn."),
    (r"^(mv2\.\d+\.conv)\.3\.", r"\1.1.conv."),
    (r"^(mv2\.\d+\.conv)\.4\.", r"\1.1.bn."),
    (r"^(mv2\.\d+\.conv)\.6\.", r"\1.2."),
    (r"^(mv2\.\d+\.conv)\.7\.", r"\1.3."),
    (r"^(mvit\.\d+\.conv\d)\.0\.", r"\1.conv."),
    (r"^(mvit\.\d+\.conv\d)\.1\.", r"\1.bn."),
    (r"\.transformer\.layers\.(\d+)\.0\.norm\.", r".transformer.\1.norm1."),
    (r"\.transformer\.layers\.(\d+)\.0\.fn\.to_qkv\.", r".transformer.\1.attn.qkv."),
    (r"\.transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.", r".transformer.\1.attn.proj."),
    (r"\.transformer\.layers\.(\d+)\.1\.norm\.", r".transformer.\1.norm2."),
    (r"\.transformer\.layers\.(\d+)\.1\.fn\.net\.0\.", r".transformer.\1.mlp.fc1."),
    (r"\.transformer\.layers\.(\d+)\.1\.fn\.net\.3\.", r".transformer.\1.mlp.fc2."),
)


def reference_key(key: str) -> str:
    """A key of the reference implementation's state_dict in this implementation's naming."""
    for pattern, replacement in _REFERENCE_KEYS:
        key = re.sub(pattern, replacement, key)
    return key


CIFAR_64PX = Preprocessing(input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_model(
    "mobilevit_xxs",
    input_size=(3, 64, 64),
    description="MobileViT-XXS (reference layout; CIFAR-10 weights at 64x64), 1.01M params",
    remap_keys=reference_key,
    preprocessing=CIFAR_64PX,
)
def mobilevit_xxs(num_classes: int = 10, head_dim: int = 8) -> MobileViT:
    channels = (16, 16, 24, 24, 48, 48, 64, 64, 80, 80, 320)
    return MobileViT((64, 80, 96), channels, num_classes, 2, head_dim=head_dim)


@register_model(
    "mobilevit_xs",
    input_size=(3, 256, 256),
    num_classes=1000,
    dataset="imagenet",
    description="MobileViT-XS (reference layout), 2.38M params with 1000 classes",
    remap_keys=reference_key,
)
def mobilevit_xs(num_classes: int = 1000, head_dim: int = 8) -> MobileViT:
    channels = (16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384)
    return MobileViT((96, 120, 144), channels, num_classes, 4, head_dim=head_dim)


@register_model(
    "mobilevit_s",
    input_size=(3, 256, 256),
    num_classes=1000,
    dataset="imagenet",
    description="MobileViT-S (reference layout), 5.64M params with 1000 classes",
    remap_keys=reference_key,
)
def mobilevit_s(num_classes: int = 1000, head_dim: int = 8) -> MobileViT:
    channels = (16, 32, 64, 64, 96, 96, 128, 128, 160, 160, 640)
    return MobileViT((144, 192, 240), channels, num_classes, 4, head_dim=head_dim)
