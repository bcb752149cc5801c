"""One small hand-written model per graph pattern, the way Torch-Pruning's tests do it.

Each is pruned through the graph (every group loses its lowest-L1 third at once) and checked:
masked outputs equal pruned ones, the MACs fall exactly as predicted, another batch size runs,
and a save/load round trip is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprune
from autoprune.criteria import select
from autoprune.errors import AutopruneError
from autoprune.graph import PruningGraph, build_graph, mask_channels
from autoprune.measure import count_macs

HERE = Path(__file__).resolve()


class LayerScaleBlock(nn.Module):
    """ConvNeXt / EdgeNeXt style: a residual branch scaled per channel by ``gamma``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw1 = nn.Conv2d(c, 2 * c, 1)
        self.pw2 = nn.Conv2d(2 * c, c, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma.view(1, -1, 1, 1) * self.pw2(F.gelu(self.pw1(self.dw(x))))


def layer_scale_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        LayerScaleBlock(16),
        LayerScaleBlock(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


class TinyViT(nn.Module):
    """A ViT without attention: patch embedding, ``cls_token``, ``pos_embed``, MLP blocks."""

    def __init__(self, num_classes: int = 10, dim: int = 24, patches: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
            )
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x)[:, 0])


class ScaleBias(nn.Module):
    """A user's per-channel layer with raw parameters, applied as ``x * scale + bias``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


def scale_bias_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), ScaleBias(32), nn.ReLU(), nn.Linear(32, num_classes))


class Gates(nn.Module):
    """EfficientViM's branch gates: one ``(branches, C)`` parameter, ``sigmoid``-ed, viewed and
    indexed per branch before it meets the channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.alpha = nn.Parameter(torch.randn(2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.alpha).view(2, -1, 1, 1)
        x = x + alpha[0] * (self.conv1(x) - x)
        return x + alpha[1] * (self.conv2(x) - x)


def gated_net(num_classes: int = 10) -> nn.Module:
    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    return nn.Sequential(nn.Conv2d(3, 16, 3), Gates(16), *head)


class UnusedParameterNet(nn.Module):
    """A root module holding a parameter its forward never uses."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(7))
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class RawMatmul(nn.Module):
    """A user's layer mixing channels with a raw square weight: not per channel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def raw_matmul_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), RawMatmul(24), nn.ReLU(),
        nn.Linear(24, num_classes),
    )  # fmt: skip


def grouped_net(num_classes: int = 10) -> nn.Module:
    """A depthwise conv with channel multiplier 2 and a grouped conv, between plain convs."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=16),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(32, 24, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, num_classes),
    )


class Ghost(nn.Module):
    """GhostNet's module: half the channels from a conv, their depthwise "cheap" copies the
    other half; channel ``c`` of each half can only go together."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(cin, cout // 2, 1), nn.BatchNorm2d(cout // 2))
        self.cheap = nn.Conv2d(cout // 2, cout // 2, 3, padding=1, groups=cout // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)


def ghost_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        Ghost(16, 64),
        nn.ReLU(),
        nn.Conv2d(64, 48, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(48, num_classes),
    )


class LinearToConv(nn.Module):
    """Issue 18: a Linear viewed into channels (16 rows per channel), and a conv flattened
    into a Linear (16 inputs per channel)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 256)
        self.conv = nn.Conv2d(16, 12, 3, padding=1)
        self.head = nn.Linear(12 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x)).view(x.shape[0], -1, 4, 4)
        return self.head(F.relu(self.conv(x)).flatten(1))


class GainConv(nn.Conv2d):
    """A conv subclass scaling its filters by a parameter of its own (timm's ScaledStdConv2d)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.gain, self.bias, padding=1)


def gain_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        GainConv(3, 16),
        nn.ReLU(),
        GainConv(16, 24),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, num_classes),
    )


IMAGE = torch.zeros(1, 3, 16, 16)
VECTOR = torch.zeros(1, 16)


