"""A user's own layer types (issue 18): registered with a LayerPruner, or with raw per-channel
parameters and no registration; and reshapes (Linear -> view -> conv, conv -> flatten ->
Linear) counted in the channels that actually go. Every hand-written model must prune exactly
(masked == pruned, MACs as predicted, save/load exact), and land on a fixed target within
0.5 % with no group past its cap."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprune
from autoprune.criteria import select
from autoprune.errors import AutopruneError
from autoprune.graph import PruningGraph, StackedMask, build_graph, mask_channels, mask_pieces
from autoprune.io.export import FORMATS
from autoprune.io.export_check import export_checked
from autoprune.measure import count_macs

README = Path(__file__).resolve().parents[1] / "README.md"
IMAGE = torch.zeros(1, 3, 16, 16)
VECTOR = torch.zeros(1, 16)
CAP = 0.75  # PruneConfig's default


class LowRankConv(nn.Module):
    """A k x k conv factored through ``rank`` channels: ``down`` reads the input channels,
    ``up`` and ``bias`` write the output channels."""

    def __init__(self, cin: int, cout: int, rank: int, k: int = 3) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, cin, k, k) / (cin * k * k) ** 0.5)
        self.up = nn.Parameter(torch.randn(cout, rank) / rank**0.5)
        self.bias = nn.Parameter(torch.randn(cout) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.down, padding=self.down.shape[-1] // 2)
        return F.conv2d(y, self.up[:, :, None, None], self.bias)


@autoprune.register_layer(LowRankConv)
class LowRankConvPruner(autoprune.LayerPruner):
    out_dims: ClassVar = {"up": 0, "bias": 0}
    in_dims: ClassVar = {"down": 1}

    def macs(self, layer: LowRankConv, in_channels: int, out_channels: int) -> int:
        rank, _, kh, kw = layer.down.shape
        return rank * in_channels * kh * kw + out_channels * rank


class ChannelGate(nn.Module):
    """A per-channel gate whose width is an attribute (``channels``) its view reads: the graph
    cannot know to update it, so the layer is registered (with ``out_attribute``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.logit = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.logit).view(1, self.channels, 1, 1)


class LogitPruner(autoprune.LayerPruner):
    out_dims: ClassVar = {"logit": 0}
    per_channel = True


class GatePruner(LogitPruner):
    out_attribute = "channels"


autoprune.register_layer(ChannelGate, GatePruner())


class ShiftConv(nn.Module):
    """A conv of its input plus a learnt per-input-channel shift: zeroing an input channel
    leaves its shift, so its pruner masks by cancelling it (``masked_input``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(cin))
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.shift) @ self.weight.T


@autoprune.register_layer(ShiftConv)
class ShiftConvPruner(autoprune.LayerPruner):
    out_dims: ClassVar = {"weight": 0}
    in_dims: ClassVar = {"weight": 1, "shift": 0}
    channel_dim = -1

    def macs(self, layer: ShiftConv, in_channels: int, out_channels: int) -> int:
        return in_channels * out_channels

    def masked_input(self, layer: ShiftConv, x: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
        return x.index_copy(-1, idxs, (-layer.shift[idxs]).expand(*x.shape[:-1], len(idxs)))


class Squeeze(nn.Module):
    """A 1x1 bottleneck of two sublayers, pruned as one layer (dotted tensor names)."""

    def __init__(self, cin: int, cout: int, width: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, width, 1, bias=False)
        self.expand = nn.Conv2d(width, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(F.relu(self.reduce(x)))


@autoprune.register_layer(Squeeze)
class SqueezePruner(autoprune.LayerPruner):
    out_dims: ClassVar = {"expand.weight": 0, "expand.bias": 0}
    in_dims: ClassVar = {"reduce.weight": 1}

    def macs(self, layer: Squeeze, in_channels: int, out_channels: int) -> int:
        return layer.reduce.out_channels * (in_channels + out_channels)


def squeeze_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Squeeze(16, 24, 4), nn.ReLU(),
        nn.Conv2d(24, 8, 3), nn.Flatten(), nn.Linear(8 * 14 * 14, num_classes),
    )  # fmt: skip


def custom_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        LowRankConv(16, 24, 4),
        ChannelGate(24),
        nn.ReLU(),
        nn.Conv2d(24, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def shift_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), ShiftConv(32, 24), nn.ReLU(), nn.Linear(24, num_classes)
    )


class ScaleBias(nn.Module):
    """Raw per-channel parameters used element-wise on a feature map: no registration."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)
        self.shift = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class UnusedRootParameter(nn.Module):
    """Automatic per-channel parameters, next to a root parameter the forward never uses."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(5, 32))
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.affine = ScaleBias(32)
        self.conv2 = nn.Conv2d(32, 48, 3, padding=1)
        self.conv3 = nn.Conv2d(48, 32, 3, padding=1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.affine(self.conv1(x)))))
        return self.head(F.relu(self.conv3(x)).mean((2, 3)))


class LinearViewConv(nn.Module):
    """A Linear whose 1024 outputs are viewed as 64 channels of 4 x 4: 16 rows per channel."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 1024)
        self.conv = nn.Conv2d(64, 48, 3, padding=1)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x)).view(x.shape[0], -1, 4, 4)
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


