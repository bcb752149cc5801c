"""``autoprune models`` and ``autoprune datasets``: the registries."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..data import DATASETS, dataset_info
from ..models import MODELS, model_info
from ._common import app, out


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
