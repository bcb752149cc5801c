"""MobileViT and attention pruning: the shared checkpoint, head groups, scopes, MACs, timm."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoprune import api
from autoprune.attention import MultiHeadAttention, PatchFold, PatchUnfold
from autoprune.data import DatasetInfo, ImageData
from autoprune.errors import UnknownNameError
from autoprune.graph import (
    PruningGraph,
    StackedMask,
    build_graph,
    mask_channels,
    mask_pieces,
    stackable,
)
from autoprune.io import load, save
from autoprune.io.export import export_onnx, run_onnx
from autoprune.measure import count_macs
from autoprune.models import Preprocessing, create_model
from autoprune.models.mobilevit import reference_key

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINT = SHARED / "weights" / "cifar10-mobilevit-xxs" / "mobilevit_xxs_cifar10_64px.pth"
EXACT_TEST = SHARED / "data" / "cifar-10-exact-test-first1017.npz"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# One group of every kind in mobilevit_xxs, in model order.
GROUPS = {
    "mv2.1.conv.0.conv": "MobileNetV2 hidden width",
    "mv2.4.conv.2": "MobileNetV2 output, read by a MobileViT block and its fusion concat",
    "mvit.0.conv1.conv": "local 3x3 conv",
    "mvit.0.conv2.conv": "embedding width (residual stream, LayerNorms, attention in/out)",
    "mvit.0.transformer.0.attn[heads]": "whole heads",
    "mvit.0.transformer.0.attn[head_dim]": "query/key dimensions of every head",
    "mvit.0.transformer.0.attn[value_dim]": "value dimensions of every head",
    "mvit.0.transformer.1.mlp.fc1": "MLP hidden width",
    "mvit.0.conv3.conv": "the transformer half of the fusion concat",
    "mvit.0.conv4.conv": "fusion output",
    "final_conv.conv": "the head conv",
}


def randomized(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, so a wrong channel shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def xxs() -> nn.Module:
    """A fresh model: building a graph on it and pruning change it in place."""
    return randomized(create_model("mobilevit_xxs"))


def inputs(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def third(group_channels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(group_channels, generator=g)[: max(1, group_channels // 3)].sort().values


def check_masked_equals_pruned(graph: PruningGraph, name: str, x: torch.Tensor, seed: int) -> None:
    group = graph.group(name)
    idxs = third(group.channels, seed)
    with torch.no_grad(), mask_channels(graph, group, idxs):
        masked = graph.model(x)
    predicted = graph.macs(group, idxs)
    graph.prune(group, idxs)
    with torch.no_grad():
        pruned = graph.model(x)
    torch.testing.assert_close(pruned, masked, rtol=0, atol=1e-5, msg=name)
    assert graph.macs() == predicted, name


# --- the shared checkpoint -------------------------------------------------------------------


def test_reference_keys_map_onto_ours() -> None:
    listing = SHARED / "weights" / "cifar10-mobilevit-xxs" / "state_dict_keys.txt"
    if not listing.is_file():
        pytest.skip(f"needs {listing} (the shared/ folder)")
    keys = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    assert sorted(map(reference_key, keys)) == sorted(create_model("mobilevit_xxs").state_dict())
    assert reference_key("mvit.0.transformer.0.attn.qkv.weight") == (
        "mvit.0.transformer.0.attn.qkv.weight"  # our own names pass unchanged
    )


def test_shared_checkpoint_accuracy_on_exact_test_images() -> None:
    if not (CHECKPOINT.is_file() and EXACT_TEST.is_file()):
        pytest.skip(f"needs {CHECKPOINT} and {EXACT_TEST} (the shared/ folder)")
    model = create_model("mobilevit_xxs", weights=CHECKPOINT).eval()
    data = np.load(EXACT_TEST)
    images = ImageData(
        DatasetInfo("exact", 10, 3, (32, 32), *IMAGENET),
        torch.from_numpy(data["x"]).permute(0, 3, 1, 2),
        torch.from_numpy(data["y"]),
    )
    batches = api.loader_for(model, images, batch_size=512, train=False)  # 64 px, as declared
    assert batches.info.image_size == (64, 64)
    with torch.inference_mode():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    assert 100 * correct / len(images) == pytest.approx(81.9, abs=0.2)


def test_preprocessing_is_declared_and_honoured() -> None:
    model = create_model("mobilevit_xxs")
    assert api.preprocessing(model) == Preprocessing(64, *IMAGENET)
    assert api.preprocessing(model, input_size=96).input_size == 96  # the caller wins
    assert api.preprocessing(create_model("resnet20")) == Preprocessing()  # unchanged CNNs
    assert api.example_input(model).shape == (1, 3, 64, 64)
    grey = ImageData(
        DatasetInfo("grey", 10, 1, (28, 28), (0.5,), (0.5,)),
        torch.full((4, 1, 28, 28), 255, dtype=torch.uint8),
        torch.zeros(4, dtype=torch.long),
    )
    x, _ = next(iter(api.loader_for(model, grey, batch_size=4, train=False)))
    assert x.shape == (4, 3, 64, 64)
    expected = (1 - torch.tensor(IMAGENET[0])) / torch.tensor(IMAGENET[1])
    torch.testing.assert_close(x[0, :, 0, 0], expected)  # the model's statistics, not the data's


# --- the layers --------------------------------------------------------------------------------


def test_patch_unfold_matches_the_reference_layout() -> None:
    x = torch.randn(2, 5, 8, 6)
    tokens = PatchUnfold(2)(x)
    # einops: b d (h ph) (w pw) -> b (ph pw) (h w) d
    reference = x.reshape(2, 5, 4, 2, 3, 2).permute(0, 3, 5, 2, 4, 1).reshape(2, 4, 12, 5)
    torch.testing.assert_close(tokens, reference.reshape(8, 12, 5), rtol=0, atol=0)
    torch.testing.assert_close(PatchFold(2)(tokens, (8, 6)), x, rtol=0, atol=0)
    odd = torch.randn(1, 3, 5, 5)  # resized to 6 x 6 and back
    assert PatchFold(2)(PatchUnfold(2)(odd), (5, 5)).shape == odd.shape


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, num_heads=4, head_dim=8, value_dim=6).eval()
    x = torch.randn(3, 7, 16)
    b, n, h = 3, 7, 4
    q, k, v = attn.qkv(x).split([32, 32, 24], dim=-1)
    q, k = (t.reshape(b, n, h, 8).transpose(1, 2) for t in (q, k))
    v = v.reshape(b, n, h, 6).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, 24))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


# --- MACs -----------------------------------------------------------------------------------------


class ExplicitAttention(nn.Module):
    """Attention written with two matmuls, as the reference code does."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v


