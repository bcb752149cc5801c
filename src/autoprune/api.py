"""The high-level Python API: names or objects in, results out. The CLI is a thin layer on it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ._device import resolve_device
from .data import BatchLoader, ImageData, dataset_info, load_dataset, make_loader
from .errors import AutopruneError
from .measure import EvalResult, count_macs, count_params, evaluate_batches
from .models import create_model, model_info
from .train import TrainConfig, TrainResult, fit

ModelLike = nn.Module | str
DataLike = ImageData | str


def build_model(
    model: ModelLike, *, weights: str | Path | None = None, num_classes: int | None = None
) -> nn.Module:
    """A module as given, or one built by name (registry, ``tv:``/``timm:``, ``file.py:fn``)."""
    if isinstance(model, nn.Module):
        if weights is not None:
            from .models import load_weights

            load_weights(model, weights)
        return model
    return create_model(model, num_classes=num_classes, weights=weights)


def get_data(
    data: DataLike, split: str = "train", *, root: str | Path | None = None, download: bool = True
) -> ImageData:
    return data if not isinstance(data, str) else load_dataset(data, split, root, download)


def model_and_data(
    model: ModelLike,
    data: DataLike,
    split: str,
    *,
    weights: str | Path | None = None,
    data_root: str | Path | None = None,
) -> tuple[nn.Module, ImageData]:
    """Build the model (classes from the dataset) before loading the data, so a bad model name
    or checkpoint fails in a second, not after the data has loaded."""
    info = dataset_info(data, root=data_root) if isinstance(data, str) else data.info
    net = build_model(model, weights=weights, num_classes=info.num_classes or None)
    return net, get_data(data, split, root=data_root)


def input_channels(model: nn.Module) -> int | None:
    """Input channels the model expects: those of its first convolution."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def loader_for(
    model: nn.Module,
    data: ImageData,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    input_size: int | None = None,
    channels_last: bool = False,
) -> BatchLoader:
    """A loader feeding ``data`` the way ``model`` expects: on its device, grey -> RGB if needed."""
    channels = input_channels(model)
    return make_loader(
        data,
        batch_size,
        train=train,
        seed=seed,
        device=next(model.parameters()).device,
        input_size=input_size,
        channels=channels if channels != data.info.channels else None,
        channels_last=channels_last,
    )


def example_input(
    model: nn.Module, data_or_name: DataLike | None = None, input_size: int | None = None
) -> torch.Tensor:
    """A zero batch of one image at the size the model sees (the dataset's, or ``input_size``)."""
    if isinstance(data_or_name, str):
        info = dataset_info(data_or_name)
        h, w = info.image_size
    elif data_or_name is not None:
        h, w = data_or_name.info.image_size
    else:
        name = getattr(model, "autoprune_arch", {}).get("name")
        if name is None:
            raise AutopruneError("cannot tell the model's input size: pass input_size or data")
        _, h, w = model_info(name).input_size
    if input_size is not None:
        h = w = input_size
    device = next(model.parameters()).device
    return torch.zeros(1, input_channels(model) or 3, h, w, device=device)


def evaluate(
    model: ModelLike,
    data: DataLike,
    *,
    split: str = "test",
    weights: str | Path | None = None,
    data_root: str | Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
    input_size: int | None = None,
) -> EvalResult:
    """Top-1 accuracy and loss of ``model`` on one split of ``data``."""
    net, dataset = model_and_data(model, data, split, weights=weights, data_root=data_root)
    net.to(resolve_device(device))
    batches = loader_for(net, dataset, batch_size=batch_size, train=False, input_size=input_size)
    return evaluate_batches(net, batches)


def complexity(
    model: nn.Module, data: DataLike | None = None, input_size: int | None = None
) -> dict[str, int]:
    """MACs per image (at the data's input size) and parameter count."""
    return {
        "macs": count_macs(model, example_input(model, data, input_size)),
        "params": count_params(model),
    }


def train(
    model: ModelLike,
    data: DataLike,
    *,
    config: TrainConfig | None = None,
    weights: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    out_dir: str | Path | None = None,
    resume: bool = False,
    input_size: int | None = None,
    validate: bool = True,
) -> tuple[nn.Module, TrainResult]:
    """Train a model on a dataset's train split, validating on its test split each epoch.

    With ``out_dir`` the full state is checkpointed there every epoch (``resume=True``
    continues from it), and the trained model and a ``summary.json`` are written at the end.
    """
    config = config or TrainConfig()
    net, train_set = model_and_data(model, data, "train", weights=weights, data_root=data_root)
    net.to(resolve_device(device))
    common = {"input_size": input_size, "channels_last": config.channels_last}
    train_loader = loader_for(
        net, train_set, batch_size=config.batch_size, train=True, seed=config.seed, **common
    )
    val_loader = None
    if validate:
        test_set = get_data(data, "test", root=data_root)
        val_loader = loader_for(net, test_set, batch_size=256, train=False, **common)
    out = Path(out_dir) if out_dir is not None else None
    checkpoint = out / "train_state.safetensors" if out is not None else None
    result = fit(
        net, train_loader, config, val_loader=val_loader, checkpoint=checkpoint, resume=resume
    )
    if out is not None:
        _write_train_outputs(out, net, train_set, config, result, input_size)
    return net, result


def _write_train_outputs(
    out: Path,
    model: nn.Module,
    data: ImageData,
    config: TrainConfig,
    result: TrainResult,
    input_size: int | None,
) -> None:
    from .io import save

    save(model, out / "model")
    summary = {
        "dataset": data.info.name,
        "model": getattr(model, "autoprune_arch", {}),
        **complexity(model, data, input_size),
        "config": asdict(config),
        "history": [asdict(r) for r in result.history],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
