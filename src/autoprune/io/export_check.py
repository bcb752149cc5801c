"""Export that proves itself: the written file must compute what the model does, and is timed
against eager torch, so a user learns before deploying whether it is right and faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AutopruneError
from ..measure.latency import BACKENDS, Latency, time_runner
from .export import FORMATS, Runner

# Batch 1, and one the file was not exported at: an exporter that froze the batch dimension
# fails here rather than in deployment.
CHECK_BATCH_SIZES = (1, 3)
CHECK_SEED = 0


@dataclass(frozen=True)
class ExportCheck:
    """Where the file is, how far its outputs are from torch's, and the latency of both
    (``eager`` and ``exported`` pair up by batch size)."""

    path: Path
    format: str
    runtime: str
    max_abs_diff: float
    tolerance: float
    check_batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES
    threads: int = 1
    eager: list[Latency] = field(default_factory=list)
    exported: list[Latency] = field(default_factory=list)

    @property
    def speedups(self) -> list[float]:
        """Eager latency over the file's, per timed batch size (> 1: the export is faster)."""
        return [e.median_ms / x.median_ms for e, x in zip(self.eager, self.exported, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "speedups": self.speedups}


def export_checked(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    *,
    format: str = "onnx",
    tolerance: float = 1e-4,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 5,
) -> ExportCheck:
    """Write ``model`` in ``format`` (dynamic batch), check the file, and time it against eager.

    The file is run in its runtime (ONNX Runtime, TorchScript) on seeded random inputs at
    batch sizes :data:`CHECK_BATCH_SIZES`; the largest absolute difference from the eager
    outputs must be at most ``tolerance``, else :class:`AutopruneError` (the file is left for
    inspection). Latency is the median of ``repeats`` runs after ``warmup``, per batch size in
    ``batch_sizes`` (``()`` skips timing), for eager torch and for the file, with torch's
    current thread count for both. ``model`` is put in eval mode.
    """
    spec = FORMATS.get(format)
    model = model.eval()
    written = spec.write(model, Path(path), example_input)
    run_file = spec.load(written)
    run_eager = BACKENDS.get("eager")(model, example_input)
    diff = _max_abs_diff(run_eager, run_file, example_input)
    if not diff <= tolerance:  # also catches NaN
        raise AutopruneError(
            f"the {format} export in {written} does not match the torch model: max abs "
            f"difference {diff:.3g} > tolerance {tolerance:g} on random inputs at batch sizes "
            f"{', '.join(map(str, CHECK_BATCH_SIZES))}"
        )
    shape = tuple(example_input.shape[1:])
    timing = {"batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup}
    device = example_input.device
    return ExportCheck(
        written,
        format,
        spec.runtime,
        diff,
        tolerance,
        threads=torch.get_num_threads(),
        eager=time_runner(run_eager, shape, backend="eager", device=device, **timing),
        exported=time_runner(run_file, shape, backend=spec.runtime, device=device, **timing),
    )


def _max_abs_diff(reference: Runner, candidate: Runner, example: torch.Tensor) -> float:
    """Largest absolute difference over the check batches (NaN if either gives a NaN)."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    diffs = []
    for batch_size in CHECK_BATCH_SIZES:
        x = torch.randn(batch_size, *example.shape[1:], generator=generator).to(example)
        got, expected = candidate(x), reference(x)
        if got.shape != expected.shape:
            raise AutopruneError(
                f"the exported model returns shape {tuple(got.shape)} for an input of "
                f"{tuple(x.shape)}; torch returns {tuple(expected.shape)}"
            )
        diffs.append((got.to(expected) - expected).abs().max())
    return torch.stack(diffs).max().item()
