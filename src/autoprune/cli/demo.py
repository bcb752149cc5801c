"""``autoprune demo``: the whole pipeline on data that ships, in a few minutes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..errors import AutopruneError
from ..io.export import FORMATS
from ..io.export_check import export_checked
from ..report import write_report
from ..train import TrainConfig
from ._common import DataRootOpt, app, out
from .prune import PRUNE, before_after

# Sized to finish in a few minutes on two CPU cores: one epoch at a high one-cycle rate, then
# a search in bigger steps on a smaller calibration set.
DEMO_TRAIN = TrainConfig(epochs=1, lr=0.2, schedule="onecycle", channels_last=False)
DEMO_PRUNE = replace(PRUNE, step=0.025, recover_every=0.1, recover_steps=50, calib_size=256)


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/demo"),
    weights: Annotated[
        Path | None, typer.Option("--weights", "-w", help="Trained smallcnn; skips training.")
    ] = None,
    target_macs: Annotated[
        float,
        typer.Option(
            "--target-macs", "--target-flops", help="Fraction of the MACs to remove (0.5 = half)."
        ),
    ] = PRUNE.target_macs_reduction,
    data_root: DataRootOpt = None,
) -> None:
    """The whole pipeline on data that ships: train a small CNN on Fashion-MNIST (unless
    --weights), prune it to half its MACs with the loss-aware search, evaluate before and after.

    Rerunning continues or reuses the runs in --out (train/ and prune/).
    """
    model: Any = "smallcnn"
    if weights is None:
        model, _ = api.train(
            "smallcnn",
            "fashion-mnist",
            config=DEMO_TRAIN,
            data_root=data_root,
            out_dir=out_dir / "train",
            resume=True,
        )
    result = api.prune(
        model,
        weights=weights,
        train_data="fashion-mnist",
        val_data="fashion-mnist",
        data_root=data_root,
        config=DEMO_PRUNE,
        target_macs_reduction=target_macs,
        out_dir=out_dir / "prune",
        resume=True,
    )
    run = out_dir / "prune"
    out.print(before_after(result.summary, run), markup=False, highlight=False)
    report_md, report_html = write_report(run)
    format, exported = _export_demo_model(result.model, run)
    out.print(
        f"  report      {report_html} (open in a browser; {report_md.name} beside it)\n"
        f"  exported    {exported} ({format}, checked against torch)\n"
        f"  next        autoprune export {run} --format {format}   # also times it",
        markup=False,
        highlight=False,
    )


def _export_demo_model(model: Any, run: Path) -> tuple[str, Path]:
    """Export in the first format that is installed and can express the model (ONNX has no
    adaptive pooling to sizes that do not divide the input; TorchScript always can)."""
    example = api.example_input(model, "fashion-mnist")
    errors = []
    for format in ("onnx", "torchscript"):
        spec = FORMATS.get(format)
        if not spec.available():
            continue
        try:
            path = export_checked(
                model, run / f"model{spec.suffix}", example, format=format, batch_sizes=()
            )
        except AutopruneError as error:
            errors.append(str(error))
            continue
        return format, path.path
    raise AutopruneError("the demo could not export its model: " + "; ".join(errors))