class ConvFlattenLinear(nn.Module):
    """A conv flattened into a hidden Linear: 16 inputs of ``fc`` per conv channel."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12 * 16, 64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1)
        return self.head(F.relu(self.fc(x)))


def prune_exactly(factory: str, example: torch.Tensor, tmp_path: Path) -> PruningGraph:
    """Remove the lowest-L1 third of every group; assert masked == pruned (1e-5), the MACs
    saved as predicted and a save/load round trip exact."""
    torch.manual_seed(0)
    model = globals()[factory]().eval()
    dense = count_macs(model, example)
    graph = build_graph(model, example)
    removal = {g.name: select(g, "l1", g.channels // 3) for g in graph.groups()}
    x = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mask_channels(graph, removal):
        masked = graph.model(x)
    predicted = graph.macs() - graph.macs(removal)
    graph.prune(removal)
    with torch.no_grad():
        pruned = graph.model(x)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert dense - count_macs(graph.model, example) == predicted > 0
    autoprune.save(graph.model, tmp_path / "m", factory=f"{__file__}:{factory}")
    loaded = autoprune.load(tmp_path / "m", trust_factory=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned)
    return graph


def test_registered_layers_prune_exactly(tmp_path: Path) -> None:
    graph = build_graph(custom_net().eval(), IMAGE)
    assert {g.name: g.channels for g in graph.groups()} == {"0": 16, "2": 24, "5": 32}
    kinds = {m.layer: m.kind for m in graph.group("2").members}
    assert kinds == {"2": "custom", "3": "channelwise", "5": "conv"}
    model = prune_exactly("custom_net", IMAGE, tmp_path).model
    assert model[2].down.shape == (4, 11, 3, 3)
    assert model[2].up.shape == (16, 4) and model[2].bias.shape == (16,)
    assert model[3].logit.shape == (16,) and model[3].channels == 16


def test_a_registered_layer_of_sublayers_prunes_them_as_one(tmp_path: Path) -> None:
    squeeze = prune_exactly("squeeze_net", IMAGE, tmp_path).model[2]
    assert squeeze.reduce.weight.shape == (4, 11, 1, 1)
    assert squeeze.expand.weight.shape == (16, 4, 1, 1) and squeeze.expand.bias.shape == (16,)


def test_a_layers_own_masking_hook_is_exact_and_never_stacked(tmp_path: Path) -> None:
    graph = prune_exactly("shift_net", VECTOR, tmp_path)
    assert graph.model[2].shift.shape == (22,) and graph.model[2].weight.shape == (16, 22)
    graph = build_graph(shift_net().eval(), VECTOR)
    pieces = mask_pieces(graph, "0", [0, 1])
    with pytest.raises(AutopruneError, match="masked_input cannot be stacked"):
        StackedMask([pieces])


def test_registered_layers_stack_their_trial_removals() -> None:
    torch.manual_seed(0)
    graph = build_graph(custom_net().eval(), IMAGE)
    removals = [{"0": [1, 3]}, {"2": [0, 5, 7]}]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        alone = []
        for removal in removals:
            with mask_channels(graph, removal):
                alone.append(graph.model(x))
        with StackedMask([mask_pieces(graph, r) for r in removals]):
            stacked = graph.model(x.repeat(2, 1, 1, 1))
    torch.testing.assert_close(stacked, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_raw_per_channel_parameters_and_an_unused_root_parameter(tmp_path: Path) -> None:
    graph = prune_exactly("UnusedRootParameter", IMAGE, tmp_path)
    assert graph.model.affine.scale.shape == graph.model.affine.shift.shape == (22,)
    assert graph.model.unused.shape == (5, 32)


def test_reshaped_groups_count_the_channels_that_go() -> None:
    assert build_graph(LinearViewConv().eval(), VECTOR).group("fc").channels == 64
    assert build_graph(ConvFlattenLinear().eval(), IMAGE).group("conv2").channels == 12


@pytest.mark.parametrize(
    ("factory", "example", "target"),
    [
        ("custom_net", IMAGE, 0.3),
        ("custom_net", IMAGE, 0.5),
        ("LinearViewConv", VECTOR, 0.3),
        ("ConvFlattenLinear", IMAGE, 0.3),
        ("ConvFlattenLinear", IMAGE, 0.5),
    ],
)
def test_fixed_target_lands_within_half_a_percent_within_the_caps(
    factory: str, example: torch.Tensor, target: float
) -> None:
    torch.manual_seed(0)
    model = globals()[factory]()
    before = {g.name: g.channels for g in build_graph(model, example).groups()}
    result = autoprune.prune(
        model,
        example_inputs=example,
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=target,
        cap=CAP,
        progress=False,
    )
    reduction = 1 - count_macs(result.model, example) / count_macs(model, example)
    assert abs(reduction - target) <= 0.005
    after = {g.name: g.channels for g in build_graph(result.model, example).groups()}
    assert after.keys() == before.keys()
    for name, channels in before.items():
        assert channels - after[name] <= CAP * channels, name


def test_register_layer_as_call_and_decorator_and_refuses_a_second_registration() -> None:
    class Mine(nn.Module):
        pass

    pruner = autoprune.register_layer(Mine, GatePruner())
    assert isinstance(pruner, GatePruner)
    with pytest.raises(ValueError, match="already registered"):
        autoprune.register_layer(Mine)(GatePruner)
    with pytest.raises(TypeError, match="needs a LayerPruner"):
        autoprune.register_layer(nn.Identity, object())  # type: ignore[arg-type]


class WrongMacs(LowRankConv):
    pass


@autoprune.register_layer(WrongMacs)
class WrongMacsPruner(LowRankConvPruner):
    def macs(self, layer: LowRankConv, in_channels: int, out_channels: int) -> int:
        return in_channels * out_channels  # forgets the rank and the kernel


class WrongDims(LowRankConv):
    pass


@autoprune.register_layer(WrongDims)
class WrongDimsPruner(LowRankConvPruner):
    in_dims: ClassVar = {"down": 0}  # the rank, not the input channels


@pytest.mark.parametrize(
    ("layer", "advice"),
    [
        (WrongMacs, r"layer '1': WrongMacsPruner.macs\(\) gives \d+ MACs .* torch counts"),
        (WrongDims, r"layer '1': 'down' dim 0 counts 4 channels but its input has 8 .* fix Wr"),
    ],
)
def test_a_wrong_declaration_is_refused_with_what_to_fix(layer: type, advice: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), layer(8, 8, 4), nn.Conv2d(8, 4, 1))
    with pytest.raises(AutopruneError, match=advice):
        build_graph(model, torch.zeros(1, 3, 4, 4))


class HiddenToo(nn.Module):
    """Returns its hidden features next to the prediction: no channel can go."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.fc1(x)
        return self.fc2(F.relu(hidden)), hidden


