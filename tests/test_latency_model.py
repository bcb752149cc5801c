"""The latency model and target, on a deterministic fake backend (no wall-clock timing).

The fake backend costs a module as if its kernels worked on blocks of 8 channels: a conv costs
``blocks(out) * blocks(in) * kernel`` units (``blocks``: rounded up to 8), a linear layer
``blocks(out)``, and every pooling layer adds a fixed overhead that no layer table sees (what
the fit through a thinner model must find); norms and activations cost nothing.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _small import SMALL, TRAIN, synthetic_task
from torch import nn

import autoprune
from autoprune.errors import AutopruneError
from autoprune.graph import build_graph
from autoprune.measure import available_backends
from autoprune.measure.latency_model import (
    LatencyModel,
    Thinned,
    build_latency_model,
    cache_key,
)
from autoprune.measure.latency_table import TIMERS, LayerTable, probe_widths
from autoprune.models import create_model
from autoprune.search import OBJECTIVES, Candidate, PruneConfig, Pruner
from autoprune.search.config import LATENCY_COARSE_SHARE
from autoprune.search.latency_target import REMEASURE, LatencyTarget

BLOCK = 8
CALLS: list[int] = []


def blocks(channels: int) -> int:
    return math.ceil(channels / BLOCK) * BLOCK


def fake_ms(module: nn.Module, shape: tuple[int, ...], batch: int) -> float:
    CALLS.append(1)
    total = 0.0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            total += blocks(m.out_channels) * blocks(m.in_channels) * m.kernel_size[0] ** 2 * 1e-4
        elif isinstance(m, nn.Linear):
            total += blocks(m.out_features) * 1e-3
        elif isinstance(m, nn.MaxPool2d | nn.AdaptiveMaxPool2d):
            total += 0.05
    return total * batch


def fake_timer(module: nn.Module, shape: tuple[int, ...], batch: int):
    return lambda: fake_ms(module, shape, batch)


if "fake8" not in TIMERS:
    TIMERS.register("fake8")(fake_timer)

EXAMPLE = torch.zeros(1, 1, 16, 16)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("smallcnn", widths=(16, 24, 32))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path))
    return tmp_path / "latency"


def test_probe_widths_cover_the_full_width_evenly():
    assert probe_widths(8, 16) == list(range(1, 9))
    assert probe_widths(64, 16) == list(range(4, 65, 4))
    assert probe_widths(10, 4) == [1, 4, 7, 10]


def test_table_reads_the_measured_width_at_or_above():
    table = LayerTable([2, 4, 6], [1.0, 2.0, 4.0], [3, 6], [0.5, 1.0])
    assert table.dense_ms == 4.0
    assert table.predict(6, 6) == 4.0
    assert table.predict(6, 5) == 4.0  # between measured widths: the one above
    assert table.predict(3, 4) == pytest.approx(2.0 * 0.5)
    assert table.predict(6, 1) == 1.0


def test_prediction_matches_the_backend_dense_and_after_pruning(model):
    graph = build_graph(model, EXAMPLE)
    target = LatencyTarget.build(graph, EXAMPLE, 0.3, backend="fake8", batch=2)
    lm = target.model
    assert lm.dense_ms == pytest.approx(fake_ms(model, (1, 16, 16), 2))
    assert lm.fixed_ms == pytest.approx(3 * 0.05 * 2)  # the pools, found by the fit
    assert lm.ratio > 1.0
    for group in graph.groups():
        graph.prune(group.name, torch.arange(group.channels // 3))
    assert target.predicted_ms() == pytest.approx(fake_ms(graph.model, (1, 16, 16), 2))
    report = target.report()
    assert report["prediction_error"] == pytest.approx(0.0, abs=1e-9)
    assert report["speedup_measured"] == pytest.approx(report["speedup_predicted"])


def test_tables_are_cached_per_backend_batch_and_machine(model, cache):
    build_latency_model(model, EXAMPLE, backend="fake8", batch=1)
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("fake8-b1-")
    CALLS.clear()
    build_latency_model(model, EXAMPLE, backend="fake8", batch=1)
    assert len(CALLS) == 3  # the whole model, 3 rounds: the tables came from the cache
    build_latency_model(model, EXAMPLE, backend="fake8", batch=4)
    assert len(list(cache.glob("*.json"))) == 2
    device = torch.device("cpu")
    key = cache_key(["a"], "eager", 1, 16, device)
    assert (
        key != cache_key(["a"], "eager", 1, 8, device) != cache_key(["b"], "eager", 1, 16, device)
    )
    files[0].write_text("not json")
    CALLS.clear()
    build_latency_model(model, EXAMPLE, backend="fake8", batch=1)
    assert len(CALLS) > 1  # an unreadable cache is measured again


def test_options_snap_to_the_widths_where_latency_steps(model):
    graph = build_graph(model, EXAMPLE)
    target = LatencyTarget.build(graph, EXAMPLE, 0.3, backend="fake8", batch=1)
    for group in graph.groups():
        options = target.options(group, group.channels - 1)
        assert options, group.name
        kept = [group.channels - n for n, _ in options]
        assert all(k % BLOCK == 0 for k in kept), (group.name, kept)
        saved = [s for _, s in options]
        assert saved == sorted(saved)


def latency_config(**overrides) -> PruneConfig:
    settings = {**SMALL, "recover_steps": 0, "distill": False, "step": 0.1}
    settings |= {"target_latency_reduction": 0.4, "latency_backend": "fake8"}
    settings["granularity"] = "channel"  # the channel snapping under test
    return PruneConfig(**settings | overrides)


def test_search_stops_at_the_predicted_target_on_kernel_friendly_widths(model):
    pruner = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    target = pruner.latency
    reductions = []
    while (entry := pruner.step()) is not None:
        reductions.append(1 - entry["latency_predicted_ms"] / target.dense_ms)
    assert reductions and reductions[-1] >= 0.4 - 0.005
    assert all(r < 0.4 - 0.005 for r in reductions[:-1])  # it stopped as soon as it got there
    for group in pruner.graph.groups():
        assert group.channels % BLOCK == 0 or group.channels == pruner.original_channels[group.name]
    measured = fake_ms(pruner.model, (1, 16, 16), 1)
    assert target.predicted_ms() == pytest.approx(measured)


def test_loss_per_latency_divides_by_the_predicted_saving(model):
    pruner = Pruner(model, EXAMPLE, latency_config(objective="loss_per_latency"), calib_data=TRAIN)
    candidates = pruner.candidates()
    assert candidates and all(c.latency_saved > 0 for c in candidates)
    losses = pruner.score(candidates)
    step_ms = pruner.config.step * pruner.latency.dense_ms
    values = [
        (v - pruner.state.loss) / min(c.latency_saved, step_ms)
        for v, c in zip(losses, candidates, strict=True)
    ]
    entry = pruner.step()
    best = candidates[min(range(len(values)), key=values.__getitem__)]
    assert entry["removed"] == {best.group: len(best.idxs)}


def test_loss_per_latency_counts_a_saving_up_to_one_step():
    """A removal saving three steps for three times the loss is no better than one saving a
    step: the plain ratio would call it as good, and one a little cheaper per ms better."""
    objective = OBJECTIVES.get("loss_per_latency")(1.0, 2.0)
    one_step = Candidate("a", ("l1",), torch.tensor([0]), 10, latency_saved=2.0)
    three_steps = Candidate("b", ("l1",), torch.tensor([0, 1, 2]), 30, latency_saved=6.0)
    assert objective(1.2, one_step) == pytest.approx(0.1)
    assert objective(1.5, three_steps) == pytest.approx(0.25)  # not 0.5 / 6 < 0.1
    half_step = Candidate("c", ("l1",), torch.tensor([0]), 5, latency_saved=1.0)
    assert objective(1.1, half_step) == pytest.approx(0.1)  # below a step: per ms saved


@pytest.mark.parametrize("name", ["loss_per_latency", "loss_per_mac"])
def test_of_removals_that_lower_the_loss_the_one_saving_more_wins(name):
    """The plain ratio of a decrease is least negative for the largest saving: a removal that
    saves almost nothing would win over one saving a whole step for the same decrease."""
    objective = OBJECTIVES.get(name)(1.0, 2.0)
    tiny = Candidate("a", ("l1",), torch.tensor([0]), 1, latency_saved=0.01)
    step = Candidate("b", ("l1",), torch.tensor([0, 1]), 100, latency_saved=2.0)
    assert objective(0.9, step) < objective(0.9, tiny) < objective(1.01, step)
    assert objective(0.8, tiny) < objective(0.9, tiny)  # still lower for a lower loss


def test_an_unreachable_latency_target_is_refused(model):
    pruner = Pruner(
        model, EXAMPLE, latency_config(target_latency_reduction=0.9, cap=0.3), calib_data=TRAIN
    )
    with pytest.raises(AutopruneError, match="latency reduction is out of reach"):
        pruner.step()


@pytest.mark.parametrize(
    "settings",
    [
        {"granularity": ("channel", "weight")},
        {"schedule": "fixed", "criteria": ("l1",)},
        {"target_latency_reduction": 1.5},
        {"latency_backend": "nope"},
    ],
)
def test_latency_settings_that_cannot_work_are_refused(settings):
    with pytest.raises(AutopruneError):
        latency_config(**settings)


def test_loss_per_latency_needs_a_latency_target():
    with pytest.raises(AutopruneError, match="target_latency_reduction"):
        PruneConfig(objective="loss_per_latency")


def test_a_latency_run_reports_predicted_and_measured_and_export_measures_again(
    model, tmp_path, cli
):
    from autoprune.report import write_report

    out = tmp_path / "run"
    settings = {**SMALL, "recover_steps": 0, "distill": False, "step": 0.1}
    settings.pop("target_macs_reduction")
    result = autoprune.prune(
        model,
        train_data=TRAIN,
        example_inputs=EXAMPLE,
        out_dir=out,
        progress=False,
        target_latency_reduction=0.3,
        latency_backend="fake8",
        **settings,
    )
    latency = result.summary["latency"]
    assert latency["backend"] == "fake8" and latency["batch"] == 1
    assert latency["measured_ms"] == pytest.approx(fake_ms(result.model, (1, 16, 16), 1))
    assert latency["prediction_error"] == pytest.approx(0.0, abs=1e-9)
    assert latency["speedup_measured"] >= 1 / (1 - 0.3 + 0.005)
    assert all("latency_predicted_ms" in h for h in result.history)
    markdown, _ = write_report(out)
    text = markdown.read_text()
    assert "## Latency" in text and "latency predicted (ms)" in text
    assert latency["checks"][-1]["final"] and not latency["checks"][-1]["short"]
    assert "savings scale" in text
    code, stdout, _ = cli(
        "export",
        str(out),
        "-f",
        "torchscript",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--input-size",
        "16",
        "--json",
    )
    assert code == 0
    again = json.loads(stdout)["pruned_for"]
    assert again["backend"] == "fake8"
    assert again["measured_ms"] == pytest.approx(latency["measured_ms"])


def test_the_default_objective_follows_the_target():
    from dataclasses import replace

    assert PruneConfig().search_objective == "loss"
    latency = replace(PruneConfig(), target_latency_reduction=0.3)
    assert latency.search_objective == "loss_per_latency"
    assert replace(latency, objective="loss").search_objective == "loss"


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_a_real_backend_builds_a_table_for_every_layer(model, backend):
    if backend not in TIMERS or backend not in available_backends():
        pytest.skip(f"{backend} is not installed here")
    example = torch.zeros(1, 1, 24, 24)  # ONNX exports the adaptive pool of a multiple of 3
    lm = build_latency_model(model, example, backend=backend, batch=1, points=2, rounds=1)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert set(lm.layers) == set(layers)
    assert lm.dense_ms > 0 and lm.tables_ms > 0
    assert lm.predict() == pytest.approx(lm.dense_ms)  # scaled to the measurement
    assert all(len(t.out_widths) == 2 for t in lm.layers.values())


def test_the_fit_finds_per_channel_cost_table_scales_and_fixed_cost_per_region():
    big, small = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)  # on a 32x32 map, on an 8x8 one
    table = LayerTable([4, 8], [2.0, 4.0], [4, 8], [2.0, 4.0])

    def fitted(dense_ms: float, big_ms: float, small_ms: float) -> LatencyModel:
        lm = LatencyModel(
            "fake8", 1, {big: table, small: table}, dense_ms, 8.0, regions={big: 1024, small: 64}
        )
        assert lm.predict() == pytest.approx(dense_ms)  # built: scaled to the measurement
        lm.fit_regions([Thinned(1024, 6.0, 4, big_ms), Thinned(64, 6.0, 4, small_ms)])
        return lm

    # the big map's half saved 4 ms where its table says 2: 0.5 ms per channel besides;
    # the small one's saved 1 where its table says 2: its table counts half
    lm = fitted(14.0, 10.0, 13.0)
    assert lm.channel_ms == {1024: 0.5} and lm.scales == {64: 0.5}
    assert (lm.fixed_ms, lm.scale) == (4.0, 1.0)
    assert lm.predict() == 14.0
    assert lm.predict({big: (4, 0)}) == 10.0 and lm.predict({small: (4, 0)}) == 13.0
    lm = fitted(9.0, 5.0, 8.0)  # the layers alone would cost more than the dense model
    assert lm.fixed_ms == 0.0 and lm.scale == pytest.approx(0.9)
    assert lm.predict() == pytest.approx(9.0)


def test_the_cli_offers_the_latency_options(cli):
    code, out, _ = cli("prune", "--help")
    assert code == 0
    for option in ("--target-latency", "--latency-backend", "--latency-batch"):
        assert option in out


def test_a_resumed_latency_run_decides_as_the_saved_one(model):
    first = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    first.step()
    saved = copy.deepcopy(first.state_dict())  # as written to disk: apart from the pruner
    assert saved["latency_fit"] == first.latency.fit_state()
    rest = [entry["removed"] for entry in iter(first.step, None)]
    second = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    second.load_state_dict(copy.deepcopy(saved))
    assert [entry["removed"] for entry in iter(second.step, None)] == rest
    third = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    third.load_state_dict({**saved, "latency_fit": {**saved["latency_fit"], "fixed_ms": 0.5}})
    assert third.latency.model.fixed_ms == 0.5  # the saved fit, not a new measurement


def test_a_layer_is_timed_with_the_norm_and_activation_that_follow_it(model):
    from autoprune.measure.latency_model import traced_shapes

    shapes = traced_shapes(model, EXAMPLE)
    convs = [s for m, s in shapes.items() if isinstance(m, nn.Conv2d)]
    assert [s.followers for s in convs] == [("BatchNorm2d", "ReLU")] * 3
    (linear,) = [s for m, s in shapes.items() if isinstance(m, nn.Linear)]
    assert linear.followers == ()  # a pool and a flatten come first
    built, input_shape = convs[1].build(16, 12)
    assert [type(m) for m in built] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert built(torch.zeros(2, *input_shape)).shape[1] == 12


def test_a_residual_conv_is_timed_without_what_follows_the_addition():
    from autoprune.measure.latency_model import traced_shapes

    shapes = traced_shapes(create_model("resnet20"), torch.zeros(1, 3, 16, 16))
    followers = [s.followers for s in shapes.values() if s.kind == "conv2d"]
    assert followers[:3] == [("BatchNorm2d", "ReLU"), ("BatchNorm2d", "ReLU"), ("BatchNorm2d",)]


@pytest.mark.parametrize("shares", [(), (1.0, 0.0)])
def test_blocks_leave_under_a_latency_target_costed_by_their_layers(shares):
    """Blocks first, to their share of the predicted latency (by default 0.75 of it; all of it:
    channels finish what no block fits), then channels to the target; the prediction without
    the removed blocks is the backend's measurement."""
    torch.manual_seed(0)
    resnet = create_model("resnet32")  # more blocks than fit 0.75 of the target
    example = torch.zeros(1, 3, 16, 16)
    train, _ = synthetic_task(channels=3)
    config = latency_config(granularity=None, target_latency_reduction=0.2, macs_shares=shares)
    pruner = Pruner(resnet, example, config, calib_data=train)
    target = pruner.latency
    candidates = pruner.candidates()
    assert candidates and all(c.paths and c.latency_saved > 0 for c in candidates)
    lm = target.model
    for candidate in candidates:
        modules = [pruner.model.get_submodule(p) for p in candidate.paths]
        layers = [m for mod in modules for m in mod.modules() if m in lm.layers]
        assert candidate.latency_saved == pytest.approx(lm.scale * sum(map(lm._layer_ms, layers)))
    history, fitting = [], None
    while (entry := pruner.step()) is not None:
        history.append(entry)
        if entry["granularity"] == "block":  # the blocks that would still fit the target
            fitting = pruner.grains[0].candidates(pruner.context())
    grains = [h["granularity"] for h in history]
    blocks = grains.count("block")
    assert blocks and grains == ["block"] * blocks + ["channel"] * (len(grains) - blocks)
    before_channels = 1 - history[blocks - 1]["latency_predicted_ms"] / target.dense_ms
    if shares:  # blocks to the target; channels finish only what no block fits
        assert fitting == [] or before_channels >= 0.2 - 0.005
    else:
        assert before_channels >= LATENCY_COARSE_SHARE * 0.2 - 0.005  # the blocks' share
        assert fitting  # a block would still fit: the share, not the blocks, ended the phase
    assert 1 - history[-1]["latency_predicted_ms"] / target.dense_ms >= 0.2 - 0.005
    assert target.predicted_ms() == pytest.approx(fake_ms(pruner.model, (3, 16, 16), 1))


