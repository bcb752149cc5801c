"""Channel groups, exact masking, exact MAC prediction and physical removal."""

from __future__ import annotations

import copy
import io
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.criteria import select
from autoprune.errors import AutopruneError
from autoprune.graph import (
    NORMALIZED_ATTR,
    PruningGraph,
    build_graph,
    mask_channels,
    normalize_model,
)
from autoprune.io import load, save
from autoprune.layers import ChannelPadShortcut
from autoprune.measure import count_macs
from autoprune.models import create_model
from autoprune.models.spec import ModelSpec, copy_model, set_spec, spec_of

# ---------------------------------------------------------------------- models of the test


class LambdaLayer(nn.Module):
    """akamaster's option-A shortcut holder."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PadBlock(nn.Module):
    """Basic block whose option-A shortcut is ``F.pad`` in ``forward`` or in a lambda."""

    def __init__(self, cin: int, cout: int, stride: int, in_lambda: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2
        self.in_lambda = in_lambda
        pad = self.pad
        self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.in_lambda:
            short = self.shortcut(x)
        else:
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)
        return F.relu(out + short)


class PadNet(nn.Module):
    """Not in the zoo: functional option-A shortcuts, a conv inside a residual loop, a
    depthwise conv, a concatenation, a flatten of a 2x2 map and a hidden linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 8, 1)  # x + mix(x): its in and out channels are one group
        self.block1 = PadBlock(8, 16, 2, in_lambda=False)
        self.block2 = PadBlock(16, 32, 2, in_lambda=True)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.dw_bn = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 16, 1)
        self.fuse = nn.Conv2d(48, 24, 3, stride=2, padding=1)
        self.fuse_bn = nn.BatchNorm2d(24)
        self.hidden = nn.Linear(24 * 2 * 2, 20)
        self.head = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.mix(x)
        x = self.block2(self.block1(x))
        x = torch.cat([F.relu(self.dw_bn(self.dw(x))), self.pw(x)], dim=1)
        x = F.relu(self.fuse_bn(self.fuse(x)))
        return self.head(F.relu(self.hidden(torch.flatten(x, 1))))


