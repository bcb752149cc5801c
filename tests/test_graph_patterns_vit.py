"""Token-stream patterns of timm's ViT-family models that Torch-Pruning's own reshape rules
misread: a batched 5-D attention matmul (nest's blocked tokens, whose broadcast Torch-Pruning
took for a GQA repeat), a class token re-joined by a concat along the token dim (tnt),
channels-last tokens padded to whole windows (twins), and a layer called with a keyword
argument next to a channel split (coat's ``crpe(q, v, size=size)``), and timm's RoPE
attention (whole heads only: the rotation pairs query/key dimensions).
Each small model is checked by ``test_graph_patterns_b.check_prunes`` (masked == pruned, MACs
as predicted, save/load exact).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_graph_patterns_b import check_prunes
from torch import nn

from autoprune.graph import build_graph


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class BlockedAttention(nn.Module):
    """nest: tokens in blocks (B, T, N, C), attention written by hand over 5-D q, k, v."""

    def __init__(self, dim: int = 32, heads: int = 4, blocks: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim, self.blocks = heads, dim // heads, blocks
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, 64)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tokens(self.embed(x))
        b, n, c = x.shape
        x = x.reshape(b, self.blocks, n // self.blocks, c)
        t, n = x.shape[1:3]
        qkv = self.qkv(x).reshape(b, t, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # (B, heads, T, N, head_dim)
        attn = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)
        out = (attn @ v).permute(0, 2, 3, 4, 1).reshape(b, t, n, self.heads * self.head_dim)
        x = x + self.proj(out)
        x = x + self.mlp(x)
        return self.fc(x.mean((1, 2)))


class ClassTokenRejoined(nn.Module):
    """tnt: every block updates only the patch tokens and re-joins the class token by a concat
    along the token dim; Torch-Pruning took each for a channel concat and, deep in the stack,
    could not infer its inputs' widths."""

    def __init__(self, dim: int = 32, depth: int = 12) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.inner = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.mlp = Mlp(dim, 64)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tokens(self.embed(x))
        pixels = x
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for inner in self.inner:
            x = torch.cat([x[:, 0:1], x[:, 1:] + inner(pixels)], dim=1)
        x = x + self.mlp(x)
        return self.fc(x[:, 0])


class WindowPadding(nn.Module):
    """twins' LocallyGroupedAttn: channels-last tokens zero-padded up to whole windows (along
    height and width only) before a linear reads them."""

    def __init__(self, dim: int = 32, window: int = 3) -> None:
        super().__init__()
        self.window = window
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.mix = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, 64)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        h, w = x.shape[1:3]
        pad_w, pad_h = -w % self.window, -h % self.window
        x = x + self.mix(F.pad(x, (0, 0, 0, pad_w, 0, pad_h)))[:, :h, :w]
        x = x + self.mlp(x)
        return self.fc(x.mean((1, 2)))


class PositionalConvs(nn.Module):
    """coat's ConvRelPosEnc: a channel split into depthwise convs, the map's size passed by
    keyword (torch.fx shape propagation feeds placeholders by position only)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.splits = [dim // 2, dim // 2]
        self.convs = nn.ModuleList(nn.Conv2d(s, s, 3, padding=1, groups=s) for s in self.splits)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        h, w = size
        feat = x.transpose(1, 2).reshape(b, c, h, w)
        parts = torch.split(feat, self.splits, dim=1)
        feat = torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], dim=1)
        return x * tokens(feat)


class KeywordSize(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.crpe = PositionalConvs(dim)
        self.mlp = Mlp(dim, 64)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        size = x.shape[2:]
        x = tokens(x)
        x = x + self.crpe(x, size=size)
        x = x + self.mlp(x)
        return self.fc(x.mean(1))


class RopeViT(nn.Module):
    """timm's RoPE attention as DeepSeek-ViT uses it: fused qkv, 'half' rotation layout, no
    prefix tokens (Torch-Pruning's walk through its rotation never ended)."""

    def __init__(self) -> None:
        super().__init__()
        deepseek_vit = pytest.importorskip("timm.models.deepseek_vit")
        torch.manual_seed(0)
        self.vit = deepseek_vit.DeepseekVitClassifier(
            img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4, num_classes=10
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


def check(model: nn.Module, tmp_path: Path, expect: tuple[str, ...]) -> None:
    factory = f"{__file__}:{type(model).__name__}"
    check_prunes(model, 16, tmp_path, expect=expect, factory=factory)


def test_blocked_attention_prunes(tmp_path: Path) -> None:
    check(BlockedAttention(), tmp_path, ("mlp.0",))


def test_class_token_rejoined_prunes(tmp_path: Path) -> None:
    check(ClassTokenRejoined(), tmp_path, ("embed", "mlp.0"))


def test_window_padding_prunes_the_embedding(tmp_path: Path) -> None:
    check(WindowPadding(), tmp_path, ("embed", "mlp.0"))


def test_layer_called_with_keyword_keeps_its_code(tmp_path: Path) -> None:
    graph = build_graph(KeywordSize(), torch.zeros(1, 3, 16, 16))
    assert isinstance(graph.model.crpe, PositionalConvs)  # not rewritten by torch.fx
    assert any("split" in reason for reason in graph.frozen.values()), graph.frozen
    check(KeywordSize(), tmp_path, ("mlp.0",))


def test_rope_attention_prunes_whole_heads(tmp_path: Path) -> None:
    check(
        RopeViT(),
        tmp_path,
        (
            "vit.encoder.blocks.0.attn[heads]",
            "vit.encoder.blocks.0.mlp.fc1",
            "vit.encoder.patch_embed.proj",
        ),
    )
    graph = build_graph(RopeViT(), torch.zeros(1, 3, 16, 16))
    assert not any(g.name.endswith("[head_dim]") for g in graph.groups())
