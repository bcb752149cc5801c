"""Latency as the median of repeated timed runs after warm-up.

Medians, not means: this machine (and most CI runners) is shared and noisy, and a single slow
run should not decide a comparison.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._registry import Registry
from ..io.export import FORMATS, ExportFormat, Runner

# A backend turns (model, example input) into a Runner that runs one batch.
Backend = Callable[[nn.Module, torch.Tensor], Runner]
BACKENDS: Registry[Backend] = Registry("latency backend")


@dataclass(frozen=True)
class Latency:
    backend: str
    batch_size: int
    median_ms: float
    repeats: int

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms


@BACKENDS.register("eager")
def _eager(model: nn.Module, example: torch.Tensor) -> Runner:
    model = model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def _exported(fmt: ExportFormat) -> Backend:
    """Write the model in ``fmt`` to a temporary file and run that file in its runtime."""

    def prepare(model: nn.Module, example: torch.Tensor) -> Runner:
        with tempfile.TemporaryDirectory() as tmp:
            return fmt.load(fmt.write(model, Path(tmp) / f"model{fmt.suffix}", example))

    return prepare


for _format in FORMATS:  # one backend per export format: onnxruntime, torchscript
    BACKENDS.register(_format.obj.runtime)(_exported(_format.obj))


def available_backends() -> list[str]:
    """Backends usable here (``onnxruntime`` only where it is installed)."""
    return ["eager", *(f.obj.runtime for f in FORMATS if f.obj.available())]


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_sizes: Sequence[int] = (1,),
    backend: str = "eager",
    warmup: int = 5,
    repeats: int = 20,
    min_seconds: float = 0.0,
) -> list[Latency]:
    """Median wall time of one forward pass of random inputs, for each batch size.

    The backend is prepared once (one export, for a runtime of exported files) and timed at
    every batch size; ``min_seconds`` extends the repeats until that much time was measured,
    so that fast models get enough samples.
    """
    device = next(model.parameters()).device
    run = BACKENDS.get(backend)(model, torch.randn(1, *input_shape, device=device))
    return time_runner(
        run,
        input_shape,
        backend=backend,
        batch_sizes=batch_sizes,
        warmup=warmup,
        repeats=repeats,
        min_seconds=min_seconds,
        device=device,
    )


def time_runner(
    run: Runner,
    input_shape: tuple[int, ...],
    *,
    backend: str,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 5,
    repeats: int = 20,
    min_seconds: float = 0.0,
    device: torch.device | str = "cpu",
) -> list[Latency]:
    """:func:`measure_latency` of a runner already prepared (an exported file, say), reported
    under the name ``backend``."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, *input_shape, device=device)
        for _ in range(warmup):
            run(x)
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            run(x)
            sync()
            times.append(time.perf_counter() - t0)
        results.append(Latency(backend, batch_size, 1000.0 * statistics.median(times), len(times)))
    return results