def test_macs_include_attention_matmuls() -> None:
    b, n, dim, h, d, dv = 2, 9, 16, 4, 8, 6
    attn = MultiHeadAttention(dim, h, d, dv)
    linears = b * n * dim * h * (2 * d + dv) + b * n * h * dv * dim
    matmuls = b * h * n * n * (d + dv)  # q @ k^T and attn @ v, fused into one SDPA call
    x = torch.randn(b, n, dim)
    assert count_macs(attn, x) == linears + matmuls
    explicit = b * n * dim * 3 * dim + 2 * b * n * n * dim
    assert count_macs(ExplicitAttention(dim), x) == explicit


def test_graph_macs_equal_flop_counter_and_follow_head_pruning(xxs: nn.Module) -> None:
    x = inputs(64)
    graph = build_graph(xxs, x[:1])
    assert graph.macs() == count_macs(graph.model, x[:1])
    attn = graph.model.mvit[2].transformer[0].attn
    unit = 4  # batch 1 x 4 sequences (pixels of a 2 x 2 patch) x 1 token (a 2 x 2 map)
    before = graph.macs()
    graph.prune("mvit.2.transformer.0.attn[heads]", [0])  # one head: 8 q, 8 k, 8 v features
    saved_matmul = unit * (8 + 8)
    saved_linear = unit * 96 * 24 + unit * 8 * 96  # qkv rows and proj columns
    assert before - graph.macs() == saved_matmul + saved_linear
    assert graph.macs() == count_macs(graph.model, x[:1])
    assert (attn.num_heads, attn.qkv.out_features, attn.proj.in_features) == (3, 72, 24)


