"""autoprune.save / autoprune.load on pruned models of every origin, and the up-front check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from _small import EXAMPLE, SMALL, TRAIN
from torch import nn

import autoprune
from autoprune.errors import AutopruneError, CheckpointError
from autoprune.models import create_model
from autoprune.models.spec import spec_of
from autoprune.search import scorers as search_scorers

FACTORY_CODE = """
from torch import nn


def tiny(num_classes: int = 10, width: int = 8, act=nn.ReLU) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), act(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), act(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )
"""


class Plain(nn.Module):
    """A user's own module: nothing tells autoprune how it was built."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def fixed_prune(
    model: nn.Module | str, size: int, channels: int = 3, target: float = 0.3
) -> nn.Module:
    """``target``: one the model's whole channels can land on (within 0.5 %)."""
    torch.manual_seed(0)
    result = autoprune.prune(
        model,
        example_inputs=torch.zeros(1, channels, size, size),
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=target,
        progress=False,
        device="cpu",
    )
    return result.model.eval()


def assert_round_trip(pruned: nn.Module, path: Path, size: int, channels: int = 3, **load) -> None:
    """Saved with no arguments, loaded back: same outputs, bit for bit; the size recorded."""
    autoprune.save(pruned, path)
    assert json.loads((path / "arch.json").read_text())["input_size"] == [channels, size, size]
    loaded = autoprune.load(path, **load).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_zoo_model(tmp_path: Path) -> None:
    assert_round_trip(fixed_prune("resnet20", 32), tmp_path / "m", 32)


@pytest.mark.parametrize("name", ["tv:mnasnet0_5", "tv:resnet18"])
def test_torchvision_model(name: str, tmp_path: Path) -> None:
    pytest.importorskip("torchvision", reason="torchvision is not importable")
    model = fixed_prune(create_model(name, num_classes=10), 64)
    assert_round_trip(model, tmp_path / "m", 64)


def test_rewritten_model_reloads_where_its_last_maps_are_one_pixel(tmp_path: Path) -> None:
    """ShuffleNetV2's channel splits are rewritten into layers (graph/_fx.py); loading rewrites
    a fresh model, in training mode, at the saved size: 32 px leaves 1x1 maps at batch 1."""
    pytest.importorskip("torchvision", reason="torchvision is not importable")
    model = create_model("tv:shufflenet_v2_x0_5", num_classes=10)
    assert_round_trip(fixed_prune(model, 32), tmp_path / "m", 32)


def test_timm_mobilevit_needs_no_input_size(tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is not importable")
    model = create_model("timm:mobilevit_xxs", num_classes=10)
    assert spec_of(model).input_size == (3, 256, 256)  # timm's own record
    assert_round_trip(fixed_prune(model, 64), tmp_path / "m", 64)  # the size it was pruned at


def test_model_file_factory(tmp_path: Path) -> None:
    code = tmp_path / "mine.py"
    code.write_text(FACTORY_CODE)
    model = fixed_prune(f"{code}:tiny", 16, channels=1, target=0.295)
    assert_round_trip(model, tmp_path / "m", 16, channels=1, trust_factory=True)
    fresh = create_model(f"{code}:tiny")  # or rebuilt from a fresh instance, running no code
    assert_round_trip(model, tmp_path / "m2", 16, channels=1, model=fresh)


def test_plain_module_is_rebuilt_from_a_fresh_instance(tmp_path: Path) -> None:
    model = fixed_prune(Plain(), 16, channels=1, target=0.295)
    autoprune.save(model, tmp_path / "m")
    record = json.loads((tmp_path / "m" / "arch.json").read_text())
    assert record["module"].endswith(".Plain")
    with pytest.raises(CheckpointError, match=r"model=YourNet"):
        autoprune.load(tmp_path / "m")
    assert_round_trip(model, tmp_path / "m", 16, channels=1, model=Plain())
    assert model.conv.out_channels < 12


def test_unsavable_run_fails_before_the_search(tmp_path: Path, monkeypatch) -> None:
    """A factory given a class as an argument cannot be written as JSON: a run with out_dir
    says so before it scores a single candidate."""
    code = tmp_path / "mine.py"
    code.write_text(FACTORY_CODE)
    model = create_model(f"{code}:tiny", act=nn.ReLU)

    def never(*args: object, **kwargs: object) -> list[float]:
        raise AssertionError("a candidate was scored")

    monkeypatch.setattr(search_scorers.FastScorer, "__call__", never)
    start = time.perf_counter()
    with pytest.raises(AutopruneError, match=r"cannot save .*not JSON.*factory="):
        autoprune.prune(model, train_data=TRAIN, out_dir=tmp_path / "run", progress=False, **SMALL)
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "run").exists()
    # The same model without out_dir prunes: the check is about saving only.
    assert (
        autoprune.prune(
            model, example_inputs=EXAMPLE, schedule="fixed", criteria="l1", progress=False
        ).summary["macs_reduction"]
        > 0
    )
