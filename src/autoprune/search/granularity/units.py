"""Blocks and layers that can leave a model whole, letting their input pass through.

The coarse granularities of multi-grain pruning (MGP, Kollek et al. 2021) remove computation
that maps a tensor to one of the same shape, so that the identity can stand in for it:

- a *block*: the innermost module of several convs whose input and output shapes match (a
  residual block with stride 1: its shortcut is what remains), or, in a plain chain (VGG's
  ``features``), a run of two or more conv layers between equal shapes;
- a *layer*: one conv with equal input and output shapes and the norm and activation that
  directly follow it.

Both are found from one recorded forward pass (who consumed whose output, and the shapes), so
no architecture is named here. Every removable unit is a candidate; trying one
(:func:`substitute_identity`) swaps its modules' ``forward`` for the identity in place, which
computes exactly what the removal does; applying it replaces each module by
:class:`~autoprune.graph.units.RemovedLayer`, whose paths ``arch.json`` lists as ``removed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..._forward import eval_mode, hooked, patched_forwards, run_eval
from ...graph import PruningGraph
from ...graph._rules import CONV_TYPES
from ...graph.units import remove_modules, removed_paths
from ...io.removals import REMOVALS, SavedRemovals
from ..calibration import CalibrationSet
from ..candidates import GrainCandidate
from ..schedules import TOLERANCE, SearchContext, Step, choose
from ._base import EMPTY, GRANULARITIES, Granularity, touches_ignored
from .norm_stats import (
    NormStats,
    estimate_norm_stats,
    estimate_norm_stats_each,
    has_norms,
    load_norm_stats,
    loaded_norm_stats,
)

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.Mish,
    nn.ELU,
    nn.PReLU,
)


@dataclass(frozen=True)
class Unit:
    """Modules (``paths``) that go together, as a ``block`` or a ``layer``, named ``name``."""

    name: str
    kind: str
    paths: tuple[str, ...]


@dataclass
class _Call:
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor
    calls: int = 1

    @property
    def keeps_shape(self) -> bool:
        return self.calls == 1 and self.input.shape == self.output.shape


def _record(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, _Call]:
    """Every module's first tensor input and tensor output on ``inputs`` (eval, no grad)."""
    calls: dict[str, _Call] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if name in calls:
                calls[name].calls += 1
            elif args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls[name] = _Call(module, args[0], output)

        return record

    with hooked((m, hook(n)) for n, m in model.named_modules() if n):
        run_eval(model, inputs)
    return calls


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES) and not module.transposed


def _convs(module: nn.Module) -> int:
    return sum(_is_conv(m) for m in module.modules())


def find_units(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Unit]:
    """The blocks and layers of ``model`` that could be replaced by the identity, in model order."""
    calls = _record(model, inputs)
    return [*_blocks(model, calls), *_runs(model, calls), *_layers(calls)]


def _layers(calls: Mapping[str, _Call]) -> list[Unit]:
    """Shape-keeping convs with the norm and activation that alone consume their output."""
    leaves = {n: c for n, c in calls.items() if next(c.module.children(), None) is None}
    readers: dict[int, list[str]] = {}
    for name, call in leaves.items():
        readers.setdefault(id(call.input), []).append(name)
    units = []
    for name, call in leaves.items():
        if not (_is_conv(call.module) and call.keeps_shape):
            continue
        chain, out = [name], call.output
        for kinds in (NORMS, ACTIVATIONS):
            nxt = readers.get(id(out), [])
            follower = leaves[nxt[0]] if len(nxt) == 1 else None
            if follower is None or follower.calls > 1 or not isinstance(follower.module, kinds):
                break
            chain.append(nxt[0])
            out = follower.output
        units.append(Unit(name, "layer", tuple(chain)))
    return units


def _blocks(model: nn.Module, calls: Mapping[str, _Call]) -> list[Unit]:
    """Innermost shape-keeping modules with at least two convs (residual blocks, stride 1)."""
    found = [
        name
        for name, call in calls.items()
        if next(call.module.children(), None) is not None
        and call.keeps_shape
        and _convs(call.module) >= 2
    ]
    innermost = [n for n in found if not any(o.startswith(n + ".") for o in found)]
    return [Unit(n, "block", (n,)) for n in innermost]


