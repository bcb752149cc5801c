"""Export to ONNX and TorchScript with a dynamic batch dimension, and run the written files.

:data:`FORMATS` names each format with how it is written and how the written file is run, so
that what is checked and timed is the file a user deploys, not a fresh export of the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._registry import Registry
from ..errors import AutopruneError

# Runs one batch: an eager model, or an exported file in its runtime.
Runner = Callable[[torch.Tensor], torch.Tensor]
ONNX_EXTRA = "ONNX needs the onnx extra: pip install 'autoprune[onnx]'"


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """Write ``model`` as ONNX (input ``input``, output ``logits``, batch dimension dynamic).

    Uses the ``torch.export``-based exporter and falls back to the TorchScript-based one for
    models that ``torch.export`` cannot capture; raises :class:`AutopruneError` when neither
    can (an operator ONNX lacks, say).
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise AutopruneError(ONNX_EXTRA) from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    names = {"input_names": ["input"], "output_names": ["logits"]}
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (example_input,),
                str(path),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                **names,
            )
    except Exception:  # torch.export could not capture the model: use the tracer
        try:
            with _quiet():
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(path),
                    dynamo=False,
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    **names,
                )
        except Exception as err:
            reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
            raise AutopruneError(
                f"cannot export {type(model).__name__} to ONNX: {reason} (try TorchScript)"
            ) from err
    return path


def export_torchscript(model: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """Write ``model`` as TorchScript: scripted where possible, else traced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    try:
        module = torch.jit.script(model)
    except Exception:
        module = torch.jit.trace(model, example_input)
    module.save(str(path))
    return path


def run_onnx(path: str | Path) -> Runner:
    """An ONNX Runtime CPU session on ``path``, with as many threads as torch uses, so that
    its timings compare with eager's."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise AutopruneError(ONNX_EXTRA) from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def run_torchscript(path: str | Path) -> Runner:
    """The TorchScript module in ``path``, run without autograd like an eager model."""
    module = torch.jit.load(str(path)).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return run


@dataclass(frozen=True)
class ExportFormat:
    """How a format is written and how the written file is run.

    ``runtime`` is the name its latency is reported under (a backend of
    :mod:`autoprune.measure.latency`); ``requires`` lists the modules it needs beyond torch.
    """

    suffix: str
    runtime: str
    write: Callable[[nn.Module, Path, torch.Tensor], Path]
    load: Callable[[Path], Runner]
    requires: tuple[str, ...] = ()

    def available(self) -> bool:
        return all(importlib.util.find_spec(module) for module in self.requires)


FORMATS: Registry[ExportFormat] = Registry("export format")
FORMATS.register("onnx")(
    ExportFormat(".onnx", "onnxruntime", export_onnx, run_onnx, ("onnxruntime", "onnxscript"))
)
FORMATS.register("torchscript")(
    ExportFormat(".pt", "torchscript", export_torchscript, run_torchscript)
)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation chatter that users cannot act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
