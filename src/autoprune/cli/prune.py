"""``autoprune prune``: its options are :class:`PruneConfig`'s fields, generated from them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..search import PruneConfig
from ..train import TrainConfig
from . import _common as common
from ._common import app, model_name, out
from ._config_options import with_config_options

PRUNE = PruneConfig()  # the defaults the prune options show


@app.command("prune")
@with_config_options(PruneConfig)
def prune_cmd(
    model: common.ModelOpt = "",
    model_file: common.ModelFileOpt = None,
    weights: common.WeightsOpt = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Dataset: its train split calibrates and recovers, its test split measures "
            "accuracy. Not needed for --schedule fixed with a data-free criterion.",
        ),
    ] = None,
    data_root: common.DataRootOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run directory (checkpoints, summary, model).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Batch size of every training (recovery, fine-tune, transfer).")
    ] = PRUNE.recovery.batch_size,
    device: common.DeviceOpt = "auto",
    input_size: common.InputSizeOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    as_json: common.JsonOpt = False,
    *,
    config: dict[str, Any],
) -> None:
    """Prune to a MACs target: loss-aware search over (layer group, criterion), with recovery."""
    trainings = {
        k: replace(v, batch_size=batch_size)
        for k, v in config.items()
        if isinstance(v, TrainConfig)
    }
    schedule = config.pop("schedule")  # given only when chosen: transfer runs have their own
    result = api.prune(
        model_name(model, model_file),
        schedule=schedule,
        train_data=data,
        val_data=data,
        weights=weights,
        data_root=data_root,
        device=device,
        input_size=input_size,
        config=PruneConfig(**{**config, **trainings}),
        out_dir=out_dir,
        resume=resume,
        progress=not no_progress,
    )
    if as_json:
        out.print_json(json.dumps(result.summary))
    else:
        out.print(before_after(result.summary, out_dir), markup=False, highlight=False)


def before_after(summary: dict[str, Any], out_dir: Path | None) -> str:
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
