"""Running a search step's candidates on one calibration batch: stacked, or one at a time.

One forward per candidate leaves an accelerator idle: the batch is small and Python runs
between the passes. Candidates that share a cut (:mod:`._prefix`) are therefore stacked: the
cached prefix is repeated once per candidate along the batch dimension and one pass runs them
all, each copy with its own channels masked (:class:`~autoprune.graph.StackedMask`). Stacks
are cut to a memory budget counted in the largest activation a pass holds per image. Losses
are summed on the device; nothing waits for the host until the scorer reads a round's sums.

Every candidate loss is the run's :class:`~autoprune.task.Task`'s ``loss_sum``; stacked outputs
(a tensor, or a tuple/dict of them) are split back per candidate first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._forward import hooked
from ..graph import PruningGraph, StackedMask, mask_channels, mask_pieces, stackable
from ..graph.masking import Piece
from ..task import Task
from ._prefix import CutPoint, PrefixCache
from .candidates import Candidate, GrainCandidate

# Scoring precisions: (autocast dtype while halving ranks, dtype of the losses returned). Where
# they differ, the best few after ranking on the whole set are scored again in the second, so
# the losses the search compares are all of that dtype.
PRECISIONS: dict[str, tuple[torch.dtype | None, torch.dtype | None]] = {
    "fp32": (None, None),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-ranking": (torch.bfloat16, None),
}


def default_precision(device: torch.device) -> str:
    """The scoring precision when the scorer is given none: ``bf16-ranking`` on a CPU with
    native bf16 (AVX512-BF16 or AMX: twice the fp32 throughput; the losses compared are still
    fp32's), ``fp32`` elsewhere (on a GPU, stacked fp32 measured fastest:
    docs/benchmarks/search_speed.md)."""
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    return "bf16-ranking" if device.type == "cpu" and native() else "fp32"


def default_stack_bytes(device: torch.device) -> int:
    """A stacked pass's budget for its largest activation when the scorer is given none; 0:
    no stacking.

    On a GPU a sixteenth of the card's memory (a pass holds a few activations of that size at
    once). On a CPU none: a core's throughput per image does not grow with the batch, and
    stacked scoring measured no faster there than one forward per candidate
    (docs/benchmarks/search_speed.md)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 16
    return 0


def split_copies(outputs: Any, copies: int) -> list[Any]:
    """A stacked pass's outputs (any nesting of tensors) cut into one per stacked copy."""
    leaves, spec = tree_flatten(outputs)
    parts = [leaf.chunk(copies) if torch.is_tensor(leaf) else [leaf] * copies for leaf in leaves]
    return [tree_unflatten([part[k] for part in parts], spec) for k in range(copies)]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``'s type; nothing when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrialPlan:
    """How each candidate is tried: its stacked mask pieces, or one at a time (``solo``)."""

    graph: PruningGraph
    candidates: Sequence[Candidate]
    pieces: dict[int, list[Piece]]
    image_bytes: int  # the largest activation of one image in a pass, in bytes
    stack_bytes: int

    @classmethod
    def build(
        cls,
        graph: PruningGraph,
        candidates: Sequence[Candidate],
        sample: torch.Tensor,
        stack: bool,
        stack_bytes: int | None,
    ) -> TrialPlan:
        """Stack every channel candidate that can be (``stack`` and a budget above 0), in
        passes sized for ``sample``'s images."""
        pieces: dict[int, list[Piece]] = {}
        budget = default_stack_bytes(sample.device) if stack_bytes is None else stack_bytes
        if stack and budget > 0:
            for i, c in enumerate(candidates):
                if not isinstance(c, GrainCandidate):
                    found = mask_pieces(graph, c.group, c.idxs)
                    if stackable(found):
                        pieces[i] = found
        image_bytes = _largest_activation(graph.model, sample) if pieces else 1
        return cls(graph, candidates, pieces, image_bytes, budget)

    def stacks(self, members: Sequence[int], images: int) -> Iterator[list[int]]:
        """``members`` that stack, in groups that fit the budget on ``images`` images each."""
        stacked = [i for i in members if i in self.pieces]
        size = max(1, self.stack_bytes // max(1, images * self.image_bytes))
        for start in range(0, len(stacked), size):
            yield stacked[start : start + size]

    def trial(self, i: int) -> AbstractContextManager[Any]:
        """Candidate ``i``'s removal, tried in place: channels are masked by the graph; blocks,
        layers and weights (:mod:`.granularity`) bring their own trial."""
        candidate = self.candidates[i]
        if isinstance(candidate, GrainCandidate):
            return candidate.trial(self.graph)
        return mask_channels(self.graph, candidate.group, candidate.idxs)


def score_batch(
    plan: TrialPlan,
    cuts: list[CutPoint],
    alive: set[int],
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task,
    sums: torch.Tensor,
) -> None:
    """Add each live candidate's summed loss on ``(x, y)`` to ``sums`` (on the device)."""
    cache = PrefixCache(plan.graph.model, x)
    for cut in cuts:
        members = [i for i in cut.candidates if i in alive]
        if not members:
            continue
        cache.advance(cut)
        for stack in plan.stacks(members, len(y)):
            with StackedMask([plan.pieces[i] for i in stack]):
                outputs = cache.run(copies=len(stack))
            losses = torch.stack([task.loss_sum(o, y) for o in split_copies(outputs, len(stack))])
            sums.index_add_(0, torch.tensor(stack, device=sums.device), losses.to(sums.dtype))
        for i in members:
            if i not in plan.pieces:
                with plan.trial(i):
                    outputs = cache.run()
                sums[i] += task.loss_sum(outputs, y).to(sums.dtype)


def _largest_activation(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of the largest tensor any module returns, per image of ``sample``."""
    largest = 0

    def note(module: nn.Module, args: tuple, output: Any) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    with hooked((m, note) for m in model.modules() if m is not model):
        model(sample)
    return max(1, largest // len(sample))
