"""Scorers and the calibration set: exact losses, an untouched model, halving's winner."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.criteria import select
from autoprune.data import DatasetInfo, ImageData
from autoprune.errors import AutopruneError, UnknownNameError
from autoprune.graph import PruningGraph, StackedMask, build_graph, mask_pieces
from autoprune.models import create_model
from autoprune.search._prefix import CallProfile, PrefixCache, plan_cuts
from autoprune.search._trials import TrialPlan
from autoprune.search.calibration import CalibrationSet, stratified_order
from autoprune.search.candidates import Candidate
from autoprune.search.scorers import SCORERS, create_scorer, list_scorers
from autoprune.task import Task

SIZE = 16  # image side: small, so the exhaustive reference stays quick


def by_loss(loss: float, candidate: Candidate) -> float:
    return loss


# ---------------------------------------------------------------------- models of the test


class PadBlock(nn.Module):
    """akamaster's basic block with an option-A shortcut as a functional ``F.pad``, written
    torchvision-style: one in-place ReLU called twice (so never replayed) and an in-place
    residual add. Cached outputs replayed into them must survive."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.pad:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        out += x
        return self.relu(out)


class PadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(PadBlock(8, 8, 1), PadBlock(8, 16, 2), PadBlock(16, 16, 1))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and running stats measured on random data: masking must be
    exact whatever BatchNorm adds to a removed channel."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.momentum = None
            bn.reset_running_stats()
        model.train()(torch.randn(8, 3, SIZE, SIZE))
    return model.eval()


def make_graph(name: str) -> PruningGraph:
    torch.manual_seed(0)
    model = randomize_bn(PadNet() if name == "padnet" else create_model(name))
    return build_graph(model, torch.randn(1, 3, SIZE, SIZE))


