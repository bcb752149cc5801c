"""Structural patterns of real architectures, each in a small hand-written model: channel
shuffle, chunk/split then concat, channels-first LayerNorm, window attention, and a MobileViT
written with einops the way public code writes it. Every model must prune (not be refused):
forward at another batch size, masked == pruned, MACs as predicted, save/load exact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprune
from autoprune.criteria import score, select
from autoprune.data.synthetic import load_synthetic
from autoprune.graph import build_graph, mask_channels
from autoprune.io.model_io import load, save
from autoprune.measure.complexity import count_macs
from autoprune.models import create_model
from autoprune.search.candidates import removable

einops = pytest.importorskip("einops")
rearrange = einops.rearrange


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class Head(nn.Module):
    def __init__(self, channels: int, classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------------- models
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleNet(nn.Module):
    """ShuffleNetV2's unit: half the channels pass, half go through a branch, then shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.branch = nn.Sequential(
            conv_bn(8, 12, 1), conv_bn(12, 12, 3, groups=12), conv_bn(12, 8, 1)
        )
        self.mix = conv_bn(16, 16, 1)
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((a, self.branch(b)), dim=1), 2)
        return self.head(self.mix(x))


class ShuffleStage(nn.Module):
    """Three ShuffleNetV2 units in a row: later units' branches hang on fewer and fewer of the
    stage's group channels (each shuffle halves them), as in torchvision's ShuffleNetV2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.branches = nn.ModuleList(
            nn.Sequential(conv_bn(8, 8, 1), conv_bn(8, 8, 3, groups=8), conv_bn(8, 8, 1))
            for _ in range(3)
        )
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for branch in self.branches:
            a, b = x.chunk(2, dim=1)
            x = channel_shuffle(torch.cat((a, branch(b)), dim=1), 2)
        return self.head(x)


class ChunkCat(nn.Module):
    """Two branches on the two halves of a map, concatenated back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.left = conv_bn(8, 6)
        self.right = conv_bn(8, 10)
        self.mix = conv_bn(16, 12, 1)
        self.head = Head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.stem(x).chunk(2, dim=1)
        return self.head(self.mix(torch.cat([self.left(left), self.right(right)], dim=1)))


