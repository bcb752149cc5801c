"""``autoprune`` command line: a thin layer over :mod:`autoprune.api`.

User errors (:class:`~autoprune.errors.AutopruneError`) print one line and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from . import api
from .data import DATASETS, dataset_info
from .errors import AutopruneError
from .graph import SCOPES
from .io.export import FORMATS
from .io.export_check import export_checked
from .measure import available_backends, profile_model
from .models import MODELS, model_info
from .report import write_report
from .search import ALLOCATIONS, GRANULARITIES, OBJECTIVES, SCORERS, PruneConfig
from .search import SCHEDULES as PRUNE_SCHEDULES
from .search.run import load_run_model
from .train import SCHEDULES, TrainConfig
from .transfer import TRANSFER_ORDERS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make trained PyTorch CNNs smaller and faster by automatic structured pruning.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# Options shared by several commands, declared once.
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Zoo name, tv:NAME, timm:NAME, or file.py:factory.")
]
ModelFileOpt = Annotated[
    str | None, typer.Option("--model-file", help="file.py:factory building your own nn.Module.")
]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", "-w", help="Checkpoint to load.")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="Dataset name (autoprune datasets).")]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-root", help="Where the dataset files are [default: ~/.cache/autoprune-data]."
    ),
]
InputSizeOpt = Annotated[
    int | None, typer.Option("--input-size", help="Resize images to N x N (bilinear).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
TargetOpt = Annotated[
    float, typer.Option("--target-flops", help="Fraction of the MACs to remove (0.5 = half).")
]
PRUNE = PruneConfig()  # the defaults the prune options show


def _model_name(model: str | None, model_file: str | None) -> str:
    if model_file:
        return model_file
    if model:
        return model
    raise AutopruneError("give --model NAME or --model-file file.py:factory")


@app.command("models")
def models_cmd(pattern: Annotated[str, typer.Argument()] = "*") -> None:
    """List the model zoo."""
    table = Table("name", "input", "classes", "dataset", "description")
    for name in MODELS.names(pattern):
        info = model_info(name)
        shape = "x".join(map(str, info.input_size))
        table.add_row(name, shape, str(info.num_classes), info.dataset, info.description)
    out.print(table)


@app.command("datasets")
def datasets_cmd() -> None:
    """List the datasets."""
    table = Table("name", "classes", "image", "description")
    for entry in DATASETS:
        info = dataset_info(entry.name)
        h, w = info.image_size
        shape = f"{info.channels}x{h}x{w}" if h else "from files"
        table.add_row(
            entry.name, str(info.num_classes or "from files"), shape, entry.meta["description"]
        )
    out.print(table)


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
        _model_name(model, model_file),
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
        _model_name(model, model_file), data, split, weights=weights, data_root=data_root
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
    net = api.build_model(_model_name(model, model_file), weights=weights)
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


def _choices(registry: Any) -> str:
    return f"One of: {', '.join(registry.names())}."


@app.command("prune")
def prune_cmd(
    model: ModelOpt = "",
    model_file: ModelFileOpt = None,
    weights: WeightsOpt = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Dataset: its train split calibrates and recovers, its test split measures "
            "accuracy. Not needed for --schedule fixed with a data-free criterion.",
        ),
    ] = None,
    data_root: DataRootOpt = None,
    target_flops: TargetOpt = PRUNE.target_macs_reduction,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run directory (checkpoints, summary, model).")
    ] = None,
    criteria: Annotated[
        str, typer.Option(help="Comma-separated criteria pool (autoprune.criteria).")
    ] = ",".join(PRUNE.criteria),
    schedule: Annotated[
        str | None,
        typer.Option(
            help=f"{_choices(PRUNE_SCHEDULES)} [default: auto; saliency-then-similarity when "
            "transferring]"
        ),
    ] = None,
    saliency_fraction: Annotated[
        float, typer.Option(help="saliency-then-similarity: switch at this part of the target.")
    ] = PRUNE.saliency_fraction,
    allocation: Annotated[
        str, typer.Option(help=f"With --schedule fixed: {', '.join(ALLOCATIONS.names())}.")
    ] = PRUNE.allocation,
    step: Annotated[
        float, typer.Option(help="MACs one iteration removes, as a fraction of the original.")
    ] = PRUNE.step,
    cap: Annotated[
        float, typer.Option(help="Most of a group's original channels that may go.")
    ] = PRUNE.cap,
    channel_multiple: Annotated[
        int,
        typer.Option(
            help="Keep a multiple of this many channels per group (8 or 16: faster CPU "
            "inference, see docs/benchmarks/speed.md)."
        ),
    ] = PRUNE.channel_multiple,
    objective: Annotated[str, typer.Option(help=_choices(OBJECTIVES))] = PRUNE.objective,
    scorer: Annotated[str, typer.Option(help=_choices(SCORERS))] = PRUNE.scorer,
    calib_size: Annotated[
        int, typer.Option(help="Calibration images candidates are scored on.")
    ] = PRUNE.calib_size,
    taylor_size: Annotated[
        int, typer.Option(help="Calibration images taylor's gradients are taken on.")
    ] = PRUNE.taylor_size,
    recover_every: Annotated[
        float, typer.Option(help="Recover each time this fraction of the MACs is gone.")
    ] = PRUNE.recover_every,
    recover_steps: Annotated[
        int, typer.Option(help="Optimizer steps per recovery (0: none).")
    ] = PRUNE.recover_steps,
    lr: Annotated[float, typer.Option(help="Recovery learning rate.")] = PRUNE.recovery.lr,
    batch_size: int = PRUNE.recovery.batch_size,
    finetune_epochs: Annotated[
        int, typer.Option(help="Epochs of fine-tuning after the search.")
    ] = PRUNE.finetune_epochs,
    finetune_lr: float = PRUNE.finetune.lr,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill/--no-distill", help="Distil from the unpruned model while training."
        ),
    ] = PRUNE.distill,
    ignored_layers: Annotated[
        str, typer.Option(help="Comma-separated layers to keep unpruned.")
    ] = "",
    granularity: Annotated[
        str,
        typer.Option(
            help="What to remove, coarse to fine: comma-separated "
            f"{', '.join(GRANULARITIES.names())} (e.g. block,layer,channel,weight)."
        ),
    ] = ",".join(PRUNE.granularity),
    weight_sparsity: Annotated[
        float, typer.Option(help="With --granularity ...,weight: the share of weights zeroed.")
    ] = PRUNE.weight_sparsity,
    weight_loss_limit: Annotated[
        float,
        typer.Option(
            help="With ...,weight: undo the step and end the weight phase where recovery leaves "
            "the calibration loss above this multiple of its value at the phase's start "
            "(0: reach --weight-sparsity at any cost)."
        ),
    ] = PRUNE.weight_loss_limit or 0.0,
    scope: Annotated[
        str,
        typer.Option(
            help=f"Layers pruned and MACs counted: {', '.join(SCOPES.names())} "
            "(stem: a hybrid's stem conv and MobileNetV2 blocks)."
        ),
    ] = PRUNE.scope,
    transfer: Annotated[
        bool,
        typer.Option(
            "--transfer",
            help="Replace the classifier for --data's classes and adapt before pruning (also "
            "automatic when the checkpoint's classes differ).",
        ),
    ] = False,
    transfer_order: Annotated[
        str, typer.Option(help=_choices(TRANSFER_ORDERS))
    ] = PRUNE.transfer_order,
    transfer_head: Annotated[
        str | None, typer.Option(help="The classifier layer to replace [default: found].")
    ] = None,
    head_steps: Annotated[
        int, typer.Option(help="Transfer: steps training the new head alone.")
    ] = PRUNE.head_steps,
    adapt_steps: Annotated[
        int, typer.Option(help="Transfer (adapt-then-prune): steps training the whole network.")
    ] = PRUNE.adapt_steps,
    seed: int = PRUNE.seed,
    device: DeviceOpt = "auto",
    input_size: InputSizeOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Prune to a MACs target: loss-aware search over (layer group, criterion), with recovery."""
    config = PruneConfig(
        target_macs_reduction=target_flops,
        criteria=criteria,
        saliency_fraction=saliency_fraction,
        allocation=allocation,
        step=step,
        cap=cap,
        channel_multiple=channel_multiple,
        objective=objective,
        scorer=scorer,
        calib_size=calib_size,
        taylor_size=taylor_size,
        recover_every=recover_every,
        recover_steps=recover_steps,
        recovery=replace(PRUNE.recovery, lr=lr, batch_size=batch_size),
        finetune_epochs=finetune_epochs,
        finetune=replace(PRUNE.finetune, lr=finetune_lr, batch_size=batch_size),
        distill=distill,
        ignored_layers=ignored_layers,
        granularity=granularity,
        weight_sparsity=weight_sparsity,
        weight_loss_limit=weight_loss_limit or None,
        scope=scope,
        transfer_order=transfer_order,
        transfer_head=transfer_head,
        head_steps=head_steps,
        head_training=replace(PRUNE.head_training, batch_size=batch_size),
        adapt_steps=adapt_steps,
        adaptation=replace(PRUNE.adaptation, batch_size=batch_size),
        seed=seed,
    )
    result = api.prune(
        _model_name(model, model_file),
        schedule=schedule,  # given only when chosen: transfer runs have their own default
        transfer=transfer,
        train_data=data,
        val_data=data,
        weights=weights,
        data_root=data_root,
        device=device,
        input_size=input_size,
        config=config,
        out_dir=out_dir,
        resume=resume,
        progress=not no_progress,
    )
    if as_json:
        out.print_json(json.dumps(result.summary))
    else:
        out.print(_before_after(result.summary, out_dir), markup=False, highlight=False)