class PredictionOnly(nn.Module):
    """The refusal's advice: a wrapper whose forward returns only the prediction."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def fixed_reduction(model: nn.Module, example: torch.Tensor, target: float) -> float:
    result = autoprune.prune(
        model, example_inputs=example, schedule="fixed", criteria="l1",
        target_macs_reduction=target, progress=False,
    )  # fmt: skip
    return 1 - count_macs(result.model, example) / count_macs(model, example)


def test_a_model_returning_hidden_features_is_refused_with_advice_that_works() -> None:
    torch.manual_seed(0)
    model = HiddenToo()
    with pytest.raises(AutopruneError) as refusal:
        fixed_reduction(model, VECTOR, 0.3)
    message = str(refusal.value)
    assert "no group of this model can lose a channel" in message
    assert "'fc1': its channels are the model's output" in message
    assert "lower the target" not in message and "raise the cap" not in message
    assert "prune a wrapper whose forward returns only the prediction" in message
    assert abs(fixed_reduction(PredictionOnly(model), VECTOR, 0.3) - 0.3) <= 0.005


def test_an_unknown_layer_freezes_its_group_with_advice_that_works() -> None:
    class Gate(nn.Module):
        """Gates normalised across the channels (a softmax mixes them), registered only once
        the refusal's advice is followed."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.logit = nn.Parameter(torch.randn(channels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.softmax(self.logit, 0).view(1, -1, 1, 1)

    def gated() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), Gate(8), nn.Conv2d(8, 4, 3))

    reason = build_graph(gated(), IMAGE).frozen["0"]
    assert reason.startswith("parameter '1.logit' cannot lose channels: it is used in 'softmax'")
    assert reason.endswith("(register Gate with autoprune.register_layer)")
    autoprune.register_layer(Gate, LogitPruner())
    assert [g.name for g in build_graph(gated(), IMAGE).groups()] == ["0"]


@pytest.mark.skipif(not FORMATS.get("onnx").available(), reason="onnxruntime not installed")
def test_a_pruned_registered_layer_exports_to_onnx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    graph = build_graph(custom_net().eval(), IMAGE)
    graph.prune({g.name: select(g, "l1", g.channels // 2) for g in graph.groups()})
    fast = {"batch_sizes": (1,), "repeats": 2, "warmup": 1}
    result = export_checked(graph.model, tmp_path / "m.onnx", IMAGE, **fast)
    assert result.max_abs_diff <= result.tolerance


def readme_block() -> str:
    marker = "<!-- tests/test_custom_layers.py runs this block -->"
    match = re.search(re.escape(marker) + r"\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "the README lost its custom layer example"
    return match.group(1)


def test_readme_custom_layer_example_runs() -> None:
    scope: dict = {"__name__": "readme_custom_layer"}
    exec(compile(readme_block(), str(README), "exec"), scope)  # asserts its claims itself
    assert scope["result"].model[2].up.shape[0] < 32