def randomize_bn(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Random BN affine parameters, then running stats measured on random data (non-trivial,
    and keeping activations of order 1 so an absolute 1e-5 is a meaningful tolerance)."""
    torch.manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.momentum = None  # cumulative average over the calibration batch
            bn.reset_running_stats()
        model.train()(torch.randn(4, *example.shape[1:]))
        for bn in bns:
            bn.momentum = 0.1
    return model.eval()


def make(name: str) -> nn.Module:
    return PadNet() if name == "padnet" else create_model(name)


def example_for(name: str) -> torch.Tensor:
    """One image; 16x16 where the network allows it (VGG's five pools need 32x32)."""
    return torch.randn(1, 3, 32, 32) if name == "vgg16_bn" else torch.randn(1, 3, 16, 16)


def fraction(graph: PruningGraph, share: float, criterion: str = "l1") -> dict:
    return {g: select(g, criterion, int(share * g.channels)) for g in graph.groups()}


# --------------------------------------------------------------------------- option A


def test_resnet56_option_a_has_three_stage_groups_and_27_block_groups():
    # Plain Torch-Pruning 1.6.1 sees akamaster's functional F.pad as an element-wise op that
    # ties stage k to stage k+1 (index for index, while the widths differ): all stages fuse
    # into one group with the classifier's inputs, and pruning it breaks the linear layer.
    # With ChannelPadShortcut's in and out channels as separate dependencies:
    graph = build_graph(create_model("resnet56"), torch.randn(1, 3, 32, 32))
    groups = graph.groups()
    stage = [g for g in groups if not g.name.endswith("conv1") or g.name == "conv1"]
    assert [(g.name, g.channels) for g in stage] == [
        ("conv1", 16),
        ("layer2.0.conv2", 32),
        ("layer3.0.conv2", 64),
    ]
    # every block's conv2 and bn2 of its stage write into the residual stream
    for g, layer in zip(stage, ("layer1", "layer2", "layer3"), strict=True):
        outs = {m.layer for m in g.members if m.out_channels and m.kind == "conv"}
        assert {f"{layer}.{i}.conv2" for i in range(9)} <= outs
    blocks = [g for g in groups if g not in stage]
    assert len(blocks) == 27
    for g in blocks:
        prefix = g.name.removesuffix("conv1")
        assert [(m.layer, m.in_channels, m.out_channels) for m in g.members] == [
            (prefix + "conv1", False, True),
            (prefix + "bn1", True, True),
            (prefix + "conv2", True, False),
        ]
    assert graph.frozen == {"linear": "its channels are the model's output"}


def test_resnet56_losing_40_percent_of_every_group_by_l1_cuts_macs_by_more_than_55_percent():
    model = create_model("resnet56").eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_graph(model, x[:1])
    before = count_macs(model, x[:1])
    selection = fraction(graph, 0.4)
    predicted = graph.macs(selection)
    graph.prune(selection)
    after = count_macs(model, x[:1])
    assert after == predicted == graph.macs()
    assert 1 - after / before >= 0.55
    assert model(x).shape == (2, 10)
    assert model.linear.in_features < 64
    assert model.layer3[0].shortcut.out_channels == model.linear.in_features


# ---------------------------------------------------- masked == pruned, MACs, script, export


@pytest.mark.parametrize("name", ["resnet56", "vgg16_bn", "mobilenetv2", "padnet"])
def test_masking_equals_pruning_and_macs_match_the_prediction(name: str):
    torch.manual_seed(1)
    example = example_for(name)
    model = randomize_bn(make(name), example)
    graph = build_graph(model, example)
    model = graph.model
    x = torch.randn(2, *example.shape[1:])
    with torch.no_grad():
        dense = model(x)
        selection = {
            g: torch.randperm(g.channels)[: max(1, g.channels * 3 // 10)] for g in graph.groups()
        }
        predicted = graph.macs(selection)
        with mask_channels(graph, selection):
            masked = model(x)
        assert torch.equal(model(x), dense)  # the mask is gone
        assert (masked - dense).abs().max() > 1e-2  # and it did something
        graph.prune(selection)
        pruned = model(x)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=0)
    assert count_macs(model, example) == predicted == graph.macs()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), pruned, atol=1e-6, rtol=0)


def test_padnet_pruned_exports_to_onnx_with_the_same_outputs():
    ort = pytest.importorskip("onnxruntime")
    example = torch.randn(1, 3, 16, 16)
    graph = build_graph(randomize_bn(PadNet(), example), example)
    graph.prune(fraction(graph, 0.5))
    model, x = graph.model, torch.randn(2, 3, 16, 16)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
        )
    (onnx_out,) = ort.InferenceSession(buffer.getvalue()).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), model(x), atol=1e-5, rtol=0)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    example = torch.randn(1, 3, 16, 16)
    graph = build_graph(randomize_bn(PadNet(), example), example)
    graph.prune(fraction(graph, 0.4))
    save(graph.model, tmp_path / "pruned", factory=f"{__file__}:PadNet", input_size=(3, 16, 16))
    loaded = load(tmp_path / "pruned", trust_factory=True).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), graph.model(x))
    assert [g.channels for g in build_graph(loaded, example).groups()] == [
        g.channels for g in graph.groups()
    ]


