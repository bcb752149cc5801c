"""Transfer learning: head replacement, adapting, transfer runs of the search and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from _small import BRIEF, synthetic_task
from _small import SMALL as SMALL_RUN
from torch import nn

import autoprune
from autoprune.errors import AutopruneError
from autoprune.io import load
from autoprune.models import create_model
from autoprune.models.spec import spec_of
from autoprune.search import PruneConfig
from autoprune.transfer import (
    TRANSFER_ORDERS,
    find_head,
    head_classes,
    load_pretrained,
    needs_transfer,
    replace_head,
)

CLASSES = 7  # the new task's; the zoo models are built for 10
TRAIN, VAL = synthetic_task(num_classes=CLASSES)
# A few iterations, recoveries and adapting steps on a smallcnn at 16 x 16 pixels: seconds.
SMALL = {
    **SMALL_RUN,
    "head_steps": 3,
    "head_training": BRIEF,
    "adapt_steps": 3,
    "adaptation": BRIEF,
}

NO_STEPS = {"head_steps": 0, "adapt_steps": 0}


class PointwiseHead(nn.Module):
    """A SqueezeNet-style classifier: a final 1x1 convolution, then global pooling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).mean((2, 3))


def small_prune(model: nn.Module | str, **kw) -> autoprune.PruneResult:
    settings = {"train_data": TRAIN, "val_data": VAL, **SMALL, **kw}
    return autoprune.prune(model, progress=False, **settings)


@pytest.fixture(scope="module")
def smallcnn() -> nn.Module:
    torch.manual_seed(0)
    return create_model("smallcnn")


@pytest.fixture(scope="module")
def transferred(smallcnn, tmp_path_factory) -> tuple[autoprune.PruneResult, object]:
    out = tmp_path_factory.mktemp("transfer")
    return small_prune(smallcnn, transfer=True, out_dir=out), out


# --------------------------------------------------------------------------------- the head


@pytest.mark.parametrize(
    ("build", "head", "image"),
    [
        (lambda: create_model("smallcnn"), "classifier", (1, 28, 28)),
        (lambda: create_model("resnet20"), "linear", (3, 32, 32)),
        (lambda: create_model("mobilenetv2"), "classifier", (3, 32, 32)),
        (PointwiseHead, "classifier", (3, 8, 8)),
    ],
)
def test_replace_head_keeps_every_other_weight(build, head, image):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert find_head(model) == head and head_classes(model) == 10
    assert replace_head(model, CLASSES) == head
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        if key.startswith(f"{head}."):
            assert value.shape[0] == CLASSES and value.shape[1:] == before[key].shape[1:]
        else:
            assert torch.equal(value, before[key]), key
    assert head_classes(model) == CLASSES
    assert model(torch.randn(2, *image)).shape == (2, CLASSES)


def test_new_head_is_seeded_and_recorded_for_loading():
    a, b = create_model("smallcnn"), create_model("smallcnn")
    replace_head(a, CLASSES, seed=3)
    replace_head(b, CLASSES, seed=3)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert spec_of(a).kwargs["num_classes"] == CLASSES


def test_a_model_without_a_classifier_asks_for_the_head_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(AutopruneError, match="pass the head's name"):
        find_head(model)
    assert replace_head(model, CLASSES, "2") == "2" and model[2].out_channels == CLASSES
    with pytest.raises(AutopruneError, match="a classifier head must be one of"):
        find_head(model, "1")
    with pytest.raises(AutopruneError, match="no layer 'nope'"):
        find_head(model, "nope")


def test_checkpoint_for_other_classes_loads_all_but_the_head(smallcnn, tmp_path):
    path = tmp_path / "smallcnn.pt"
    torch.save(smallcnn.state_dict(), path)
    model = create_model("smallcnn", num_classes=CLASSES)
    assert needs_transfer(model, CLASSES) is False
    load_pretrained(model, path)
    assert head_classes(model) == 10 and needs_transfer(model, CLASSES)
    for key, value in model.state_dict().items():
        assert torch.equal(value, smallcnn.state_dict()[key]), key
    broken = {**smallcnn.state_dict(), "stage1.conv.weight": torch.zeros(1)}
    torch.save(broken, path)
    with pytest.raises(AutopruneError, match="shape mismatches"):
        load_pretrained(create_model("smallcnn", num_classes=CLASSES), path)


# ---------------------------------------------------------------------------- transfer runs