def _before_after(summary: dict[str, Any], out_dir: Path | None) -> str:
    """A few lines: MACs, parameters and accuracy before and after, and where the run is."""
    base, pruned, timings = summary["baseline"], summary["pruned"], summary["timings"]
    lines = [
        f"{summary['model']} on {summary['dataset'] or 'no data'}, "
        f"{summary['iterations']} iterations in {timings['total_s']:.0f} s "
        f"(search {timings['search_s']:.0f} s, recovery {timings['recovery_s']:.0f} s, "
        f"fine-tune {timings['finetune_s']:.0f} s)",
        f"  MACs     {base['macs'] / 1e6:9.2f} M -> {pruned['macs'] / 1e6:9.2f} M "
        f"(-{100 * summary['macs_reduction']:.1f} %)",
        f"  params   {base['params'] / 1e3:9.1f} k -> {pruned['params'] / 1e3:9.1f} k "
        f"(-{100 * summary['params_reduction']:.1f} %)",
    ]
    scope = summary["config"].get("scope", "all")
    if scope != "all":
        s = summary["scopes"][scope]
        lines.append(
            f"  {scope + ' MACs':<9}{s['macs_before'] / 1e6:9.2f} M -> "
            f"{s['macs_after'] / 1e6:9.2f} M (-{100 * s['macs_reduction']:.1f} %)"
        )
    if base["accuracy"] is not None:
        lines.append(
            f"  accuracy {base['accuracy']:9.2f} % -> {pruned['accuracy']:9.2f} % "
            f"({pruned['accuracy'] - base['accuracy']:+.2f})"
        )
    elif base["loss"] is not None:  # a task without a metric (a custom loss): its loss
        lines.append(f"  val loss {base['loss']:9.4f}   -> {pruned['loss']:9.4f}")
    ended_early = summary.get("ended_early", {})  # absent from runs of older versions
    if summary["removed"]["weights"] or ended_early:
        lines.append(
            f"  non-zero {summary['nonzero_params'] / 1e3:9.1f} k parameters: "
            f"{summary['compression_ratio']:.1f}x compression, "
            f"{100 * summary['weight_sparsity']:.1f} % of weights zero"
        )
    for grain, why in ended_early.items():
        lines.append(f"  {grain} ended before its goal: {why}")
    transfer = summary.get("transfer")
    if transfer is not None:
        adapted = "-" if transfer["accuracy"] is None else f"{transfer['accuracy']:.2f} %"
        lines.append(
            f"  transferred from {transfer['source'] or 'the given model'}: "
            f"{transfer['classes_before']} -> {transfer['classes_after']} classes "
            f"(head {transfer['head']}, {transfer['order']}), {adapted} after adapting"
        )
    chosen = ", ".join(f"{k} {v}" for k, v in summary["criteria_chosen"].items())
    lines.append(f"  criteria chosen: {chosen or '-'}")
    if out_dir is not None:
        lines.append(f"  run directory: {out_dir}")
    return "\n".join(lines)


