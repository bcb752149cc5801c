"""Fixtures for data that lives outside the repository (../shared, Debian packages)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_JPEG75 = Path("~/.cache/autoprune-data/cifar-10-jpeg75").expanduser()


def _import_torchvision_here() -> None:
    """torchvision's wheel for this torch is a CUDA build; the shared shim makes its (and timm's)
    model code import on a CPU-only torch. Tests that need either skip when it is absent."""
    shim_dir = SHARED / "tools"
    if not (shim_dir / "torchvision_cpu_shim.py").exists():
        return
    sys.path.insert(0, str(shim_dir))
    import torchvision_cpu_shim

    with contextlib.suppress(ImportError):
        torchvision_cpu_shim.install()


_import_torchvision_here()

# The test models are tiny: a second thread only adds synchronisation, and on a busy machine
# OpenMP's spinning threads slow them down tenfold.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (shared test data and weights) is not here")
    return SHARED


@pytest.fixture(scope="session")
def cifar10_jpeg75_root(shared_dir: Path) -> Path:
    """CIFAR-10-JPEG75 in the official layout, unpacked by the shared script on first use."""
    if not (CIFAR_JPEG75 / "cifar-10-batches-py" / "test_batch").exists():
        script = shared_dir / "data" / "prepare_cifar10_jpeg75.py"
        subprocess.run([sys.executable, str(script)], check=True, capture_output=True)
    return CIFAR_JPEG75


CliRun = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRun:
    """Run ``autoprune ARGS...`` in-process; returns (exit code, stdout, stderr)."""
    from autoprune.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            main(list(argv))
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
