"""BatchNorm statistics re-estimated on the calibration set (adaptive BN: EagleEye, Li et al.,
ECCV 2020).

Removing a block or layer shifts what every later norm sees. Judged with the running
statistics the dense model was trained with, a removal looks as bad as the mismatch makes it,
and candidates rank by that mismatch rather than by what training could not restore; any
training re-estimates the statistics first. So unit candidates are scored, and the one chosen
is applied, with the statistics its model has on the calibration images: per candidate, a pass
over them from its unit on (the layers before run once for all).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..._forward import Forward, eval_mode
from .._prefix import CallProfile, PrefixCache, plan_cuts

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


@contextmanager
def _estimating(model: nn.Module) -> Iterator[tuple[dict[str, _BatchNorm], NormStats]]:
    """``model``'s norms set to average the statistics of what runs through them (reset, a
    cumulative average, training mode; everything else in eval mode), and their own statistics;
    on any exit the model is exactly as it was."""
    norms = _norms(model)
    saved = {n: _buffers(m) for n, m in norms.items()}
    momenta = {n: m.momentum for n, m in norms.items()}
    try:
        with eval_mode(model):
            for m in norms.values():
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: every batch counts alike
                m.train()
            yield norms, {n: b[:2] for n, b in saved.items()}
    finally:
        for n, m in norms.items():
            _restore(m, saved[n])
            m.momentum = momenta[n]


@torch.no_grad()
def estimate_norm_stats(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]) -> NormStats:
    """The running statistics ``model``'s norms get from ``batches`` alone (the mean of the
    batches' statistics), for those that ran and whose statistics changed; the model is left
    exactly as it was."""
    with _estimating(model) as (norms, own):
        for x, *_ in batches:
            model(x)
        return _changed(
            {n: _buffers(m)[:2] for n, m in norms.items() if int(m.num_batches_tracked) > 0}, own
        )


@torch.no_grad()
def estimate_norm_stats_each(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, ...]],
    variants: Sequence[Mapping[nn.Module, Forward]],
) -> list[NormStats]:
    """For each variant (``model`` with those modules' forwards replaced), what
    :func:`estimate_norm_stats` gives for the norms from its first replaced module on.

    The layers before that run once per batch for all variants (:mod:`.._prefix`), so the
    norms there keep the model's own statistics: what they are once the model's statistics
    come from the same batches. A variant replacing a late block costs the rest of the model.
    """
    with eval_mode(model):
        profile = CallProfile.record(model, batches[0][0][:2])
    cuts = plan_cuts([list(v) for v in variants], profile)
    sums: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in variants]
    with _estimating(model) as (norms, own):
        for x, *_ in batches:
            cache = PrefixCache(model, x)
            for cut in cuts:
                cache.advance(cut)
                for i in cut.candidates:
                    for m in norms.values():
                        m.reset_running_stats()
                    cache.run(variants[i])
                    for n, m in norms.items():
                        if int(m.num_batches_tracked) > 0:
                            mean, var = sums[i].get(n, (0.0, 0.0))
                            sums[i][n] = (mean + m.running_mean, var + m.running_var)
        count = len(batches)
        return [
            _changed({n: (mean / count, var / count) for n, (mean, var) in s.items()}, own)
            for s in sums
        ]


def _changed(stats: NormStats, own: NormStats) -> NormStats:
    """Those of ``stats`` that differ from the model's ``own``."""
    return {
        n: (mean, var)
        for n, (mean, var) in stats.items()
        if not (torch.equal(mean, own[n][0]) and torch.equal(var, own[n][1]))
    }


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
