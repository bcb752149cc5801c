"""Fetch a public dataset file once, verified by md5, shared by every dataset module.

Any failure (offline, HTTP error, wrong checksum) becomes a :class:`DataNotFoundError` that says
which files were expected where and how to provide them, because that is all a user can act on.
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..errors import DataNotFoundError

_CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, md5: str, dest: Path, *, missing: str) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right md5 is already there.

    ``missing`` starts the error message: what was expected where (one line, no period).
    """
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _stream(url, part)
        got = md5sum(part)
        if got != md5:
            raise OSError(f"md5 {got}, expected {md5}")
        part.replace(dest)
    except OSError as e:  # URLError, timeouts, HTTP errors and disk errors are all OSErrors
        part.unlink(missing_ok=True)
        raise DataNotFoundError(
            f"{missing}; downloading {url} failed ({type(e).__name__}: {e}); "
            "put the files there or pass --data-root DIR pointing to them"
        ) from e
    return dest


def fetch_and_extract(url: str, md5: str, root: Path, *, missing: str) -> None:
    """Download a .tar.gz into ``root`` and unpack it there (``filter="data"``: no links out)."""
    archive = fetch(url, md5, root / url.rsplit("/", 1)[-1], missing=missing)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()


def _stream(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=30) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"downloading {dest.name.removesuffix('.part')}", total=total)
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                bar.advance(task, len(chunk))