def candidates_of(graph: PruningGraph, criteria: tuple[str, ...] = ("l1", "random")) -> list:
    """Per group, a quarter of its channels as each criterion picks them (deduplicated)."""
    found = []
    for group in graph.groups():
        picks: dict[tuple[int, ...], list[str]] = {}
        for name in criteria:
            idxs = select(group, name, max(1, group.channels // 4))
            picks.setdefault(tuple(idxs.tolist()), []).append(name)
        for key, names in picks.items():
            idxs = torch.tensor(key)
            saved = graph.macs() - graph.macs(group, idxs)
            found.append(Candidate(group.name, tuple(names), idxs, saved))
    return found


def random_calib(sizes: tuple[int, ...] = (12, 12, 7), seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet(
        [
            (torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(10, (n,), generator=g))
            for n in sizes
        ]
    )


Snapshot = tuple[dict[str, torch.Tensor], dict[str, bool]]


def snapshot(model: nn.Module) -> Snapshot:
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    return state, {n: m.training for n, m in model.named_modules()}


def assert_untouched(graph: PruningGraph, before: Snapshot) -> None:
    """Parameters and buffers bit-identical, every module's mode, no hook or patch left."""
    state, modes = snapshot(graph.model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], v) for k, v in before[0].items())
    assert modes == before[1]
    assert not graph.masks.active
    for m in graph.model.modules():
        assert "forward" not in vars(m)
        assert not m._forward_hooks and not m._forward_pre_hooks


# ------------------------------------------------------------------------------ registry


def test_registry_lists_both_scorers_and_checks_options():
    assert list_scorers() == ["exhaustive", "fast"] == SCORERS.names()
    fast = create_scorer()
    assert type(fast).__name__ == "FastScorer" and fast.prefix_cache and fast.halving
    assert create_scorer("fast", keep=0.5, min_images=8).keep == 0.5
    with pytest.raises(UnknownNameError, match="unknown scorer 'bogus'"):
        create_scorer("bogus")
    with pytest.raises(AutopruneError, match="options: prefix_cache, halving"):
        create_scorer("fast", halvng=False)
    with pytest.raises(AutopruneError, match="keep"):
        create_scorer("fast", keep=0.0)
    with pytest.raises(AutopruneError, match="precision 'fp8' is not one of fp32, bf16"):
        create_scorer("fast", precision="fp8")


# ------------------------------------------------------------------------------ exactness


@pytest.fixture(scope="module", params=["resnet20", "padnet"])
def reference(request: pytest.FixtureRequest) -> tuple[PruningGraph, list, list[float]]:
    """A model, its candidates and their exhaustive (pruned deep copy) losses."""
    graph = make_graph(request.param)
    candidates = candidates_of(graph)
    return (
        graph,
        candidates,
        create_scorer("exhaustive")(graph, candidates, random_calib(), by_loss),
    )


@pytest.mark.parametrize(
    "options",
    [
        {"prefix_cache": False, "halving": False, "channels_last": False},
        {"halving": False, "channels_last": False},
        {"halving": False, "max_batch": 5},
        {"halving": False},
        {"min_images": 4, "keep": 1.0, "bound": False},  # rounds of halving, nobody dropped
        {"halving": False, "stack": False},  # one forward per candidate
        {"halving": False, "stack_bytes": 1},  # stacks of one
        {"halving": False, "prefix_cache": False, "stack_bytes": 600_000},  # stacks of a few
        {
            "min_images": 4,
            "keep": 1.0,
            "bound": False,
            "min_keep": 99,
            "precision": "bf16-ranking",
            "stack_bytes": 1 << 30,
        },
    ],
    ids=[
        "masking",
        "prefix",
        "prefix-split-batches",
        "prefix-channels-last",
        "halving-keep-all",
        "one-by-one",
        "stacks-of-one",
        "stacks-of-a-few",
        "bf16-ranking-fp32-final",
    ],
)
def test_fast_losses_equal_the_exhaustive_reference(reference, options: dict):
    graph, candidates, expected = reference
    scorer = create_scorer("fast", **{"precision": "fp32", **options})
    losses = scorer(graph, candidates, random_calib(), by_loss)
    assert len(losses) == len(candidates) >= 8
    assert max(abs(a - b) for a, b in zip(losses, expected, strict=True)) <= 1e-5
    assert scorer.last_stats["fully_scored"] == len(candidates)
    if options.get("prefix_cache", True):  # candidates of different layers do not share a cut
        assert scorer.last_stats["cut_points"] > 3


@pytest.mark.parametrize(
    "options",
    [
        {"stack_bytes": 1 << 30},
        {"prefix_cache": False, "stack_bytes": 1 << 30},
        {"stack_bytes": 600_000},
    ],
)
def test_stacked_losses_equal_one_forward_per_candidate(reference, options: dict):
    graph, candidates, _ = reference
    calib = random_calib()
    fp32 = {"halving": False, "precision": "fp32"}
    solo = create_scorer("fast", stack=False, **fp32)(graph, candidates, calib, by_loss)
    scorer = create_scorer("fast", **fp32, **options)
    stacked = scorer(graph, candidates, calib, by_loss)
    assert scorer.last_stats["stacked"] == len(candidates)
    assert max(abs(a - b) for a, b in zip(stacked, solo, strict=True)) <= 1e-5


def test_bf16_ranking_rescores_its_best_few_in_fp32(reference):
    graph, candidates, expected = reference
    scorer = create_scorer("fast", min_images=4, precision="bf16-ranking", min_keep=3)
    losses = scorer(graph, candidates, random_calib(), by_loss)
    exact = [i for i, loss in enumerate(losses) if loss != math.inf]
    assert len(exact) == scorer.last_stats["fully_scored"] == 3
    assert max(abs(losses[i] - expected[i]) for i in exact) <= 1e-5  # fp32, not bf16
    assert min(exact, key=losses.__getitem__) == min(range(len(expected)), key=expected.__getitem__)


def test_bf16_scoring_is_close_and_ranks_like_fp32(reference):
    graph, candidates, expected = reference
    losses = create_scorer("fast", halving=False, precision="bf16")(
        graph, candidates, random_calib(), by_loss
    )
    assert losses != expected  # it did run in bf16
    assert max(abs(a - b) / b for a, b in zip(losses, expected, strict=True)) < 0.05
    assert min(range(len(losses)), key=losses.__getitem__) == min(
        range(len(expected)), key=expected.__getitem__
    )


def test_stacked_mask_refuses_a_batch_that_is_not_its_copies():
    graph = make_graph("padnet")
    removals = [mask_pieces(graph, c.group, c.idxs) for c in candidates_of(graph)[:2]]
    with torch.no_grad(), StackedMask(removals), pytest.raises(AutopruneError, match="stack=False"):
        graph.model(torch.randn(3, 3, SIZE, SIZE))
    assert_untouched(graph, snapshot(graph.model))


def test_stacks_follow_the_memory_budget():
    graph = make_graph("resnet20")
    candidates = candidates_of(graph)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert not TrialPlan.build(graph, candidates, x, stack=True, stack_bytes=None).pieces  # CPU
    plan = TrialPlan.build(graph, candidates, x, stack=True, stack_bytes=1 << 30)
    assert plan.image_bytes == 16 * SIZE * SIZE * 4  # the widest activation, fp32
    plan.stack_bytes = 3 * 10 * plan.image_bytes  # three candidates of ten images
    assert [len(s) for s in plan.stacks(range(8), 10)] == [3, 3, 2]
    assert [len(s) for s in plan.stacks(range(2), 1000)] == [1, 1]  # never fewer than one
    assert not TrialPlan.build(graph, candidates, x, stack=False, stack_bytes=1 << 30).pieces


def test_prefix_frontier_is_the_outermost_layers_done_before_the_cut():
    graph = build_graph(create_model("resnet20"), torch.randn(1, 3, SIZE, SIZE))
    model = graph.model
    profile = CallProfile.record(model, torch.randn(2, 3, SIZE, SIZE))
    position, module = profile.cut([model.layer2[1].conv2, model.layer3[0].conv1])
    assert module is model.layer2[1].conv2
    names = {m: n for n, m in model.named_modules()}
    assert [names[m] for m in profile.frontier(position)] == [
        "conv1",
        "bn1",
        "relu",
        "layer1",
        "layer2.0",
        "layer2.1.conv1",
        "layer2.1.bn1",
        "layer2.1.relu1",
    ]
    assert profile.cut([]) == (profile.end, None)
    assert [names[m] for m in profile.frontier(profile.end)] == [""]  # the whole model


def test_replayed_outputs_survive_in_place_ops_downstream():
    graph = make_graph("padnet")
    model = graph.model
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        dense = model(x)
        profile = CallProfile.record(model, x)
        block = model.blocks[1]  # its ReLU runs twice, so bn1's replayed output meets it
        candidate = Candidate("blocks.1.conv1", (), torch.tensor([0]), 1)
        (cut,) = plan_cuts([candidate.changed(graph)], profile)
        assert block.bn1 in cut.frontier and block.relu not in cut.frontier
        assert cut.module is block.conv2
        cache = PrefixCache(model, x)
        cache.advance(cut)
        first, second = cache.run(), cache.run()
    assert cache.copy  # the in-place ReLU met a replayed output: replays became copies
    assert torch.equal(first, dense) and torch.equal(second, dense)


# ---------------------------------------------------------------------- model untouched


@pytest.mark.parametrize("name", ["exhaustive", "fast"])
def test_scorers_leave_the_model_exactly_as_it_was(name: str):
    graph = make_graph("padnet")
    graph.model.train()  # scoring runs in eval mode and must give the modes back
    before = snapshot(graph.model)
    create_scorer(name)(graph, candidates_of(graph), random_calib(), by_loss)
    assert_untouched(graph, before)


def test_fast_scorer_cleans_up_when_a_forward_fails_midway():
    graph = make_graph("padnet")
    before = snapshot(graph.model)
    calls = 0

    def fail_from_the_fifth_call(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        if calls >= 5:
            raise RuntimeError("boom")

    handle = graph.model.head.register_forward_hook(fail_from_the_fifth_call)
    with pytest.raises(RuntimeError, match="boom"):
        create_scorer("fast", halving=False)(graph, candidates_of(graph), random_calib(), by_loss)
    handle.remove()
    assert_untouched(graph, before)


# ---------------------------------------------------------------------------- halving


def test_halving_keeps_the_winner_and_scores_it_on_the_whole_set():
    graph = make_graph("resnet20")
    calib = confident_calib(graph)
    candidates = candidates_of(graph) + [
        Candidate(g.name, ("most",), select(g, "l1", g.channels - 2), 1) for g in graph.groups()
    ]
    exact = create_scorer("fast", halving=False, precision="fp32")(
        graph, candidates, calib, by_loss
    )
    best, second = sorted(exact)[:2]
    assert second > 2 * best  # the case: one clear winner, found on 64 images
    options = {"min_images": 8, "keep": 0.25, "min_keep": 2, "precision": "fp32"}
    scorer = create_scorer("fast", bound=False, **options)
    losses = scorer(graph, candidates, calib, by_loss)
    stats = scorer.last_stats

    winner = min(range(len(losses)), key=losses.__getitem__)
    assert exact[winner] == best
    assert stats["images_per_candidate"][winner] == calib.size == 64
    assert stats["rounds"] == 4 and stats["images"] < len(candidates) * calib.size / 4
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    assert len(finite) == stats["fully_scored"] == 2
    for i in finite:  # survivors: the same loss as without halving
        assert losses[i] == pytest.approx(exact[i], abs=1e-6)
    for i, v in enumerate(losses):  # the dropped: inf, with their partial estimate kept
        assert math.isfinite(v) or stats["images_per_candidate"][i] < calib.size
        assert math.isfinite(stats["estimates"][i])


def confident_calib(graph: PruningGraph) -> CalibrationSet:
    """Labels: the model's own, fairly confident predictions (a few images carry most loss)."""
    with torch.no_grad():
        graph.model.linear.weight *= 2
        return CalibrationSet(
            [(x, graph.model(x).argmax(1)) for x, _ in random_calib((16,) * 4).batches]
        )


def test_the_bound_drops_only_candidates_that_cannot_win():
    graph = make_graph("resnet20")
    calib = confident_calib(graph)
    candidates = candidates_of(graph)
    options = {"min_images": 8, "keep": 1.0, "precision": "fp32"}  # halving drops nobody
    plain = create_scorer("fast", bound=False, **options)
    exact = plain(graph, candidates, calib, by_loss)
    scorer = create_scorer("fast", **options)
    losses = scorer(graph, candidates, calib, by_loss)
    stats = scorer.last_stats

    best = min(exact)
    assert min(losses) == pytest.approx(best, abs=1e-6)
    assert losses.index(min(losses)) == exact.index(best)
    assert stats["bounded"] > 0 and stats["images"] < plain.last_stats["images"]
    for i, v in enumerate(losses):
        if math.isfinite(v):  # scored on every image: the same loss
            assert v == pytest.approx(exact[i], abs=1e-6)
        else:  # dropped: what it had seen already summed to more than the winner's loss
            seen = stats["images_per_candidate"][i]
            assert 0 < seen < calib.size
            assert best < stats["estimates"][i] * seen / calib.size <= exact[i] + 1e-6


def test_the_scorer_orders_by_losses_it_is_given_instead_of_a_pass_of_its_own():
    graph = make_graph("resnet20")
    calib = confident_calib(graph)
    candidates = candidates_of(graph)
    scorer = create_scorer("fast", min_images=8, keep=1.0, precision="fp32")
    measured = scorer(graph, candidates, calib, by_loss)
    ran = scorer.last_stats["images"]
    with torch.no_grad():
        own = torch.cat([calib.task.losses(graph.model(x), y) for x, y in calib.batches])
    for covered in (calib.size, 24):  # every image, or the first only: a pass over the rest
        given = scorer(graph, candidates, replace(calib, image_losses=own[:covered]), by_loss)
        assert scorer.last_stats["ordering_images"] == calib.size - covered
        assert scorer.last_stats["images"] == ran - covered
        # the same order to rounding: the same winner, with the same exact loss
        assert given.index(min(given)) == measured.index(min(measured))
        both = [i for i, v in enumerate(given) if math.isfinite(v + measured[i])]
        assert max(abs(given[i] - measured[i]) for i in both) <= 1e-6


def test_no_bound_where_the_loss_has_no_known_floor():
    graph = make_graph("resnet20")
    confident = confident_calib(graph)
    calib = CalibrationSet(confident.batches, Task(loss_fn=F.cross_entropy))
    assert calib.task.loss_floor is None and confident.task.loss_floor == 0.0
    candidates = candidates_of(graph)
    scorer = create_scorer("fast", min_images=8, keep=1.0, precision="fp32")
    losses = scorer(graph, candidates, calib, by_loss)
    assert scorer.last_stats["bounded"] == 0 and all(map(math.isfinite, losses))
    floored = Task(loss_fn=F.cross_entropy, loss_floor=0.0)
    scorer(graph, candidates, CalibrationSet(confident.batches, floored), by_loss)
    assert scorer.last_stats["bounded"] > 0


@pytest.mark.parametrize("above_all", [True, False])
def test_shortlist_scores_the_best_predicted_then_any_predicted_to_win(reference, above_all):
    graph, candidates, expected = reference
    # every other candidate gets a prediction, its exact loss reversed in rank: above every
    # measured loss (none predicted to win) or below (all of them are)
    offset = 2 * max(expected) if above_all else 0.0
    predicted = [
        replace(c, predicted_loss=offset - expected[i]) if i % 2 == 0 else c
        for i, c in enumerate(candidates)
    ]
    scorer = create_scorer("fast", halving=False, shortlist=0.25, min_keep=1, precision="fp32")
    losses = scorer(graph, predicted, random_calib(), by_loss)
    with_prediction = range(0, len(candidates), 2)
    best_predicted = sorted(with_prediction, key=lambda i: -expected[i])
    chosen = set(best_predicted[: math.ceil(len(best_predicted) / 4)])
    unpredicted = set(range(1, len(candidates), 2))
    scored = {i for i, v in enumerate(losses) if math.isfinite(v)}
    stats = scorer.last_stats
    assert stats["shortlisted"] == len(chosen | unpredicted) < len(candidates)
    if above_all:
        assert scored == chosen | unpredicted and stats["predicted_winners"] == 0
    else:
        assert scored == set(range(len(candidates)))
        assert stats["predicted_winners"] == len(with_prediction) - len(chosen) > 0
    assert max(abs(losses[i] - expected[i]) for i in scored) <= 1e-5
    unscored = set(range(len(candidates))) - scored
    assert all(stats["estimates"][i] == offset - expected[i] for i in unscored)
    with pytest.raises(AutopruneError, match="shortlist"):
        create_scorer("fast", shortlist=0)


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_a_shortlisted_candidate_survives_halving_wherever_it_did_among_all(reference, share):
    """Rounds keep as many as they would of the whole field, so a candidate's rank among fewer
    can only help it: whoever reaches the whole set among all still does if shortlisted."""
    graph, candidates, expected = reference
    noisy = [e + 0.05 * math.sin(7.0 * i) for i, e in enumerate(expected)]  # an imperfect guess
    predicted = [replace(c, predicted_loss=p) for c, p in zip(candidates, noisy, strict=True)]
    options = {"min_images": 4, "keep": 0.5, "min_keep": 4, "precision": "fp32", "bound": False}
    calib = random_calib((16,) * 4)
    whole = create_scorer("fast", shortlist=1.0, **options)(graph, predicted, calib, by_loss)
    scorer = create_scorer("fast", shortlist=share, **options)
    short = scorer(graph, predicted, calib, by_loss)
    shortlisted = sorted(range(len(noisy)), key=noisy.__getitem__)[
        : scorer.last_stats["shortlisted"]
    ]
    finalists = {i for i in shortlisted if math.isfinite(whole[i])}
    assert finalists and finalists <= {i for i, v in enumerate(short) if math.isfinite(v)}
    assert all(short[i] == pytest.approx(whole[i], abs=1e-6) for i in finalists)


def test_halving_ranks_by_the_objective_not_the_loss():
    graph = make_graph("padnet")
    candidates = candidates_of(graph)
    favourite = candidates[-1]

    def prefer_favourite(loss: float, candidate: Candidate) -> float:
        return loss + (0.0 if candidate is favourite else 100.0)

    scorer = create_scorer("fast", min_images=4, min_keep=1, keep=0.1)
    losses = scorer(graph, candidates, random_calib(), prefer_favourite)
    values = [prefer_favourite(v, c) for v, c in zip(losses, candidates, strict=True)]
    assert min(range(len(values)), key=values.__getitem__) == len(candidates) - 1
    assert scorer.last_stats["fully_scored"] == 1


# ---------------------------------------------------------------------- calibration set


def image_data(labels: list[int]) -> ImageData:
    info = DatasetInfo("toy", 4, 3, (4, 4), (0.5,) * 3, (0.25,) * 3)
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4)
    return ImageData(info, images, torch.tensor(labels))


def test_calibration_set_is_deterministic_class_balanced_in_every_prefix():
    data = image_data([c for c in range(4) for _ in range(50)])
    a = CalibrationSet.from_data(data, 40, batch_size=16, seed=3)
    b = CalibrationSet.from_data(data, 40, batch_size=16, seed=3)
    c = CalibrationSet.from_data(data, 40, batch_size=16, seed=4)
    assert a.size == 40 and [len(y) for _, y in a.batches] == [16, 16, 8]

    def flat(calib: CalibrationSet) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([x for x, _ in calib.batches]), torch.cat([y for _, y in calib.batches])

    assert all(torch.equal(u, v) for u, v in zip(flat(a), flat(b), strict=True))
    assert not torch.equal(a.batches[0][0], c.batches[0][0])
    labels = flat(a)[1]
    for k in range(1, 41):
        counts = torch.bincount(labels[:k], minlength=4)
        assert int(counts.max() - counts.min()) <= 1  # every prefix balanced
    x, _ = a.batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 4, 4)  # normalised, un-augmented
    pixels = (x[:, 0, 0, 0] * 0.25 + 0.5) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # whole images: no crop, no flip
    assert a.loss(nn.Sequential(nn.Flatten(), nn.Linear(48, 4))) > 0


