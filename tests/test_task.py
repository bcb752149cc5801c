"""The task: a user's Dataset/DataLoader, tuple and dict outputs, a custom loss, devices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _small import SMALL, TRAIN, VAL
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.api import example_input, loader_for
from autoprune.data import ImageData
from autoprune.errors import AutopruneError
from autoprune.task import Task, default_adapter

TOLERANCE = 0.005


class Net(nn.Module):
    """A small CNN whose forward returns a tensor, a tuple or a dict, as models in the wild do."""

    def __init__(self, output: str = "tensor", out_features: int = 10) -> None:
        super().__init__()
        self.output = output
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, out_features)

    def forward(self, x: torch.Tensor) -> object:
        y = self.head(self.body(x))
        if self.output == "tuple":
            return y, x.mean()
        if self.output == "dict":
            return {"aux": x.mean(), "logits": y}
        return y


def as_tensors(data: ImageData) -> TensorDataset:
    """The images as a user has them: float tensors, with integer labels."""
    return TensorDataset(data.images.float() / 255, data.labels)


USER_TRAIN, USER_VAL = as_tensors(TRAIN), as_tensors(VAL)


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def copy_as(model: Net, output: str) -> Net:
    other = Net(output, model.head.out_features)
    other.load_state_dict(model.state_dict())
    return other


def trace(result: autoprune.PruneResult) -> list[tuple]:
    return [(h["group"], h["removed"], h["loss"], h["loss_recovered"]) for h in result.history]


# ----------------------------------------------------------------------------- the Task


def test_default_adapter_reads_tensors_tuples_and_dicts():
    y = torch.randn(2, 3)
    assert default_adapter(y) is y
    assert default_adapter((y, 1)) is y
    assert default_adapter({"aux": 0, "logits": y}) is y
    assert default_adapter({"out": [y]}) is y
    with pytest.raises(AutopruneError, match="output_adapter"):
        default_adapter({"features": y})


def test_per_sample_and_mean_losses_agree():
    pred, target = torch.randn(6, 2), torch.randn(6, 2)
    expected = ((pred - target) ** 2).mean(1)
    for task in (
        Task(F.mse_loss),
        Task(lambda p, t: ((p - t) ** 2).mean(1)),
        Task(lambda p, t: F.mse_loss(p, t, reduction="none")),
    ):
        torch.testing.assert_close(task.losses(pred, target), expected)
        torch.testing.assert_close(task.loss_sum(pred, target), expected.sum())
        torch.testing.assert_close(task.mean_loss(pred, target), expected.mean())
    with pytest.raises(AutopruneError, match="one loss per sample"):
        Task(lambda p, t: p.sum(0)).losses(pred[:3], target[:3])
    dense, labels = torch.randn(2, 3, 4, 4), torch.randint(3, (2, 4, 4))  # segmentation
    per_pixel = F.cross_entropy(dense, labels, reduction="none")
    torch.testing.assert_close(Task().losses(dense, labels), per_pixel.mean((1, 2)))
    torch.testing.assert_close(Task().mean_loss(dense, labels), per_pixel.mean())
    assert Task().correct(dense, labels) is None  # top-1 is for one label per sample
    mean = Task(F.mse_loss)
    assert mean.correct(pred, target) is None  # a custom loss has no accuracy unless given
    assert Task().correct(torch.eye(3), torch.tensor([0, 1, 0])) == 2


# ---------------------------------------------------------------------------- user data


def test_evaluate_takes_a_dataset_and_a_dataloader(net):
    x, y = USER_VAL.tensors
    with torch.no_grad():
        logits = net.eval()(x)
    accuracy = 100.0 * (logits.argmax(1) == y).float().mean().item()
    loss = F.cross_entropy(logits, y).item()
    for data in (USER_VAL, DataLoader(USER_VAL, batch_size=10)):
        result = autoprune.evaluate(net, data, device="cpu", batch_size=16)
        assert result.samples == len(y)
        assert result.accuracy == pytest.approx(accuracy)
        assert result.loss == pytest.approx(loss, rel=1e-5)


def test_loss_aware_search_on_a_dataset_and_a_dataloader(net):
    result = autoprune.prune(
        net,
        train_data=USER_TRAIN,
        val_data=DataLoader(USER_VAL, batch_size=16),
        progress=False,
        **SMALL,
    )
    summary = result.summary
    assert summary["macs_reduction"] >= SMALL["target_macs_reduction"] - TOLERANCE
    assert summary["dataset"] == "TensorDataset"
    assert any(h["loss_recovered"] is not None for h in result.history)  # recovery trained
    after = autoprune.evaluate(result.model, USER_VAL, device="cpu")
    assert summary["pruned"]["accuracy"] == pytest.approx(after.accuracy)
    assert summary["pruned"]["loss"] == pytest.approx(after.loss, rel=1e-5)


def test_fixed_schedule_takes_its_example_input_from_the_data(net):
    result = autoprune.prune(
        net,
        calib_data=DataLoader(USER_TRAIN, batch_size=32),
        schedule="fixed",
        criteria="l1",
        allocation="global",
        target_macs_reduction=0.4,
        progress=False,
    )
    assert result.summary["macs_reduction"] >= 0.4 - TOLERANCE
    assert result.summary["baseline"]["calib_loss"] is not None
    assert result.model(USER_VAL.tensors[0][:3]).shape == (3, 10)


def test_train_takes_a_dataset(net):
    _, result = autoprune.train(
        copy_as(net, "dict"),
        USER_TRAIN,
        val_data=USER_VAL,
        config=autoprune.TrainConfig(epochs=1, batch_size=32, channels_last=False, progress=False),
        device="cpu",
    )
    record = result.history[0]
    assert record.steps == len(USER_TRAIN) // 32
    assert record.train_accuracy is not None and record.val_loss is not None


# ------------------------------------------------------------------------------ outputs


def test_tuple_and_dict_outputs_prune_like_a_tensor_output(net):
    """Scores, Taylor saliency and distilled recovery read the adapted output: every loss of
    the run is the plain model's."""
    runs = {
        output: autoprune.prune(
            copy_as(net, output),
            train_data=USER_TRAIN,
            criteria=("l1", "taylor"),
            progress=False,
            **{**SMALL, "target_macs_reduction": 0.15},
        )
        for output in ("tensor", "tuple", "dict")
    }
    assert runs["tensor"].summary["config"]["distill"]  # recovery distils from the unpruned
    assert any(h["loss_recovered"] is not None for h in runs["dict"].history)
    assert trace(runs["tuple"]) == trace(runs["tensor"])
    assert trace(runs["dict"]) == trace(runs["tensor"])


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> dict:
    """A regression head pruned with MSE, one search step, its run directory written."""
    torch.manual_seed(0)
    model = Net(out_features=2)
    x = USER_TRAIN.tensors[0][:64]
    targets = torch.randn(64, 2)
    data = TensorDataset(x, targets)
    out = tmp_path_factory.mktemp("regression")
    result = autoprune.prune(
        model,
        train_data=data,
        val_data=data,
        loss_fn=F.mse_loss,
        out_dir=out,
        progress=False,
        **{**SMALL, "target_macs_reduction": 0.05, "recover_steps": 0, "calib_size": 64},
    )
    return {"model": model, "x": x, "targets": targets, "result": result, "out": out}