@app.command("export")
def export_cmd(
    run: Annotated[
        Path, typer.Argument(help="A pruning run, or a model directory from autoprune.io.save.")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help=_choices(FORMATS))] = "onnx",
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
    result = export_checked(
        net,
        out_file or run / f"model{spec.suffix}",
        api.example_input(net, None, input_size),
        format=format,
        tolerance=tolerance,
        batch_sizes=[int(b) for b in batch_sizes.split(",")],
        repeats=repeats,
    )
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
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


# Sized to finish in a few minutes on two CPU cores: one epoch at a high one-cycle rate (about
# 89 % on Fashion-MNIST), then a search in bigger steps on a smaller calibration set.
DEMO_TRAIN = TrainConfig(epochs=1, lr=0.2, schedule="onecycle", channels_last=False)
DEMO_PRUNE = replace(PRUNE, step=0.025, recover_every=0.1, recover_steps=50, calib_size=256)


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/demo"),
    weights: Annotated[
        Path | None, typer.Option("--weights", "-w", help="Trained smallcnn; skips training.")
    ] = None,
    target_flops: TargetOpt = PRUNE.target_macs_reduction,
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
        target_macs_reduction=target_flops,
        out_dir=out_dir / "prune",
        resume=True,
    )
    run = out_dir / "prune"
    out.print(_before_after(result.summary, run), markup=False, highlight=False)
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


@app.command("report")
def report_cmd(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN", help="The --out directory of `autoprune prune`.")
    ],
) -> None:
    """Write RUN/report.md and a self-contained RUN/report.html, with plots under RUN/report/."""
    for path in write_report(run_dir):
        out.print(str(path), markup=False, highlight=False)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except AutopruneError as error:
        err.print(f"error: {error}", markup=False, highlight=False)
        sys.exit(2)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (click.Abort, KeyboardInterrupt):
        err.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
