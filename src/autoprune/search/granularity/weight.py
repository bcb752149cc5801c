"""The ``weight`` granularity: unstructured masks, zeros inside the remaining layers.

A masked layer keeps its dense ``weight`` (with zeros where the mask is off) and a boolean
``weight_mask`` buffer of the same shape, so the model stays a plain module: it runs,
exports and saves like a dense one, and ``autoprune.io`` stores the mask in safetensors. What
keeps the zeros zero while training is :func:`masks_held`: after every optimizer step (any
optimizer, any training loop inside it) the masks are applied again, so a masked weight is
zero at every forward pass and after the last step. Zeros save no dense MACs:
:func:`sparse_macs` estimates what a sparse kernel would compute.

A step masks ``weight_step`` of all conv and linear weights, taken from one layer by magnitude
or spread over every layer by a score comparable across layers (LAMP, global magnitude); it is
tried by zeroing the weights (:func:`zeroed`) and applied by masking them (:func:`mask_weights`).
``arch.json`` lists the masked layers as ``masked``; their masks are in the safetensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..._forward import hooked, run_eval
from ...graph import PruningGraph
from ...graph._rules import CONV_TYPES
from ...io.removals import REMOVALS, SavedRemovals
from ..candidates import GrainCandidate
from ..schedules import Schedule, SearchContext
from ._base import EMPTY, GRANULARITIES, Granularity, touches_ignored

if TYPE_CHECKING:
    from ..config import PruneConfig

MASK = "weight_mask"
MAX_LAYER_SPARSITY = 0.99  # a layer keeps at least 1 % of its weights
WEIGHT_TYPES = (*CONV_TYPES, nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The conv and linear layers whose weights may be masked, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)}


def attach_mask(module: nn.Module) -> torch.Tensor:
    """The layer's mask, created all on (nothing masked) when it has none yet."""
    mask = getattr(module, MASK, None)
    if mask is None:
        weight = module.weight
        mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        module.register_buffer(MASK, mask)
    return mask


def mask_weights(module: nn.Module, idxs: torch.Tensor) -> None:
    """Mask the weights at flat positions ``idxs`` (in the weight's logical order), for good."""
    mask = attach_mask(module)
    flat = mask.reshape(-1).clone()  # logical order, whatever the memory format
    flat[idxs.to(mask.device)] = False
    mask.copy_(flat.view(mask.shape))
    apply_mask(module)


@torch.no_grad()
def apply_mask(module: nn.Module) -> None:
    module.weight.masked_fill_(~getattr(module, MASK), 0.0)


@contextmanager
def zeroed(module: nn.Module, idxs: torch.Tensor) -> Iterator[None]:
    """The weights at ``idxs`` zero for the duration, as if masked: a trial removal."""
    weight = module.weight
    saved = weight.detach().clone()
    off = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    off[idxs.to(weight.device)] = True
    off = off.view(weight.shape)
    with torch.no_grad():
        weight.masked_fill_(off, 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, MASK, None) is not None}


@contextmanager
def masks_held(model: nn.Module) -> Iterator[None]:
    """Re-apply ``model``'s masks after every optimizer step taken inside the block."""
    layers = list(masked_layers(model).values())
    if not layers:
        yield
        return

    def reapply(*_: object) -> None:
        for module in layers:
            apply_mask(module)

    handle = register_optimizer_step_post_hook(reapply)
    try:
        yield
    finally:
        handle.remove()


def restore_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load ``saved`` (a state dict taken before some masking) into ``model``: weights and
    masks as they were, and the masks made since then gone."""
    for name, module in masked_layers(model).items():
        if f"{name}.{MASK}".lstrip(".") not in saved:
            del module._buffers[MASK]
    model.load_state_dict(saved)


def masked_count(model: nn.Module) -> tuple[int, int]:
    """(masked weights, all weights) of the conv and linear layers."""
    masked = total = 0
    for module in weight_layers(model).values():
        total += module.weight.numel()
        mask = getattr(module, MASK, None)
        if mask is not None:
            masked += int((~mask).sum())
    return masked, total


def sparse_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...], dense_macs: int) -> int:
    """``dense_macs`` less what the masked weights compute: a zero weight of a conv saves one
    MAC per output position of its channel, of a linear layer one per token."""
    saved = 0

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal saved
        channels = out.shape[1] if isinstance(module, CONV_TYPES) else out.shape[-1]
        saved += out.numel() // channels * int((~getattr(module, MASK)).sum())

    layers = [m for m in masked_layers(model).values() if not getattr(m, "transposed", False)]
    with hooked((m, hook) for m in layers):
        run_eval(model, inputs)
    return dense_macs - saved


@dataclass(frozen=True)
class WeightCandidate(GrainCandidate):
    """Masking the weights at flat positions ``idxs`` of the layer named ``group``."""

    def trial(self, graph: PruningGraph) -> AbstractContextManager[Any]:
        return zeroed(graph.model.get_submodule(self.group), self.idxs)

    def changed(self, graph: PruningGraph) -> list[nn.Module]:
        return [graph.model.get_submodule(self.group)]

    def prune(self, graph: PruningGraph) -> None:
        mask_weights(graph.model.get_submodule(self.group), self.idxs)


@dataclass(frozen=True)
class SpreadWeightCandidate(GrainCandidate):
    """Masking weights in several layers at once: ``parts`` pairs a layer with its positions."""

    parts: tuple[tuple[str, torch.Tensor], ...] = ()

    def trial(self, graph: PruningGraph) -> AbstractContextManager[Any]:
        stack = ExitStack()
        for name, idxs in self.parts:
            stack.enter_context(zeroed(graph.model.get_submodule(name), idxs))
        return stack

    def changed(self, graph: PruningGraph) -> list[nn.Module]:
        return [graph.model.get_submodule(name) for name, _ in self.parts]

    def prune(self, graph: PruningGraph) -> None:
        for name, idxs in self.parts:
            mask_weights(graph.model.get_submodule(name), idxs)

    def removal(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al., ICLR 2021): a weight's square over the sum of the squares of the
    layer's weights at least as large. A layer's own scale cancels, so one global threshold
    spreads a step over the layers without emptying those whose weights are small."""
    squares = weight.detach().reshape(-1).double().pow(2)
    ordered, order = squares.sort()
    tails = ordered.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(squares)
    scores[order] = ordered / tails.clamp_min(torch.finfo(torch.float64).tiny)
    return scores


