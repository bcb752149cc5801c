"""Trial removal: make the model compute exactly what it would without some channels, in place.

A removed channel's only effect on the output runs through the layers that *read* it and mix
it into other channels: convs, linears, shortcuts (a group's consumers). Everything between
its producers and those consumers (BatchNorm, activations, depthwise convs, residual adds,
concatenations) is per channel. So zeroing the channel at the input of every consumer is
exactly removal, whatever the producers, biases or BatchNorm statistics put into it; no
weights are touched, no copy is made. The one per-channel layer that is not per channel is
LayerNorm (its statistics run across channels): it is recomputed on the kept channels; layers
whose statistics see all their inputs otherwise (weight standardisation, a one-group
GroupNorm) are run as they would be pruned (see ``._grouped``). Inside
an attention layer the q/k/v rows of a head group are zeroed where ``qkv`` outputs them (see
:mod:`._attention`): a zero head or query/key dimension contributes nothing.

Masks stack: several groups, or the same group twice, can be masked at once; every layer gets
one hook that applies the union of what is masked in it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ._grouped import run_as_pruned
from .custom import layer_pruner

if TYPE_CHECKING:
    from .groups import ChannelGroup
    from .pruning_graph import PruningGraph


Site = tuple[nn.Module, str]  # (layer, where: "input", "output", "layernorm" or "pruned")
Piece = tuple[Site, torch.Tensor, str]  # (site, channel indices there, member kind)


class MaskState:
    """The channels masked at each site right now, and the hooks that apply them."""

    def __init__(self) -> None:
        self._stacks: dict[Site, list[torch.Tensor]] = {}
        self._merged: dict[Site, torch.Tensor] = {}
        self._hooks: dict[Site, torch.utils.hooks.RemovableHandle] = {}

    @property
    def active(self) -> bool:
        return bool(self._stacks)

    def push(self, site: Site, idxs: torch.Tensor, kind: str) -> None:
        stack = self._stacks.setdefault(site, [])
        stack.append(idxs)  # already on the module's device: hooks never copy
        self._merge(site)
        if site not in self._hooks:
            module, where = site
            dim = site_dim(module, kind)
            if where == "layernorm":
                self._hooks[site] = module.register_forward_hook(self._layernorm_hook)
            elif where == "pruned":
                self._hooks[site] = module.register_forward_hook(self._pruned_hook)
            elif where == "output":
                self._hooks[site] = module.register_forward_hook(self._zero_output(dim))
            else:
                self._hooks[site] = module.register_forward_pre_hook(self._zero_input(dim))

    def pop(self, site: Site, idxs: torch.Tensor) -> None:
        stack = self._stacks[site]
        del stack[next(i for i, t in enumerate(stack) if t is idxs)]
        if stack:
            self._merge(site)
            return
        del self._stacks[site], self._merged[site]
        self._hooks.pop(site).remove()

    def _merge(self, site: Site) -> None:
        stack = self._stacks[site]
        self._merged[site] = stack[0] if len(stack) == 1 else torch.cat(stack).unique()

    def _zero_input(self, dim: int) -> Callable[[nn.Module, tuple], tuple]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x, idxs = args[0], self._merged[module, "input"]
            spec = layer_pruner(module)  # a user's layer type may mask its input its own way
            x = spec.masked_input(module, x, idxs) if spec else x.index_fill(dim, idxs, 0.0)
            return (x, *args[1:])

        return hook

    def _zero_output(self, dim: int) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output.index_fill(dim, self._merged[module, "output"], 0.0)

        return hook

    def _pruned_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return run_as_pruned(module, self._merged[module, "pruned"], args, output)

    def _layernorm_hook(
        self, module: nn.LayerNorm, args: tuple, output: torch.Tensor
    ) -> torch.Tensor:
        # A channels-first LayerNorm2d (timm, ConvNeXt ports) normalises dim 1 of its input.
        x = args[0]
        width = module.normalized_shape[0]
        first = x.dim() > 2 and x.shape[1] == width
        if first and x.shape[-1] == width:  # both fit (16 channels of 16 x 16): the class tells
            first = "2d" in type(module).__name__.lower()
        dim = 1 if first else -1
        x = x.movedim(dim, -1)
        keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
        keep[self._merged[module, "layernorm"]] = False
        w = module.weight[keep] if module.weight is not None else None
        b = module.bias[keep] if module.bias is not None else None
        y = F.layer_norm(x[..., keep], (int(keep.sum()),), w, b, module.eps).movedim(-1, dim)
        for after in ("drop", "act"):  # timm's LayerNormAct2d: norm, dropout, activation
            layer = getattr(module, after, None)
            if isinstance(layer, nn.Module):
                y = layer(y)
        return output.new_zeros(output.shape).index_copy(dim, keep.nonzero().flatten(), y)


def site_dim(module: nn.Module, kind: str) -> int:
    """The dim of a site's tensor that holds the channels: the last for linear layers, a
    registered layer's own (see :mod:`.custom`), else 1."""
    spec = layer_pruner(module)
    if spec is not None:
        return spec.channel_dim
    return -1 if kind == "linear" else 1


class ChannelMask:
    """Handle of one trial removal: active from creation until :meth:`remove` (or ``with``)."""

    def __init__(self, state: MaskState, pieces: list[Piece]) -> None:
        self._state = state
        self._pieces = pieces
        for site, idxs, kind in pieces:
            state.push(site, idxs, kind)

    def remove(self) -> None:
        """Undo the mask; calling it again does nothing."""
        for site, idxs, _ in self._pieces:
            self._state.pop(site, idxs)
        self._pieces = []

    def __enter__(self) -> ChannelMask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def mask_channels(
    graph: PruningGraph,
    group: ChannelGroup | str | Mapping[ChannelGroup | str, Sequence[int] | torch.Tensor],
    idxs: Sequence[int] | torch.Tensor | None = None,
) -> ChannelMask:
    """Make ``graph.model`` behave as if ``idxs`` of ``group`` were physically removed.

    ``mask_channels(graph, group, idxs)`` or ``mask_channels(graph, {group: idxs, ...})``;
    use it as a context manager or call ``.remove()``. Validated like :meth:`PruningGraph.prune`.
    """
    return ChannelMask(graph.masks, mask_pieces(graph, group, idxs))


def mask_pieces(
    graph: PruningGraph,
    group: ChannelGroup | str | Mapping[ChannelGroup | str, Sequence[int] | torch.Tensor],
    idxs: Sequence[int] | torch.Tensor | None = None,
) -> list[Piece]:
    """Where a removal is masked: the channels to zero at each site, on the site's device."""
    pieces: list[Piece] = []
    for g, ids in graph.resolve(group, idxs):
        for member in g.members:
            if member.mask_site is not None:
                hit = member.idxs[torch.isin(member.group_idxs, ids)]
                if hit.numel():
                    site = (member.module, member.mask_site)
                    pieces.append((site, hit.to(_device(member.module)), member.kind))
    return pieces


def _device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