# --- masking equals pruning, per scope ------------------------------------------------------------


@pytest.mark.parametrize("scope", ["stem", "conv", "all"])
def test_masked_equals_pruned_in_every_scope(xxs: nn.Module, scope: str) -> None:
    x = inputs(32)
    graph = build_graph(xxs, x[:1], scope=scope)
    names = [g.name for g in graph.groups()]
    stem = {n for n in names if n.startswith(("stem.", "mv2."))}
    if scope == "stem":
        assert set(names) == stem and len(stem) == 12  # 7 hidden widths, 5 block outputs
        assert "final_conv.conv" in graph.frozen and "mvit.0.conv1.conv" in graph.frozen
    elif scope == "conv":
        assert not any("[" in n or "mlp" in n for n in names)
        assert "mvit.0.conv2.conv" not in names  # the embedding width reaches attention
        assert "mvit.0.conv1.conv" in names and "final_conv.conv" in names
    else:
        assert set(GROUPS) <= set(names)
    for seed, name in enumerate(n for n in GROUPS if n in names):
        check_masked_equals_pruned(graph, name, x, seed)
    if scope == "all":  # a second round on the shrunk layers, heads and dims together
        assert graph.model.mvit[0].transformer[0].attn.num_heads == 3
        check_masked_equals_pruned(graph, "mvit.0.transformer.0.attn[heads]", x, 9)
        check_masked_equals_pruned(graph, "mvit.0.transformer.0.attn[head_dim]", x, 10)
        assert graph.macs() == count_macs(graph.model, x[:1])


def test_head_masks_stack_on_one_attention_layer(xxs: nn.Module) -> None:
    x = inputs(32)
    graph = build_graph(xxs, x[:1])
    prefix = "mvit.1.transformer.2.attn"
    removal = {
        f"{prefix}[heads]": [1],
        f"{prefix}[head_dim]": [0, 3],
        f"{prefix}[value_dim]": [2, 7],
        "mvit.1.conv2.conv": [5, 6],  # the same layer's input columns
    }
    with torch.no_grad(), mask_channels(graph, removal):
        masked = graph.model(x)
    graph.prune(removal)
    with torch.no_grad():
        pruned = graph.model(x)
    torch.testing.assert_close(pruned, masked, rtol=0, atol=1e-5)
    attn = graph.model.mvit[1].transformer[2].attn
    assert (attn.num_heads, attn.head_dim, attn.value_dim) == (3, 6, 6)
    assert (attn.qkv.in_features, attn.proj.out_features) == (78, 78)


def test_stacked_masks_equal_one_mask_at_a_time(xxs: nn.Module) -> None:
    """Copy j of a stacked batch computes what removal j alone computes, attention included;
    removals that reach a LayerNorm are the ones that do not stack."""
    x = inputs(32)
    graph = build_graph(xxs, x[:1])
    removals = {name: third(graph.group(name).channels, seed) for seed, name in enumerate(GROUPS)}
    pieces = {name: mask_pieces(graph, name, idxs) for name, idxs in removals.items()}
    stacked = [name for name in GROUPS if stackable(pieces[name])]
    assert set(GROUPS) - set(stacked) == {"mvit.0.conv2.conv"}  # the embedding width
    with torch.no_grad():
        with StackedMask([pieces[name] for name in stacked]):
            outputs = graph.model(torch.cat([x] * len(stacked))).chunk(len(stacked))
        for name, out in zip(stacked, outputs, strict=True):
            with mask_channels(graph, name, removals[name]):
                torch.testing.assert_close(out, graph.model(x), rtol=0, atol=1e-5, msg=name)


def test_scope_is_checked_and_cnns_keep_their_groups() -> None:
    x = torch.randn(1, 3, 32, 32)
    resnet = create_model("resnet20")
    default = [g.name for g in build_graph(resnet, x).groups()]
    assert [g.name for g in build_graph(resnet, x, scope="all").groups()] == default
    graph = build_graph(resnet, x, scope="stem")  # no attention: every conv is stem
    assert [g.name for g in graph.groups()] == default
    assert graph.macs() == count_macs(resnet, x) - 64 * 10  # all but the classifier
    with pytest.raises(UnknownNameError, match="stem"):
        build_graph(resnet, x, scope="head")


