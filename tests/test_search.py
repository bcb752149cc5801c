"""The pruning search: targets, outputs, resume, bad input, schedules, the CLI command."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from _small import EXAMPLE, SMALL, TRAIN, VAL

import autoprune
from autoprune.errors import AutopruneError
from autoprune.graph import build_graph
from autoprune.io import load
from autoprune.io.state import load_state
from autoprune.measure import count_macs
from autoprune.models import create_model
from autoprune.search import OBJECTIVES, SCHEDULES, PruneConfig, make_candidates
from autoprune.search import _trials as search_trials
from autoprune.search import pruner as search_pruner
from autoprune.search import scorers as search_scorers
from autoprune.search import training as search_training
from autoprune.search.candidates import criteria_state, removable

TOLERANCE = 0.005


@pytest.fixture(scope="module")
def smallcnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("smallcnn")


def small_prune(model: torch.nn.Module, **kw) -> autoprune.PruneResult:
    settings = {"train_data": TRAIN, "val_data": VAL, **SMALL, **kw}
    return autoprune.prune(model, progress=False, **settings)


@pytest.fixture(scope="module")
def finished(smallcnn, tmp_path_factory) -> tuple[autoprune.PruneResult, Path]:
    out = tmp_path_factory.mktemp("run")
    return small_prune(smallcnn, out_dir=out), out


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def without_times(history: list[dict]) -> list[dict]:
    drop = ("seconds", "recovery_s", "scorer")
    return [{k: v for k, v in h.items() if k not in drop} for h in history]


# ----------------------------------------------------------------------------- the loop


def test_search_lands_on_the_target_and_the_summary_is_the_model(finished):
    result, _ = finished
    summary = result.summary
    macs = count_macs(result.model, EXAMPLE)
    assert abs(summary["macs_reduction"] - 0.3) <= TOLERANCE
    assert macs == summary["pruned"]["macs"] < summary["baseline"]["macs"]
    assert summary["macs_reduction"] == pytest.approx(
        1 - macs / count_macs(create_model("smallcnn"), EXAMPLE)
    )
    assert summary["pruned"]["params"] == sum(p.numel() for p in result.model.parameters())
    modules = dict(result.model.named_modules())
    for layer in summary["layers"]:
        m = modules[layer["name"]]
        assert layer["after"] == getattr(m, "out_channels", getattr(m, "out_features", None))
    assert any(layer["after"] < layer["before"] for layer in summary["layers"])
    assert summary["iterations"] == len(result.history) >= 2
    assert sum(summary["criteria_chosen"].values()) >= summary["iterations"]
    assert set(summary["timings"]) == {"search_s", "recovery_s", "finetune_s", "total_s"}
    assert summary["baseline"]["accuracy"] is not None and summary["pruned"]["loss"] > 0


def test_run_directory_holds_summary_history_and_model(finished):
    result, out = finished
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(result.summary))
    lines = [json.loads(s) for s in (out / "history.jsonl").read_text().splitlines()]
    assert len(lines) == result.summary["iterations"]
    for h in lines:
        assert {"group", "criteria", "channels", "loss", "macs_reduction", "candidates"} <= h.keys()
        assert h["channels"] >= 1 and h["candidates"] >= 1 and math.isfinite(h["loss"])
    assert [h["macs_reduction"] for h in lines] == sorted(h["macs_reduction"] for h in lines)
    assert any(h["loss_recovered"] is not None for h in lines)
    reloaded = load(out / "model").eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model.eval()(x))


def test_candidates_are_deduplicated_and_their_macs_exact(smallcnn):
    graph = build_graph(create_model("smallcnn"), EXAMPLE)
    graph.model.load_state_dict(smallcnn.state_dict())
    limits = {g.name: removable(g, g.channels, 0.75) for g in graph.groups()}
    step = 0.05 * graph.macs()
    pool = ("l1", "l2", "fpgm", "euclidean", "bn_scale")
    candidates = make_candidates(graph, pool, step, limits, criteria_state(graph, pool, None, 0, 1))
    seen = {}
    for c in candidates:
        key = (c.group, tuple(c.idxs.tolist()))
        assert key not in seen
        seen[key] = c.criteria
        assert c.macs_saved == graph.macs() - graph.macs(c.group, c.idxs)
        one = graph.group(c.group).macs_per_channel
        assert abs(c.macs_saved - step) <= one / 2 + 1 or len(c.idxs) == 1
    for group in graph.groups():
        offered = [n for (g, _), names in seen.items() if g == group.name for n in names]
        assert sorted(offered) == sorted(pool)


@pytest.mark.parametrize("schedule", SCHEDULES.names())
def test_every_schedule_reaches_the_target(smallcnn, schedule):
    criteria = {"fixed": "l1", "saliency-then-similarity": "taylor,fpgm"}.get(schedule)
    extra = {"allocation": "global"} if schedule == "fixed" else {}
    result = small_prune(
        smallcnn, schedule=schedule, criteria=criteria, recover_steps=0, val_data=None, **extra
    )
    assert abs(result.summary["macs_reduction"] - 0.3) <= TOLERANCE
    assert result.summary["iterations"] == len(result.history)


@pytest.mark.parametrize(
    "objective",
    [n for n in OBJECTIVES.names() if OBJECTIVES.entry(n).meta.get("target") != "latency"],
)
def test_every_macs_objective_reaches_the_target(smallcnn, objective):
    result = small_prune(smallcnn, objective=objective, target_macs_reduction=0.15, recover_steps=0)
    assert abs(result.summary["macs_reduction"] - 0.15) <= TOLERANCE


@pytest.mark.parametrize("criteria", ["l1,taylor,fpgm", "l1,fpgm"])
def test_the_scorer_shortlists_and_orders_by_what_the_taylor_pass_measured(smallcnn, criteria):
    result = small_prune(smallcnn, criteria=criteria, recover_steps=0, val_data=None)
    stats = [h["scorer"] for h in result.history]
    if "taylor" in criteria:  # a fifth of them, at least min_keep (4)
        assert all(s["shortlisted"] == max(4, math.ceil(0.2 * s["candidates"])) for s in stats)
        assert any(s["shortlisted"] < s["candidates"] for s in stats)
        # the images go hardest first by the losses taylor's pass measured: no pass of its own
        assert all(s["ordering_images"] == 0 for s in stats)
    else:  # nothing predicted: every candidate scored, the images ordered by a pass
        assert all(s["shortlisted"] == s["candidates"] for s in stats)
        assert any(s["ordering_images"] > 0 for s in stats)


def test_saliency_then_similarity_switches_once(smallcnn):
    result = small_prune(
        smallcnn,
        schedule="saliency-then-similarity",
        criteria="taylor,l1,fpgm,cosine",
        saliency_fraction=0.5,
        target_macs_reduction=0.4,
        recover_steps=0,
    )
    before = 0.0
    phases = []
    for h in result.history:
        saliency = before / 0.4 < 0.5
        allowed = {"taylor"} if saliency else {"fpgm", "cosine"}
        assert set(h["criteria"]) <= allowed, (before, h["criteria"])
        phases.append(saliency)
        before = h["macs_reduction"]
    assert phases[0] and not phases[-1] and phases == sorted(phases, reverse=True)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_fixed_schedule_needs_no_data(allocation):
    torch.manual_seed(0)
    model = create_model("resnet20")
    result = autoprune.prune(
        model,
        example_inputs=torch.zeros(1, 3, 32, 32),
        schedule="fixed",
        criteria="l1",
        allocation=allocation,
        target_macs_reduction=0.4,
        progress=False,
    )
    summary = result.summary
    assert summary["baseline"]["accuracy"] is None and summary["dataset"] is None
    assert count_macs(result.model, torch.zeros(1, 3, 32, 32)) == summary["pruned"]["macs"]
    assert summary["macs_reduction"] >= 0.4 - TOLERANCE
    ratios = [1 - g["after"] / g["before"] for g in summary["layers"] if "conv" in g["name"]]
    if allocation == "global":
        assert abs(summary["macs_reduction"] - 0.4) <= TOLERANCE
    else:  # the same fraction everywhere, up to one channel of the narrowest group (16)
        assert max(ratios) - min(ratios) < 1 / 16 + 1e-9


def test_config_is_shared_with_the_api_and_fine_tunes(smallcnn, tmp_path):
    config = PruneConfig(**{**SMALL, "recover_steps": 0, "finetune_epochs": 1})
    result = autoprune.prune(
        smallcnn,
        train_data=TRAIN,
        val_data=VAL,
        config=config,
        target_macs_reduction=0.1,
        out_dir=tmp_path,
        progress=False,
    )
    summary = result.summary
    assert summary["config"]["target_macs_reduction"] == 0.1
    assert summary["config"]["step"] == 0.05 and summary["config"]["finetune_epochs"] == 1
    assert summary["timings"]["finetune_s"] > 0 and summary["timings"]["recovery_s"] == 0
    assert (tmp_path / "finetune_state.safetensors").exists()


# ------------------------------------------------------------------------------ resume


def kill_at_call(target: object, name: str, k: int, monkeypatch) -> None:
    """Make ``target.name`` raise KeyboardInterrupt at its ``k``-th call (a kill mid-run)."""
    real, calls = getattr(target, name), []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, killed)


@pytest.mark.parametrize(
    ("where", "k"),
    [
        ("fit", 2),  # inside the second recovery
        ("mask_channels", 12),  # while scoring the candidates of a later iteration
    ],
)
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    smallcnn, finished, tmp_path, monkeypatch, where, k
):
    result, _ = finished
    target = {"fit": search_training, "mask_channels": search_trials}[where]
    kill_at_call(target, where, k, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        small_prune(smallcnn, out_dir=tmp_path)
    saved = load_state(tmp_path / "state.safetensors")
    assert 0 < saved["iteration"] < result.summary["iterations"]
    monkeypatch.undo()
    with pytest.raises(AutopruneError, match="already holds a pruning run"):
        small_prune(smallcnn, out_dir=tmp_path)
    resumed = small_prune(smallcnn, out_dir=tmp_path, resume=True)
    assert_same_weights(resumed.model, result.model)
    assert without_times(resumed.history) == without_times(result.history)
    assert resumed.summary["layers"] == result.summary["layers"]


def test_finished_run_is_not_redone(smallcnn, finished, monkeypatch):
    result, out = finished

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(search_training, "fit", fail)
    monkeypatch.setattr(search_pruner.Pruner, "step", fail)
    again = small_prune(smallcnn, out_dir=out, resume=True)
    assert_same_weights(again.model, result.model)
    assert again.summary == json.loads((out / "summary.json").read_text())


def test_resume_with_other_settings_is_refused(smallcnn, finished):
    _, out = finished
    with pytest.raises(AutopruneError, match=r"other settings.*step"):
        small_prune(smallcnn, out_dir=out, resume=True, step=0.02)


def test_resume_from_a_model_with_other_weights_is_refused(smallcnn, finished):
    _, out = finished
    retrained = copy.deepcopy(smallcnn)
    with torch.no_grad():
        next(retrained.parameters())[0].add_(1e-3)  # same architecture, one weight changed
    with pytest.raises(AutopruneError, match="started from a model with other weights"):
        small_prune(retrained, out_dir=out, resume=True)
    assert small_prune(smallcnn, out_dir=out, resume=True).summary["iterations"] > 0


def test_resume_after_a_scorer_default_changed_is_refused(smallcnn, finished, monkeypatch):
    _, out = finished
    newer = search_scorers.FastScorer(min_images=16)  # as if a new release changed a default
    monkeypatch.setattr(search_pruner, "create_scorer", lambda name, **options: newer)
    with pytest.raises(AutopruneError, match=r"other settings.*scorer_settings"):
        small_prune(smallcnn, out_dir=out, resume=True)


def test_channel_multiple_leaves_every_group_a_multiple_of_it(smallcnn):
    graph = build_graph(create_model("smallcnn"), EXAMPLE)
    graph.prune("stage2.conv", torch.arange(3))  # 61 channels: the first step rounds to 56
    pool = ("l1", "fpgm")
    state = criteria_state(graph, pool, None, 0, 1)
    for multiple in (1, 4, 8):
        limits = {g.name: removable(g, 64, 0.75, multiple) for g in graph.groups()}
        assert limits["stage2.conv"] == {1: 45, 4: 45, 8: 45}[multiple]  # keep 16 of 64
        candidates = make_candidates(graph, pool, 0.05 * graph.macs(), limits, state, multiple)
        assert {c.group for c in candidates} == {g.name for g in graph.groups()}
        for c in candidates:
            kept = graph.group(c.group).channels - len(c.idxs)
            assert kept % multiple == 0 and 0 < len(c.idxs) <= limits[c.group]
    small = removable(graph.group("stage1.conv"), 32, 0.75, 64)
    assert small == 0  # fewer channels than the multiple: nothing may go

    result = small_prune(smallcnn, channel_multiple=8)
    widths = [g.channels for g in build_graph(result.model, EXAMPLE).groups()]
    assert result.summary["macs_reduction"] >= 0.3 - TOLERANCE
    assert all(w % 8 == 0 for w in widths) and widths != [32, 64, 128]
    with pytest.raises(AutopruneError, match="channel_multiple"):
        PruneConfig(schedule="fixed", criteria=("l1",), channel_multiple=8)


# ---------------------------------------------------------------------------- bad input


def test_unreachable_target_is_refused_before_the_search(smallcnn, monkeypatch):
    graph = build_graph(create_model("smallcnn"), EXAMPLE)
    at_cap = {g.name: torch.arange(removable(g, g.channels, 0.5)) for g in graph.groups()}
    best = 1 - graph.macs(at_cap) / graph.macs()

    def fail(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(search_pruner.Pruner, "step", fail)
    with pytest.raises(AutopruneError, match="out of reach") as error:
        small_prune(smallcnn, target_macs_reduction=0.9, cap=0.5)
    assert f"the most is {100 * best:.2f} %" in str(error.value)


def test_nan_loss_stops_the_run_with_the_last_good_state_saved(smallcnn, tmp_path, monkeypatch):
    real_fit, calls = search_training.fit, []

    def diverging(model, *args, **kwargs):
        calls.append(1)
        result = real_fit(model, *args, **kwargs)
        if len(calls) == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return result

    monkeypatch.setattr(search_training, "fit", diverging)
    with pytest.raises(AutopruneError, match="calibration loss is nan after recovery") as error:
        small_prune(smallcnn, out_dir=tmp_path)
    assert str(tmp_path / "state.safetensors") in str(error.value)
    saved = load_state(tmp_path / "state.safetensors")
    history = [json.loads(s) for s in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert saved["iteration"] == len(history) >= 1
    recovered = [h["iteration"] for h in history if h["loss_recovered"] is not None]
    assert len(recovered) == 1  # the first recovery's iteration is kept, the second's is not
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"schedule": "fixed"}, "exactly one criterion"),
        ({"criteria": "l1,nope"}, "unknown criterion 'nope'"),
        ({"schedule": "saliency-then-similarity", "criteria": "l1"}, "needs a saliency"),
        ({"scorer": "slow"}, "unknown scorer 'slow'"),
        ({"cap": 1.5}, "cap must be in"),
        ({"stepp": 0.1}, "unknown prune setting(s) stepp"),
    ],
)
def test_bad_settings_are_refused(smallcnn, settings, expected):
    with pytest.raises(AutopruneError) as error:
        small_prune(smallcnn, **settings)
    assert expected in str(error.value)


def test_loss_aware_search_without_data_is_refused(smallcnn):
    with pytest.raises(AutopruneError, match="needs data"):
        autoprune.prune(smallcnn, example_inputs=EXAMPLE, progress=False)


# ---------------------------------------------------------------------------------- CLI


def test_cli_prune_writes_the_run_directory(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_DATA_ROOT", str(tmp_path))
    out = tmp_path / "run"
    argv = ["prune", "-m", "resnet20", "-d", "synthetic", "--target-flops", "0.1"]
    argv += ["--step", "0.05", "--criteria", "l1,taylor", "--calib-size", "16", "--out", str(out)]
    argv += ["--recover-every", "0.1", "--recover-steps", "1", "--batch-size", "16", "--distill"]
    code, stdout, err = cli(*argv, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert abs(summary["macs_reduction"] - 0.1) <= TOLERANCE
    assert summary["config"]["distill"] and summary["dataset"] == "synthetic"
    assert (out / "model" / "arch.json").exists()
    history = (out / "history.jsonl").read_text().splitlines()
    assert len(history) == summary["iterations"]
    assert err.count("iter ") == summary["iterations"]  # one log line per iteration on stderr
    code, stdout, _ = cli(*argv, "--resume")
    assert code == 0 and "MACs" in stdout and str(out) in stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--schedule", "fixed", "--criteria", "l1", "--target-flops", "0.95"], "out of reach"),
        (["--schedule", "fixed"], "exactly one criterion"),
        (["--criteria", "l1,nope"], "unknown criterion 'nope'"),
        (["--scorer", "slow"], "unknown scorer 'slow'"),
        ([], "needs data"),
    ],
)
def test_cli_prune_bad_input_gets_one_line_and_exit_code_2(cli, argv, expected):
    code, _, err = cli("prune", "-m", "resnet20", "--no-progress", *argv)
    assert code == 2
    assert expected in err
    assert err.startswith("error: ") and err.count("\n") == 1
