"""Forward-pass tools every layer shares: running a model in eval mode and putting each
module's mode back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block (BatchNorm statistics and dropout frozen), then
    every module back in the mode it had: a module kept in eval inside a training model (a
    frozen norm) stays so, which ``model.train(was_training)`` would undo."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training
