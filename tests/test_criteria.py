"""Importance criteria: one registry, scores per group channel, lower = removed first."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.criteria import (
    CRITERIA,
    TaylorAccumulator,
    list_criteria,
    register_criterion,
    score,
    select,
)
from autoprune.errors import AutopruneError, UnknownNameError
from autoprune.graph import PruningGraph, build_graph, mask_channels
from autoprune.models import create_model
from autoprune.task import Task

DATA_FREE = ["bn_scale", "cosine", "euclidean", "fpgm", "l1", "l2", "random"]


@pytest.fixture(scope="module")
def resnet56() -> PruningGraph:
    torch.manual_seed(0)
    return build_graph(create_model("resnet56"), torch.randn(1, 3, 32, 32))


def test_registry_lists_every_criterion_by_kind(resnet56: PruningGraph):
    assert list_criteria(needs_data=False) == DATA_FREE
    assert list_criteria(needs_data=True) == ["taylor"]
    assert list_criteria("similarity") == ["cosine", "euclidean", "fpgm"]
    assert CRITERIA.entry("random").meta == {"kind": "control", "needs_data": False}
    with pytest.raises(ValueError, match="kind"):
        register_criterion("nope", kind="vibes")
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("l1", kind="magnitude")(lambda group, **state: torch.zeros(1))
    with pytest.raises(UnknownNameError, match="unknown criterion 'l3'"):
        score(resnet56.groups()[0], "l3")


@pytest.mark.parametrize("name", DATA_FREE)
def test_every_criterion_scores_every_channel_and_select_takes_the_lowest(
    resnet56: PruningGraph, name: str
):
    for group in resnet56.groups():
        s = score(group, name)
        assert s.shape == (group.channels,) and bool(torch.isfinite(s).all())
        assert torch.equal(score(group, name), s)  # deterministic
        n = group.channels // 3
        chosen = select(group, name, n)
        assert chosen.tolist() == sorted(chosen.tolist()) and len(set(chosen.tolist())) == n
        if n:
            kept = torch.ones(group.channels, dtype=torch.bool)
            kept[chosen] = False
            assert s[chosen].max() <= s[kept].min()


def test_scoring_all_resnet56_groups_with_all_data_free_criteria_takes_under_a_second(
    resnet56: PruningGraph,
):
    groups = resnet56.groups()
    times = []
    for _ in range(3):  # best of three, each from cold caches: the machine is shared
        for g in groups:
            g.cache.clear()
        start = time.perf_counter()
        for g in groups:
            for name in DATA_FREE:
                score(g, name)
        times.append(time.perf_counter() - start)
    assert len(groups) == 30
    assert min(times) < 1.0  # measured about 0.03 s on 2 idle cores


def test_magnitudes_join_every_producing_layer_of_a_group(resnet56: PruningGraph):
    model = resnet56.model
    block = resnet56.group("layer2.3.conv1")
    w = model.layer2[3].conv1.weight.detach()
    torch.testing.assert_close(score(block, "l1"), w.abs().sum(dim=(1, 2, 3)))
    torch.testing.assert_close(score(block, "l2"), w.flatten(1).norm(dim=1))
    stage = resnet56.group("layer2.0.conv2")
    convs = [model.layer2[i].conv2.weight.detach().flatten(1) for i in range(9)]
    torch.testing.assert_close(score(stage, "l1"), torch.cat(convs, 1).abs().sum(1))
    gammas = sum(model.layer2[i].bn2.weight.detach().abs() for i in range(9))
    torch.testing.assert_close(score(stage, "bn_scale"), gammas)


def test_cached_scores_follow_weight_updates(resnet56: PruningGraph):
    block = resnet56.group("layer1.1.conv1")
    before = score(block, "l1")
    conv = resnet56.model.layer1[1].conv1
    with torch.no_grad():
        conv.weight[0].mul_(2)  # in place, like an optimizer step
    assert score(block, "l1")[0] == pytest.approx(2 * before[0].item())
    with torch.no_grad():
        conv.weight[0].div_(2)


def planted_graph() -> PruningGraph:
    """Five filters: a centre and four around it at the same distance, on two axes."""
    model = nn.Sequential(nn.Conv2d(2, 5, 1, bias=False), nn.ReLU(), nn.Conv2d(5, 1, 1))
    centre = torch.tensor([3.0, 1.0])
    around = [centre + d for d in torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])]
    filters = torch.stack([around[0], around[1], centre, around[2], around[3]])
    with torch.no_grad():
        model[0].weight.copy_(filters[..., None, None])
    return build_graph(model, torch.randn(1, 2, 3, 3))


@pytest.mark.parametrize("name", ["fpgm", "euclidean", "cosine"])
def test_similarity_criteria_find_the_most_replaceable_filter(name: str):
    (group,) = planted_graph().groups()
    assert select(group, name, 1).tolist() == [2]


def test_fpgm_measures_the_distance_to_the_geometric_median():
    (group,) = planted_graph().groups()
    expected = torch.tensor([1.0, 1, 0, 1, 1])
    torch.testing.assert_close(score(group, "fpgm"), expected, atol=1e-4, rtol=0)


def test_random_is_seeded_and_bn_scale_needs_batchnorm():
    graph = planted_graph()
    (group,) = graph.groups()
    assert torch.equal(score(group, "random", seed=3), score(group, "random", seed=3))
    assert not torch.equal(score(group, "random", seed=3), score(group, "random", seed=4))
    with pytest.raises(AutopruneError, match="no affine BatchNorm"):
        score(group, "bn_scale")
    with pytest.raises(AutopruneError, match="choose 0 to 4"):
        select(group, "l1", 5)


def test_predicted_loss_follows_the_measured_loss_of_each_removal():
    """The prediction from gradients, for cross-entropy (logistic form) and another loss
    (quadratic form), ranks single-channel removals like the loss measured with each masked."""
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    graph = build_graph(model, torch.randn(1, 3, 32, 32))
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        model.linear.weight *= 0.05  # a loss near 2: confident on some images, not on others
        y = model(x).argmax(1)
        y[:8] = torch.randint(0, 10, (8,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    squared = Task(loss_fn=lambda p, t: F.cross_entropy(p, t, reduction="none") ** 2)

    def measured(task: Task) -> float:
        with torch.no_grad():
            return float(torch.cat([task.losses(model(a), b) for a, b in batches]).mean())

    for task in (Task(), squared):
        acc = TaylorAccumulator(graph).collect(batches, task)
        with torch.no_grad():  # the losses its pass measured, per image in set order
            per_image = torch.cat([task.losses(model(a), b) for a, b in batches])
        torch.testing.assert_close(acc.image_losses.float(), per_image, rtol=1e-5, atol=1e-6)
        for group in (graph.group("layer1.0.conv1"), graph.group("layer3.1.conv1")):
            assert acc.predicted_loss(group, torch.tensor([], dtype=torch.long)) == (
                pytest.approx(measured(task), rel=1e-5)
            )
            predicted, actual = [], []
            for c in range(group.channels):
                predicted.append(acc.predicted_loss(group, torch.tensor([c])))
                with mask_channels(graph, group.name, torch.tensor([c])):
                    actual.append(measured(task))
            ranks = torch.stack(
                [torch.tensor(v).argsort().argsort().double() for v in (predicted, actual)]
            )
            assert torch.corrcoef(ranks)[0, 1] > 0.85
            if task is not squared:  # cross-entropy's form is close in value too
                error = max(abs(p - a) for p, a in zip(predicted, actual, strict=True))
                assert error < 0.35 * (max(actual) - min(actual))
    with TaylorAccumulator(graph) as own_loop:  # no per-image losses: no prediction
        F.cross_entropy(model(x), y).backward()
    assert own_loop.predicted_loss(graph.group("conv1"), torch.tensor([0])) is None
    assert own_loop.image_losses is None


def test_taylor_equals_weight_times_gradient_summed_over_consumers():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    graph = build_graph(model, torch.randn(1, 3, 32, 32))
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    with pytest.raises(AutopruneError, match="needs calibration data"):
        score(graph.groups()[1], "taylor")
    acc = TaylorAccumulator(graph).collect([batch])
    assert acc.batches == 1
    assert all(p.grad is None for p in model.parameters())  # collect leaves grads alone
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    group = graph.group("layer1.0.conv1")  # its one consumer: layer1.0.conv2's inputs
    w = model.layer1[0].conv2.weight
    expected = (w * w.grad).sum(dim=(0, 2, 3)).abs()
    taylor = score(group, "taylor", taylor=acc)
    torch.testing.assert_close(taylor, expected, rtol=1e-4, atol=1e-7)
    # a second batch through a hand-written loop adds its own |.|
    with acc:
        F.cross_entropy(model(batch[0]), batch[1]).backward()
    torch.testing.assert_close(score(group, "taylor", taylor=acc), 2 * taylor)
    # the stage group sees the shortcut too (a consumer without weights)
    stage = graph.group("conv1")
    assert any(m.kind == "shortcut" and m.consumer for m in stage.members)
    assert bool((score(stage, "taylor", taylor=acc) > 0).all())
    graph.prune(group, [0])
    with pytest.raises(AutopruneError, match="collect it again"):
        score(graph.group("layer1.0.conv1"), "taylor", taylor=acc)
