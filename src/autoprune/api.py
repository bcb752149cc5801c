"""The high-level Python API: names or objects in, results out. The CLI is a thin layer on it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._device import resolve_device
from .data import ImageData, UserData
from .errors import AutopruneError
from .feed import DataLike, Inputs, dataset_name, follow, get_data, num_classes, search_data
from .feed import example_input as example_input
from .feed import input_channels as input_channels
from .feed import loader_for as loader_for
from .feed import preprocessing as preprocessing
from .io.model_io import check_savable
from .measure import EvalResult, count_macs, count_params, evaluate_batches
from .models import create_model
from .models.spec import copy_model, describe, set_spec
from .search import PruneConfig, PruneResult, Recover, run_search
from .search.config import default_schedule
from .search.run import RunDir
from .task import OutputAdapter, Task, TaskLoss
from .train import TrainConfig, TrainResult, fit
from .transfer import load_pretrained, needs_transfer, transfer_for_pruning

ModelLike = nn.Module | str


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


def model_and_data(
    model: ModelLike,
    data: DataLike,
    split: str,
    *,
    weights: str | Path | None = None,
    data_root: str | Path | None = None,
) -> tuple[nn.Module, ImageData | UserData]:
    """Build the model (classes from the dataset) before loading the data, so a bad model name
    or checkpoint fails in a second, not after the data has loaded."""
    net = build_model(model, weights=weights, num_classes=num_classes(data, data_root))
    return net, get_data(data, split, root=data_root)


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
    task: Task | None = None,
    loss_fn: TaskLoss | None = None,
    output_adapter: OutputAdapter | None = None,
) -> EvalResult:
    """Metric (top-1 accuracy by default) and mean loss of ``model`` on one split of ``data``
    (a registered dataset), or on a ``Dataset``/``DataLoader`` of ``(inputs, targets)``.

    ``loss_fn`` and ``output_adapter`` (or a whole ``task``) say how the loss is computed on
    the model's outputs; see :mod:`autoprune.task`. With a custom loss, accuracy is None.
    """
    task = Task.of(task, loss_fn, output_adapter)
    net, dataset = model_and_data(model, data, split, weights=weights, data_root=data_root)
    net.to(resolve_device(device))
    batches = loader_for(net, dataset, batch_size=batch_size, train=False, input_size=input_size)
    return evaluate_batches(net, batches, task)


def complexity(
    model: nn.Module, data: DataLike | None = None, input_size: int | None = None
) -> dict[str, int]:
    """MACs per input (at the data's input size) and parameter count."""
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
    val_data: DataLike | None = None,
    task: Task | None = None,
    loss_fn: TaskLoss | None = None,
    output_adapter: OutputAdapter | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Train a model on a dataset's train split (or a ``Dataset``/``DataLoader``), validating
    each epoch on ``val_data`` or, for a registered dataset, its test split.

    With ``out_dir`` the full state is checkpointed there every epoch (``resume=True``
    continues from it), and the trained model and a ``summary.json`` are written at the end.
    ``loss_fn``/``output_adapter``/``task`` as in :func:`evaluate`.
    """
    config = config or TrainConfig()
    task = Task.of(task, loss_fn, output_adapter)
    torch.manual_seed(config.seed)  # a model built here starts from seeded weights
    net, train_set = model_and_data(model, data, "train", weights=weights, data_root=data_root)
    net.to(resolve_device(device))
    common = {"input_size": input_size, "channels_last": config.channels_last}
    train_loader = loader_for(
        net, train_set, batch_size=config.batch_size, train=True, seed=config.seed, **common
    )
    val_loader = None
    if val_data is None and validate and isinstance(data, str):
        val_data = data
    if val_data is not None and validate:
        test_set = get_data(val_data, "test", root=data_root)
        val_loader = loader_for(net, test_set, batch_size=256, train=False, **common)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_savable(net)  # before training, not after it
    checkpoint = out / "train_state.safetensors" if out is not None else None
    result = fit(
        net,
        train_loader,
        config,
        val_loader=val_loader,
        checkpoint=checkpoint,
        resume=resume,
        task=task,
    )
    if out is not None:
        _write_train_outputs(out, net, train_set, config, result, input_size)
    return net, result


def _write_train_outputs(
    out: Path,
    model: nn.Module,
    data: ImageData | UserData,
    config: TrainConfig,
    result: TrainResult,
    input_size: int | None,
) -> None:
    from .io import save

    save(model, out / "model")
    summary = {
        "dataset": dataset_name(data),
        "model": describe(model).to_json(),
        **complexity(model, data, input_size),
        "config": asdict(config),
        "history": [asdict(r) for r in result.history],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def prune(
    model: ModelLike,
    *,
    example_inputs: Inputs | None = None,
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
    task: Task | None = None,
    loss_fn: TaskLoss | None = None,
    output_adapter: OutputAdapter | None = None,
    recover: Recover | None = None,
    **overrides: Any,
) -> PruneResult:
    """Prune ``model`` to ``target_macs_reduction`` of its MACs; returns the smaller model.

    Settings come from ``config`` (default :class:`PruneConfig`), then the named arguments
    that are not None, then ``overrides`` (any other PruneConfig field, e.g. ``step=0.02``).
    ``train_data`` (its train split) feeds calibration (unless ``calib_data`` is given),
    recovery and fine-tuning; ``val_data`` (its test split) the accuracies in the summary.
    Data are registered names, :class:`~autoprune.data.ImageData`, or any ``Dataset`` or
    ``DataLoader`` of ``(inputs, targets)``, taken as the model expects them. Every loss (the
    candidates' scores, Taylor saliency, recovery, fine-tuning, validation) is computed with
    ``task``, or one made of ``loss_fn(prediction, targets)`` and ``output_adapter(outputs)``
    (see :mod:`autoprune.task`: tuple and dict outputs work as they are; with a custom loss the
    summary reports the loss, not an accuracy). With ``schedule="fixed"`` and a data-free
    criterion no data is needed, only ``example_inputs`` (or a model whose input size is known).
    Example inputs and data may be on any device: they follow the model to its own.
    ``model`` itself is left unchanged. With ``out_dir`` the run is checkpointed after every
    iteration and ``resume=True`` continues it (see :func:`autoprune.search.run_search`), and
    whether the pruned model can be saved is checked before the search starts.

    ``transfer=True``, or data whose class count differs from the model's head (or the
    checkpoint's), makes it a transfer run: the head is replaced for the data's classes and the
    model adapted before the search (:mod:`autoprune.transfer`); unless a schedule is chosen
    (a config's schedule equal to its default counts as not chosen) it is
    saliency-then-similarity. ``summary["transfer"]`` says what was transferred from where.

    ``recover(model)``, when given, is the recovery (e.g. your own training steps), called
    whenever recovery is due instead of ``recover_steps`` of training on ``train_data``. To
    drive the steps yourself, use :class:`autoprune.Pruner`, the engine this loops over.
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
    task = Task.of(task, loss_fn, output_adapter)
    given = [d for d in (train_data, val_data, calib_data) if d is not None]
    classes = num_classes(given[0], data_root) if given else None
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
    example_inputs = follow(example_inputs, net)
    _record_input_size(net, example_inputs)
    if out_dir is not None:
        check_savable(net)  # a model that cannot be written fails now, not after the search
    data = search_data(
        net,
        seed=config.seed,
        calib_size=config.calib_size,
        task=task,
        train=train,
        calib=calib,
        val=val,
        input_size=input_size,
    )
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
        recover=recover,
    )


def _pretrained(
    model: ModelLike, weights: str | Path | None, num_classes: int | None, head: str | None
) -> nn.Module:
    """The model to prune, never the caller's object: built for the data's classes (or
    copied), then given the checkpoint, whose classifier may be for other classes."""
    if isinstance(model, nn.Module):
        net = copy_model(model)
    else:
        net = build_model(model, num_classes=num_classes)
    if weights is not None:
        load_pretrained(net, weights, head=head)
    return net


def _shape(example_inputs: Inputs) -> list[int] | None:
    return list(example_inputs.shape[1:]) if isinstance(example_inputs, torch.Tensor) else None


def _record_input_size(net: nn.Module, example_inputs: Inputs) -> None:
    """Note the input size on the model to prune (our copy), so that saving it, by the run or
    by ``autoprune.save(result.model, path)``, records it without being told."""
    shape = _shape(example_inputs)
    if shape is not None:
        set_spec(net, describe(net).with_input_size(shape))
