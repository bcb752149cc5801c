"""The safety net: every group is pruned for real once, on a clone, before the search trusts it.

The graph's rules cover the patterns we know; a model can still hold one they get wrong (a
fixed channel index, a parameter read by an einsum, a reshape whose widths are baked into the
forward). Such a group gives a pruned model that crashes or computes something else than the
masked original, which is what every search decision is based on. :func:`verify_groups`
removes one unit (a channel, a head, a coupled unit) of every prunable group at once, on a
clone (:mod:`._clone`), and compares it with the same removal masked on the original. Where
they differ it bisects over the groups, freezes each culprit with a one-line reason, and the
rest of the model still prunes; only a model with nothing left to prune is refused.

Cost: a healthy model takes one clone and two forwards at batch 2. Each culprit found adds
about two checks per halving (``2 log2(groups)`` clones and twice as many forwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from .._forward import eval_mode
from ..errors import AutopruneError
from ._clone import clone_graph
from .groups import ChannelGroup
from .masking import mask_channels
from .pruning_graph import PruningGraph

TOLERANCE = 1e-4  # largest masked-vs-pruned difference, relative to the output's scale
Check = Callable[[Sequence[str]], str | None]  # groups -> what broke (None: nothing)


def verify_groups(graph: PruningGraph) -> list[tuple[str, str]]:
    """Freeze (:meth:`PruningGraph.freeze`) every group whose physical removal does not give
    the masked model's outputs; returns the ``(group, reason)`` pairs frozen, in model order.

    Runs on ``graph.example_inputs`` made a batch of two (the first sample and a random one),
    in eval mode, without gradients. Raises :class:`AutopruneError` when no group is left.
    """
    removal = {g.name: _one_unit(g) for g in graph.groups() if g.channels > g.min_kept}
    inputs = _two_samples(graph.example_inputs)
    frozen: list[tuple[str, str]] = []
    with eval_mode(graph.model), torch.no_grad():

        def check(names: Sequence[str]) -> str | None:
            return _breaks(graph, inputs, {n: removal[n] for n in names})

        pending = list(removal)
        what = check(pending) if pending else None
        while what is not None:
            found = _culprits(check, pending, what)
            for name, reason in found:
                graph.freeze(name, reason)
            frozen += found
            pending = [n for n in pending if n not in dict(found)]
            what = check(pending) if pending else None
    if frozen and not graph.groups():
        raise AutopruneError(
            f"no channel group of this model prunes correctly (all {len(frozen)} frozen; "
            f"first: {frozen[0][1]}); prune it by block or layer instead"
        )
    order = {n: k for k, n in enumerate(removal)}
    return sorted(frozen, key=lambda pair: order[pair[0]])


def _culprits(check: Check, names: Sequence[str], what: str) -> list[tuple[str, str]]:
    """Groups of ``names`` (which break together, saying ``what``) that break by themselves,
    found by halving; where no half breaks alone, the one group that tips a prefix over."""
    if len(names) == 1:
        return [(names[0], f"removing a channel of {names[0]!r} {what}")]
    half = len(names) // 2
    found: list[tuple[str, str]] = []
    for part in (names[:half], names[half:]):
        why = check(part)
        if why is not None:
            found += _culprits(check, part, why)
    return found or [_tipping(check, names, what)]


def _tipping(check: Check, names: Sequence[str], what: str) -> tuple[str, str]:
    """The group whose addition makes a passing prefix of ``names`` break: a binary search
    keeping ``names[:good]`` passing and ``names[:bad]`` breaking."""
    good, bad = 0, len(names)
    while bad - good > 1:
        mid = (good + bad) // 2
        why = check(names[:mid])
        if why is None:
            good = mid
        else:
            bad, what = mid, why
    name = names[bad - 1]
    return name, f"removing a channel of {name!r} with one of each group before it {what}"


def _breaks(
    graph: PruningGraph, inputs: tuple[Any, ...], removal: dict[str, torch.Tensor]
) -> str | None:
    """What goes wrong when ``removal`` is pruned on a clone instead of masked (None: nothing).
    Anything raised counts: the point is that the search never meets it."""
    try:
        with mask_channels(graph, removal):
            expected = graph.model(*inputs)
    except Exception as e:  # any failure is a finding
        return f"breaks the masked forward ({_one_line(e)})"
    try:
        clone = clone_graph(graph)
        clone.prune(removal)
    except Exception as e:
        return f"cannot be done ({_one_line(e)})"
    try:
        got = clone.model(*inputs)
    except Exception as e:
        return f"breaks the pruned forward ({_one_line(e)})"
    return _differ(expected, got)


def _differ(expected: Any, got: Any) -> str | None:
    """How the pruned outputs differ from the masked ones beyond :data:`TOLERANCE`."""
    want, have = tree_leaves(expected), tree_leaves(got)
    if len(want) != len(have):
        return "changes the number of outputs"
    for a, b in zip(want, have, strict=True):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return "changes the output's shape"
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        if not diff <= TOLERANCE * max(scale, 1e-12):
            return f"changes the output by {diff / max(scale, 1e-12):.2g} of its scale"
    return None


def _one_unit(group: ChannelGroup) -> torch.Tensor:
    """The first channel a removal may take (not one that keeps a layer alive)."""
    return group.keep_layers(torch.zeros(group.channels)).argmin().reshape(1)


def _two_samples(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Each input's first sample and a random one: batch 2, so that a pattern that mixes the
    batch with the channels shows, and a non-zero sample where the example is all zeros."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            first = x[:1]
            other = (
                torch.randn(first.shape, generator=gen, dtype=x.dtype).to(x.device)
                if x.is_floating_point()
                else first
            )
            x = torch.cat([first, other])
        out.append(x)
    return tuple(out)


def _one_line(e: BaseException) -> str:
    text = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:160]}"
