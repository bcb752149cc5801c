"""BatchNorm statistics re-estimated on the calibration set (adaptive BN: EagleEye, Li et al.,
ECCV 2020).

Removing a block or layer shifts what every later norm sees. Judged with the running
statistics the dense model was trained with, a removal looks as bad as the mismatch makes it,
and candidates rank by that mismatch rather than by what training could not restore; any
training re-estimates the statistics first. So unit candidates are scored, and the one chosen
is applied, with the statistics its model has on the calibration images: one forward pass over
them per candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..._forward import eval_mode

# {norm's path: (running mean, running variance)}
NormStats = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def _norms(model: nn.Module) -> dict[str, _BatchNorm]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def has_norms(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm with running statistics."""
    return bool(_norms(model))


@torch.no_grad()
def estimate_norm_stats(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]) -> NormStats:
    """The running statistics ``model``'s norms get from ``batches`` alone (the mean of the
    batches' statistics), for those that ran and whose statistics changed; everything else
    runs in eval mode and the model is left exactly as it was."""
    norms = _norms(model)
    saved = {n: _buffers(m) for n, m in norms.items()}
    momenta = {n: m.momentum for n, m in norms.items()}
    try:
        with eval_mode(model):
            for m in norms.values():
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: every batch counts alike
                m.train()
            for x, *_ in batches:
                model(x)
            return {
                n: _buffers(m)[:2]
                for n, m in norms.items()
                if int(m.num_batches_tracked) > 0 and not _same(_buffers(m), saved[n])
            }
    finally:
        for n, m in norms.items():
            _restore(m, saved[n])
            m.momentum = momenta[n]


def load_norm_stats(model: nn.Module, stats: NormStats) -> None:
    """Write ``stats`` into ``model``'s norms, for good."""
    for name, (mean, var) in stats.items():
        norm = model.get_submodule(name)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)


@contextmanager
def loaded_norm_stats(model: nn.Module, stats: NormStats) -> Iterator[None]:
    """``stats`` in ``model``'s norms for the block; the statistics before return on any exit."""
    saved = {n: _buffers(model.get_submodule(n)) for n in stats}
    try:
        load_norm_stats(model, stats)
        yield
    finally:
        for name, buffers in saved.items():
            _restore(model.get_submodule(name), buffers)


def _buffers(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()


def _restore(norm: nn.Module, buffers: tuple[torch.Tensor, ...]) -> None:
    for b, old in zip(
        (norm.running_mean, norm.running_var, norm.num_batches_tracked), buffers, strict=True
    ):
        b.copy_(old)


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
