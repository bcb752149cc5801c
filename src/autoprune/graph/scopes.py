"""Scopes: which layers a run may prune and whose MACs its target counts.

A scope is a predicate over the model's MAC-bearing layers (convolutions, linears, attention
matmuls), registered by name. The pruning graph keeps the groups whose producing layers all
satisfy it and counts MACs over the layers that do, so "-30 % MACs" means -30 % of the scope's
MACs; a removal in scope may still shrink a layer outside it (the consumers of its channels),
which only the total shows.

- ``all`` (default): every layer; a CNN's search is the same as without scopes.
- ``conv``: every convolution; MLP widths, attention heads and embedding widths stay.
- ``stem``: the convolutional stem of a hybrid (the ICCAS 2024 setting): convolutions that
  are not in a hybrid block (the smallest module around an attention layer that also holds a
  convolution: a MobileViT block) and that run before the last attention layer (so the head's
  1x1 conv is out). In a model without attention every convolution is stem.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from .._registry import Registry
from ._rules import CONV_TYPES


@dataclass(frozen=True)
class ScopeContext:
    """What a scope predicate may look at besides the layer itself."""

    model: nn.Module
    order: Mapping[nn.Module, int]  # first call position of every MAC-bearing layer
    attention: frozenset[nn.Module]

    def names(self) -> dict[nn.Module, str]:
        return {m: n for n, m in self.model.named_modules()}


Predicate = Callable[[nn.Module], bool]
SCOPES: Registry[Callable[[ScopeContext], Predicate]] = Registry("scope")


def list_scopes() -> list[str]:
    return SCOPES.names()


@SCOPES.register("all", description="every layer: convolutions, linears and attention")
def _all(ctx: ScopeContext) -> Predicate:
    return lambda layer: True


@SCOPES.register("conv", description="every convolution")
def _conv(ctx: ScopeContext) -> Predicate:
    return lambda layer: isinstance(layer, CONV_TYPES)


@SCOPES.register("stem", description="stem convolutions and MobileNetV2 blocks of a hybrid")
def _stem(ctx: ScopeContext) -> Predicate:
    names = ctx.names()
    modules = dict(ctx.model.named_modules())
    blocks = {_hybrid_block(names[a], modules) for a in ctx.attention}
    last = max((ctx.order[a] for a in ctx.attention if a in ctx.order), default=None)

    def predicate(layer: nn.Module) -> bool:
        if not isinstance(layer, CONV_TYPES):
            return False
        name = names[layer]
        if any(name.startswith(b + ".") for b in blocks):
            return False
        return last is None or ctx.order.get(layer, last) < last

    return predicate


def _hybrid_block(name: str, modules: Mapping[str, nn.Module]) -> str:
    """The nearest proper ancestor of layer ``name`` that contains a convolution."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k])
        if any(isinstance(m, CONV_TYPES) for m in modules[prefix].modules()):
            return prefix
    return name  # only the model itself holds one: the attention layer alone


def scope_layers(name: str, ctx: ScopeContext, layers: list[nn.Module]) -> frozenset[nn.Module]:
    """The ``layers`` in scope ``name``; raises UnknownNameError listing the scopes."""
    predicate = SCOPES.get(name)(ctx)
    return frozenset(m for m in layers if predicate(m))


def scope_report(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, dict]:
    """Per scope: MACs before and after pruning and their reduction (for a run's summary)."""
    return {
        name: {
            "macs_before": before[name],
            "macs_after": after[name],
            "macs_reduction": 1.0 - after[name] / before[name] if before[name] else 0.0,
        }
        for name in before
    }
