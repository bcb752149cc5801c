"""The model zoo: every registered model builds, trains, scripts; checkpoints load safely."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from autoprune._registry import Entry
from autoprune.errors import AutopruneError, CheckpointError, UnknownNameError
from autoprune.layers import ChannelPadShortcut
from autoprune.models import (
    MODELS,
    create_model,
    list_models,
    load_weights,
    model_info,
    register_model,
)
from autoprune.models.spec import spec_of

SHARED = Path(__file__).resolve().parents[2] / "shared"
AKAMASTER = SHARED / "weights" / "cifar10-resnet-akamaster"
EXACT_TEST = SHARED / "data" / "cifar-10-exact-test-first1017.npz"
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model_info(name).input_size)


# --- every registered model ------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    info = model_info(name)
    model = create_model(name)
    out = model(example(name))
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list_models())
def test_torchscript_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = example(name)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))


@pytest.mark.parametrize("name", list_models())
def test_arch_record_and_num_classes(name: str) -> None:
    model = create_model(name, num_classes=7).eval()
    assert spec_of(model).name == name
    assert spec_of(model).kwargs["num_classes"] == 7
    assert model(example(name, batch=1)).shape == (1, 7)


def test_default_num_classes_is_recorded() -> None:
    assert spec_of(create_model("smallcnn")).to_json() == {
        "name": "smallcnn",
        "kwargs": {"num_classes": model_info("smallcnn").num_classes},
    }


def test_model_info_and_listing() -> None:
    info = model_info("smallcnn")
    assert (info.input_size, info.dataset, info.num_classes) == ((1, 28, 28), "fashion-mnist", 10)
    assert model_info("resnet56").input_size == (3, 32, 32)
    assert list_models("resnet*") == ["resnet110", "resnet20", "resnet32", "resnet44", "resnet56"]
    assert list_models("vgg*") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(lambda num_classes=10: nn.Linear(1, num_classes))


def test_unknown_model_lists_names() -> None:
    with pytest.raises(UnknownNameError, match="resnet56") as e:
        create_model("resnet57")
    assert "unknown model 'resnet57'" in str(e.value)
    with pytest.raises(UnknownNameError):
        model_info("nope")


def test_bad_kwarg_names_the_arguments() -> None:
    with pytest.raises(AutopruneError, match="shortcut"):
        create_model("resnet20", depth=3)
    with pytest.raises(AutopruneError, match="shortcut option 'C'"):
        create_model("resnet20", shortcut="C")


# --- facts about the families ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet20", 0.26e6, 0.28e6),
        ("resnet56", 0.85e6, 0.86e6),
        ("resnet110", 1.72e6, 1.74e6),
        ("vgg16_bn", 14.7e6, 14.8e6),
        ("mobilenetv2", 2.2e6, 2.3e6),
        ("smallcnn", 0.1e6, 0.11e6),
    ],
)
def test_param_counts(name: str, low: float, high: float) -> None:
    assert low <= n_params(create_model(name)) <= high


def test_shortcut_a_is_parameter_free_channel_pad() -> None:
    model = create_model("resnet20").eval()
    assert not [k for k in model.state_dict() if "shortcut" in k]
    pads = [m for m in model.modules() if isinstance(m, ChannelPadShortcut)]
    assert [(m.in_channels, m.out_channels) for m in pads] == [(16, 32), (32, 64)]
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    x = torch.randn(2, 16, 8, 8)
    reference = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(model.layer2[0].shortcut(x), reference)


def test_shortcut_b_projects() -> None:
    a, b = create_model("resnet20"), create_model("resnet20", shortcut="B")
    # Two 1x1 projections with BN: 16->32 and 32->64.
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert isinstance(b.layer3[0].shortcut[0], nn.Conv2d)
    assert "layer2.0.shortcut.0.weight" in b.state_dict()
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenetv2_width_mult_rounds_to_8() -> None:
    model = create_model("mobilenetv2", width_mult=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert convs[0].out_channels == 16
    assert model.classifier.in_features == 1280
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_smallcnn_in_channels() -> None:
    model = create_model("smallcnn", in_channels=3)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)


# --- published checkpoints -------------------------------------------------------------------


def exact_test_images() -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(EXACT_TEST)
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    return (x - mean) / std, torch.from_numpy(data["y"]).long()


@pytest.mark.parametrize(("name", "expected"), [("resnet20", 91.6), ("resnet56", 92.7)])
def test_akamaster_checkpoint_accuracy(name: str, expected: float) -> None:
    found = sorted(AKAMASTER.glob(f"{name}-*.th"))
    if not found or not EXACT_TEST.is_file():
        pytest.skip(f"needs {AKAMASTER}/{name}-*.th and {EXACT_TEST} (the shared/ folder)")
    model = create_model(name, weights=found[0]).eval()
    x, y = exact_test_images()
    with torch.inference_mode():
        correct = sum(
            (model(xb).argmax(1) == yb).sum().item()
            for xb, yb in zip(x.split(512), y.split(512), strict=True)
        )
    accuracy = 100 * correct / len(y)
    assert accuracy == pytest.approx(expected, abs=0.2)


# --- checkpoint loading ----------------------------------------------------------------------


def test_load_unwraps_prefix_and_safetensors(tmp_path: Path) -> None:
    source = create_model("resnet20")
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model_state_dict": wrapped, "epoch": 3}, tmp_path / "ckpt.pt")
    save_file(source.state_dict(), tmp_path / "ckpt.safetensors")
    x = torch.randn(2, 3, 32, 32)
    expected = source.eval()(x)
    for file in ("ckpt.pt", "ckpt.safetensors"):
        model = load_weights(create_model("resnet20"), tmp_path / file).eval()
        assert torch.equal(model(x), expected)


def test_load_without_num_batches_tracked(tmp_path: Path) -> None:
    state = create_model("smallcnn").state_dict()
    torch.save({k: v for k, v in state.items() if "num_batches" not in k}, tmp_path / "old.pt")
    load_weights(create_model("smallcnn"), tmp_path / "old.pt")


def test_remap_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {f"net.{k}": v for k, v in create_model("smallcnn").state_dict().items()}
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: net."):
        load_weights(create_model("smallcnn"), tmp_path / "renamed.pt")
    load_weights(create_model("smallcnn"), tmp_path / "renamed.pt", remap_keys=lambda k: k[4:])
    # A model registered with remap_keys gets it applied by create_model(weights=...).
    entry = MODELS.entry("smallcnn")
    meta = {**entry.meta, "remap_keys": lambda k: k.removeprefix("net.")}
    monkeypatch.setitem(MODELS._entries, "smallcnn_renamed", Entry("x", entry.obj, meta))
    create_model("smallcnn_renamed", weights=tmp_path / "renamed.pt")


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    torch.save(create_model("resnet20").state_dict(), tmp_path / "good.pt")
    blob = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file" * 10)
    for name in ("truncated.pt", "garbage.pt", "empty.pth", "garbage.safetensors", "absent.th"):
        with pytest.raises(CheckpointError, match=f"cannot read .*{name}"):
            load_weights(create_model("resnet20"), tmp_path / name)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "executed"))  # type: ignore[return-value]


def test_pickled_objects_are_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    checkpoint = {"state_dict": create_model("smallcnn").state_dict(), "x": Payload(marker)}
    torch.save(checkpoint, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused: .*evil.pt contains pickled Python"):
        load_weights(create_model("smallcnn"), tmp_path / "evil.pt")
    assert not marker.exists()


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state_dict found"):
        load_weights(create_model("smallcnn"), tmp_path / "list.pt")


def test_mismatching_architecture_names_keys(tmp_path: Path) -> None:
    torch.save(create_model("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(CheckpointError, match="architecture resnet32") as e:
        create_model("resnet32", weights=tmp_path / "r20.pt")
    assert "missing keys: layer1.3.conv1.weight" in str(e.value)
    with pytest.raises(CheckpointError, match=r"linear.weight \(10, 64\) vs model \(100, 64\)"):
        create_model("resnet20", num_classes=100, weights=tmp_path / "r20.pt")
    # Non-strict loading ignores missing keys but never shapes.
    model = load_weights(create_model("resnet32"), tmp_path / "r20.pt", strict=False)
    assert torch.equal(model.conv1.weight, torch.load(tmp_path / "r20.pt")["conv1.weight"])


# --- model files and external libraries ------------------------------------------------------

MODEL_FILE = """
import torch
from torch import nn


