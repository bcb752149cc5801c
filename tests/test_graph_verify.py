"""The safety net: groups the graph would prune wrong are frozen, the rest still prunes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import autoprune
from autoprune.cli import prune as cli_prune
from autoprune.errors import AutopruneError
from autoprune.graph import build_graph, clone_graph, mask_channels, verify_groups
from autoprune.search import PruneConfig, Pruner

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
FIXED = {"schedule": "fixed", "criteria": ("l1",)}


class Chain(nn.Module):
    """conv -> conv -> conv -> linear; ``between`` runs on the first conv's output."""

    forwards = 0

    def __init__(self, between: str = "none", width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 4)
        self.between = between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).forwards += 1
        a = self.c1(x)
        b = self.c2(BETWEEN[self.between](a)).relu()
        return self.head((self.c3(b) + b).mean((2, 3)))


def heads_of_four(a: torch.Tensor) -> torch.Tensor:
    """A softmax over groups of 4 channels, its group count baked in: pruning crashes."""
    n, c, h, w = a.shape
    return a.reshape(n, 4, c // 4, h * w).softmax(-1).reshape(n, c, h, w)


BETWEEN = {
    "none": lambda a: a,
    # a scale from the width: the graph sees no op on the channels, pruning changes the value
    "width_scale": lambda a: a / a.shape[1] ** 0.5,
    "heads_of_four": heads_of_four,
}


class AllBroken(nn.Module):
    """Every group's channels are scaled by their count: no group prunes correctly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        b = self.c2(a / a.shape[1])
        return self.head((b / b.shape[1]).mean((2, 3)))


class Joint(nn.Module):
    """Two groups whose widths are read together: either may lose a channel, not both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        b = self.c2(a)
        c = self.c3(b) * (a.shape[1] + b.shape[1] > 14)
        return self.head(c.mean((2, 3)))


def pruned_minus_masked(graph, removal) -> float:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with mask_channels(graph, removal):
            expected = graph.model(x)
        graph.prune(removal)
        return float((graph.model(x) - expected).abs().max())


@pytest.mark.parametrize(
    ("between", "broke"),
    [("width_scale", "changes the output"), ("heads_of_four", "breaks the pruned forward")],
)
def test_only_the_broken_group_is_frozen_and_the_rest_prunes_exactly(between, broke):
    graph = build_graph(Chain(between).eval(), X)
    if between == "width_scale":  # unchecked, the group prunes to another model...
        assert pruned_minus_masked(clone_graph(graph), {"c1": [0]}) > 1e-4
    else:  # ... or to one that crashes
        with pytest.raises(RuntimeError):
            pruned_minus_masked(clone_graph(graph), {"c1": [0]})

    frozen = verify_groups(graph)

    assert [name for name, _ in frozen] == ["c1"]
    reason = frozen[0][1]
    assert "'c1'" in reason and broke in reason and "\n" not in reason
    assert graph.frozen["c1"] == reason
    assert [g.name for g in graph.groups()] == ["c2"]  # c2, c3 and the head coupled by a sum
    removal = {g.name: torch.arange(int(0.3 * g.channels)) for g in graph.groups()}
    assert pruned_minus_masked(graph, removal) <= 1e-5
    assert graph.model.c1.out_channels == 16  # frozen through the prune's rebuild of the groups


def test_a_fixed_prune_skips_the_frozen_group_and_reports_it():
    model = Chain("width_scale")
    result = autoprune.prune(
        model, example_inputs=X, target_macs_reduction=0.31, progress=False, **FIXED
    )
    assert set(result.summary["frozen_by_verify"]) == {"c1"}
    assert result.model.c1.out_channels == 16 and result.model.c2.out_channels < 16
    assert abs(result.summary["macs_reduction"] - 0.31) <= 0.005


def test_a_target_only_the_frozen_group_could_reach_names_its_reason():
    config = PruneConfig(target_macs_reduction=0.95, cap=1.0, **FIXED)
    pruner = Pruner(Chain("width_scale"), X, config)
    with pytest.raises(AutopruneError, match="'c1': removing a channel of 'c1' changes"):
        pruner.start()


def test_groups_that_break_only_together_lose_the_one_that_tips_them_over():
    graph = build_graph(Joint().eval(), X)
    frozen = verify_groups(graph)
    assert [name for name, _ in frozen] == ["c2"]
    assert "with one of each group before it" in frozen[0][1]
    assert [g.name for g in graph.groups()] == ["c1", "c3"]


def test_a_model_whose_every_group_breaks_gets_one_clean_refusal():
    with pytest.raises(AutopruneError) as refused:
        verify_groups(build_graph(AllBroken().eval(), X))
    assert "no channel group of this model prunes correctly" in str(refused.value)
    assert "\n" not in str(refused.value)
    with pytest.raises(AutopruneError, match="no channel group"):
        autoprune.prune(AllBroken(), example_inputs=X, progress=False, **FIXED)


def test_a_healthy_model_freezes_nothing_in_two_forwards():
    graph = build_graph(Chain().eval(), X)
    before = {k: v.clone() for k, v in graph.model.state_dict().items()}
    Chain.forwards = 0
    assert verify_groups(graph) == []
    assert Chain.forwards == 2  # masked original and pruned clone, all groups at once
    assert [g.name for g in graph.groups()] == ["c1", "c2"]
    assert all(torch.equal(before[k], v) for k, v in graph.model.state_dict().items())


def test_clone_shares_the_analysis_but_not_the_weights():
    graph = build_graph(Chain().eval(), X)
    clone = clone_graph(graph)
    assert clone.model is not graph.model and clone.model.c1 is not graph.model.c1
    assert [g.name for g in clone.groups()] == [g.name for g in graph.groups()]
    assert clone.macs() == graph.macs()
    clone.prune({"c2": [0, 1]})
    assert clone.model.c2.out_channels == 14 and graph.model.c2.out_channels == 16
    assert graph.macs() > clone.macs()


def test_verification_off_leaves_every_group_prunable():
    config = PruneConfig(verify_graph=False, **FIXED)
    pruner = Pruner(Chain("width_scale"), X, config)
    assert pruner.frozen_by_verify == {}
    assert "c1" in {g.name for g in pruner.graph.groups()}
    on = Pruner(Chain("width_scale"), X, PruneConfig(**FIXED))
    assert set(on.frozen_by_verify) == {"c1"}


def test_the_cli_flag_turns_verification_off(cli, monkeypatch):
    seen = {}

    def fake_prune(model, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(summary={})

    monkeypatch.setattr(cli_prune.api, "prune", fake_prune)
    code, _, err = cli("prune", "-m", "resnet20", "--no-verify-graph", "--json")
    assert code == 0, err
    assert seen["config"].verify_graph is False
