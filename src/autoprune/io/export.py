"""Export to ONNX and TorchScript with a dynamic batch dimension."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import AutopruneError


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """Write ``model`` as ONNX (input ``input``, output ``logits``, batch dimension dynamic).

    Uses the ``torch.export``-based exporter and falls back to the TorchScript-based one for
    models that ``torch.export`` cannot capture.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise AutopruneError(
            "ONNX export needs the onnx extra: pip install 'autoprune[onnx]'"
        ) from err
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
        with _quiet():
            torch.onnx.export(
                model,
                (example_input,),
                str(path),
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **names,
            )
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
