"""How data reaches a model: on its device, in the form it expects, whatever the user passed.

Registered datasets (a name or :class:`~autoprune.data.ImageData`) are resized, replicated
and normalised as the model's :func:`preprocessing` says; a user's own ``Dataset`` or
``DataLoader`` is taken as it is (:mod:`autoprune.data.user`). Either way the batches, the
calibration set and the example inputs end up on the model's device, so a model moved to CUDA
takes CPU data and CPU example inputs without the caller moving anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._device import follow, model_device
from .data import (
    BatchLoader,
    ImageData,
    UserBatches,
    UserData,
    dataset_info,
    first_batches,
    is_user_data,
    load_dataset,
    make_loader,
)
from .errors import AutopruneError
from .models import MODELS, Preprocessing, model_info
from .models.spec import spec_of
from .search import CalibrationSet, SearchData
from .task import CLASSIFICATION, Task
from .train import TrainConfig

DataLike = ImageData | str | UserData
Loader = BatchLoader | UserBatches
Inputs = torch.Tensor | Sequence[torch.Tensor]


def get_data(
    data: DataLike, split: str = "train", *, root: str | Path | None = None, download: bool = True
) -> ImageData | UserData:
    """A registered dataset's split by name; data given as an object is used as it is."""
    return data if not isinstance(data, str) else load_dataset(data, split, root, download)


def input_channels(model: nn.Module) -> int | None:
    """Input channels the model expects: what its timm config says (its first convolution may
    see a rearranged image: TResNet's space-to-depth, CSATv2's DCT), else those of its first
    convolution."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size is not None:
        return int(size[0])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def preprocessing(model: nn.Module, input_size: int | None = None) -> Preprocessing:
    """How images are prepared for ``model``: its zoo entry's preprocessing (what its published
    weights were trained with: size, mean, std), an explicit ``input_size`` taking precedence.
    Models outside the zoo keep the dataset's size and statistics."""
    spec = spec_of(model)
    name = spec.name if spec is not None else None
    pre = model_info(name).preprocessing if name in MODELS else Preprocessing()
    return pre if input_size is None else replace(pre, input_size=input_size)


def loader_for(
    model: nn.Module,
    data: ImageData | UserData,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    input_size: int | None = None,
    channels_last: bool = False,
) -> Loader:
    """A loader feeding ``data`` the way ``model`` expects: on its device; a registered
    dataset also grey -> RGB if needed, resized and normalised as :func:`preprocessing` says."""
    device = model_device(model)
    if is_user_data(data):
        return UserBatches(
            data, batch_size, train=train, seed=seed, device=device, channels_last=channels_last
        )
    return make_loader(
        data,
        batch_size,
        train=train,
        seed=seed,
        device=device,
        channels_last=channels_last,
        **_prepared_as(model, data, input_size),
    )


def _prepared_as(model: nn.Module, data: ImageData, input_size: int | None) -> dict[str, Any]:
    """How a registered dataset's images are converted for ``model``: resized, grey -> RGB
    where the model wants other channels, normalised (the loader's and calibration's kwargs)."""
    channels = input_channels(model)
    pre = preprocessing(model, input_size)
    return {
        "input_size": pre.input_size,
        "channels": channels if channels != data.info.channels else None,
        "mean": pre.mean,
        "std": pre.std,
    }


def calibration_for(
    model: nn.Module,
    data: ImageData | UserData,
    size: int,
    *,
    seed: int,
    task: Task = CLASSIFICATION,
    input_size: int | None = None,
) -> CalibrationSet:
    """``size`` fixed samples of ``data`` (class-balanced for a registered dataset) on the
    model's device, prepared like :func:`loader_for` prepares them."""
    device = model_device(model)
    if is_user_data(data):
        if not isinstance(data, torch.utils.data.DataLoader):
            size = min(size, len(data))
        return CalibrationSet(first_batches(data, size, seed=seed, device=device), task)
    return CalibrationSet.from_data(
        data,
        min(size, len(data)),
        seed=seed,
        device=device,
        task=task,
        **_prepared_as(model, data, input_size),
    )


def example_input(
    model: nn.Module, data_or_name: DataLike | None = None, input_size: int | None = None
) -> torch.Tensor:
    """A batch of one input at the size the model sees, on its device.

    For a registered dataset (or ``input_size``) a zero image at the dataset's size; without
    either, the size saved with the model, else its zoo entry's; a model whose
    :func:`preprocessing` resizes sees that size. For a user's data: its first sample.
    """
    if data_or_name is not None and is_user_data(data_or_name):
        x, _ = first_batches(data_or_name, 1)[0]
        return follow(x[:1], model)
    input_size = preprocessing(model, input_size).input_size
    if isinstance(data_or_name, str):
        h, w = dataset_info(data_or_name).image_size
    elif data_or_name is not None:
        h, w = data_or_name.info.image_size
    else:
        spec = spec_of(model)
        if spec is not None and spec.input_size is not None:
            _, h, w = spec.input_size
        elif spec is not None and spec.name in MODELS:
            _, h, w = model_info(spec.name).input_size
        elif input_size is None:
            raise AutopruneError("cannot tell the model's input size: pass input_size or data")
        else:
            h = w = input_size
    if input_size is not None:
        h = w = input_size
    return torch.zeros(1, input_channels(model) or 3, h, w, device=model_device(model))


def search_data(
    net: nn.Module,
    *,
    seed: int,
    calib_size: int,
    task: Task,
    train: ImageData | UserData | None,
    calib: ImageData | UserData | None,
    val: ImageData | UserData | None,
    input_size: int | None,
) -> SearchData:
    """Loaders and the calibration set of a pruning run, feeding the data as ``net`` expects."""

    def train_loader(train_config: TrainConfig) -> Loader:
        assert train is not None
        return loader_for(
            net,
            train,
            batch_size=train_config.batch_size,
            train=True,
            seed=seed,
            input_size=input_size,
            channels_last=train_config.channels_last,
        )

    calib_set = None
    if calib is not None:
        calib_set = calibration_for(
            net, calib, calib_size, seed=seed, task=task, input_size=input_size
        )
    val_loader = None
    if val is not None:
        val_loader = loader_for(net, val, batch_size=256, train=False, input_size=input_size)
    source = next((d for d in (train, val, calib) if d is not None), None)
    return SearchData(
        train=train_loader if train is not None else None,
        calib=calib_set,
        val=val_loader,
        dataset=dataset_name(source),
        task=task,
    )


def dataset_name(data: DataLike | None) -> str | None:
    """A registered dataset's name; a user's data is named by its class."""
    if data is None or isinstance(data, str):
        return data
    if is_user_data(data):
        inner = getattr(data, "dataset", data)  # a DataLoader's dataset
        return type(inner).__name__
    return data.info.name


def num_classes(data: DataLike, root: str | Path | None) -> int | None:
    """Classes of a registered dataset (its head size); None for a user's data."""
    if is_user_data(data):
        return None
    info = dataset_info(data, root=root) if isinstance(data, str) else data.info
    return info.num_classes or None
