"""Multi-grain pruning: blocks and layers leave as the identity, weight masks hold, and a
block,layer,channel,weight run accounts for what it removed, saves, loads and exports."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _small import EXAMPLE as SMALL_EXAMPLE
from _small import SMALL, synthetic_task
from _small import TRAIN as SMALL_TRAIN
from torch import nn

import autoprune
from autoprune.data import load_dataset
from autoprune.errors import AutopruneError
from autoprune.graph import build_graph
from autoprune.graph.units import RemovedLayer
from autoprune.io import load, save
from autoprune.io.export import FORMATS, run_onnx
from autoprune.measure import count_macs, count_params
from autoprune.models import create_model
from autoprune.report import write_report
from autoprune.search import PruneConfig, Pruner, create_scorer
from autoprune.search import training as search_training
from autoprune.search.calibration import CalibrationSet
from autoprune.search.candidates import loss_objective
from autoprune.search.granularity._base import EMPTY, plan
from autoprune.search.granularity.norm_stats import estimate_norm_stats, load_norm_stats
from autoprune.search.granularity.units import (
    UnitCandidate,
    adapted,
    fewest_params_of_tied,
    find_units,
    tied_with,
    unit_image_losses,
    unit_params,
)
from autoprune.search.granularity.weight import (
    MASK,
    SPREAD_SCORES,
    WeightCandidate,
    _spread,
    lamp_scores,
    mask_weights,
    masked_count,
    masks_held,
    weight_layers,
)
from autoprune.search.schedules import SCHEDULES, Step
from autoprune.train import TrainConfig, fit

X32 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` with BatchNorm statistics from ``x`` (not the identity), in eval mode."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def identity_at(model: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` with plain ``nn.Identity`` at ``paths``: the reference."""
    ref = copy.deepcopy(model)
    for path in paths:
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent), child, nn.Identity())
    return ref


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return trained_bn(create_model("resnet20"), X32)


def units_of(model: nn.Module, kind: str) -> list:
    return [u for u in find_units(model, (X32[:1],)) if u.kind == kind]


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("resnet20", "block", "layer2.1"),
        ("resnet20", "layer", "layer1.0.conv1"),
        ("resnet20", "layer", "layer3.2.conv2"),
        ("vgg16_bn", "block", "features.17..features.22"),
        ("vgg16_bn", "layer", "features.20"),
    ],
)
def test_removal_equals_the_model_with_identity_in_its_place(name, kind, expected):
    torch.manual_seed(0)
    model = trained_bn(create_model(name), X32)
    units = {u.name: u for u in units_of(model, kind)}
    assert expected in units, sorted(units)
    paths = units[expected].paths
    reference = identity_at(model, paths)
    graph = build_graph(copy.deepcopy(model), X32[:1])
    saved = graph.module_macs(graph.model.get_submodule(p) for p in paths)
    before = graph.macs()
    graph.remove_modules(paths)
    assert all(isinstance(graph.model.get_submodule(p), RemovedLayer) for p in paths)
    assert graph.macs() == before - saved == count_macs(graph.model, X32[:1])
    with torch.no_grad():
        torch.testing.assert_close(graph.model.eval()(X32), reference(X32), rtol=0, atol=0)
        assert not torch.equal(model(X32), reference(X32))
    assert graph.groups()  # the graph was traced again and still has its channel groups


def test_units_are_only_shape_keeping():
    units = units_of(create_model("resnet20"), "block")
    # stride-2 blocks change the shape; whole stages hold blocks and are not innermost
    assert {u.name for u in units} == {f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2)} - {
        "layer2.0",
        "layer3.0",
    }
    smallcnn = find_units(create_model("smallcnn"), (torch.zeros(1, 1, 28, 28),))
    assert smallcnn == []  # every conv widens


def scorers_agree(graph, candidates, calib) -> None:
    fast = create_scorer("fast", halving=False, precision="fp32")(
        graph, candidates, calib, loss_objective(0.0)
    )
    exact = create_scorer("exhaustive")(graph, candidates, calib, loss_objective(0.0))
    assert fast == pytest.approx(exact, rel=1e-4)
    assert len(set(exact)) == len(exact)  # every candidate changes the loss differently


