"""What every benchmark needs: the shared data and weights, machine facts, result files."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import autoprune
from autoprune.api import loader_for
from autoprune.data import ImageData, load_dataset
from autoprune.io import load, save
from autoprune.measure import evaluate_batches
from autoprune.train import LossFn, TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOCS = REPO / "docs" / "benchmarks"
SMOKE = Path("/tmp/autoprune-bench-smoke")  # where --smoke runs write, never docs/
SEARCHED = REPO / "runs" / "bench-searched"  # pruned models before fine-tuning, for bench/speed.py
CIFAR10_JPEG75 = Path("~/.cache/autoprune-data/cifar-10-jpeg75").expanduser()


def cifar10_jpeg75_root() -> Path:
    """CIFAR-10-JPEG75 in the official layout, unpacked from ../shared on first use."""
    if not (CIFAR10_JPEG75 / "cifar-10-batches-py" / "test_batch").exists():
        script = SHARED / "data" / "prepare_cifar10_jpeg75.py"
        subprocess.run([sys.executable, str(script)], check=True)
    return CIFAR10_JPEG75


def cifar10_jpeg75(test_size: int = 10_000) -> tuple[ImageData, ImageData]:
    """The CIFAR-10-JPEG75 training split and its first ``test_size`` test images."""
    root = cifar10_jpeg75_root()
    train = load_dataset("cifar10", "train", root)
    return train, load_dataset("cifar10", "test", root).subset(range(test_size))


def adapted_weights(model: str) -> Path:
    """The dense baselines for CIFAR-10-JPEG75 benchmarks (ResNet-20 and ResNet-56)."""
    return SHARED / "weights" / "cifar10-jpeg75-resnet-adapted" / f"{model}.th"


def original_weights(model: str) -> Path:
    """akamaster's CIFAR ResNets as published, trained on the original CIFAR-10."""
    return next((SHARED / "weights" / "cifar10-resnet-akamaster").glob(f"{model}-*.th"))


def machine() -> dict[str, Any]:
    """The facts a reader needs to weigh the timings."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "autoprune": autoprune.__version__,
    }


def machine_line(facts: dict[str, Any]) -> str:
    load = " / ".join(f"{x:.1f}" for x in facts["load_average"])
    return (
        f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['torch_threads']} torch "
        f"threads, load average {load} (1 / 5 / 15 min); torch {facts['torch']}, "
        f"Python {facts['python']}, autoprune {facts['autoprune']}."
    )


def write_results(path: Path, result: dict[str, Any], markdown: str) -> None:
    """``path``.json and ``path``.md side by side (the table is generated, never typed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)


def previous_rows(out: Path, **settings: Any) -> list[dict[str, Any]]:
    """The ``runs`` of ``out``.json when it was written with the same ``settings``: a long
    method can be run on its own (``--scorers``, ``--methods``) and join the table."""
    path = out.with_suffix(".json")
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = all(old.get(key) == value for key, value in settings.items())
    return old["runs"] if same else []


def accuracy(model: nn.Module, data: ImageData, input_size: int | None = None) -> float:
    """Top-1 test accuracy in percent (images resized to ``input_size`` when given)."""
    loader = loader_for(model, data, batch_size=256, train=False, input_size=input_size)
    return evaluate_batches(model, loader).accuracy


def finetune(
    model: nn.Module,
    train: ImageData,
    epochs: float,
    *,
    lr: float,
    seed: int,
    loss_fn: LossFn | None = None,
    input_size: int | None = None,
) -> None:
    """Fine-tune in place with autoprune's trainer: SGD (nesterov, weight decay 5e-4), cosine
    schedule, batch 128. ``epochs`` may be a fraction (a smoke run trains a few steps)."""
    config = TrainConfig(
        epochs=max(1, math.ceil(epochs)),
        max_steps=max(1, round(epochs * len(train) / 128)),
        lr=lr,
        channels_last=False,
        progress=False,
        seed=seed,
    )
    loader = loader_for(
        model, train, batch_size=config.batch_size, train=True, seed=seed, input_size=input_size
    )
    fit(model, loader, config, loss_fn=loss_fn)


def trained_model(
    path: Path,
    train: ImageData,
    factory: str,
    *,
    epochs: float,
    lr: float,
    seed: int,
    input_shape: tuple[int, int, int],
    **kwargs: Any,
) -> nn.Module:
    """Zoo model ``factory(**kwargs)`` trained from scratch on ``train`` with :func:`finetune`,
    saved at ``path`` and loaded from there next time (benchmarks without shipped weights)."""
    if (path / "arch.json").exists():
        return load(path)
    torch.manual_seed(seed)
    model = autoprune.create_model(factory, **kwargs)
    size = input_shape[-1]
    finetune(model, train, epochs, lr=lr, seed=seed, input_size=size)
    save(model, path, input_size=input_shape)
    return model


def same_decision(a: dict, b: dict) -> bool:
    """Two searches' decisions at one iteration agree: group, channels, loss to 1e-5."""
    return (a["group"], a["channels"]) == (b["group"], b["channels"]) and math.isclose(
        a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-7
    )


def from_history(history: list[dict]) -> dict:
    """A row's images scored and decisions (to compare with the exhaustive scorer's)."""
    return {
        "images_scored": sum(h["scorer"]["images"] for h in history),
        "decisions": [
            {"group": h["group"], "channels": h["channels"], "loss": h["loss"]} for h in history
        ],
    }
