"""Saving and loading pruned models as arch.json + model.safetensors, without pickle."""

from __future__ import annotations

import fnmatch
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprune import io as aio
from autoprune._registry import Entry
from autoprune.errors import AutopruneError, CheckpointError
from autoprune.graph import build_graph, normalize_model
from autoprune.io.removals import REMOVALS, SavedRemovals
from autoprune.layers import ChannelPadShortcut
from autoprune.models import create_model, list_models, model_info
from autoprune.models.spec import spec_of

# Per family: (layers whose output channels shrink, in order; the layer consuming them).
CHAINS: dict[str, tuple[list[str], str]] = {
    "resnet*": (["layer1.0.conv1", "layer1.0.bn1"], "layer1.0.conv2"),
    "vgg*": (["features.0", "features.1"], "<next conv>"),
    "mobilenetv2": (
        [
            "features.2.conv.0.conv",
            "features.2.conv.0.bn",
            "features.2.conv.1.conv",  # depthwise: its groups shrink too
            "features.2.conv.1.bn",
        ],
        "features.2.conv.2",
    ),
    "smallcnn": (["stage1.conv", "stage1.bn"], "stage2.conv"),
    "mobilevit*": (
        ["mv2.0.conv.0.conv", "mv2.0.conv.0.bn", "mv2.0.conv.1.conv", "mv2.0.conv.1.bn"],
        "mv2.0.conv.2",
    ),
}


def chain_for(name: str, model: nn.Module) -> tuple[list[str], str]:
    found = [chain for pattern, chain in CHAINS.items() if fnmatch.fnmatch(name, pattern)]
    assert found, f"add a shrinkable chain of layers for {name!r} to CHAINS"
    producers, consumer = found[0]
    if consumer == "<next conv>":
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        consumer = convs[1]
    return producers, consumer


def _slice(module: nn.Module, attr: str, keep: torch.Tensor, dim: int) -> None:
    tensor = getattr(module, attr)
    new = tensor.detach().index_select(dim, keep).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, attr, nn.Parameter(new))
    else:
        module.register_buffer(attr, new)


def shrink_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    n = len(keep)
    if isinstance(module, nn.Conv2d):
        _slice(module, "weight", keep, 0)
        if module.bias is not None:
            _slice(module, "bias", keep, 0)
        if module.groups > 1:  # depthwise: one filter per input channel
            module.in_channels = module.groups = n
        module.out_channels = n
    elif isinstance(module, nn.BatchNorm2d):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _slice(module, attr, keep, 0)
        module.num_features = n
    else:
        raise TypeError(type(module))


def shrink_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    _slice(module, "weight", keep, 1)
    if isinstance(module, nn.Linear):
        module.in_features = len(keep)
    else:
        module.in_channels = len(keep)


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a wrong channel or a default buffer shows in the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def shrink(name: str, model: nn.Module) -> list[str]:
    """Remove half the channels of one chain (and edit option-A maps); the layers it changed."""
    producers, consumer = chain_for(name, model)
    width = model.get_submodule(producers[0]).out_channels
    keep = torch.randperm(width, generator=torch.Generator().manual_seed(1))[: width // 2].sort()
    for layer in producers:
        shrink_outputs(model.get_submodule(layer), keep.values)
    shrink_inputs(model.get_submodule(consumer), keep.values)
    changed = [*producers, consumer]
    for layer, m in model.named_modules():
        if isinstance(m, ChannelPadShortcut):  # a map pruning could leave: shifted, with holes
            index = m.index.roll(3)
            index[:2] = -1
            m.set_index(index, m.in_channels)
            changed.append(layer)
    return changed


ZOO_CASES = [(name, {}) for name in list_models()] + [("resnet20", {"shortcut": "B"})]


@pytest.mark.parametrize(("name", "kwargs"), ZOO_CASES, ids=lambda v: str(v or ""))
def test_round_trip_of_a_shrunk_zoo_model(name: str, kwargs: dict, tmp_path: Path) -> None:
    model = randomize(create_model(name, **kwargs))
    x = torch.randn(2, *model_info(name).input_size)
    dense_out = model(x)
    changed = shrink(name, model)
    expected = model(x)
    assert not torch.equal(expected, dense_out)
    aio.save(model, tmp_path / "m", metadata={"top1": 91.6})
    loaded = aio.load(tmp_path / "m").eval()
    assert torch.equal(loaded(x), expected)
    assert (
        spec_of(loaded).to_json()
        == spec_of(model).to_json()
        == {"name": name, "kwargs": loaded_kwargs(name, kwargs)}
    )
    assert loaded.autoprune_metadata == {"top1": 91.6}
    for layer in changed:
        a, b = model.get_submodule(layer), loaded.get_submodule(layer)
        assert repr(a) == repr(b)
        if isinstance(a, ChannelPadShortcut):
            assert torch.equal(a.index, b.index)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def loaded_kwargs(name: str, kwargs: dict) -> dict:
    return {**kwargs, "num_classes": model_info(name).num_classes}


def test_arch_json_is_plain_text_per_layer(tmp_path: Path) -> None:
    model = create_model("resnet20", num_classes=100)
    aio.save(model, tmp_path / "m", metadata={"note": "dense"})
    text = (tmp_path / "m" / "arch.json").read_text()
    record = json.loads(text)
    assert record["name"] == "resnet20"
    assert record["kwargs"] == {"num_classes": 100}
    assert "input_size" not in record  # the registered one applies
    assert record["layers"]["linear"] == {
        "type": "Linear",
        "in_features": 64,
        "out_features": 100,
        "tensors": {"weight": [100, 64], "bias": [100]},
    }
    assert record["layers"]["layer2.0.shortcut"]["in_channels"] == 16
    assert '  "layer1.0.conv1": {"type": "Conv2d"' in text  # one line per layer
    # Metadata is kept across load and a second save.
    again = aio.load(tmp_path / "m")
    aio.save(again, tmp_path / "m2", metadata={"step": 2})
    assert aio.load(tmp_path / "m2").autoprune_metadata == {"note": "dense", "step": 2}


NORM_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.gn = nn.GroupNorm(width // 2, width)
        self.fc1 = nn.Linear(width, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)
        self.enc = nn.Linear(16, 16)
        self.dec = nn.Linear(16, 16)
        self.dec.weight = self.enc.weight  # tied
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.gn(self.conv(x))).mean((2, 3))
        h = self.fc2(self.ln(self.fc1(x)))
        return self.head(self.dec(F.relu(self.enc(h))))


class PadBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.down(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))


class PadNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = PadBlock()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.block(self.conv(x)).mean((2, 3)))
"""


@pytest.fixture
def net_file(tmp_path: Path) -> Path:
    file = tmp_path / "nets.py"
    file.write_text(NORM_NET)
    return file


def test_group_norm_layer_norm_and_tied_weights(net_file: Path, tmp_path: Path) -> None:
    model = create_model(f"{net_file}:Net", num_classes=5).eval()
    keep = torch.tensor([0, 1, 4, 5])  # whole groups of 2: the group norm shrinks to 2 groups
    shrink_outputs_plain(model.conv, keep)
    for attr in ("weight", "bias"):
        _slice(model.gn, attr, keep, 0)
    model.gn.num_channels, model.gn.num_groups = 4, 2
    shrink_inputs(model.fc1, keep)
    keep16 = torch.arange(0, 16, 2)
    shrink_outputs_plain(model.fc1, keep16)
    for attr in ("weight", "bias"):
        _slice(model.ln, attr, keep16, 0)
    model.ln.normalized_shape = (8,)
    shrink_inputs(model.fc2, keep16)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    aio.save(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "arch.json").read_text())["tied"] == {
        "dec.weight": "enc.weight"
    }
    loaded = aio.load(tmp_path / "m", trust_factory=True).eval()
    assert torch.equal(loaded(x), expected)
    assert loaded.dec.weight is loaded.enc.weight
    assert (loaded.gn.num_groups, loaded.gn.num_channels, loaded.ln.normalized_shape) == (
        2,
        4,
        (8,),
    )
    assert (loaded.fc1.in_features, loaded.fc1.out_features, loaded.fc2.in_features) == (4, 8, 8)


def shrink_outputs_plain(module: nn.Module, keep: torch.Tensor) -> None:
    """Output channels of a conv or linear layer, with its bias."""
    _slice(module, "weight", keep, 0)
    _slice(module, "bias", keep, 0)
    if isinstance(module, nn.Linear):
        module.out_features = len(keep)
    else:
        module.out_channels = len(keep)


def test_rewritten_pad_shortcut_round_trip(net_file: Path, tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    model = normalize_model(create_model(f"{net_file}:PadNet"), x).eval()
    (pad,) = [m for m in model.modules() if isinstance(m, ChannelPadShortcut)]
    pad.set_index(pad.index.flip(0), pad.in_channels)
    expected = model(x)
    with pytest.raises(AutopruneError, match="input_size"):
        aio.save(model, tmp_path / "m")
    aio.save(model, tmp_path / "m", input_size=(3, 8, 8))
    loaded = aio.load(tmp_path / "m", trust_factory=True).eval()
    assert torch.equal(loaded(x), expected)
    assert spec_of(loaded) == spec_of(model).with_input_size((3, 8, 8))
    aio.save(loaded, tmp_path / "again")  # the input size travels with the model now
    assert torch.equal(aio.load(tmp_path / "again", trust_factory=True).eval()(x), expected)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


PLAIN = f"{Path(__file__).resolve()}:Plain"


def test_plain_module_needs_a_factory_or_a_fresh_instance(tmp_path: Path) -> None:
    aio.save(Plain(), tmp_path / "plain")
    with pytest.raises(CheckpointError, match=r"cannot rebuild .* model=YourNet"):
        aio.load(tmp_path / "plain")
    model = Plain()
    aio.save(model, tmp_path / "m", factory=PLAIN)
    record = json.loads((tmp_path / "m" / "arch.json").read_text())
    assert (record["factory"], record["kwargs"]) == (PLAIN, {})
    x = torch.randn(3, 4)
    assert torch.equal(aio.load(tmp_path / "m", trust_factory=True)(x), model(x))


def test_factory_code_runs_only_when_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    code = tmp_path / "code.py"
    code.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    aio.save(Plain(), tmp_path / "m", factory=f"{code}:Plain")
    with pytest.raises(CheckpointError, match=r"refused: .* trust_factory=True"):
        aio.load(tmp_path / "m")
    assert not marker.exists()


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aio.save(create_model("smallcnn"), tmp_path / "m")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    for target, attr in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(target, attr, forbidden)
    aio.load(tmp_path / "m")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return aio.save(create_model("smallcnn"), tmp_path / "m")


def test_missing_files(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no arch\.json"):
        aio.load(tmp_path / "absent")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"cannot read .*model.safetensors"):
        aio.load(saved)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"layers": {}}', "\xff\xfe"])
def test_corrupt_arch_json(saved: Path, text: str) -> None:
    (saved / "arch.json").write_text(text, encoding="latin-1")
    with pytest.raises(CheckpointError):
        aio.load(saved)


def test_bad_layer_records(saved: Path) -> None:
    path = saved / "arch.json"
    record = json.loads(path.read_text())
    record["layers"]["stage9.conv"] = record["layers"]["stage1.conv"]
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="lacks"):
        aio.load(saved)
    del record["layers"]["stage9.conv"]
    record["layers"]["stage1.conv"]["type"] = "Linear"
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="saved as a Linear"):
        aio.load(saved)
    record["layers"]["stage1.conv"] = {"type": "Conv2d", "tensors": {"weight": "x"}}
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="malformed layer record"):
        aio.load(saved)


def test_corrupt_or_mismatching_safetensors(saved: Path, tmp_path: Path) -> None:
    weights = saved / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        aio.load(saved)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        aio.load(saved)
    aio.save(create_model("smallcnn", num_classes=3), tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(
        CheckpointError, match=r"classifier.weight \(3, 1152\) vs model \(10, 1152\)"
    ):
        aio.load(saved)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_round_trip_after_pruning_with_the_graph(name: str, tmp_path: Path) -> None:
    x = torch.randn(2, *model_info(name).input_size)
    graph = build_graph(randomize(create_model(name)), x[:1])
    graph.prune({g: torch.arange(0, g.channels, 3) for g in graph.groups()})
    model = graph.model.eval()
    aio.save(model, tmp_path / "m")
    loaded = aio.load(tmp_path / "m").eval()
    assert torch.equal(loaded(x), model(x))
    assert sum(p.numel() for p in loaded.parameters()) < 0.7 * sum(
        p.numel() for p in create_model(name).parameters()
    )


def test_a_registered_removal_is_saved_and_restored_in_rank_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tagged(model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if getattr(m, "tagged", False)]

    def tag(model: nn.Module, names: list[str]) -> None:
        for name in names:
            model.get_submodule(name).tagged = True

    entry = Entry("tagged", SavedRemovals(tagged, tag), {"rank": -1})
    monkeypatch.setitem(REMOVALS._entries, "tagged", entry)
    model = create_model("smallcnn")
    model.stage2.conv.tagged = True
    aio.save(model, tmp_path / "m")
    record = json.loads((tmp_path / "m" / "arch.json").read_text())
    assert [k for k in record if k in REMOVALS] == ["tagged", "removed", "masked"]
    assert record["tagged"] == ["stage2.conv"] and record["removed"] == record["masked"] == []
    assert tagged(aio.load(tmp_path / "m")) == ["stage2.conv"]
