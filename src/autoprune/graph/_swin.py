"""torchvision's Swin attention (``ShiftedWindowAttention`` and its V2) made head-prunable.

torchvision's ``shifted_window_attention`` sizes each head as ``C // num_heads`` with ``C`` the
*input* width, so neither heads nor head dimensions can go without breaking its reshapes. The
layer keeps its submodules and weights but gets a subclass (see :mod:`._foreign`) whose
``forward`` computes the same function from its own ``num_heads`` and ``head_dim``, with the
softmax scale of the unpruned heads, calling ``qkv`` and ``proj`` as layers so their MACs are
counted. Its adapter (:mod:`._attention`) then prunes whole heads (with their relative position
bias, and in V2 their logit scale and bias MLP output) and head dimensions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import AttentionAdapter, HeadShape, register_attention, slice_parameter
from ._foreign import REWRITES, adapted_class
from .groups import Member

_TV = "torchvision.models.swin_transformer"


def _shift_mask(x: torch.Tensor, size: tuple[int, int], window: list[int], shift: list[int]):
    """torchvision's mask that keeps the shifted windows' pieces from attending to each other."""
    mask = x.new_zeros(size)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    mask = mask.view(size[0] // window[0], window[0], size[1] // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _logits(self: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """V1: scaled dot product; V2: cosine similarity with a learnt scale per head and no key
    bias (torchvision zeroes it in every forward, so it is taken back out here)."""
    logit_scale = getattr(self, "logit_scale", None)
    if logit_scale is None:
        return (q * self.scale) @ k.transpose(-2, -1)
    if self.qkv.bias is not None:
        width = self.num_heads * self.head_dim
        k = k - self.qkv.bias[width : 2 * width].view(1, self.num_heads, 1, self.head_dim)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    return attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``shifted_window_attention``, heads sized by ``num_heads x head_dim``."""
    b, h, w, c = x.shape
    wh, ww = self.window_size
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    ph, pw = x.shape[1:3]
    shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows, n, heads = (ph // wh) * (pw // ww), wh * ww, self.num_heads
    x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
    q, k, v = self.qkv(x).reshape(-1, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
    attn = _logits(self, q, k) + self.get_relative_position_bias()
    if sum(shift) > 0:
        mask = _shift_mask(x, (ph, pw), self.window_size, shift)
        attn = (attn.view(b, windows, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
    x = (attn @ v).transpose(1, 2).reshape(-1, n, heads * self.head_dim)
    x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
    x = x.view(b, ph // wh, pw // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _adapt(module: nn.Module) -> None:
    module.head_dim = module.qkv.out_features // 3 // module.num_heads
    module.scale = module.head_dim**-0.5  # the trained one, kept when head dims go
    module.__class__ = adapted_class(type(module), _forward)


REWRITES[f"{_TV}.ShiftedWindowAttention"] = _adapt
REWRITES[f"{_TV}.ShiftedWindowAttentionV2"] = _adapt


@register_attention(f"{_TV}.ShiftedWindowAttention")
class _ShiftedWindowAttention(AttentionAdapter):
    """One ``head_dim`` for q, k and v; the bias table holds one column per head."""

    tied = True
    attributes = ("num_heads", "head_dim")

    def shape(self, m: nn.Module) -> HeadShape:
        return HeadShape(m.num_heads, m.head_dim, m.head_dim)

    def set_shape(self, m: nn.Module, shape: HeadShape) -> None:
        m.num_heads, m.head_dim = shape.num_heads, shape.qk_dim

    def drop_heads(self, m: nn.Module, heads: torch.Tensor) -> None:
        slice_parameter(m, "relative_position_bias_table", 1, heads)

    def matmul_unit(self, m: nn.Module, x: torch.Tensor) -> int:
        """Tokens padded to whole windows, each attending to its window's tokens."""
        (wh, ww), (b, h, w) = m.window_size, x.shape[:3]
        return b * math.ceil(h / wh) * wh * math.ceil(w / ww) * ww * wh * ww


@register_attention(f"{_TV}.ShiftedWindowAttentionV2")
class _ShiftedWindowAttentionV2(_ShiftedWindowAttention):
    """Per head also a logit scale and one output of the MLP that makes the position bias."""

    def drop_heads(self, m: nn.Module, heads: torch.Tensor) -> None:
        slice_parameter(m, "logit_scale", 0, heads)
        last = m.cpb_mlp[-1]
        slice_parameter(last, "weight", 0, heads)
        slice_parameter(last, "bias", 0, heads)
        last.out_features = last.weight.shape[0]

    def head_members(self, name: str, m: nn.Module) -> list[Member]:
        heads = torch.arange(m.num_heads)
        layer = f"{name}.cpb_mlp.{len(m.cpb_mlp) - 1}"
        return [Member(layer, "linear", False, True, m.cpb_mlp[-1], heads, heads)]
