"""Layers whose channels go in blocks or whose statistics see every channel (``._grouped``):
grouped and depthwise convs with multipliers, GroupNorm, weight standardisation, channels-last
splits, per-channel scales. One small hand-written model per pattern, each checked by
``test_graph_patterns_b.check_prunes`` (masked == pruned, MACs as predicted, save/load exact)
and by the fixed schedule landing within 0.5 % of -30 % MACs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_graph_patterns_b import Head, check_prunes
from torch import nn

import autoprune
from autoprune.graph import build_graph, mask_channels
from autoprune.measure import count_macs


def tail(cin: int) -> nn.Sequential:
    """Plain 1x1 convs before the head: channels fine enough for the fixed schedule to land
    within 0.5 % where the pattern's own blocks are coarse."""
    return nn.Sequential(
        nn.Conv2d(cin, 48, 1), nn.ReLU(), nn.Conv2d(48, 48, 1), nn.ReLU(), Head(48)
    )  # fmt: skip


class GroupedConvs(nn.Module):
    """A depthwise conv with multiplier 2, then a grouped conv (4 groups), between plain convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(32)
        self.pw1 = nn.Conv2d(32, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.pw2 = nn.Conv2d(32, 24, 1)
        self.head = tail(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.dw(F.relu(self.stem(x)))))
        x = F.relu(self.grouped(F.relu(self.pw1(x))))
        return self.head(F.relu(self.pw2(x)))


class GroupNorms(nn.Module):
    """GroupNorm with 4 groups of 4 channels, and with one group, around a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.gn1 = nn.GroupNorm(1, 24)
        self.mix = nn.Conv2d(24, 24, 1)
        self.head = tail(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn(self.stem(x)))
        x = F.relu(self.conv(x))
        return self.head(x + self.mix(self.gn1(x)))


class StdConv(nn.Conv2d):
    """A conv that standardises each filter over its inputs in ``forward`` (BiT, NFNet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False).add(1e-5).sqrt()
        return F.conv2d(x, (w - mean) / std, self.bias, self.stride, self.padding, 1, self.groups)


class StdConvs(nn.Module):
    """Weight-standardised convs, one of them grouped, reading pruned channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv(3, 16, 3, padding=1)
        self.conv = StdConv(16, 32, 3, padding=1)
        self.grouped = StdConv(32, 32, 3, padding=1, groups=2)
        self.head = tail(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(F.relu(self.stem(x))))
        return self.head(F.relu(self.grouped(x)))