def test_masked_scoring_equals_physical_removal(resnet20):
    graph = build_graph(copy.deepcopy(resnet20), X32[:1])
    y = torch.arange(8) % 10
    calib = CalibrationSet([(torch.randn(8, 3, 32, 32), y)])
    units = units_of(resnet20, "block")[:3] + units_of(resnet20, "layer")[:3]
    candidates = [UnitCandidate(u.name, (), EMPTY, 1, paths=u.paths) for u in units]
    scorers_agree(graph, candidates, calib)
    conv = graph.model.layer2[1].conv1
    weights = [
        WeightCandidate(
            "layer2.1.conv1", ("magnitude",), torch.arange(k, conv.weight.numel(), 3), 0
        )
        for k in range(3)
    ]
    scorers_agree(graph, weights, calib)
    assert not graph.masks.active and not hasattr(conv, MASK)


def test_losses_tie_within_one_standard_error_of_their_per_image_difference():
    base = torch.tensor([0.0, 1.0, 2.0, 3.0] * 4)
    noise = torch.tensor([1.0, -1.0] * 8)
    losses = {
        "best": base,
        "noisy": base + 0.1 + noise,  # 0.1 higher, standard error of the difference ~0.26
        "clear": base + 0.1 + 0.01 * noise,  # 0.1 higher, standard error ~0.003
        "lower": base - 0.5,  # lower than the loss-aware choice: ties too
    }
    assert tied_with(losses, "best") == ["best", "noisy", "lower"]


@pytest.mark.parametrize(
    ("first", "gap", "expected"),
    [
        ("layer3.1", 0.0, "layer1.1"),  # tied: the smaller block
        ("layer3.1", 5.0, "layer3.1"),  # the loss tells them apart: the loss-aware choice stays
        ("layer1.1", 0.0, "layer1.1"),  # the smaller one ranked first stays
    ],
)
def test_tied_blocks_give_way_to_the_one_removing_fewest_parameters(resnet20, first, gap, expected):
    """A first-stage block (16 channels) holds a tenth of the parameters of a last-stage one
    (64): where their losses tie, removing it leaves the fine-tune more to recover with."""
    graph = build_graph(copy.deepcopy(resnet20), X32[:1])
    units = {u.name: u for u in units_of(resnet20, "block")}
    both = [UnitCandidate(n, (), EMPTY, 1, paths=units[n].paths) for n in ("layer3.1", "layer1.1")]
    assert 10 * unit_params(graph, both[1]) < unit_params(graph, both[0])
    spread = torch.tensor([0.0, 2.0, 1.0, 3.0])
    other = "layer1.1" if first == "layer3.1" else "layer3.1"
    losses = {first: spread, other: spread.flip(0) + gap}  # the same mean, or gap higher
    step = Step(dict.fromkeys(units[first].paths, EMPTY), (), 1.5, 2, {})
    chosen = fewest_params_of_tied(graph, both, step, losses)
    assert list(chosen.removal) == list(units[expected].paths)
    assert chosen.loss == pytest.approx(float(losses[expected].mean()))
    assert chosen.stats == {"tied": 1 if gap else 2, "loss_ranked_first": first}


def test_unit_image_losses_average_to_the_scorers_loss(resnet20):
    graph = build_graph(copy.deepcopy(resnet20), X32[:1])
    calib = CalibrationSet([(X32, torch.arange(len(X32)) % 10)])
    candidates = [
        UnitCandidate(u.name, (), EMPTY, 1, paths=u.paths) for u in units_of(resnet20, "block")[:3]
    ]
    image = unit_image_losses(graph, calib, candidates)
    exact = create_scorer("exhaustive")(graph, candidates, calib, loss_objective(0.0))
    assert [float(image[c.group].mean()) for c in candidates] == pytest.approx(exact, rel=1e-5)
    assert all(len(v) == len(X32) for v in image.values())


def test_weight_masks_survive_training_and_save_load(tmp_path: Path):
    torch.manual_seed(0)
    model = create_model("smallcnn")
    conv = model.stage2.conv
    mask_weights(conv, torch.arange(0, conv.weight.numel(), 2))
    assert masked_count(model) == (
        conv.weight.numel() // 2,
        sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))),
    )
    train = load_dataset("synthetic", "train", channels=1, image_size=16, size=64)
    loader = autoprune.api.loader_for(model, train, batch_size=16, train=True, seed=0)
    before = conv.weight.detach().clone()
    with masks_held(model):
        fit(model, loader, TrainConfig(epochs=1, lr=0.1, channels_last=False, progress=False))
    mask = getattr(conv, MASK)
    assert torch.all(conv.weight[~mask] == 0)
    assert not torch.equal(conv.weight[mask], before[mask])  # the kept weights trained
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m").eval()
    assert torch.equal(getattr(loaded.stage2.conv, MASK), mask)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_lamp_scores_do_not_depend_on_a_layer_s_scale():
    w = torch.tensor([3.0, -1.0, 2.0])  # squares 9, 1, 4: each over the sum of those >= it
    expected = torch.tensor([1.0, 1 / 14, 4 / 13], dtype=torch.float64)
    torch.testing.assert_close(lamp_scores(w), expected)
    torch.testing.assert_close(lamp_scores(100 * w), expected)


