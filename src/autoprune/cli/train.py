"""``autoprune train``, ``eval`` and ``profile``: a model's training, accuracy and cost."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from .. import api
from ..measure import available_backends, profile_model
from ..train import SCHEDULES, TrainConfig
from ._common import (
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    InputSizeOpt,
    JsonOpt,
    ModelFileOpt,
    ModelOpt,
    WeightsOpt,
    app,
    model_name,
    out,
)


@app.command("train")
def train_cmd(
    data: DataOpt,
    model: ModelOpt = "",
    model_file: ModelFileOpt = None,
    weights: WeightsOpt = None,
    data_root: DataRootOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory.")] = None,
    epochs: int = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps.")] = None,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    schedule: Annotated[
        str, typer.Option(help=f"One of: {', '.join(SCHEDULES.names())}.")
    ] = "cosine",
    warmup: Annotated[float, typer.Option(help="Warm-up as a fraction of the steps.")] = 0.0,
    label_smoothing: float = 0.0,
    seed: int = 0,
    device: DeviceOpt = "auto",
    input_size: InputSizeOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train (or fine-tune) a model; checkpoints every epoch when --out is given."""
    SCHEDULES.entry(schedule)  # fail before loading data
    config = TrainConfig(
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_fraction=warmup,
        label_smoothing=label_smoothing,
        seed=seed,
        progress=not no_progress,
    )
    _, result = api.train(
        model_name(model, model_file),
        data,
        config=config,
        weights=weights,
        data_root=data_root,
        device=device,
        out_dir=out_dir,
        resume=resume,
        input_size=input_size,
    )
    history = [asdict(r) for r in result.history]
    if as_json:
        out.print_json(json.dumps({"history": history, "steps": result.steps}))
    elif out_dir is not None:
        out.print(f"saved to {out_dir}")


@app.command("eval")
def eval_cmd(
    data: DataOpt,
    model: ModelOpt = "",
    model_file: ModelFileOpt = None,
    weights: WeightsOpt = None,
    data_root: DataRootOpt = None,
    split: str = "test",
    batch_size: int = 256,
    device: DeviceOpt = "auto",
    input_size: InputSizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy and loss on a dataset split, with the model's MACs and parameters."""
    net, dataset = api.model_and_data(
        model_name(model, model_file), data, split, weights=weights, data_root=data_root
    )
    result = api.evaluate(net, dataset, batch_size=batch_size, device=device, input_size=input_size)
    report = {
        "accuracy": None if result.accuracy is None else round(result.accuracy, 4),
        "loss": round(result.loss, 6),
        **api.complexity(net, dataset, input_size),
        "samples": result.samples,
    }
    if as_json:
        out.print_json(json.dumps(report))
    else:
        out.print(
            f"accuracy {report['accuracy']:.2f}%  loss {report['loss']:.4f}  "
            f"MACs {report['macs'] / 1e6:.2f} M  params {report['params'] / 1e6:.3f} M  "
            f"({report['samples']} images of {dataset.info.name} {split})"
        )


@app.command("profile")
def profile_cmd(
    model: ModelOpt = "",
    model_file: ModelFileOpt = None,
    weights: WeightsOpt = None,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Take the input size from it.")
    ] = None,
    input_size: InputSizeOpt = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,64",
    backends: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated; installed: {', '.join(available_backends())}."),
    ] = None,
    repeats: int = 20,
    no_latency: Annotated[bool, typer.Option("--no-latency")] = False,
    as_json: JsonOpt = False,
) -> None:
    """MACs, parameters and latency (median of repeated runs after warm-up)."""
    net = api.build_model(model_name(model, model_file), weights=weights)
    example = api.example_input(net, data, input_size)
    chosen = [] if no_latency else (backends.split(",") if backends else None)
    result = profile_model(
        net,
        tuple(example.shape[1:]),
        batch_sizes=[int(b) for b in batch_sizes.split(",")],
        backends=chosen,
        repeats=repeats,
    )
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(
        f"MACs {result.macs / 1e6:.2f} M  params {result.params / 1e6:.3f} M  "
        f"input {'x'.join(map(str, result.input_shape))}"
    )
    for lat in result.latency:
        out.print(
            f"{lat.backend:>12} batch {lat.batch_size:>3}: {lat.median_ms:8.2f} ms  "
            f"({lat.images_per_s:.0f} img/s, median of {lat.repeats})"
        )
