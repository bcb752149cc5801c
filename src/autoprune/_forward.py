"""Forward-pass tools every layer shares: modes put back, hooks that come off, forwards patched
for a while. Each is written once here, so no caller can forget a restore on an exception."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Forward = Callable[..., Any]
Hook = Callable[..., Any]
_MISSING = object()


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Every module back in the mode it had before the block, whatever the block set (a tracer
    that leaves the model in eval): a module kept in eval inside a training model (a frozen
    norm) stays so, which ``model.train(was_training)`` would undo."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block (BatchNorm statistics and dropout frozen), then
    every module back in its own mode (:func:`kept_modes`)."""
    with kept_modes(model):
        model.eval()
        yield model


@contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, Hook]], *, pre: bool = False) -> Iterator[None]:
    """Forward hooks (``pre``: forward pre-hooks) on the paired modules for the block: how a
    recorder listens to one pass. They come off on any exit."""
    handles = []
    try:
        for module, hook in hooks:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_eval(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """``model(*inputs)`` in eval mode without gradients, every module's mode kept: a pass that
    records (shapes, inputs) must not move BatchNorm's running statistics."""
    with eval_mode(model):
        return model(*inputs)


@contextmanager
def patched_forwards(patches: Mapping[nn.Module, Forward]) -> Iterator[None]:
    """Give modules another ``forward`` for the duration; the originals return on any exit."""
    saved: dict[nn.Module, Any] = {}
    try:
        for module, forward in patches.items():
            saved[module] = module.__dict__.get("forward", _MISSING)
            module.forward = forward
        yield
    finally:
        for module, old in saved.items():
            if old is _MISSING:
                del module.forward
            else:
                module.forward = old