def test_calibration_set_takes_all_of_a_small_class_and_fills_up_from_the_others():
    data = image_data([0] * 3 + [1] * 40 + [2] * 40)
    calib = CalibrationSet.from_data(data, 30, batch_size=64)
    counts = torch.bincount(torch.cat([y for _, y in calib.batches])).tolist()
    assert counts[0] == 3 and sorted(counts[1:]) == [13, 14]
    assert sorted(stratified_order(data.labels, 0).tolist()) == list(range(83))
    with pytest.raises(AutopruneError, match="between 1 and the 83"):
        CalibrationSet.from_data(data, 84)


def test_calibration_set_reordered_keeps_pairs_and_batch_size():
    calib = random_calib((12, 12, 7))
    order = torch.randperm(31, generator=torch.Generator().manual_seed(0))
    moved = calib.reordered(order)
    assert [len(y) for _, y in moved.batches] == [12, 12, 7]
    x, y = (torch.cat(t) for t in zip(*calib.batches, strict=True))
    mx, my = (torch.cat(t) for t in zip(*moved.batches, strict=True))
    assert torch.equal(mx, x[order]) and torch.equal(my, y[order])


def test_calibration_slices_cover_a_range_in_pieces_within_batches():
    calib = random_calib((12, 12, 7))
    pieces = list(calib.slices(5, 29, max_batch=4))
    assert [len(y) for _, y in pieces] == [4, 3, 4, 4, 4, 4, 1]
    flat = torch.cat([y for _, y in calib.batches])
    assert torch.equal(torch.cat([y for _, y in pieces]), flat[5:29])
    assert [len(y) for _, y in calib.slices(0, 31)] == [12, 12, 7]
