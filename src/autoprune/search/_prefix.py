"""Prefix caching: what every candidate computes identically is computed once per batch.

A trial removal changes the model's computation only from the first layer its mask hooks
onwards (:mod:`autoprune.graph.masking` hooks members at their ``mask_site``). Every
module whose ``forward`` returned before that layer started, and that runs once per pass, gives
the same output as in the unmasked model. Found without knowing the architecture:

1. :class:`CallProfile` runs the model once with every module's ``forward`` wrapped, and notes
   when each started and returned (one clock over all calls) and how often it ran.
2. A candidate's *cut* is the start of the first module its mask hooks; its *frontier* is the
   outermost once-run modules that returned before the cut. Replacing their ``forward`` by
   "return the recorded output" skips everything inside them; code in their parents around them
   (functional ops, the loss) still runs, on identical values.
3. :class:`PrefixCache` walks the cuts of one batch in call order. Reaching the next cut runs
   the model with the current frontier replayed, records the new frontier's outputs and stops
   at the cut by raising: the clean prefix is computed once per batch in total, and only the
   current frontier is held (at worst a stage's block outputs, a fraction of what caching
   every cut's prefix at once would hold).

Replayed outputs are inference tensors: an in-place op downstream (``ReLU(inplace=True)``,
``out += identity``) raises instead of corrupting the cache, and the batch continues with a fresh
copy per replay.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .._forward import Forward, patched_forwards


@dataclass(frozen=True)
class Span:
    """When a module's first ``forward`` started and returned, on the profile's clock."""

    start: int
    end: int
    calls: int


@dataclass(frozen=True)
class CallProfile:
    """Call order of every module in one forward pass (see the module docstring)."""

    spans: dict[nn.Module, Span]
    end: int  # the clock after the pass: a cut here is past every module

    @classmethod
    def record(cls, model: nn.Module, inputs: torch.Tensor) -> CallProfile:
        """Profile one pass on ``inputs`` (a few images do: the call order is architecture)."""
        clock = itertools.count()
        spans: dict[nn.Module, Span] = {}

        def timed(module: nn.Module, forward: Forward) -> Forward:
            def run(*args: Any, **kwargs: Any) -> Any:
                start = next(clock)
                out = forward(*args, **kwargs)
                end = next(clock)
                old = spans.get(module)
                spans[module] = (
                    Span(start, end, 1) if old is None else Span(old.start, old.end, old.calls + 1)
                )
                return out

            return run

        with torch.no_grad(), patched_forwards({m: timed(m, m.forward) for m in model.modules()}):
            model(inputs)
        return cls(spans, next(clock))

    def cut(self, modules: Sequence[nn.Module]) -> tuple[int, nn.Module | None]:
        """The clock when the first of ``modules`` starts, and that module (end, None if none)."""
        called = [(self.spans[m].start, m) for m in modules if m in self.spans]
        return min(called, key=lambda sm: sm[0]) if called else (self.end, None)

    def frontier(self, cut: int) -> tuple[nn.Module, ...]:
        """The outermost modules, run once, that returned before ``cut``; in call order."""
        done = sorted(
            ((s.start, s.end, m) for m, s in self.spans.items() if s.calls == 1 and s.end < cut),
            key=lambda t: t[0],
        )
        outermost: list[nn.Module] = []
        reach = -1
        for start, end, module in done:
            if start > reach:  # calls nest, so a later start inside ``reach`` lies inside
                outermost.append(module)
                reach = end
        return tuple(outermost)


@dataclass
class CutPoint:
    """Candidates sharing a cut: one set of cached outputs serves all of them."""

    position: int
    module: nn.Module | None  # the first module they change; None when past the end
    frontier: tuple[nn.Module, ...]
    candidates: list[int] = field(default_factory=list)


def plan_cuts(
    changed: Sequence[Sequence[nn.Module]], profile: CallProfile | None
) -> list[CutPoint]:
    """Candidates (each given by the modules it changes) grouped by cut, in call order;
    without a profile, one cut at the start."""
    if profile is None:
        return [CutPoint(0, None, (), list(range(len(changed))))]
    cuts: dict[int, CutPoint] = {}
    for i, modules in enumerate(changed):
        position, module = profile.cut(modules)
        if position not in cuts:
            cuts[position] = CutPoint(position, module, profile.frontier(position))
        cuts[position].candidates.append(i)
    return [cuts[p] for p in sorted(cuts)]


class _Stop(Exception):
    """Raised by the cut's module to end a recording pass there."""


def _stop(*args: Any, **kwargs: Any) -> Any:
    raise _Stop


class PrefixCache:
    """The current frontier's outputs for one batch, advanced cut by cut in call order."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor) -> None:
        self.model = model
        self.inputs = inputs
        self.outputs: dict[nn.Module, Any] = {}
        self.copy = False  # set once an in-place op downstream met a replayed output

    def advance(self, cut: CutPoint) -> None:
        """Hold the outputs of ``cut.frontier``, running only the layers not yet recorded."""
        missing = [m for m in cut.frontier if m not in self.outputs]
        if missing:
            recorded: dict[nn.Module, Any] = {}
            patches = {m: _recorder(m.forward, m, recorded) for m in missing}
            if cut.module is not None:
                patches[cut.module] = _stop
            with suppress(_Stop):
                self.run(patches)
            self.outputs.update(recorded)
        self.outputs = {m: self.outputs[m] for m in cut.frontier}

    def run(self, extra: Mapping[nn.Module, Forward] | None = None, copies: int = 1) -> Any:
        """``model(inputs)`` with the cached outputs replayed (and ``extra`` patches).

        With ``copies`` > 1 the inputs and the replayed outputs are the batch repeated that
        many times along dim 0 (a stacked pass, :class:`~autoprune.graph.StackedMask`).
        A failure is retried once with copies of the cached outputs: an in-place op on a
        replayed inference tensor is the failure copies fix; any other repeats and propagates.
        """
        try:
            return self._run(extra, copies)
        except RuntimeError:
            if self.copy or not self.outputs or copies > 1:
                raise
            self.copy = True
            return self._run(extra, copies)

    def _run(self, extra: Mapping[nn.Module, Forward] | None, copies: int) -> Any:
        if copies == 1:
            patches = {m: self._replay(out) for m, out in self.outputs.items()}
            inputs = self.inputs
        else:  # fresh tensors: in-place ops downstream are harmless
            patches = {m: _constant(_repeat(out, copies)) for m, out in self.outputs.items()}
            inputs = _repeat(self.inputs, copies)
        patches.update(extra or {})
        with patched_forwards(patches):
            return self.model(inputs)

    def _replay(self, output: Any) -> Forward:
        def replay(*args: Any, **kwargs: Any) -> Any:
            return tree_map_only(torch.Tensor, torch.clone, output) if self.copy else output

        return replay


def _repeat(value: Any, copies: int) -> Any:
    """Every tensor in ``value`` repeated ``copies`` times along dim 0 (memory format kept)."""
    return tree_map_only(torch.Tensor, lambda t: torch.cat([t] * copies), value)


def _constant(value: Any) -> Forward:
    def replay(*args: Any, **kwargs: Any) -> Any:
        return value

    return replay


def _recorder(forward: Forward, module: nn.Module, store: dict[nn.Module, Any]) -> Forward:
    def record(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        with torch.inference_mode():  # a copy: the pass may still change ``out`` in place
            store[module] = tree_map_only(torch.Tensor, torch.clone, out)
        return out

    return record