def test_latency_targets_refuse_weights_and_fixed_channels_but_take_blocks():
    assert latency_config(granularity=("block", "layer", "channel")).granularity[0] == "block"
    assert latency_config(granularity=("block",), schedule="fixed", criteria=("l1",))
    with pytest.raises(AutopruneError, match="use target_macs_reduction for weight"):
        latency_config(granularity=("channel", "weight"))


def measured_as(pruner: Pruner, saves: float, after: float = 0.0):
    """A backend that saves ``saves`` of what the fake timer predicts once the predicted
    reduction is past ``after`` (before that, what it predicts)."""
    target = pruner.latency
    dense_ms = fake_ms(target.dense, (1, 16, 16), 1)

    def measure() -> tuple[float, float]:
        pruned_ms = fake_ms(pruner.model, (1, 16, 16), 1)
        factor = saves if target.reduction > after else 1.0
        return dense_ms, dense_ms - factor * (dense_ms - pruned_ms)

    return measure


@pytest.mark.parametrize("saves", [0.8, 1.25])
def test_measured_on_the_way_the_search_lands_on_the_target_as_measured(model, monkeypatch, saves):
    """The backend saves 80 % (125 %) of what the model predicts: the first check on the way
    scales every saving to it, and the search stops where the measurement reaches the target
    rather than short of it (past it)."""
    pruner = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    target = pruner.latency
    monkeypatch.setattr(target, "_measure", measured_as(pruner, saves))
    history = list(iter(pruner.step, None))
    checks = pruner.state.latency_checks
    first, last = checks[0], checks[-1]
    assert not first.get("final") and last["final"] and not last["short"]
    assert first["measured_reduction"] == pytest.approx(saves * first["predicted_reduction"])
    assert target.model.savings == pytest.approx(saves)
    assert last["iteration"] == len(history)
    assert 0.4 - 0.01 <= last["measured_reduction"] <= 0.4 + 0.1  # one step of 0.1 at most
    assert last["measured_reduction"] == pytest.approx(last["predicted_reduction"])
    saved = pruner.state_dict()
    assert saved["latency_fit"]["savings"] == pytest.approx(saves)
    assert saved["latency_checks"] == checks


