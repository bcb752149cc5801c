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
from ..io.export import export_onnx

# A backend turns (model, example input) into a callable that runs one batch.
Runner = Callable[[torch.Tensor], object]
BACKENDS: Registry[Callable[[nn.Module, torch.Tensor], Runner]] = Registry("latency backend")


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

    def run(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return model(x)

    return run


@BACKENDS.register("onnxruntime")
def _onnxruntime(model: nn.Module, example: torch.Tensor) -> Runner:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", example)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def available_backends() -> list[str]:
    """Backends usable here (``onnxruntime`` only where it is installed)."""
    names = ["eager"]
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return names
    return [*names, "onnxruntime"]


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

    The backend is prepared once (one ONNX export) and timed at every batch size;
    ``min_seconds`` extends the repeats until that much time was measured, so that fast models
    get enough samples.
    """
    device = next(model.parameters()).device
    run = BACKENDS.get(backend)(model, torch.randn(1, *input_shape, device=device))
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
