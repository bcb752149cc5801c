"""Stacked trial removals: several removals tried in one forward pass.

The scorer repeats a batch ``k`` times along dim 0; copy ``j`` must compute what the model
computes on the batch alone with removal ``j`` masked (:func:`~.masking.mask_channels`). Masking
zeroes channels at the sites of a removal (consumer inputs, attention projections), and zeroing
is per sample, so one hook per site multiplies its tensor by a per-sample keep mask: ones for
the copies that keep the channel, zero for the one that removes it. Copies never mix as long as
every layer treats samples independently along dim 0, which eval mode gives for convolutional
and attention models; the scorer runs stacked passes in eval mode only.

LayerNorm sites (recomputed on the kept channels) and layers run as pruned are not stacked:
:func:`stackable` says which removals are, and the others are tried one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import AutopruneError
from .custom import layer_pruner
from .masking import Piece, Site, site_dim


def stackable(pieces: Sequence[Piece]) -> bool:
    """Whether a removal's mask (:func:`~.masking.mask_pieces`) can run in a stacked pass."""
    return all(site[1] in ("input", "output") and _zeroes(site[0]) for site, _, _ in pieces)


def _zeroes(module: nn.Module) -> bool:
    """Whether masking ``module`` zeroes channels (a registered layer may mask otherwise)."""
    spec = layer_pruner(module)
    return spec is None or spec.stackable


class StackedMask:
    """Removal ``j`` of ``removals`` applied to copy ``j`` of a batch stacked ``len(removals)``
    times; active from creation until :meth:`remove` (or the end of a ``with`` block)."""

    def __init__(self, removals: Sequence[Sequence[Piece]]) -> None:
        self.copies = len(removals)
        zeros: dict[Site, tuple[str, list[torch.Tensor], list[torch.Tensor]]] = {}
        for j, pieces in enumerate(removals):
            if not stackable(pieces):
                raise AutopruneError(
                    "a LayerNorm mask, a layer run as pruned or a layer's own masked_input "
                    "cannot be stacked: try that removal with mask_channels"
                )
            for site, idxs, kind in pieces:
                _, rows, cols = zeros.setdefault(site, (kind, [], []))
                rows.append(torch.full_like(idxs, j))
                cols.append(idxs)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for (module, where), (kind, rows, cols) in zeros.items():
            dim = site_dim(module, kind)
            keep = _KeepMask(self.copies, torch.cat(rows), torch.cat(cols), dim)
            if where == "output":
                self._hooks.append(module.register_forward_hook(keep.output_hook))
            else:
                self._hooks.append(module.register_forward_pre_hook(keep.input_hook))

    def remove(self) -> None:
        """Take the hooks off; calling it again does nothing."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> StackedMask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _KeepMask:
    """One site's per-sample keep mask, built on first use for the shape it meets."""

    def __init__(self, copies: int, rows: torch.Tensor, cols: torch.Tensor, dim: int) -> None:
        self.copies, self.rows, self.cols, self.dim = copies, rows, cols, dim
        self._cache: dict[tuple, torch.Tensor] = {}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], x.shape[self.dim], x.dim(), x.dtype, x.device)
        mask = self._cache.get(key)
        if mask is None:
            mask = self._cache[key] = self._build(x)
        return x * mask

    def _build(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.copies:
            raise AutopruneError(
                f"a stacked pass met a tensor of batch {x.shape[0]} at a masked layer, not a "
                f"multiple of its {self.copies} copies: the model moves the batch off dim 0; "
                "score without stacking (scorer option stack=False)"
            )
        channels = x.shape[self.dim]
        rows = torch.ones(self.copies, channels, dtype=x.dtype, device=x.device)
        rows[self.rows.to(x.device), self.cols.to(x.device)] = 0
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[self.dim] = channels
        return rows.repeat_interleave(x.shape[0] // self.copies, dim=0).view(shape)

    def input_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self.apply(args[0]), *args[1:])

    def output_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.apply(output)