def test_a_spread_step_takes_from_every_layer_and_respects_the_layer_floor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # a layer of small weights
    layers = weight_layers(model)
    (lamp,) = _spread(layers, lamp_scores, "lamp", 20)
    (magnitude,) = _spread(layers, SPREAD_SCORES["global_magnitude"], "global_magnitude", 20)
    counts = {name: int(idxs.numel()) for name, idxs in lamp.parts}
    assert counts.keys() == {"0", "2"} and sum(counts.values()) == 20 == lamp.params_saved
    # raw magnitude would empty the small layer, up to its floor of 1 % (31 of 32 weights)
    assert {n: int(i.numel()) for n, i in magnitude.parts} == {"2": 20}
    mask_weights(model[2], torch.arange(31))
    (after,) = _spread(layers, SPREAD_SCORES["global_magnitude"], "global_magnitude", 20)
    assert [n for n, _ in after.parts] == ["0"]  # the floor: layer 2 keeps its last weight
    graph = build_graph(model, torch.zeros(1, 8))
    after.prune(graph)
    assert masked_count(model)[0] == 31 + 20


def test_a_weight_step_over_the_loss_limit_is_undone_and_ends_the_phase():
    torch.manual_seed(0)
    model = create_model("smallcnn")
    loader = autoprune.api.loader_for(model, SMALL_TRAIN, batch_size=32, train=True, seed=0)
    fit(model, loader, TrainConfig(epochs=6, lr=0.01, channels_last=False, progress=False))
    settings = {
        **SMALL,
        "example_inputs": SMALL_EXAMPLE,
        "train_data": SMALL_TRAIN,
        "granularity": "weight",
        "weight_sparsity": 0.9,
        "weight_step": 0.5,  # half the weights of a trained net at once: the loss must rise
        "recover_steps": 0,
        "weight_loss_limit": 1.0001,
    }
    with pytest.warns(UserWarning, match="'weight' ended before its goal"):
        result = autoprune.prune(model, progress=False, **settings)
    assert result.history == [] and "weight" in result.summary["ended_early"]
    assert masked_count(result.model)[0] == 0 and not any(
        hasattr(m, MASK) for m in result.model.modules()
    )
    after, before = result.model.state_dict(), model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    unlimited = autoprune.prune(model, progress=False, **{**settings, "weight_loss_limit": None})
    assert unlimited.summary["weight_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert unlimited.summary["ended_early"] == {}


def test_granularities_are_checked():
    assert PruneConfig().granularities == ("channel",)
    with pytest.raises(AutopruneError, match="coarse to fine"):
        PruneConfig(granularity="channel,block")
    with pytest.raises(AutopruneError, match="macs_shares"):
        PruneConfig(granularity="block,channel", macs_shares=(0.5, 0.6))
    with pytest.raises(AutopruneError, match="macs_shares"):
        PruneConfig(granularity="block,channel", macs_shares=(1.1, -0.1))
    with pytest.raises(AutopruneError, match="unknown granularity"):
        PruneConfig(granularity="neuron")
    with pytest.raises(AutopruneError, match="weight_loss_limit must be > 1"):
        PruneConfig(weight_loss_limit=0.5)


def test_the_default_granularities_and_shares_follow_the_target():
    def goals(config: PruneConfig) -> dict[str, float]:
        return {g.name: g.goal for g in plan(config, SCHEDULES.get(config.schedule)(config))}

    macs = PruneConfig(target_macs_reduction=0.4)
    assert macs.granularities == ("channel",) and goals(macs) == {"channel": 0.4}
    assert PruneConfig(granularity="block,channel").target_shares == (0.5, 0.5)
    latency = replace(macs, target_latency_reduction=0.4)  # the default follows the target
    assert latency.granularities == ("block", "channel")
    assert goals(latency) == pytest.approx({"block": 0.3, "channel": 0.4})
    three = replace(latency, granularity="block,layer,channel")
    assert three.target_shares == (0.375, 0.375, 0.25)
    assert replace(latency, macs_shares=(0.5, 0.5)).target_shares == (0.5, 0.5)
    assert replace(latency, granularity="channel").target_shares == (1.0,)
    # what the summary and a saved state record: the settings as the run used them
    record = latency.resolved()
    assert (record.granularity, record.macs_shares) == (("block", "channel"), (0.75, 0.25))
    blocks_only = replace(record, macs_shares=(1.0, 0.0))  # a share of 0: what blocks leave
    assert goals(blocks_only) == pytest.approx({"block": 0.4, "channel": 0.4})
    assert record.objective == "loss_per_latency"


TRAIN, VAL = synthetic_task(channels=3)
EXAMPLE = torch.zeros(1, 3, 16, 16)
# About a dozen iterations: a block, two layers, channels, then weights, on ResNet-20 at 16 px.
MULTIGRAIN = {
    **SMALL,
    "example_inputs": EXAMPLE,
    "train_data": TRAIN,
    "val_data": VAL,
    "granularity": "block,layer,channel,weight",
    "weight_sparsity": 0.3,
    "weight_step": 0.1,
}


@pytest.fixture(scope="module")
def multigrain(resnet20, tmp_path_factory) -> tuple[autoprune.PruneResult, Path]:
    out = tmp_path_factory.mktemp("multigrain")
    return autoprune.prune(resnet20, out_dir=out, progress=False, **MULTIGRAIN), out


def test_multigrain_run_accounts_for_every_granularity(resnet20, multigrain):
    result, _ = multigrain
    summary, model, history = result.summary, result.model, result.history
    assert [h["granularity"] for h in history] == sorted(
        (h["granularity"] for h in history), key=["block", "layer", "channel", "weight"].index
    )
    removed = summary["removed"]
    assert removed["blocks"] >= 1 and removed["layers"] >= 1 and removed["channels"] >= 1
    removed_paths = [n for n, m in model.named_modules() if isinstance(m, RemovedLayer)]
    blocks = [h for h in history if h["granularity"] == "block"]
    layers = [h for h in history if h["granularity"] == "layer"]
    assert len(removed_paths) == sum(len(h["removed"]) for h in blocks + layers)
    masked, total = masked_count(model)
    assert removed["weights"] == masked and masked / total == pytest.approx(0.3, abs=1e-3)
    assert summary["weight_sparsity"] == masked / total
    nonzero = count_params(model, nonzero=True)
    assert summary["nonzero_params"] == nonzero < count_params(model)
    assert summary["compression_ratio"] == count_params(resnet20) / nonzero
    assert abs(summary["macs_reduction"] - 0.3) <= 0.005
    pruned = summary["pruned"]
    assert pruned["macs"] == count_macs(model, EXAMPLE)
    assert pruned["sparse_macs"] < pruned["macs"]
    assert any(layer["after"] == 0 for layer in summary["layers"])  # removed convs


def test_multigrain_result_loads_back_and_exports(multigrain, tmp_path):
    result, out = multigrain
    model = result.model.eval()
    loaded = load(out / "model").eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert masked_count(loaded) == masked_count(model)
    onnx = FORMATS.get("onnx")
    if not onnx.available():
        pytest.skip("onnx runtime not installed")
    path = onnx.write(loaded, tmp_path / "m.onnx", x[:1])
    torch.testing.assert_close(run_onnx(path)(x), model(x), rtol=1e-4, atol=1e-4)


def test_interrupted_multigrain_run_resumes_to_the_same_model(resnet20, multigrain, tmp_path):
    result, _ = multigrain
    real, calls = search_training.fit, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # in the layer or channel phase, after a block went
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search_training, "fit", killed)
        with pytest.raises(KeyboardInterrupt):
            autoprune.prune(resnet20, out_dir=tmp_path, progress=False, **MULTIGRAIN)
    resumed = autoprune.prune(resnet20, out_dir=tmp_path, resume=True, progress=False, **MULTIGRAIN)
    a, b = resumed.model.state_dict(), result.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_multigrain_run_reports_its_compression(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_DATA_ROOT", str(tmp_path))
    argv = ["prune", "-m", "resnet20", "-d", "synthetic", "--target-flops", "0.05"]
    argv += ["--step", "0.05", "--criteria", "l1", "--calib-size", "16", "--no-progress"]
    argv += ["--recover-steps", "1", "--batch-size", "16", "--granularity", "channel,weight"]
    argv += ["--weight-sparsity", "0.1", "--weight-loss-limit", "0"]
    code, stdout, err = cli(*argv)
    assert code == 0, err
    assert "compression, 10.0 % of weights zero" in stdout
    code, stdout, err = cli(*argv, "--json")
    summary = json.loads(stdout)
    assert summary["config"]["weight_loss_limit"] is None
    assert summary["weight_sparsity"] == pytest.approx(0.1, abs=1e-3)


def test_report_of_a_multigrain_run_counts_what_each_granularity_removed(multigrain):
    result, out = multigrain
    markdown, _ = write_report(out)
    text = markdown.read_text()
    summary = result.summary
    assert f"{summary['compression_ratio']:.1f}x compression" in text
    assert f"{summary['nonzero_params']:,}" in text and "sparse MACs (estimate)" in text
    removed = summary["removed"]
    assert removed["blocks"] == 1 and removed["layers"] > 1 and removed["weights"] > 0
    assert f"Removed: 1 block, {removed['layers']} layers, {removed['channels']} channels, " in text


def adapted_by_hand(model: nn.Module, paths: tuple[str, ...], calib: CalibrationSet) -> nn.Module:
    """The reference of adaptive BN: the unit replaced by ``nn.Identity``, every BatchNorm's
    statistics reset and averaged over the calibration batches in training mode."""
    ref = identity_at(model, paths)
    norms = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    ref.eval()
    for m in norms:
        m.train()
    with torch.no_grad():
        for x, _ in calib.batches:
            ref(x)
    return ref.eval()


def test_unit_candidates_are_scored_with_their_model_s_batchnorm_statistics(resnet20):
    graph = build_graph(copy.deepcopy(resnet20), X32[:1])
    g = torch.Generator().manual_seed(1)
    calib = CalibrationSet(
        [(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 10) for _ in range(2)]
    )
    # as the block phase starts: the model's own statistics from the same images
    load_norm_stats(graph.model, estimate_norm_stats(graph.model, calib.batches))
    units = units_of(resnet20, "block")[1:]  # from the first stage's second on: some after others
    plain = [UnitCandidate(u.name, (), EMPTY, 1, paths=u.paths) for u in units]
    candidates = adapted(graph, calib, plain)
    before = copy.deepcopy(graph.model.state_dict())
    expected = [calib.loss(adapted_by_hand(graph.model, u.paths, calib)) for u in units]
    scorers_agree(graph, candidates, calib)
    fast = create_scorer("fast", halving=False, precision="fp32")
    assert fast(graph, candidates, calib, loss_objective(0.0)) == pytest.approx(expected, rel=1e-4)
    unadapted = fast(graph, plain, calib, loss_objective(0.0))
    differ = [abs(a - b) > 1e-3 for a, b in zip(unadapted, expected, strict=True)]
    assert differ == [bool(c.norm_stats) for c in candidates]  # the last: no norm after it
    after = graph.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # trials leave the model be
    order = [n for n, m in graph.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for unit, candidate in zip(units, candidates, strict=True):  # the norms after the unit
        (path,) = unit.paths
        inside = [i for i, n in enumerate(order) if n.startswith(path + ".")]
        assert sorted(candidate.norm_stats, key=order.index) == order[max(inside) + 1 :]


@pytest.mark.parametrize(("adapt", "ties"), [(True, False), (False, False), (True, True)])
def test_a_block_step_leaves_the_statistics_it_was_scored_with(resnet20, adapt, ties):
    settings = {**SMALL, "granularity": "block", "target_macs_reduction": 0.2}
    config = PruneConfig(**settings, adapt_norms=adapt, break_unit_ties=ties)
    pruner = Pruner(resnet20, EXAMPLE, config, calib_data=TRAIN)
    entry = pruner.step()
    assert entry is not None and entry["granularity"] == "block"
    assert ("tied" in entry["scorer"]) is ties
    assert pruner.calib is not None
    left = estimate_norm_stats(pruner.model, pruner.calib.batches)
    assert (left == {}) is adapt  # adapted: already what the calibration images give
    assert pruner.state.loss == pytest.approx(entry["loss"], rel=1e-4)