class TopLevelPadNet(nn.Module):
    """The option-A pad in the model's own forward: normalizing replaces the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.stem(x)[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        return self.head(x.mean((2, 3)))


def build_top_level_pad_net() -> nn.Module:
    return TopLevelPadNet()


def test_a_rewritten_top_level_model_keeps_how_it_was_built(tmp_path):
    example = torch.randn(1, 3, 16, 16)
    model = TopLevelPadNet()
    spec = ModelSpec(factory=f"{__file__}:build_top_level_pad_net")
    set_spec(model, spec)
    normalized = normalize_model(model, example)
    assert normalized is not model
    assert spec_of(normalized) == spec
    assert spec_of(copy_model(normalized)) == spec
    graph = build_graph(normalized, example)
    graph.prune(fraction(graph, 0.5))
    save(graph.model, tmp_path / "m", input_size=(3, 16, 16))
    loaded = load(tmp_path / "m", trust_factory=True).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), graph.model.eval()(x), atol=0, rtol=0)


def test_macs_saved_is_exact_per_group_even_when_a_layer_is_on_both_sides():
    example = torch.randn(1, 3, 16, 16)
    base = PadNet().eval()
    graph = build_graph(copy.deepcopy(base), example)
    mix = next(g for g in graph.groups() if any(m.layer == "mix" for m in g.members))
    assert {(m.in_channels, m.out_channels) for m in mix.members if m.layer == "mix"} == {
        (True, False),
        (False, True),
    }
    for g in graph.groups():
        n = g.channels // 2
        fresh = build_graph(copy.deepcopy(base), example)
        before = count_macs(fresh.model, example)
        fresh.prune(g.name, list(range(n)))
        assert before - count_macs(fresh.model, example) == g.macs_saved(n), g.name
    assert mix.macs_saved(2) != 2 * mix.macs_per_channel  # quadratic in the loop conv


def test_pruned_model_trains_and_the_graph_serves_the_next_step():
    example = torch.randn(1, 3, 16, 16)
    graph = build_graph(randomize_bn(PadNet(), example), example)
    graph.prune(fraction(graph, 0.25))
    model = graph.model.train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model.eval()
    # second step: the refreshed groups mask and prune exactly again
    selection = fraction(graph, 0.25, "l2")
    with torch.no_grad(), mask_channels(graph, selection):
        masked = model(x)
    predicted = graph.macs(selection)
    graph.prune(selection)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=1e-5, rtol=0)
    assert count_macs(model, example) == predicted


# --------------------------------------------------------------------------------- masks


def test_masks_stack_overlap_and_undo_exactly():
    example = torch.randn(1, 3, 16, 16)
    graph = build_graph(randomize_bn(PadNet(), example), example)
    model, x = graph.model, torch.randn(2, 3, 16, 16)
    g = graph.groups()[0]
    with torch.no_grad():
        dense = model(x)
        with mask_channels(graph, g, [0, 1]):
            with mask_channels(graph, {g.name: [1, 2]}) as inner:
                both = model(x)
                inner.remove()
                inner.remove()  # idempotent
            only_first = model(x)
        with mask_channels(graph, g, [0, 1, 2]):
            assert torch.equal(model(x), both)
        with mask_channels(graph, g, [0, 1]):
            assert torch.equal(model(x), only_first)
        assert torch.equal(model(x), dense)


def test_layernorm_is_masked_exactly():
    model = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(3, 12)
    graph = build_graph(model, x[:1])
    (g,) = graph.groups()
    assert {m.layer: m.kind for m in g.members} == {"0": "linear", "1": "layernorm", "3": "linear"}
    with torch.no_grad(), mask_channels(graph, g, [3, 7, 8]):
        masked = model(x)
    graph.prune(g, [3, 7, 8])
    torch.testing.assert_close(model(x), masked, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- F.pad rewriting


@pytest.mark.parametrize("in_lambda", [False, True])
def test_normalize_rewrites_functional_option_a_into_channel_pad_shortcuts(in_lambda: bool):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PadBlock(8, 16, 2, in_lambda)).eval()
    x = torch.randn(2, 3, 8, 8)
    dense = model(x)
    out = normalize_model(model, x[:1])
    assert out is model  # the pad sat in a child: rewritten in place
    rewritten = "1.shortcut" if in_lambda else "1"
    assert getattr(model, NORMALIZED_ATTR) == (rewritten,)
    pads = [m for m in model.modules() if isinstance(m, ChannelPadShortcut)]
    assert [(p.in_channels, p.out_channels, p.stride) for p in pads] == [(8, 16, 2)]
    assert not any(m.training for m in model.modules())  # new layers join the model's mode
    assert torch.equal(model(x), dense)
    assert model[1].conv1 is not None and "1.conv1.weight" in model.state_dict()
    assert normalize_model(model, x[:1]) is model  # idempotent


def test_zoo_models_are_left_untouched_by_normalize():
    model = create_model("resnet20")
    assert normalize_model(model) is model
    assert not hasattr(model, NORMALIZED_ATTR)


def test_a_pad_in_the_models_own_forward_makes_a_new_module():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.pad(self.conv(x), (0, 0, 0, 0, 1, 3))

    model, x = Net(), torch.randn(1, 3, 4, 4)
    out = normalize_model(model, x)
    assert out is not model and getattr(out, NORMALIZED_ATTR) == ("",)
    assert getattr(copy.deepcopy(out), NORMALIZED_ATTR) == ("",)
    assert torch.equal(out(x), model(x))


# ----------------------------------------------------------------------------- bad input


class Scale(nn.Module):
    """A layer with its own per-channel parameter, applied element-wise."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def scale_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), Scale(8), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)
    )


