"""Layers of other libraries made prunable in place, keyed by their "module.QualName".

timm's MobileViT block unfolds patches by folding channels into the batch dimension
(``reshape(B * C * n_h, ...)``), which no dependency tracer can follow, and which breaks
as soon as a channel is gone. Here such a block keeps its submodules and weights and gets a
subclass whose ``forward`` computes the same function with :class:`~autoprune.attention.PatchUnfold`
and :class:`~autoprune.attention.PatchFold` (channel ``c`` of the map is feature ``c`` of
every token). The foreign library is never imported: classes are matched by name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..attention import PatchFold, PatchUnfold
from ..errors import AutopruneError


def _mobilevit_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    x = self.conv_1x1(self.conv_kxk(x))
    size = (x.shape[2], x.shape[3])
    x = self.fold(self.norm(self.transformer(self.unfold(x))), size)
    x = self.conv_proj(x)
    if self.conv_fusion is not None:
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x


ADAPTED = "_autoprune_adapted"  # class attribute of the subclasses made here


@functools.cache
def adapted_class(cls: type[nn.Module], forward: Callable[..., torch.Tensor]) -> type[nn.Module]:
    namespace = {"forward": forward, "__module__": cls.__module__, ADAPTED: True}
    return type(cls.__name__, (cls,), namespace)


def _timm_mobilevit_block(block: nn.Module) -> None:
    ph, pw = block.patch_size
    if ph != pw:
        raise AutopruneError(f"MobileViT blocks with {ph}x{pw} patches are not supported")
    block.unfold, block.fold = PatchUnfold(ph), PatchFold(ph)
    block.__class__ = adapted_class(type(block), _mobilevit_forward)


REWRITES: dict[str, Callable[[nn.Module], None]] = {
    "timm.models.mobilevit.MobileVitBlock": _timm_mobilevit_block,
}


def adapt_foreign_layers(model: nn.Module) -> list[str]:
    """Rewrite every layer :data:`REWRITES` knows (once); the names of those rewritten now."""
    done = []
    for name, module in list(model.named_modules()):
        cls = type(module)
        rewrite = REWRITES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rewrite is not None and not getattr(cls, ADAPTED, False):
            rewrite(module)
            done.append(name)
    return done