def prune_and_check(factory: str, example: torch.Tensor, tmp_path: Path) -> PruningGraph:
    """Prune every group by a third; assert masked == pruned, the MACs saved as predicted,
    batch 3, save/load exact."""
    torch.manual_seed(0)
    model = globals()[factory]().eval()
    dense = count_macs(model, example)
    graph = build_graph(model, example)
    removal = {
        g.name: select(g, "l1", g.channels // 3) for g in graph.groups() if g.channels // 3 >= 1
    }
    assert removal, "nothing prunable"
    x = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mask_channels(graph, removal):
        masked = graph.model(x)
    predicted = graph.macs() - graph.macs(removal)  # the MACs the removal saves
    graph.prune(removal)
    with torch.no_grad():
        pruned = graph.model(x)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert pruned.shape == (3, 10)
    assert dense - count_macs(graph.model, example) == predicted > 0
    autoprune.io.save(graph.model, tmp_path / "m", factory=f"{HERE}:{factory}")
    loaded = autoprune.io.load(tmp_path / "m", trust_factory=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned)
    return graph


def test_layer_scale_gamma_is_pruned_with_its_channels(tmp_path: Path) -> None:
    graph = prune_and_check("layer_scale_net", IMAGE, tmp_path)
    assert graph.model[3].gamma.shape == (graph.model[0].out_channels,) == (11,)


def test_vit_cls_token_and_pos_embed_follow_the_embedding(tmp_path: Path) -> None:
    graph = prune_and_check("TinyViT", IMAGE, tmp_path)
    dim = graph.model.patch.out_channels
    assert dim == 16
    assert graph.model.cls_token.shape == (1, 1, dim)
    assert graph.model.pos_embed.shape == (1, 17, dim)


def test_custom_per_channel_parameters_need_no_registration(tmp_path: Path) -> None:
    graph = prune_and_check("scale_bias_net", VECTOR, tmp_path)
    assert graph.model[1].scale.shape == graph.model[1].bias.shape == (22,)


def test_gates_through_sigmoid_view_and_index_are_pruned_with_their_channels(
    tmp_path: Path,
) -> None:
    graph = prune_and_check("gated_net", IMAGE, tmp_path)
    assert graph.model[1].alpha.shape == (2, 11)


def test_conv_subclass_gain_is_pruned_with_its_filters(tmp_path: Path) -> None:
    graph = prune_and_check("gain_net", IMAGE, tmp_path)
    assert graph.model[0].gain.shape == (11, 1, 1, 1)
    assert graph.model[2].gain.shape == (16, 1, 1, 1)


def test_unused_root_parameter_is_ignored(tmp_path: Path) -> None:
    graph = prune_and_check("UnusedParameterNet", IMAGE, tmp_path)
    assert graph.model.unused.shape == (7,)


def test_parameter_used_in_a_matmul_freezes_only_its_groups(tmp_path: Path) -> None:
    graph = prune_and_check("raw_matmul_net", VECTOR, tmp_path)
    assert [g.name for g in graph.groups()] == ["0"]
    reason = next(r for r in graph.frozen.values() if "3.weight" in r)
    assert "'matmul'" in reason


def test_grouped_convs_prune_in_blocks(tmp_path: Path) -> None:
    """The grouped conv keeps its 4 groups and loses the same positions in each: its 32 outputs
    are 8 units, and its inputs (the depthwise conv's pairs of filters) tie stem channel ``c``
    to ``c + 4``, ``c + 8``, ``c + 12``. The depthwise conv loses whole pairs with its inputs."""
    graph = build_graph(grouped_net().eval(), IMAGE)
    assert [(g.name, g.channels) for g in graph.groups()] == [("0", 4), ("5", 8), ("7", 24)]
    graph = prune_and_check("grouped_net", IMAGE, tmp_path)
    dw, grouped = graph.model[2], graph.model[5]
    assert (dw.in_channels, dw.groups, dw.out_channels) == (12, 12, 24)
    assert (grouped.in_channels, grouped.groups, grouped.out_channels) == (24, 4, 24)
    assert grouped.weight.shape[1] == 6


def test_ghost_module_halves_go_together(tmp_path: Path) -> None:
    graph = build_graph(ghost_net().eval(), IMAGE)
    assert graph.group("2.primary.0").channels == 32  # 64 concatenated: 32 pairs
    graph = prune_and_check("ghost_net", IMAGE, tmp_path)
    assert graph.model[2].cheap.out_channels == graph.model[4].in_channels // 2 == 22


def test_linear_viewed_into_channels_is_counted_in_channels(tmp_path: Path) -> None:
    graph = build_graph(LinearToConv().eval(), VECTOR)
    assert graph.group("fc").channels == 16
    graph = prune_and_check("LinearToConv", VECTOR, tmp_path)
    assert graph.model.fc.out_features == 16 * graph.model.conv.in_channels == 16 * 11


@pytest.mark.parametrize(
    ("factory", "example", "target"),
    [
        ("layer_scale_net", IMAGE, 0.3),
        ("layer_scale_net", IMAGE, 0.5),
        ("ghost_net", IMAGE, 0.3),
        ("LinearToConv", VECTOR, 0.3),
    ],
)
def test_fixed_schedule_lands_within_half_a_percent(
    factory: str, example: torch.Tensor, target: float
) -> None:
    torch.manual_seed(0)
    model = globals()[factory]()
    result = autoprune.prune(
        model,
        example_inputs=example,
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=target,
        progress=False,
    )
    reduction = 1 - count_macs(result.model, example) / count_macs(model, example)
    assert abs(reduction - target) <= 0.005
    before = dict(model.named_modules())
    for name, layer in result.model.named_modules():  # no layer past the 75 % cap
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and name != "head" and name != "7":
            assert layer.weight.shape[0] >= 0.25 * before[name].weight.shape[0]


class AllOutputs(nn.Module):
    """Issue 18: every hidden layer is also an output, so no channel can go."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.fc1(x)
        return self.fc2(F.relu(hidden)), hidden


def test_a_model_with_nothing_prunable_is_refused_with_why_not_with_raise_the_cap() -> None:
    with pytest.raises(AutopruneError, match="no cap helps") as error:
        autoprune.prune(
            AllOutputs(),
            example_inputs=VECTOR,
            schedule="fixed",
            criteria="l1",
            target_macs_reduction=0.3,
            progress=False,
        )
    assert "raise the cap" not in str(error.value)
    assert "'fc1': its channels are the model's output" in str(error.value)
