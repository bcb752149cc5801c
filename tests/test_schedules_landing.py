"""Issue 15: the fixed schedule lands within the tolerance wherever a plan under the caps does.

The models are small enough that every plan (each group losing a prefix of its L1 order, up to
its cap) is enumerated: the tests check against that list, not against typed-in numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprune
from autoprune.criteria import score
from autoprune.errors import AutopruneError
from autoprune.graph import build_graph
from autoprune.measure import count_macs
from autoprune.search.candidates import removable
from autoprune.search.schedules import TOLERANCE

CAP = 0.75  # PruneConfig's default


class Scale(nn.Module):
    """A user's per-channel scale, a raw ``nn.Parameter``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


def scaled_cnn(c1: int = 8, c2: int = 20) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), Scale(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), Scale(c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10),
    )  # fmt: skip


class LinearToConv(nn.Module):
    """A Linear viewed into 4 x 4 maps: each channel removes 16 of its rows at once."""

    def __init__(self, features: int = 4, channels: int = 12, width: int = 12) -> None:
        super().__init__()
        self.fc = nn.Linear(features, channels * 16)
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.head = nn.Linear(width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x)).view(x.shape[0], -1, 4, 4)
        return self.head(F.relu(self.conv(x)).flatten(1))


def mlp(a: int = 16, b: int = 8) -> nn.Module:
    """A few hundred MACs: one channel is a percent or more."""
    return nn.Sequential(nn.Linear(8, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU(), nn.Linear(b, 4))


MODELS: dict[str, tuple[Callable[[], nn.Module], torch.Tensor]] = {
    "scaled_cnn": (scaled_cnn, torch.zeros(1, 3, 8, 8)),
    "linear_to_conv": (LinearToConv, torch.zeros(1, 4)),
    "mlp": (mlp, torch.zeros(1, 8)),
    "coarse_mlp": (lambda: mlp(12, 10), torch.zeros(1, 8)),
}


def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def every_plan(name: str) -> list[float]:
    """The MACs reduction of every plan that removes something, within the caps."""
    example = MODELS[name][1]
    graph = build_graph(model(name).eval(), example)
    order = {g.name: torch.argsort(score(g, "l1"), stable=True) for g in graph.groups()}
    limits = [range(removable(g, g.channels, CAP) + 1) for g in graph.groups()]
    return [
        1
        - graph.macs({g: order[g][:k] for g, k in zip(order, counts, strict=True) if k})
        / graph.macs()
        for counts in itertools.product(*limits)
        if any(counts)
    ]


def prune(name: str, target: float) -> tuple[nn.Module, float]:
    dense, example = model(name), MODELS[name][1]
    result = autoprune.prune(
        dense,
        example_inputs=example,
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=target,
        progress=False,
    )
    return result.model, 1 - count_macs(result.model, example) / count_macs(dense, example)


@pytest.mark.parametrize("target", [0.3, 0.5])
@pytest.mark.parametrize("name", ["scaled_cnn", "linear_to_conv", "mlp"])
def test_fixed_schedule_lands_where_a_plan_does(name: str, target: float) -> None:
    assert any(abs(r - target) <= TOLERANCE for r in every_plan(name))
    pruned, reduction = prune(name, target)
    assert abs(reduction - target) <= TOLERANCE
    dense = dict(model(name).named_modules())
    for path, layer in pruned.named_modules():  # no layer past the cap (the outputs stay)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            assert layer.weight.shape[0] >= (1 - CAP) * dense[path].weight.shape[0]


def test_the_criterion_still_chooses_which_channels_go() -> None:
    """Landing changes how many channels a group loses, never which: the lowest-L1 ones."""
    dense = model("mlp")
    graph = build_graph(model("mlp").eval(), MODELS["mlp"][1])
    pruned, _ = prune("mlp", 0.5)
    for group in graph.groups():
        layer, kept = dense.get_submodule(group.name), pruned.get_submodule(group.name)
        lost = layer.out_features - kept.out_features
        survivors = torch.argsort(score(group, "l1"), stable=True)[lost:].sort().values
        assert lost > 0
        assert torch.equal(kept.bias, layer.bias[survivors])


def test_no_plan_within_the_tolerance_is_refused_with_the_nearest() -> None:
    reductions = every_plan("coarse_mlp")
    target = next(
        t / 100 for t in range(20, 60) if not any(abs(r - t / 100) <= TOLERANCE for r in reductions)
    )
    below = max(r for r in reductions if r < target)
    above = min(r for r in reductions if r > target)
    nearest = f"{100 * below:.2f} % and {100 * above:.2f} %"
    with pytest.raises(AutopruneError, match=f"no plan within.*nearest reach {nearest}"):
        prune("coarse_mlp", target)
