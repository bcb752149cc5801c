"""The high-level Python API: names or objects in, results out. The CLI is a thin layer on it."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._device import resolve_device
from .data import BatchLoader, ImageData, dataset_info, load_dataset, make_loader
from .errors import AutopruneError
from .measure import EvalResult, count_macs, count_params, evaluate_batches
from .models import MODELS, Preprocessing, create_model, model_info
from .search import CalibrationSet, PruneConfig, PruneResult, SearchData, run_search
from .search.config import default_schedule
from .search.run import RunDir
from .train import TrainConfig, TrainResult, fit
from .transfer import load_pretrained, needs_transfer, transfer_for_pruning

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


def preprocessing(model: nn.Module, input_size: int | None = None) -> Preprocessing:
    """How images are prepared for ``model``: its zoo entry's preprocessing (what its published
    weights were trained with: size, mean, std), an explicit ``input_size`` taking precedence.
    Models outside the zoo keep the dataset's size and statistics."""
    name = getattr(model, "autoprune_arch", {}).get("name")
    pre = model_info(name).preprocessing if name in MODELS else Preprocessing()
    return pre if input_size is None else replace(pre, input_size=input_size)


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
    """A loader feeding ``data`` the way ``model`` expects: on its device, grey -> RGB if needed,
    resized and normalised as its :func:`preprocessing` says."""
    channels = input_channels(model)
    pre = preprocessing(model, input_size)
    return make_loader(
        data,
        batch_size,
        train=train,
        seed=seed,
        device=next(model.parameters()).device,
        input_size=pre.input_size,
        channels=channels if channels != data.info.channels else None,
        mean=pre.mean,
        std=pre.std,
        channels_last=channels_last,
    )


def example_input(
    model: nn.Module, data_or_name: DataLike | None = None, input_size: int | None = None
) -> torch.Tensor:
    """A zero batch of one image at the size the model sees (the dataset's, or ``input_size``;
    without either, the size saved with the model, else its zoo entry's); a model whose
    :func:`preprocessing` resizes sees that size."""
    input_size = preprocessing(model, input_size).input_size
    if isinstance(data_or_name, str):
        info = dataset_info(data_or_name)
        h, w = info.image_size
    elif data_or_name is not None:
        h, w = data_or_name.info.image_size
    else:
        arch = getattr(model, "autoprune_arch", {})
        if "input_size" in arch:
            _, h, w = arch["input_size"]
        elif "name" in arch:
            _, h, w = model_info(arch["name"]).input_size
        else:
            raise AutopruneError("cannot tell the model's input size: pass input_size or data")
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
    torch.manual_seed(config.seed)  # a model built here starts from seeded weights
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