@pytest.mark.parametrize(
    ("left_at", "now", "checked"),
    [
        (0.0, 0.55, True),
        (0.55, 0.7, False),
        (0.55, 0.8, True),
        (0.85, 0.95, False),
        (0.45, 0.6, True),
    ],  # the last: a check at 0.8 corrected down to 0.45 re-arms 0.5
)
def test_a_check_on_the_way_is_due_at_each_point_above_where_the_last_left_it(
    model, monkeypatch, left_at, now, checked
):
    """One measurement taken while the load changed can scale the savings down by half: the
    points the progress then falls below are checked again, or nothing would catch the
    search running far past the target before its end."""
    pruner = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    pruner.start()
    target = pruner.latency
    monkeypatch.setattr(type(target), "progress", property(lambda self: now))
    monkeypatch.setattr(target, "check", lambda final: {"progress_after": now})
    checks = [{"iteration": 1, "progress_after": left_at}] if left_at else []
    target.check_on_the_way(checks, 2)
    assert (len(checks) == (1 if left_at else 0) + 1) is checked


@pytest.mark.parametrize("bursts", [1, 5])
@pytest.mark.parametrize("when", ["check", "report"])
def test_a_timing_taken_while_the_load_changed_is_measured_again(model, monkeypatch, bursts, when):
    """The first ``bursts`` timings run under a load that slows the dense model 3x and hides
    most of the saving: a check, or the summary's report where no check timed the final model,
    measures again (at most REMEASURE times) and keeps the timing whose dense model is closest
    to the fit's."""
    pruner = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    pruner.step()
    target, calls = pruner.latency, []
    true = measured_as(pruner, 1.0)
    dense = true()[0]

    def measure() -> tuple[float, float]:
        calls.append(1)
        dense, pruned = true()
        return (3 * dense, 2.9 * dense) if len(calls) <= bursts else (dense, pruned)

    monkeypatch.setattr(target, "_measure", measure)
    again = min(bursts, REMEASURE)
    if when == "report":
        report = target.report()
        assert len(calls) == again + 1
        assert report["dense_measured_ms"] == (dense if bursts <= REMEASURE else 3 * dense)
        return
    check = target.check(final=False)
    assert check["remeasured"] == again and len(calls) == again + 1
    if bursts <= REMEASURE:
        assert check["measured_reduction"] == pytest.approx(check["predicted_reduction"])
        assert target.model.savings == pytest.approx(1.0)
    else:  # loaded throughout: the correction is what the least loaded timing says
        assert check["measured_reduction"] == pytest.approx(1 - 2.9 / 3)


def test_a_model_measured_short_at_the_end_is_pruned_on(model, monkeypatch):
    pruner = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    monkeypatch.setattr(pruner.latency, "_measure", measured_as(pruner, 0.8, after=0.395))
    history = list(iter(pruner.step, None))
    finals = [c for c in pruner.state.latency_checks if c.get("final")]
    assert [c["short"] for c in finals] == [True, False]
    assert finals[0]["iteration"] < finals[1]["iteration"] == len(history)  # pruned on between
    assert finals[1]["measured_reduction"] >= 0.4 - 0.01


def test_a_model_measured_as_predicted_is_not_corrected(model):
    pruner = Pruner(model, EXAMPLE, latency_config(), calib_data=TRAIN)
    list(iter(pruner.step, None))
    checks = pruner.state.latency_checks
    assert [c.get("final", False) for c in checks][-1] and not checks[-1]["short"]
    assert sum(c.get("final", False) for c in checks) == 1
    assert pruner.latency.model.savings == pytest.approx(1.0)
    assert pruner.step() is None and pruner.state.latency_checks == checks