class Scale(nn.Module):
    """metaformer's ``Scale``: a per-channel parameter viewed to (C, 1, 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(-1, 1, 1)


class ScaledBlocks(nn.Module):
    """A PoolFormer block: one-group GroupNorm, pooling minus identity, layer and residual
    scales."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(1, 16)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.layer_scale = Scale(16)
        self.res_scale = Scale(16)
        self.fc1 = nn.Conv2d(16, 32, 1)
        self.fc2 = nn.Conv2d(32, 16, 1)
        self.head = tail(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(x)
        x = self.res_scale(x) + self.layer_scale(self.pool(y) - y)
        return self.head(x + self.fc2(F.gelu(self.fc1(x))))


class GatedBlock(nn.Module):
    """MambaOut's gated conv block on a channels-last map: ``fc1``'s output split on its last
    dim into a gate, an identity part and a depthwise-conv part."""

    def __init__(self, dim: int = 16, hidden: int = 24, conv: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.split_indices = (hidden, hidden - conv, conv)
        self.conv = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_indices, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc2(F.gelu(g) * torch.cat((i, c), dim=-1))


class ChannelsLastSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = GatedBlock()
        self.head = tail(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.permute(0, 3, 1, 2))


class EvoNorms(nn.Module):
    """timm's EvoNorm B0 (per channel, a running variance) and S0 (4 groups of 4 channels)."""

    def __init__(self) -> None:
        super().__init__()
        evo_norm = pytest.importorskip("timm.layers.evo_norm")
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b0 = evo_norm.EvoNorm2dB0(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.s0 = evo_norm.EvoNorm2dS0(16, groups=4)
        self.head = tail(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.s0(self.conv(self.b0(self.stem(x)))))


# pattern -> (model, groups that must be prunable, a pattern layer and the width it must lose)
PATTERNS = {
    "grouped_convs": (GroupedConvs, ("stem", "grouped"), ("grouped", "out_channels")),
    "group_norms": (GroupNorms, ("stem", "conv"), ("gn1", "num_channels")),
    "std_convs": (StdConvs, ("stem", "conv", "grouped"), ("conv", "in_channels")),
    "scales": (ScaledBlocks, ("stem", "fc1"), ("norm", "num_channels")),
    "channels_last_split": (ChannelsLastSplit, ("stem", "block.fc1"), ("block.conv", "groups")),
    "evo_norms": (EvoNorms, ("stem", "conv"), ("b0", "weight")),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_prunes_exactly(pattern: str, tmp_path: Path) -> None:
    cls, expect, _ = PATTERNS[pattern]
    check_prunes(cls(), 16, tmp_path, expect=expect, factory=f"{__file__}:{cls.__name__}")


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_fixed_schedule_lands_within_half_a_percent(pattern: str) -> None:
    torch.manual_seed(0)
    cls, _, (layer, width) = PATTERNS[pattern]
    model = cls().eval()
    x = torch.zeros(1, 3, 16, 16)
    result = autoprune.prune(
        model,
        example_inputs=x,
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=0.3,
        progress=False,
    )
    reduction = 1 - count_macs(result.model, x) / count_macs(model, x)
    assert abs(reduction - 0.3) <= 0.005
    assert _width(result.model, layer, width) < _width(model, layer, width)


def _width(model: nn.Module, layer: str, attr: str) -> int:
    value = getattr(model.get_submodule(layer), attr)
    return value.numel() if isinstance(value, torch.Tensor) else value


def test_grouped_convs_prune_in_blocks() -> None:
    """The grouped conv keeps its 4 groups and loses the same positions in each, on both
    sides; the depthwise conv with multiplier 2 loses whole pairs of filters with its inputs."""
    graph = build_graph(GroupedConvs().eval(), torch.zeros(1, 3, 16, 16))
    assert graph.group("pw1").channels == graph.group("grouped").channels == 8  # 32 in 4 groups
    stem = graph.group("stem")
    assert stem.channels == 16
    assert sum(m.count(torch.tensor([3])) for m in stem.members if m.layer == "dw") == 3
    graph.prune({"stem": [3, 5], "pw1": [1], "grouped": [0, 7]})
    model = graph.model
    assert (model.dw.in_channels, model.dw.groups, model.dw.out_channels) == (14, 14, 28)
    assert (model.grouped.in_channels, model.grouped.groups, model.grouped.out_channels) == (
        28,
        4,
        24,
    )
    assert model.grouped.weight.shape[:2] == (24, 7) and model.pw2.in_channels == 24


def test_group_norm_loses_whole_groups() -> None:
    graph = build_graph(GroupNorms().eval(), torch.zeros(1, 3, 16, 16))
    assert graph.group("stem").channels == 4
    graph.prune("stem", [2])
    assert graph.model.gn.num_groups == 3 and graph.model.gn.num_channels == 12


def test_one_group_norm_and_std_conv_are_masked_as_pruned() -> None:
    """Their statistics see every channel: zeroing a channel is not removing it, so masking
    runs them as pruned (and such removals are tried one at a time, not stacked)."""
    x = torch.randn(2, 3, 16, 16)
    for cls, group in ((GroupNorms, "conv"), (StdConvs, "stem")):
        graph = build_graph(cls().eval(), x[:1])
        with torch.no_grad(), mask_channels(graph, group, [0, 1]):
            masked = graph.model(x)
        graph.prune(group, [0, 1])
        with torch.no_grad():
            torch.testing.assert_close(graph.model(x), masked, atol=1e-5, rtol=1e-5)