def _runs(model: nn.Module, calls: Mapping[str, _Call]) -> list[Unit]:
    """Runs of two or more conv layers (conv + norm + activation children) of a Sequential
    whose first input and last output have the same shape: VGG's blocks."""
    units = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or name not in calls:
            continue
        prefix = f"{name}." if name else ""
        for segments in _segments(seq, prefix, calls):
            for i in range(len(segments)):
                for j in range(i + 1, len(segments)):
                    first, last = segments[i][0], segments[j][-1]
                    if calls[first].input.shape == calls[last].output.shape:
                        paths = tuple(p for s in segments[i : j + 1] for p in s)
                        units.append(Unit(f"{first}..{last}", "block", paths))
    return units


def _segments(seq: nn.Sequential, prefix: str, calls: Mapping[str, _Call]) -> list[list[list[str]]]:
    """The Sequential's leaf children as unbroken runs of conv layers (each a list of paths)."""
    runs: list[list[list[str]]] = [[]]
    for child, module in seq.named_children():
        path = prefix + child
        if path not in calls or next(module.children(), None) is not None:
            runs.append([])
        elif _is_conv(module) and calls[path].calls == 1:
            runs[-1].append([path])
        elif isinstance(module, NORMS + ACTIVATIONS) and runs[-1] and calls[path].calls == 1:
            runs[-1][-1].append(path)
        else:
            runs.append([])
    return [r for r in runs if len(r) >= 2]


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def substitute_identity(modules: Sequence[nn.Module]) -> Any:
    """Make ``modules`` pass their input through for the duration: the trial of a removal."""
    return patched_forwards(dict.fromkeys(modules, _identity))


@dataclass(frozen=True)
class UnitCandidate(GrainCandidate):
    """Replacing the modules at ``paths`` by the identity (``group`` names the unit), the
    norms then holding ``norm_stats`` (:mod:`.norm_stats`; the model's own where empty)."""

    paths: tuple[str, ...] = ()
    norm_stats: NormStats = field(default_factory=dict, compare=False)

    def _modules(self, graph: PruningGraph) -> list[nn.Module]:
        return [graph.model.get_submodule(p) for p in self.paths]

    @contextmanager
    def trial(self, graph: PruningGraph) -> Iterator[None]:
        with (
            substitute_identity(self._modules(graph)),
            loaded_norm_stats(graph.model, self.norm_stats),
        ):
            yield

    def changed(self, graph: PruningGraph) -> list[nn.Module]:
        return self._modules(graph) + [graph.model.get_submodule(n) for n in self.norm_stats]

    def prune(self, graph: PruningGraph) -> None:
        graph.remove_modules(self.paths)
        load_norm_stats(graph.model, self.norm_stats)

    def removal(self) -> dict[str, torch.Tensor]:
        return dict.fromkeys(self.paths, EMPTY)


def adapted(
    graph: PruningGraph, calib: CalibrationSet, candidates: Sequence[UnitCandidate]
) -> list[UnitCandidate]:
    """``candidates`` with the norm statistics their models have on ``calib``'s images, from
    their unit on (those before it are the model's own: :meth:`_Units.settle` makes them what
    the same images give). The layers before a unit run once for all candidates."""
    variants = [dict.fromkeys(c._modules(graph), _identity) for c in candidates]
    stats = estimate_norm_stats_each(graph.model, calib.batches, variants)
    return [replace(c, norm_stats=s) for c, s in zip(candidates, stats, strict=True)]


TIE = 1.0  # two units' losses closer than this many standard errors of their difference tie


def tied_with(image_losses: Mapping[str, torch.Tensor], best: str) -> list[str]:
    """The units whose calibration loss is not higher than ``best``'s by more than :data:`TIE`
    standard errors of the per-image difference (``best`` among them): a difference the draw
    of the calibration images could make or unmake."""
    ref = image_losses[best]

    def tied(losses: torch.Tensor) -> bool:
        diff = (losses - ref).double()
        return float(diff.mean()) <= TIE * float(diff.std()) / math.sqrt(len(diff))

    return [name for name, losses in image_losses.items() if name == best or tied(losses)]


def unit_params(graph: PruningGraph, candidate: UnitCandidate) -> int:
    return sum(p.numel() for m in candidate._modules(graph) for p in m.parameters())


def unit_image_losses(
    graph: PruningGraph, calib: CalibrationSet, candidates: Sequence[UnitCandidate]
) -> dict[str, torch.Tensor]:
    """Each candidate's loss per calibration image with its removal tried (returned on the
    CPU, in fp32): the scorer keeps only their sums, the tie needs their spread."""
    image_losses = {}
    with torch.no_grad(), eval_mode(graph.model):
        for c in candidates:
            with c.trial(graph):
                image_losses[c.group] = torch.cat(
                    [calib.task.losses(graph.model(x), y).float().cpu() for x, y in calib.batches]
                )
    return image_losses