def test_a_layer_with_its_own_per_channel_parameter_prunes_or_can_be_ignored():
    graph = build_graph(scale_net(), torch.randn(1, 3, 9, 9))
    assert [g.name for g in graph.groups()] == ["0", "2"]
    graph.prune("0", [0, 1])
    assert graph.model[1].gain.shape == (1, 6, 1, 1)
    graph = build_graph(scale_net(), torch.randn(1, 3, 9, 9), ignored_layers=["1"])
    assert [g.name for g in graph.groups()] == ["2"]  # the channels around the Scale stay
    assert graph.frozen["0"] == "ignored layer '1'"


class Untraceable(nn.Module):
    """F.pad behind data-dependent control flow: torch.fx cannot rewrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > -1e9:
            y = F.pad(y, (0, 0, 0, 0, 2, 2))
        return self.head(self.conv2(y) + y)


def test_an_op_that_breaks_channel_coupling_freezes_the_groups_through_it():
    x = torch.randn(1, 3, 6, 6)
    graph = build_graph(Untraceable(), x)
    assert graph.groups() == []  # the pad ties conv, conv2 and head's inputs into one group
    assert re.search(r"after layer 'conv' cannot be followed through 'pad'", graph.frozen["conv"])
    graph = build_graph(Untraceable(), x, ignored_layers=["conv"])
    assert graph.frozen["conv"] == "ignored layer 'conv'"


def test_pruning_refuses_emptying_a_group_repeats_out_of_range_and_stale_groups():
    graph = build_graph(create_model("resnet20"), torch.randn(1, 3, 32, 32))
    g = graph.group("layer1.0.conv1")
    with pytest.raises(
        AutopruneError, match=r"16 of 16 channels would leave group 'layer1.0.conv1'"
    ):
        graph.prune(g, range(16))
    with pytest.raises(AutopruneError, match="repeat"):
        graph.prune(g, [1, 1])
    with pytest.raises(AutopruneError, match=r"\[0, 16\)"):
        graph.prune(g, [16])
    with pytest.raises(AutopruneError, match="selected twice"):
        graph.prune({g: [0], "layer1.0.conv1": [1]})
    with pytest.raises(AutopruneError, match="model's output"):
        graph.group("linear")
    with pytest.raises(AutopruneError, match="would leave group"):
        mask_channels(graph, g, range(16))
    graph.prune(g, range(15))
    assert graph.group("layer1.0.conv1").channels == 1
    with pytest.raises(AutopruneError, match="before the last prune"):
        graph.prune(g, [0])
    with pytest.raises(AutopruneError, match=r"would leave group 'layer1\.0\.conv1' empty"):
        graph.prune("layer1.0.conv1", [0])
