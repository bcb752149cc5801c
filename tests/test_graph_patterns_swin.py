"""Windowed attention: torchvision's Swin (V1 and V2) blocks, heads and all, pruned exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

try:
    from torchvision.models.swin_transformer import (
        PatchMerging,
        PatchMergingV2,
        ShiftedWindowAttention,
        ShiftedWindowAttentionV2,
        SwinTransformer,
    )
except (ImportError, RuntimeError):  # absent, or its CUDA build without ../shared's CPU shim
    pytest.skip("torchvision does not import here (tests/conftest.py)", allow_module_level=True)

import autoprune
from autoprune.criteria import select
from autoprune.graph import PruningGraph, build_graph, mask_channels
from autoprune.measure import count_macs

HERE = Path(__file__).resolve()
ATTENTION = {"v1": ShiftedWindowAttention, "v2": ShiftedWindowAttentionV2}
MERGING = {"v1": PatchMerging, "v2": PatchMergingV2}


class WindowNet(nn.Module):
    """Channels-last tokens through shifted window attention (relative position bias per
    head, a 6x6 map padded to 4x4 windows) and a patch merging ``cat`` on the last dim."""

    def __init__(self, version: str = "v1", dim: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.norm = nn.LayerNorm(dim)
        self.attn = ATTENTION[version](dim, [4, 4], [2, 2], num_heads=4)
        self.merge = MERGING[version](dim)
        self.fc1, self.fc2 = nn.Linear(2 * dim, 3 * dim), nn.Linear(3 * dim, 2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm(x))
        x = self.merge(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean((1, 2)))


def window_net_v1() -> nn.Module:
    return WindowNet("v1")


def window_net_v2() -> nn.Module:
    return WindowNet("v2")


def tiny_swin_v1() -> nn.Module:
    return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=10)


def randomized(model: nn.Module) -> nn.Module:
    """Random norms, biases and V2 logit scales, so a wrongly kept channel or head shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, ShiftedWindowAttentionV2):
                m.logit_scale.uniform_(1.0, 3.0)
    return model.eval()


def prepared(factory: str, x: torch.Tensor) -> PruningGraph:
    """The graph of a fresh ``factory`` model, checked to compute what torchvision's does."""
    torch.manual_seed(0)
    model = randomized(globals()[factory]())
    with torch.no_grad():
        original = copy.deepcopy(model)(x)
    graph = build_graph(model, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(graph.model(x), original, atol=1e-5, rtol=1e-5)
    return graph


def masked_then_pruned(graph: PruningGraph, removal: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), mask_channels(graph, removal):
        masked = graph.model(x)
    graph.prune(removal)
    with torch.no_grad():
        pruned = graph.model(x)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    return pruned


@pytest.mark.parametrize(
    ("factory", "size"),
    [("window_net_v1", 12), ("window_net_v2", 12), ("tiny_swin_v1", 16), ("tiny_swin_v1", 12)],
)  # at 12, patch merging pads the 3 x 3 token grid
def test_window_attention_stream_mlp_merging_and_heads_prune_exactly(
    factory: str, size: int, tmp_path: Path
) -> None:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    dense = count_macs(globals()[factory](), x[:1])
    graph = prepared(factory, x)
    assert graph.frozen.keys() <= {"head"}, graph.frozen
    groups = [g for g in graph.groups() if not g.name.endswith("[head_dim]")]  # not with heads
    assert any(g.name.endswith("[heads]") for g in groups)
    removal = {g.name: select(g, "l1", g.channels // 3) for g in groups if g.channels > 2}
    predicted = graph.macs() - graph.macs(removal)
    pruned = masked_then_pruned(graph, removal, x)
    assert dense - count_macs(graph.model, x[:1]) == predicted > 0
    autoprune.io.save(
        graph.model, tmp_path / "m", factory=f"{HERE}:{factory}", input_size=(3, size, size)
    )
    loaded = autoprune.io.load(tmp_path / "m", trust_factory=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned)


@pytest.mark.parametrize("factory", ["window_net_v1", "window_net_v2"])
def test_head_dims_prune_exactly(factory: str) -> None:
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    graph = prepared(factory, x)
    masked_then_pruned(graph, {"attn[head_dim]": torch.tensor([0, 2])}, x)
    assert graph.model.attn.head_dim == 2 and graph.model.attn.qkv.out_features == 24


def test_v2_heads_take_their_logit_scale_and_bias_mlp_output() -> None:
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    graph = prepared("window_net_v2", x)
    attn = graph.model.attn
    kept = attn.logit_scale[[0, 2, 3]].clone()
    masked_then_pruned(graph, {"attn[heads]": torch.tensor([1])}, x)
    assert attn.num_heads == 3 and attn.qkv.out_features == 3 * 3 * attn.head_dim
    assert torch.equal(attn.logit_scale, kept)
    assert attn.cpb_mlp[-1].out_features == 3