def fewest_params_of_tied(
    graph: PruningGraph,
    candidates: Sequence[UnitCandidate],
    step: Step,
    image_losses: Mapping[str, torch.Tensor],
) -> Step:
    """``step`` (the loss-aware choice), or the tied unit (:func:`tied_with`) removing the
    fewest parameters in its place: where the calibration loss cannot tell units apart, the
    one that leaves the fine-tune the most to recover with."""
    best = next(c.group for c in candidates if set(c.removal()) == set(step.removal))
    tied = [c for c in candidates if c.group in tied_with(image_losses, best)]
    pick = min(tied, key=lambda c: (unit_params(graph, c), float(image_losses[c.group].mean())))
    stats = {**step.stats, "tied": len(tied), "loss_ranked_first": best}
    loss = float(image_losses[pick.group].mean())
    return Step(pick.removal(), (), loss, step.candidates, stats, step.granularity)


class _Units(Granularity):
    """Every block or layer whose removal stays within the target is a candidate; with a
    latency target each is costed by the predicted latency of its layers. With
    ``config.adapt_norms`` each is scored, and applied, with its model's BatchNorm statistics
    re-estimated on the calibration set (:mod:`.norm_stats`)."""

    kind: ClassVar[str]

    def candidates(self, ctx: SearchContext) -> list[UnitCandidate]:
        graph, latency = ctx.graph, ctx.latency
        if latency is None:
            room = ctx.remaining_macs + TOLERANCE * ctx.original_macs
        else:
            room = (latency.target - latency.reduction + TOLERANCE) * latency.dense_ms
        candidates: list[UnitCandidate] = []
        for unit in find_units(graph.model, graph.example_inputs):
            if unit.kind != self.kind or touches_ignored(unit.paths, self.config.ignored_layers):
                continue
            modules = [graph.model.get_submodule(p) for p in unit.paths]
            saved = graph.module_macs(modules)
            cost = saved if latency is None else latency.saved_whole(modules)
            if saved > 0 and 0 < cost <= room:
                candidates.append(
                    UnitCandidate(
                        unit.name,
                        (),
                        EMPTY,
                        saved,
                        latency_saved=0.0 if latency is None else cost,
                        paths=unit.paths,
                    )
                )
        if self._adapts(graph, ctx.calib):
            assert ctx.calib is not None
            return adapted(graph, ctx.calib, candidates)
        return candidates

    def propose(self, ctx: SearchContext) -> Step | None:
        """The loss-aware choice; with ``config.break_unit_ties`` the unit removing the fewest
        parameters of those whose loss ties with it (:func:`fewest_params_of_tied`)."""
        candidates = self.candidates(ctx)
        if not candidates:
            return None
        step = choose(ctx, candidates, self.name)
        if not self.config.break_unit_ties or ctx.calib is None or len(candidates) < 2:
            return step
        image_losses = unit_image_losses(ctx.graph, ctx.calib, candidates)
        return fewest_params_of_tied(ctx.graph, candidates, step, image_losses)

    def _adapts(self, graph: PruningGraph, calib: CalibrationSet | None) -> bool:
        return self.config.adapt_norms and calib is not None and has_norms(graph.model)

    def settle(self, graph: PruningGraph, calib: CalibrationSet | None) -> bool:
        """The model's own norm statistics re-estimated on the calibration set, as its
        candidates' are: at the phase's start, so that the loss each is compared with is of the
        same kind, and after each step (the chosen candidate's, now for good)."""
        if not self._adapts(graph, calib):
            return False
        assert calib is not None
        load_norm_stats(graph.model, estimate_norm_stats(graph.model, calib.batches))
        return True

    def apply(self, graph: PruningGraph, removal: Mapping[str, torch.Tensor]) -> None:
        graph.remove_modules(list(removal))

    def count(self, removal: Mapping[str, torch.Tensor]) -> int:
        return 1


@GRANULARITIES.register(
    "block", rank=0, description="residual blocks and runs of layers between equal shapes"
)
class Block(_Units):
    kind = "block"
    counts = "blocks"


@GRANULARITIES.register("layer", rank=1, description="one conv + norm + activation, stride 1")
class Layer(_Units):
    kind = "layer"
    counts = "layers"


REMOVALS.register("removed", rank=GRANULARITIES.entry("block").meta["rank"])(
    SavedRemovals(read=removed_paths, restore=remove_modules)
)
