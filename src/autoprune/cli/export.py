"""``autoprune export`` and ``autoprune report``: what a finished run gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import nn

from .. import api
from .._forward import eval_mode
from ..io.export import FORMATS
from ..io.export_check import export_checked
from ..measure.latency_table import TIMERS, median_rounds
from ..report import write_report
from ..search.run import load_run_model
from ._common import JsonOpt, app, choices, out


@app.command("export")
def export_cmd(
    run: Annotated[
        Path, typer.Argument(help="A pruning run, or a model directory from autoprune.io.save.")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help=choices(FORMATS))] = "onnx",
    out_file: Annotated[
        Path | None, typer.Option("--out", help="File to write (default: RUN/model.onnx or .pt).")
    ] = None,
    batch_sizes: Annotated[
        str, typer.Option(help="Comma-separated batch sizes to time (the file's is dynamic).")
    ] = "1,64",
    repeats: Annotated[int, typer.Option(help="Timed runs per batch size (median).")] = 20,
    tolerance: Annotated[
        float, typer.Option(help="Largest absolute difference from torch's outputs allowed.")
    ] = 1e-4,
    input_size: Annotated[
        int | None,
        typer.Option(help="Export for N x N inputs (default: the size it was pruned at)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the pruned model as ONNX or TorchScript with a dynamic batch, check it against
    torch, and time both."""
    spec = FORMATS.get(format)  # fail before loading the model
    net = load_run_model(run)
    example = api.example_input(net, None, input_size)
    result = export_checked(
        net,
        out_file or run / f"model{spec.suffix}",
        example,
        format=format,
        tolerance=tolerance,
        batch_sizes=[int(b) for b in batch_sizes.split(",")],
        repeats=repeats,
    )
    target = _pruned_for(run, net, example)
    if as_json:
        out.print_json(json.dumps({**result.to_dict(), "pruned_for": target}))
        return
    checked = " and ".join(map(str, result.check_batch_sizes))
    out.print(
        f"wrote {result.path} ({format}, dynamic batch): matches torch within {tolerance:g} "
        f"(max abs difference {result.max_abs_diff:.2g} at batch {checked})",
        markup=False,
        highlight=False,
    )
    rows = zip(result.eager, result.exported, result.speedups, strict=True)
    for eager, exported, speedup in rows:
        out.print(
            f"  batch {eager.batch_size:>3}: eager {eager.median_ms:8.2f} ms  {result.runtime} "
            f"{exported.median_ms:8.2f} ms  ({speedup:.2f}x)",
            markup=False,
            highlight=False,
        )
    if result.eager:
        out.print(f"  median of {repeats} runs each, torch threads: {result.threads}")
    if target is not None:
        out.print(
            f"  pruned for {target['backend']} at batch {target['batch']}: "
            f"{target['measured_ms']:.3f} ms now, {target['speedup']:.2f}x the dense model's "
            f"{target['dense_measured_ms']:.3f} ms (the run predicted {target['predicted_ms']:.3f}"
            f" ms and measured {target['run_measured_ms']:.3f} ms)",
            markup=False,
            highlight=False,
        )


def _pruned_for(run: Path, net: nn.Module, example: torch.Tensor) -> dict[str, Any] | None:
    """A run pruned to a latency target: the model measured again on that backend and batch."""
    summary = run / "summary.json"
    latency = json.loads(summary.read_text()).get("latency") if summary.is_file() else None
    if latency is None:
        return None
    with eval_mode(net), torch.no_grad():
        (now,) = median_rounds(
            [net], tuple(example.shape[1:]), TIMERS.get(latency["backend"]), latency["batch"], 3
        )
    return {
        "backend": latency["backend"],
        "batch": latency["batch"],
        "measured_ms": now,
        "speedup": latency["dense_measured_ms"] / now,
        "dense_measured_ms": latency["dense_measured_ms"],
        "predicted_ms": latency["predicted_ms"],
        "run_measured_ms": latency["measured_ms"],
    }


@app.command("report")
def report_cmd(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN", help="The --out directory of `autoprune prune`.")
    ],
) -> None:
    """Write RUN/report.md and a self-contained RUN/report.html, with plots under RUN/report/."""
    for path in write_report(run_dir):
        out.print(str(path), markup=False, highlight=False)