# --- a pruned model runs, saves, loads, exports ---------------------------------------------------


def test_pruned_heads_save_load_and_export(xxs: nn.Module, tmp_path: Path) -> None:
    x = inputs(32)
    graph = build_graph(xxs, x[:1])
    graph.prune(
        {
            "mvit.0.transformer.0.attn[heads]": [0, 2],
            "mvit.1.transformer.3.attn[head_dim]": [1, 4, 5],
            "mvit.2.transformer.1.attn[value_dim]": [0],
            "mvit.2.transformer.1.mlp.fc1": list(range(0, 384, 3)),
        }
    )
    model = graph.model.eval()
    with torch.no_grad():
        expected = model(x)
    save(model, tmp_path / "model")
    loaded = load(tmp_path / "model").eval()
    assert loaded.mvit[0].transformer[0].attn.num_heads == 2
    assert loaded.mvit[1].transformer[3].attn.head_dim == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    run = run_onnx(export_onnx(loaded, tmp_path / "model.onnx", x[:1]))
    torch.testing.assert_close(run(x), expected, rtol=1e-4, atol=1e-4)


def test_stem_scope_prune_reaches_the_stem_target(cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, err = cli(
        "prune",
        "--model",
        "mobilevit_xxs",
        "--schedule",
        "fixed",
        "--criteria",
        "l1",
        "--scope",
        "stem",
        "--target-flops",
        "0.3",
        "--input-size",
        "32",
        "--no-progress",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    stem, total = summary["scopes"]["stem"], summary["scopes"]["all"]
    assert 0.295 <= stem["macs_reduction"] < 0.35  # fixed plans land on the first one past it
    assert 0 < total["macs_reduction"] < stem["macs_reduction"]
    assert summary["macs_reduction"] == pytest.approx(total["macs_reduction"])
    changed = {w["name"] for w in summary["layers"] if w["after"] != w["before"]}
    assert changed and all(name.startswith(("stem.", "mv2.")) for name in changed)


# --- timm, where it is installed ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "kinds"),
    [
        ("timm:mobilevit_xxs", 64, {"heads"}),
        ("timm:efficientformer_l1", 224, {"heads", "head_dim", "value_dim"}),
    ],
)
def test_timm_hybrids_prune_through_the_same_path(
    name: str, size: int, kinds: set[str], tmp_path: Path
) -> None:
    pytest.importorskip("timm", reason="timm is not installed")
    model = randomized(create_model(name, num_classes=10))
    with torch.no_grad():  # layer scales start at 1e-5 and attention biases at 0
        for pname, p in model.named_parameters():
            if pname.endswith(("gamma", "attention_biases")):
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    graph = build_graph(model, x[:1])
    with torch.no_grad():  # rewritten blocks compute what timm's do
        torch.testing.assert_close(graph.model(x), reference, rtol=1e-5, atol=1e-5)
    assert graph.macs() == count_macs(graph.model, x[:1])
    heads = {g.name.rsplit("[", 1)[1][:-1]: g.name for g in graph.groups() if "[" in g.name}
    assert set(heads) == kinds
    for seed, group in enumerate(heads.values()):
        check_masked_equals_pruned(graph, group, x, seed)
    save(graph.model, tmp_path / "model", input_size=(3, size, size))
    with torch.no_grad():
        torch.testing.assert_close(
            load(tmp_path / "model").eval()(x), graph.model.eval()(x), rtol=0, atol=0
        )


def test_attention_matches_sdpa_reference_of_torch() -> None:
    """Our fused call with an explicit scale equals torch's own multi-head attention."""
    torch.manual_seed(0)
    ours = MultiHeadAttention(16, num_heads=2, head_dim=8, qkv_bias=True).eval()
    theirs = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.qkv.weight)
        theirs.in_proj_bias.copy_(ours.qkv.bias)
        theirs.out_proj.weight.copy_(ours.proj.weight)
        theirs.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x), theirs(x, x, x, need_weights=False)[0], atol=1e-5, rtol=0)