def prune(
    model: ModelLike,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    train_data: DataLike | None = None,
    calib_data: DataLike | None = None,
    val_data: DataLike | None = None,
    target_macs_reduction: float | None = None,
    criteria: Sequence[str] | str | None = None,
    schedule: str | None = None,
    recover_every: float | None = None,
    recover_steps: int | None = None,
    finetune_epochs: int | None = None,
    seed: int | None = None,
    out_dir: str | Path | None = None,
    config: PruneConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    weights: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    input_size: int | None = None,
    transfer: bool | None = None,
    **overrides: Any,
) -> PruneResult:
    """Prune ``model`` to ``target_macs_reduction`` of its MACs; returns the smaller model.

    Settings come from ``config`` (default :class:`PruneConfig`), then the named arguments
    that are not None, then ``overrides`` (any other PruneConfig field, e.g. ``step=0.02``).
    ``train_data`` (its train split) feeds calibration (unless ``calib_data`` is given),
    recovery and fine-tuning; ``val_data`` (its test split) the accuracies in the summary.
    Datasets are names or :class:`~autoprune.data.ImageData`. With ``schedule="fixed"`` and a
    data-free criterion no data is needed, only ``example_inputs`` (or a zoo model, whose input
    size is known). ``model`` itself is left unchanged. With ``out_dir`` the run is
    checkpointed after every iteration and ``resume=True`` continues it; see
    :func:`autoprune.search.run_search`.

    ``transfer=True``, or data whose class count differs from the model's head (or the
    checkpoint's), makes it a transfer run: the head is replaced for the data's classes and the
    model adapted before the search (:mod:`autoprune.transfer`); unless a schedule is chosen
    (a config's schedule equal to its default counts as not chosen) it is
    saliency-then-similarity. ``summary["transfer"]`` says what was transferred from where.
    """
    named = {
        "target_macs_reduction": target_macs_reduction,
        "criteria": criteria,
        "schedule": schedule,
        "recover_every": recover_every,
        "recover_steps": recover_steps,
        "finetune_epochs": finetune_epochs,
        "seed": seed,
        "transfer": transfer,
    }
    settings = {k: v for k, v in named.items() if v is not None} | overrides
    known = {f.name for f in fields(PruneConfig)}
    unknown = sorted(settings.keys() - known)
    if unknown:
        raise AutopruneError(
            f"unknown prune setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    chosen = "schedule" in settings or (
        config is not None and config.schedule != default_schedule(config.transfer)
    )
    config = replace(config or PruneConfig(), **settings)
    if out_dir is not None and not resume:
        RunDir(out_dir).load(resume=False)  # refuses a directory holding a run before any work
    given = [d for d in (train_data, val_data, calib_data) if d is not None]
    info = None
    if given:
        first = given[0]
        info = dataset_info(first, root=data_root) if isinstance(first, str) else first.info
    classes = (info.num_classes or None) if info else None
    torch.manual_seed(config.seed)  # a model built here starts from seeded weights
    net = _pretrained(model, weights, classes, config.transfer_head)
    if config.transfer or needs_transfer(net, classes, config.transfer_head):
        config = config.for_transfer(schedule_chosen=chosen)
    net.to(resolve_device(device))
    train = get_data(train_data, "train", root=data_root) if train_data is not None else None
    val = get_data(val_data, "test", root=data_root) if val_data is not None else None
    calib = get_data(calib_data, "train", root=data_root) if calib_data is not None else train
    if example_inputs is None:
        shape_source = next((d for d in (train, val, calib) if d is not None), None)
        example_inputs = example_input(net, shape_source, input_size)
    data = _search_data(net, config, train, calib, val, input_size)
    record = None
    if config.transfer:
        if classes is None:
            raise AutopruneError("a transfer run needs data with a known number of classes")
        record = transfer_for_pruning(
            net,
            config,
            data,
            num_classes=classes,
            source=str(weights) if weights is not None else None,
            out_dir=out_dir,
            resume=resume,
            input_size=_shape(example_inputs),
            progress=progress,
        )
    return run_search(
        net,
        example_inputs,
        config,
        data,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
        transfer=record,
    )


def _pretrained(
    model: ModelLike, weights: str | Path | None, num_classes: int | None, head: str | None
) -> nn.Module:
    """The model to prune, never the caller's object: built for the data's classes (or
    copied), then given the checkpoint, whose classifier may be for other classes."""
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model)
    else:
        net = build_model(model, num_classes=num_classes)
    if weights is not None:
        load_pretrained(net, weights, head=head)
    return net


def _shape(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[int] | None:
    return list(example_inputs.shape[1:]) if isinstance(example_inputs, torch.Tensor) else None


def _search_data(
    net: nn.Module,
    config: PruneConfig,
    train: ImageData | None,
    calib: ImageData | None,
    val: ImageData | None,
    input_size: int | None,
) -> SearchData:
    """Loaders and the calibration set, feeding the data the way ``net`` expects it."""

    def train_loader(train_config: TrainConfig) -> BatchLoader:
        assert train is not None
        return loader_for(
            net,
            train,
            batch_size=train_config.batch_size,
            train=True,
            seed=config.seed,
            input_size=input_size,
            channels_last=train_config.channels_last,
        )

    calib_set = None
    if calib is not None:
        channels = input_channels(net)
        pre = preprocessing(net, input_size)
        calib_set = CalibrationSet.from_data(
            calib,
            min(config.calib_size, len(calib)),
            seed=config.seed,
            device=next(net.parameters()).device,
            input_size=pre.input_size,
            channels=channels if channels != calib.info.channels else None,
            mean=pre.mean,
            std=pre.std,
        )
    val_loader = None
    if val is not None:
        val_loader = loader_for(net, val, batch_size=256, train=False, input_size=input_size)
    source = train or val or calib
    return SearchData(
        train=train_loader if train is not None else None,
        calib=calib_set,
        val=val_loader,
        dataset=source.info.name if source is not None else None,
    )