# How a step spread over every layer ranks the weights: lowest first, compared across layers.
SPREAD_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "lamp": lamp_scores,
    "global_magnitude": lambda weight: weight.detach().reshape(-1).abs().double(),
}


@GRANULARITIES.register("weight", rank=3, description="unstructured magnitude masks")
class Weight(Granularity):
    """Steps of ``weight_step`` of all conv and linear weights, from one layer by magnitude or
    spread over all by each of :data:`SPREAD_SCORES`; every step is followed by recovery (with
    the masks held). A layer keeps at least ``1 - MAX_LAYER_SPARSITY`` of its weights."""

    structured = False
    counts = "weights"
    recover_every_step = True

    def __init__(self, name: str, config: PruneConfig, goal: float, schedule: Schedule) -> None:
        super().__init__(name, config, goal, schedule)
        self.loss_limit = config.weight_loss_limit

    def _remaining(self, model: nn.Module) -> tuple[int, int]:
        masked, total = masked_count(model)
        return round(self.goal * total) - masked, total

    def reached(self, ctx: SearchContext) -> bool:
        return self._remaining(ctx.graph.model)[0] <= 0

    def candidates(self, ctx: SearchContext) -> list[GrainCandidate]:
        remaining, total = self._remaining(ctx.graph.model)
        step = min(max(1, round(self.config.weight_step * total)), remaining)
        layers = {
            name: module
            for name, module in weight_layers(ctx.graph.model).items()
            if not touches_ignored([name], self.config.ignored_layers)
        }
        offers: list[GrainCandidate] = []
        for name, module in layers.items():
            free = _free(module, module.weight.detach().abs().reshape(-1))
            n = min(step, int(free.isfinite().sum()))
            if n >= 1:
                idxs = torch.topk(free, n, largest=False).indices.sort().values.cpu()
                offers.append(WeightCandidate(name, ("magnitude",), idxs, 0, n))
        for criterion, score in SPREAD_SCORES.items():
            offers += _spread(layers, score, criterion, step)
        # Candidates that remove the whole step compare by loss alone; smaller ones only if
        # none can give the whole step.
        return [c for c in offers if c.params_saved == step] or offers

    def apply(self, graph: PruningGraph, removal: Mapping[str, torch.Tensor]) -> None:
        for name, idxs in removal.items():
            mask_weights(graph.model.get_submodule(name), idxs)


def _free(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` (flat, of ``module``'s weights) with inf where a weight may not be masked:
    masked already, or beyond the layer's ``MAX_LAYER_SPARSITY``."""
    scores = scores.clone()
    mask = getattr(module, MASK, None)
    if mask is not None:
        scores[~mask.reshape(-1)] = math.inf
    allowed = math.floor(MAX_LAYER_SPARSITY * scores.numel()) - int(scores.isinf().sum())
    if allowed < int(scores.isfinite().sum()):
        scores[scores.argsort()[max(0, allowed) :]] = math.inf
    return scores


def _spread(
    layers: Mapping[str, nn.Module],
    score: Callable[[torch.Tensor], torch.Tensor],
    criterion: str,
    step: int,
) -> list[GrainCandidate]:
    """The ``step`` weights with the lowest ``score`` over all ``layers``, as one candidate
    (none for a single layer: its own candidate is the same step)."""
    if len(layers) < 2:
        return []
    scores = [_free(m, score(m.weight)) for m in layers.values()]
    flat = torch.cat(scores)
    n = min(step, int(flat.isfinite().sum()))
    if n < 1:
        return []
    picked = torch.topk(flat, n, largest=False).indices
    parts, start = [], 0
    for name, layer_scores in zip(layers, scores, strict=True):
        end = start + layer_scores.numel()
        idxs = picked[(picked >= start) & (picked < end)] - start
        if idxs.numel():
            parts.append((name, idxs.sort().values.cpu()))
        start = end
    return [SpreadWeightCandidate("all layers", (criterion,), EMPTY, 0, n, parts=tuple(parts))]


def _restore_masks(model: nn.Module, names: Sequence[str]) -> None:
    """Give the named layers of a freshly built model their (all-on) mask buffers, which the
    saved state dict then fills."""
    for name in names:
        attach_mask(model.get_submodule(name))


REMOVALS.register("masked", rank=GRANULARITIES.entry("weight").meta["rank"])(
    SavedRemovals(read=lambda model: list(masked_layers(model)), restore=_restore_masks)
)
