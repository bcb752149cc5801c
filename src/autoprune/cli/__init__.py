"""``autoprune`` command line: a thin layer over :mod:`autoprune.api`, one module per group of
commands; ``prune``'s options are generated from :class:`~autoprune.search.PruneConfig`.

User errors (:class:`~autoprune.errors.AutopruneError`) print one line and exit with code 2.
"""

from __future__ import annotations

import sys

import click

from ..errors import AutopruneError
from . import demo, export, listing, prune, train
from ._common import app, err

__all__ = ["app", "demo", "export", "listing", "main", "prune", "train"]


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