def test_transfer_run_ends_with_the_new_classes_and_loads_back(smallcnn, transferred):
    result, out = transferred
    record = result.summary["transfer"]
    assert record["classes_before"] == 10 and record["classes_after"] == CLASSES
    assert record["head"] == "classifier" and record["order"] == "adapt-then-prune"
    assert (record["head_steps"], record["adapt_steps"]) == (3, 3)
    assert record["accuracy"] is not None and record["adapt_s"] > 0
    assert result.model.classifier.out_features == CLASSES
    assert json.loads((out / "summary.json").read_text())["transfer"] == record
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(load(out / "model").eval()(x), result.model.eval()(x))
        assert load(out / "adapted").eval()(x).shape == (4, CLASSES)
    assert smallcnn.classifier.out_features == 10  # the caller's model is left alone


def test_finished_transfer_run_is_not_redone(smallcnn, transferred, monkeypatch):
    result, out = transferred
    monkeypatch.setattr("autoprune.transfer.adapt", lambda *a, **k: pytest.fail("adapted again"))
    again = small_prune(smallcnn, transfer=True, out_dir=out, resume=True)
    assert again.summary == json.loads(json.dumps(result.summary))
    with pytest.raises(AutopruneError, match="other transfer settings"):
        small_prune(smallcnn, transfer=True, out_dir=out, resume=True, head_steps=4)


def test_checkpoint_with_other_classes_triggers_transfer(smallcnn, tmp_path):
    path = tmp_path / "smallcnn.pt"
    torch.save(smallcnn.state_dict(), path)
    result = small_prune("smallcnn", weights=path, transfer_order="prune-while-adapting")
    record = result.summary["transfer"]
    assert (record["classes_before"], record["classes_after"]) == (10, CLASSES)
    assert record["source"] == str(path) and record["adapt_steps"] == 0
    assert result.summary["config"]["transfer"] is True
    assert result.model(torch.randn(2, 1, 16, 16)).shape == (2, CLASSES)


@pytest.mark.parametrize(
    ("settings", "schedule"),
    [
        ({"transfer": True}, "saliency-then-similarity"),
        ({"transfer": True, "schedule": "auto"}, "auto"),
        ({"transfer": True, "schedule": "fixed", "criteria": "l1"}, "fixed"),
        ({"config": PruneConfig(transfer=True, **NO_STEPS)}, "saliency-then-similarity"),
        ({"config": PruneConfig(transfer=True, schedule="auto", **NO_STEPS)}, "auto"),
        ({}, "saliency-then-similarity"),  # the data's 7 classes are not the head's 10
    ],
)
def test_transfer_runs_default_to_saliency_then_similarity(
    smallcnn, monkeypatch, settings, schedule
):
    seen = {}

    def search(model, example_inputs, config, data, **kw):
        seen.update(config=config, transfer=kw["transfer"])

    monkeypatch.setattr("autoprune.api.run_search", search)
    fast = {**SMALL, **NO_STEPS}
    kw = {k: v for k, v in settings.items() if k != "config"}
    if "config" in settings:
        fast = {}
        kw["config"] = settings["config"]
    autoprune.prune(smallcnn, train_data=TRAIN, progress=False, **fast, **kw)
    assert seen["config"].transfer and seen["config"].schedule == schedule
    assert seen["transfer"]["classes_after"] == CLASSES
    assert PruneConfig().schedule == "auto"


def test_orders_are_a_registry():
    assert TRANSFER_ORDERS.names() == ["adapt-then-prune", "prune-while-adapting"]
    config = PruneConfig(head_steps=5, adapt_steps=9)
    assert TRANSFER_ORDERS.get("adapt-then-prune")(config) == (5, 9)
    assert TRANSFER_ORDERS.get("prune-while-adapting")(config) == (5, 0)
    with pytest.raises(AutopruneError, match="unknown transfer order"):
        PruneConfig(transfer_order="later")


# ---------------------------------------------------------------------------------- CLI


def test_cli_transfers_a_checkpoint_for_other_classes(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_DATA_ROOT", str(tmp_path))
    weights = tmp_path / "resnet20-4.pt"
    torch.manual_seed(0)
    torch.save(create_model("resnet20", num_classes=4).state_dict(), weights)
    argv = ["prune", "-m", "resnet20", "-w", str(weights), "-d", "synthetic"]
    argv += ["--target-flops", "0.05", "--step", "0.05", "--criteria", "taylor,fpgm"]
    argv += ["--calib-size", "16", "--recover-every", "0.1", "--recover-steps", "1"]
    argv += ["--batch-size", "16", "--head-steps", "1", "--adapt-steps", "1", "--no-progress"]
    code, stdout, err = cli(*argv, "--transfer-order", "prune-while-adapting", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["config"]["schedule"] == "saliency-then-similarity"
    assert summary["transfer"]["classes_before"] == 4
    assert summary["transfer"]["classes_after"] == 10
    assert summary["transfer"]["order"] == "prune-while-adapting"
    code, stdout, err = cli(*argv, "--transfer", "--schedule", "auto", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "transferred from" in stdout and "4 -> 10 classes" in stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["config"]["schedule"] == "auto"
