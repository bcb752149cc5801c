"""Patterns of CNN-ish timm models (RDNet, EfficientViT-MSRA, TResNet, ...), each in a small
hand-written model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from test_graph_patterns_b import Head, check_prunes
from torch import nn

import autoprune
from autoprune.criteria import select
from autoprune.graph import build_graph, mask_channels
from autoprune.graph._fx import normalize_model


class DenseConcat(nn.Module):
    """RDNet: two convs concatenated, then one depthwise conv over the concat, so each conv's
    group holds a slice of the depthwise weight (the first slice starts at row 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 8, 1)
        self.b = nn.Conv2d(6, 4, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = Head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.dw(torch.cat([self.a(x), self.b(x)], 1)))


def test_depthwise_slice_after_concat_is_scored_by_its_own_rows() -> None:
    torch.manual_seed(0)
    model = DenseConcat().eval()
    graph = build_graph(model, torch.zeros(1, 3, 8, 8))
    group = graph.group("a")
    rows = torch.cat([model.a.weight.flatten(1), model.dw.weight[:8].flatten(1)], 1)
    expected = torch.argsort(rows.abs().sum(1))[:3]
    assert sorted(select(group, "l1", 3).tolist()) == sorted(expected.tolist())
    removal = {g.name: select(g, "l1", g.channels // 3) for g in graph.groups()}
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad(), mask_channels(graph, removal):
        masked = graph.model(x)
    graph.prune(removal)
    with torch.no_grad():
        torch.testing.assert_close(graph.model(x), masked, atol=1e-5, rtol=1e-5)


class ChunkedMixer(nn.Module):
    """EfficientViT-MSRA's CascadedGroupAttention: its own code chunks channels (so it is
    rewritten by torch.fx) and its parent reads a plain attribute of it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.left = nn.Conv2d(c // 2, c // 2, 1)
        self.right = nn.Conv2d(c // 2, c // 2, 1)
        self.resolution = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([self.left(a), self.right(b)], 1)


class WindowedParent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mixer = ChunkedMixer(8)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] == self.mixer.resolution:
            x = self.mixer(x)
        return self.head(x)


def test_rewritten_layer_keeps_plain_attributes() -> None:
    torch.manual_seed(0)
    model = WindowedParent().eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        before = model(x)
    model = normalize_model(model, x)
    assert isinstance(model.mixer, torch.fx.GraphModule)
    for m in (model, copy.deepcopy(model)):
        assert m.mixer.resolution == 4
        with torch.no_grad():
            torch.testing.assert_close(m(x), before)
    graph = build_graph(model, x[:1])
    assert graph.groups()


class SpaceToDepthNet(nn.Module):
    """TResNet: the stem rearranges the image (pixel unshuffle) before its first conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, padding=1)
        self.head = Head(8, 10)
        self.pretrained_cfg = {"input_size": (3, 16, 16)}  # as every timm model says it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(F.pixel_unshuffle(x, 2))))


def test_input_channels_follow_the_config_not_the_first_conv() -> None:
    assert autoprune.api.input_channels(SpaceToDepthNet()) == 3
    assert autoprune.api.input_channels(DenseConcat()) == 3


class AcrossChannelNorms(nn.Module):
    """MobileNetV5's RmsNorm2d and CSATv2's GlobalResponseNorm (channels first and last):
    their statistics run across the channels, so zeroing a channel is not removing it."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import RmsNorm2d, RmsNormAct2d
        from timm.layers.grn import GlobalResponseNorm

        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.rms = RmsNorm2d(12)
        self.pw = nn.Conv2d(12, 16, 1)
        self.rms_act = RmsNormAct2d(16)
        self.grn = GlobalResponseNorm(16, channels_last=False)
        self.fc1 = nn.Linear(16, 24)
        self.grn_last = GlobalResponseNorm(24, channels_last=True)
        self.fc2 = nn.Linear(24, 16)
        self.head = Head(16)
        for p in (self.rms.weight, self.rms_act.weight, self.grn.weight, self.grn_last.weight):
            nn.init.uniform_(p, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grn(self.rms_act(self.pw(self.rms(self.stem(x)))))
        y = self.fc2(self.grn_last(self.fc1(x.permute(0, 2, 3, 1))))
        return self.head(x + y.permute(0, 3, 1, 2))


def test_norms_across_channels_are_masked_as_pruned(tmp_path: Path) -> None:
    model = AcrossChannelNorms()
    check_prunes(
        model, 8, tmp_path, expect=("stem", "pw", "fc1"), factory=f"{__file__}:AcrossChannelNorms"
    )
    assert model.rms.normalized_shape == (model.rms.weight.numel(),) < (12,)
