"""Transformer layers written for structured pruning: attention with explicit head shapes, and
patch unfold/fold for CNN-transformer hybrids.

Pruning removes whole heads or the same dimensions from every head, so the head shape is
state, not a constant: :class:`MultiHeadAttention` keeps ``num_heads``, ``head_dim`` (queries
and keys) and ``value_dim`` as attributes that its reshapes read at every call, while its
softmax scale stays the one it was trained with. :class:`PatchUnfold` and :class:`PatchFold`
turn a feature map into tokens and back with reshapes and permutes only, so that channel ``c``
of the map is feature ``c`` of every token: the pruning graph couples them one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Self-attention over ``(batch, tokens, dim)``: ``qkv`` linear, fused attention, ``proj``.

    ``qkv`` rows are ``[q | k | v]``, each ``num_heads`` blocks of ``head_dim`` (``value_dim``
    for v) rows, as in most vision transformers' checkpoints.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        head_dim: int = 8,
        value_dim: int | None = None,
        qkv_bias: bool = False,
        proj_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.value_dim = value_dim or head_dim
        self.scale = head_dim**-0.5  # fixed: pruning head dimensions must not rescale logits
        self.qkv = nn.Linear(dim, num_heads * (2 * head_dim + self.value_dim), bias=qkv_bias)
        self.proj = nn.Linear(num_heads * self.value_dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d, dv = self.num_heads, self.head_dim, self.value_dim
        q, k, v = self.qkv(x).split([h * d, h * d, h * dv], dim=-1)
        q = q.reshape(b, n, h, d).transpose(1, 2)
        k = k.reshape(b, n, h, d).transpose(1, 2)
        v = v.reshape(b, n, h, dv).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * dv))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}"


def _patch_grid(size: int, patch: int) -> int:
    return -(-size // patch)


class PatchUnfold(nn.Module):
    """``(B, C, H, W)`` -> ``(B * ph * pw, N, C)``: one sequence of ``N`` patches per pixel
    position inside a patch (MobileViT). A map whose sides are not multiples of the patch is
    first resized up to the next multiple (bilinear), as timm does."""

    def __init__(self, patch_size: int = 2) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        b, c, height, width = x.shape
        nh, nw = _patch_grid(int(height), p), _patch_grid(int(width), p)
        if nh * p != height or nw * p != width:  # sizes as constants: ONNX's Resize wants them
            x = F.interpolate(x, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        x = x.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1)
        return x.reshape(b * p * p, nh * nw, c)


class PatchFold(nn.Module):
    """The inverse of :class:`PatchUnfold`: tokens back to a ``(B, C, H, W)`` map of ``size``."""

    def __init__(self, patch_size: int = 2) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        p = self.patch_size
        height, width = int(size[0]), int(size[1])
        nh, nw = _patch_grid(height, p), _patch_grid(width, p)
        c = x.shape[-1]
        x = x.reshape(-1, p, p, nh, nw, c).permute(0, 5, 3, 1, 4, 2)
        b = x.shape[0]
        x = x.reshape(b, c, nh * p, nw * p)
        if nh * p != height or nw * p != width:
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        return x