def test_custom_loss_drives_the_search(regression):
    """The chosen candidate's loss is the MSE of the model it leaves, computed by hand; the
    summary reports the loss and no accuracy."""
    result, x, targets = regression["result"], regression["x"], regression["targets"]
    assert len(result.history) == 1
    with torch.no_grad():
        manual = F.mse_loss(result.model.eval()(x), targets).item()
        before = F.mse_loss(regression["model"].eval()(x), targets).item()
    assert result.history[0]["loss"] == pytest.approx(manual, rel=1e-5)
    assert result.summary["pruned"]["calib_loss"] == pytest.approx(manual, rel=1e-5)
    assert result.summary["baseline"]["loss"] == pytest.approx(before, rel=1e-5)
    assert result.summary["baseline"]["accuracy"] is None
    assert result.summary["pruned"]["accuracy"] is None


def test_custom_loss_run_reports_the_loss_and_saves_the_plain_model(regression):
    result, out = regression["result"], regression["out"]
    markdown, _ = autoprune.write_report(out)
    text = markdown.read_text()
    assert "validation loss" in text and "top-1 accuracy" not in text
    loaded = autoprune.load(out / "model", model=Net(out_features=2)).eval()
    x = regression["x"][:4]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


def test_task_and_its_shortcuts_are_exclusive(net):
    with pytest.raises(AutopruneError, match="either task= or loss_fn="):
        autoprune.prune(net, train_data=USER_TRAIN, task=Task(), loss_fn=F.mse_loss)


# ------------------------------------------------------------------------------ devices


def test_user_data_and_example_inputs_follow_the_model_to_its_device(net):
    """A model on another device (meta stands in for CUDA) gets its batches, its calibration
    samples and its example input there, from data on the CPU."""
    model = Net().to("meta")
    x, y = next(iter(loader_for(model, USER_TRAIN, batch_size=8, train=True)))
    assert x.device.type == y.device.type == "meta" and x.shape == (8, 1, 16, 16)
    assert example_input(model, USER_TRAIN).device.type == "meta"
    assert example_input(model, VAL).device.type == "meta"
    moved = autoprune.api.follow((torch.zeros(1), {"a": torch.ones(2)}), model)
    assert moved[0].device.type == moved[1]["a"].device.type == "meta"
