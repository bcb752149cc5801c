"""What every command shares: the app, the consoles, options declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..errors import AutopruneError

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
        "--data-root", help="Where the dataset files are (default: ~/.cache/autoprune-data)."
    ),
]
InputSizeOpt = Annotated[
    int | None, typer.Option("--input-size", help="Resize images to N x N (bilinear).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def model_name(model: str | None, model_file: str | None) -> str:
    if model_file:
        return model_file
    if model:
        return model
    raise AutopruneError("give --model NAME or --model-file file.py:factory")


def choices(registry: Any) -> str:
    return f"One of: {', '.join(registry.names())}."