class SplitCat(nn.Module):
    """Res2Net's hierarchy with unequal pieces: each piece adds the previous branch's output,
    the last piece passes straight into the concat (CSP-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 14)
        self.b1 = conv_bn(4, 4)
        self.b2 = conv_bn(4, 6)
        self.mix = conv_bn(16, 12, 1)
        self.head = Head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1, p2, p3 = self.stem(x).split([4, 4, 6], dim=1)
        y1 = self.b1(p1)
        y2 = self.b2(y1 + p2)
        return self.head(self.mix(torch.cat([y1, y2, p3], dim=1)))


class Rejoined(nn.Module):
    """A map concatenated with itself, chunked and concatenated back, block after block (CoaT,
    CPU-bone): every channel lands in three places, and the walk back and forth through the
    pieces must not multiply the indices it carries (it did: 3 ** blocks, a hang)."""

    def __init__(self, blocks: int = 6) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.convs = nn.ModuleList(conv_bn(24, 8, 1) for _ in range(blocks))
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for conv in self.convs:
            a, b, c = torch.cat([x, x, x], dim=1).chunk(3, dim=1)
            x = x + conv(torch.cat([a, b, c], dim=1))
        return self.head(x)


class SliceAdd(nn.Module):
    """ReXNet: the first channels of the expanded map add the shortcut, selected by bounds
    written in the code (``y[:, :8]``): pruning would shift what they select."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.expand = conv_bn(8, 12, 1)
        self.mix = conv_bn(12, 10, 1)
        self.head = Head(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.expand(x)
        return self.head(self.mix(torch.cat([y[:, :8] + x, y[:, 8:]], dim=1)))


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: permute, normalise the last dim, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """A ConvNeXt block (depthwise conv, permute to channels-last LayerNorm and MLP, permute
    back, residual) and a LayerNorm2d downsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.stem_norm = LayerNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.down_norm = LayerNorm2d(16)
        self.down = nn.Conv2d(16, 24, 2, 2)
        self.head = Head(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(x))
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        x = x + y
        return self.head(self.down(self.down_norm(x)))


class WindowAttention(nn.Module):
    """Swin-style: channels-last map cut into windows by view/permute, attention per window."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window, self.head_dim = heads, window, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        s = self.window
        win = self.norm(x).view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
        win = win.reshape(-1, s * s, c)
        n = win.shape[1]
        qkv = self.qkv(win).reshape(-1, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(-1, n, self.heads * self.head_dim))
        out = out.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + out
        return x + self.mlp(x)


class Swinish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, 2)
        self.block = WindowAttention(16, 2, 4)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.patch(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


# --------------------------------- MobileViT as chinhsuanwu/mobilevit-pytorch writes it
class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class EinopsAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2, dim_head: int = 8) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b p n (h d) -> b p h n d", h=self.heads) for t in qkv)
        attn = (torch.matmul(q, k.transpose(-1, -2)) * self.scale).softmax(dim=-1)
        out = rearrange(torch.matmul(attn, v), "b p h n d -> b p n (h d)")
        return self.to_out(out)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(dim, EinopsAttention(dim)),
                    PreNorm(
                        dim,
                        nn.Sequential(nn.Linear(dim, mlp_dim), nn.SiLU(), nn.Linear(mlp_dim, dim)),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class MV2Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: int = 2) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileViTBlock(nn.Module):
    def __init__(self, dim: int, channel: int, patch: int = 2) -> None:
        super().__init__()
        self.ph = self.pw = patch
        self.conv1 = conv_bn(channel, channel)
        self.conv2 = conv_bn(channel, dim, 1)
        self.transformer = Transformer(dim, 1, 2 * dim)
        self.conv3 = conv_bn(dim, channel, 1)
        self.conv4 = conv_bn(2 * channel, channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        x = self.conv2(self.conv1(x))
        _, _, h, w = x.shape
        x = rearrange(x, "b d (h ph) (w pw) -> b (ph pw) (h w) d", ph=self.ph, pw=self.pw)
        x = self.transformer(x)
        x = rearrange(
            x,
            "b (ph pw) (h w) d -> b d (h ph) (w pw)",
            h=h // self.ph,
            w=w // self.pw,
            ph=self.ph,
            pw=self.pw,
        )
        x = self.conv3(x)
        return self.conv4(torch.cat((x, y), 1))


class EinopsMobileViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8, stride=2)
        self.mv2 = nn.Sequential(MV2Block(8, 8), MV2Block(8, 12, 2))
        self.mvit = MobileViTBlock(16, 12)
        self.conv2 = conv_bn(12, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.mvit(self.mv2(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------------- checks
def _selection(graph, fraction: float) -> dict[str, torch.Tensor]:
    """Every prunable group loses ``fraction`` of its channels, spread over the group."""
    picked = {}
    for g in graph.groups():
        n = min(int(g.channels * fraction), g.channels - 1)
        if n:
            order = torch.randperm(g.channels, generator=torch.Generator().manual_seed(0))
            picked[g.name] = order[:n]
    return picked


def check_prunes(
    model: nn.Module,
    size: int,
    tmp_path: Path,
    *,
    scope: str = "all",
    expect: tuple[str, ...] = (),
    factory: str | None = None,
) -> None:
    """Every group loses 40 % of its channels at once: masked == pruned, MACs as predicted
    (and as FlopCounterMode counts them), forward at batch 3, save/load exact."""
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(1, 3, size, size)
    graph = build_graph(model, x, scope=scope)
    names = [g.name for g in graph.groups()]
    for name in expect:
        assert name in names, (name, names, graph.frozen)
    selection = _selection(graph, 0.4)
    assert selection, graph.frozen
    predicted = graph.macs(selection)
    total_before = count_macs(graph.model, x)
    removed_in_scope = graph.macs() - predicted
    assert removed_in_scope > 0
    x3 = torch.randn(3, 3, size, size)
    with torch.no_grad(), mask_channels(graph, selection):
        masked = graph.model(x3)
    graph.prune(selection)
    with torch.no_grad():
        pruned = graph.model(x3)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert graph.macs() == predicted
    if scope == "all":
        assert count_macs(graph.model, x) == total_before - removed_in_scope
    path = save(graph.model, tmp_path / "m", factory=factory, input_size=(3, size, size))
    loaded = load(path, trust_factory=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x3), pruned, atol=0, rtol=0)


PATTERNS = {
    "shuffle": (ShuffleNet, 16, ("stem.0", "branch.0.0")),
    "chunk_cat": (ChunkCat, 16, ("stem.0", "left.0", "right.0")),
    "split_cat": (SplitCat, 16, ("stem.0", "b2.0")),
    "slice_add": (SliceAdd, 16, ("mix.0",)),
    "rejoined": (Rejoined, 16, ("stem.0",)),
    "layernorm2d": (ConvNeXtish, 16, ("stem", "fc1", "down")),
    "window_attention": (Swinish, 16, ("patch", "block.mlp.1")),
    "einops_mobilevit": (EinopsMobileViT, 32, ("conv1.0", "mvit.conv1.0", "conv2.0")),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_prunes_exactly(pattern: str, tmp_path: Path) -> None:
    cls, size, expect = PATTERNS[pattern]
    check_prunes(cls(), size, tmp_path, expect=expect, factory=f"{__file__}:{cls.__name__}")


@pytest.mark.parametrize("scope", ["stem", "conv", "all"])
def test_einops_mobilevit_prunes_in_every_scope(scope: str, tmp_path: Path) -> None:
    expect = {
        "stem": ("conv1.0",),
        "conv": ("mvit.conv1.0",),
        "all": ("mvit.transformer.layers.0.1.fn.0",),
    }
    factory = f"{__file__}:EinopsMobileViT"
    check_prunes(
        EinopsMobileViT(), 32, tmp_path, scope=scope, expect=expect[scope], factory=factory
    )


def test_channel_shuffle_couples_the_channels_it_interleaves() -> None:
    """Stem channel c and the branch's output channel c sit side by side after the shuffle:
    they go together (so the shuffle of what is left is the old one, restricted), and the
    stem's other half (the branch's input) is pruned in the same group."""
    graph = build_graph(ShuffleNet().eval(), torch.randn(1, 3, 16, 16))
    assert list(graph.frozen) == ["head.fc"]
    stem = graph.group("stem.0")
    members = {m.layer: m for m in stem.members}
    assert {"branch.0.0", "branch.2.0", "mix.0"} <= set(members)
    mix = members["mix.0"]
    assert mix.idxs[torch.isin(mix.group_idxs, torch.tensor([3]))].tolist() == [6, 7]
    graph.prune("stem.0", [3, 12])
    assert graph.model.mix[0].in_channels == 14 and graph.model.branch[0][0].in_channels == 7


def test_a_removal_within_the_limit_leaves_every_layer_of_a_shuffled_stage_a_channel() -> None:
    """The last unit's branch owns channels of only a few of the stage's group channels: the
    most a schedule may take (the cap at 100 %) still leaves each layer one, whatever the
    scores, and the pruned model runs."""
    graph = build_graph(ShuffleStage().eval(), torch.randn(1, 3, 16, 16))
    classes = graph.model.head.fc.out_features
    group = graph.group("stem.0")
    assert group.layer_coverages and group.min_kept > 1
    n = removable(group, group.channels, cap=1.0)
    assert n == group.channels - group.min_kept
    removal = select(group, "l1", n)
    for covered in group.layer_coverages:
        assert not torch.isin(covered, removal).all()
    graph.prune("stem.0", removal)
    out = graph.model(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, classes) and out.isfinite().all()


def test_every_group_has_a_cost_per_channel_where_channels_map_unevenly() -> None:
    """The stem's group owns 2 of mix's input channels per channel on one half of them and 1
    on the other: its cost per channel (which the fixed schedule sorts by) is the average."""
    graph = build_graph(ShuffleNet().eval(), torch.randn(1, 3, 16, 16))
    stem = graph.group("stem.0")
    assert stem.macs_per_channel == stem.macs_saved(torch.arange(stem.channels)) // stem.channels
    assert all(g.macs_per_channel > 0 for g in graph.groups())


def test_channels_selected_by_fixed_bounds_freeze_their_group() -> None:
    graph = build_graph(SliceAdd().eval(), torch.randn(1, 3, 16, 16))
    assert "selects channels by position" in graph.frozen["stem.0"]
    assert [g.name for g in graph.groups()] == ["mix.0"]


def test_attention_written_by_hand_is_frozen_with_the_reason() -> None:
    """Its q/k/v split and head reshapes feed a matmul: the qkv outputs stay, the embedding
    width around the attention (LayerNorm, qkv inputs, output projection) still prunes."""
    graph = build_graph(EinopsMobileViT().eval(), torch.randn(1, 3, 32, 32))
    assert "to_qkv" in graph.frozen["mvit.transformer.layers.0.0.fn.to_qkv"]
    assert "mvit.conv2.0" in [g.name for g in graph.groups()]


# --- timm, where it is installed ------------------------------------------------------------------
def timm_model(name: str) -> nn.Module:
    pytest.importorskip("timm", reason="timm is not installed")
    torch.manual_seed(0)
    return create_model(name, num_classes=10).eval()


@pytest.mark.parametrize("scope", ["stem", "conv", "all"])
@pytest.mark.parametrize("name", ["timm:mobilevit_xxs", "timm:mobilevitv2_050"])
def test_timm_mobilevit_prunes_in_every_scope(name: str, scope: str, tmp_path: Path) -> None:
    check_prunes(timm_model(name), 64, tmp_path, scope=scope, expect=("stem.conv",))


@pytest.mark.parametrize(
    "name", ["timm:swin_tiny_patch4_window7_224", "timm:maxvit_rmlp_pico_rw_256"]
)
def test_window_attention_graphs_build_quickly_and_prune(name: str) -> None:
    """Hundreds of window reshapes: labels, not Torch-Pruning's recursive shape inference."""
    model = timm_model(name)
    size = 256 if name.endswith("256") else 224
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    graph = build_graph(model, x)
    assert time.perf_counter() - start < 30
    groups = {g.name: g for g in graph.groups()}
    mlp = next(n for n in groups if "mlp.fc1" in n)  # inside a block, past the windows
    idxs = torch.arange(0, groups[mlp].channels, 3)
    predicted = graph.macs(mlp, idxs)
    with torch.no_grad(), mask_channels(graph, mlp, idxs):
        masked = graph.model(x)
    graph.prune(mlp, idxs)
    with torch.no_grad():
        torch.testing.assert_close(graph.model(x), masked, atol=1e-4, rtol=1e-4)
    assert graph.macs() == predicted == count_macs(graph.model, x)


@pytest.mark.slow
def test_efficientformer_loss_aware_search_runs_two_iterations() -> None:
    """The fast scorer replays EfficientFormer's modules (a tuple once reached a conv)."""
    model = timm_model("timm:efficientformer_l1")
    data = load_synthetic(Path("."), "train", False, 10, 3, 224, size=16)
    result = autoprune.prune(
        model,
        example_inputs=torch.zeros(1, 3, 224, 224),
        train_data=data,
        criteria=("l1",),
        target_macs_reduction=0.1,
        step=0.05,
        recover_steps=0,
        distill=False,
        calib_size=8,
        progress=False,
    )
    assert len(result.history) >= 2
    assert abs(result.summary["macs_reduction"] - 0.1) <= 0.005


def test_l1_scores_groups_whose_channels_own_unequal_numbers_of_rows() -> None:
    """Res2NeXt: grouped convs on split pieces give some group channels more producer rows
    than others; L1 sums whatever rows a channel owns (the fixed schedule refused the model)."""
    graph = build_graph(timm_model("timm:res2next50"), torch.randn(1, 3, 32, 32))
    uneven = [
        g
        for g in graph.groups()
        if any(
            len(set(torch.bincount(m.group_idxs, minlength=g.channels).tolist())) > 1
            for m in g.members
            if m.out_channels and m.kind == "conv"
        )
    ]
    assert uneven
    for group in uneven:
        scores = score(group, "l1")
        assert scores.shape == (group.channels,) and bool((scores > 0).all())