def build(num_classes=10, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def not_a_model():
    return 42
"""


def test_model_file_factory(tmp_path: Path) -> None:
    file = tmp_path / "mynet.py"
    file.write_text(MODEL_FILE)
    model = create_model(f"{file}:build", num_classes=3, width=4)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    assert spec_of(model).to_json() == {
        "factory": f"{file}:build",
        "kwargs": {"num_classes": 3, "width": 4},
    }
    with pytest.raises(AutopruneError, match=r"has no function 'missing'.*build"):
        create_model(f"{file}:missing")
    with pytest.raises(AutopruneError, match=r"not a torch.nn.Module"):
        create_model(f"{file}:not_a_model")
    with pytest.raises(AutopruneError, match="unexpected keyword argument 'depth'"):
        create_model(f"{file}:build", depth=3)
    with pytest.raises(AutopruneError, match="model file not found"):
        create_model(f"{tmp_path / 'absent.py'}:build")


def test_module_factory() -> None:
    model = create_model("autoprune.models.smallcnn:smallcnn", num_classes=4)
    assert spec_of(model).factory == "autoprune.models.smallcnn:smallcnn"
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(AutopruneError, match=r"cannot import module 'no_such_pkg.mod'"):
        create_model("no_such_pkg.mod:fn")


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_external_packages_absent(package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = {"torchvision": "tv", "timm": "timm"}[package]
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    with pytest.raises(AutopruneError, match=f"{package} is not importable here.*resnet56"):
        create_model(f"{prefix}:resnet18")


def test_broken_torchvision_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision built for another torch/CUDA fails with errors other than ImportError."""
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text("raise OSError('libcudart.so.12')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    with pytest.raises(AutopruneError, match=r"torchvision is not importable here \(OSError"):
        create_model("tv:resnet18")
