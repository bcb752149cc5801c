"""Adapting a pretrained model to a new task: a new classifier head, then brief training.

The usual case: a backbone trained on one dataset, a small dataset of one's own with other
classes. The classifier head (found generically, or named) is replaced by a fresh one for the
new classes, keeping every other weight; the head is trained alone (the rest frozen), then the
whole network briefly. A transfer order (a registry) says how much of that comes before the
loss-aware search: all of it, or only the head, recovery during the search doing the rest.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._registry import Registry
from .data import BatchLoader
from .errors import AutopruneError
from .io import load, save
from .io.model_io import ARCH_FILE
from .measure import evaluate_batches
from .models import MODELS, load_weights, model_info
from .models._weights import read_state_dict
from .models.spec import copy_model, set_spec, spec_of
from .task import CLASSIFICATION, Task
from .train import TrainConfig, fit

if TYPE_CHECKING:
    from .search import PruneConfig, SearchData

LoaderFactory = Callable[[TrainConfig], BatchLoader]
ADAPTED_DIR = "adapted"  # in a run directory: the adapted dense model, reused on resume


# ------------------------------------------------------------------------------- the head
@dataclass(frozen=True)
class HeadKind:
    """A kind of classifier layer: how to spot it in a model, its class count, a fresh one."""

    type: type[nn.Module]
    find: Callable[[nn.Module], str | None]
    classes: Callable[[Any], int]
    rebuild: Callable[[Any, int], nn.Module]


def _last_linear(model: nn.Module) -> str | None:
    return next(
        (n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None
    )


def _final_pointwise_conv(model: nn.Module) -> str | None:
    """The last convolution, if it is a 1x1 one mixing all channels (SqueezeNet-style heads)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    name, conv = convs[-1]
    return name if conv.kernel_size == (1, 1) and conv.groups == 1 else None


def _linear(old: nn.Linear, classes: int) -> nn.Linear:
    return nn.Linear(old.in_features, classes, bias=old.bias is not None, dtype=old.weight.dtype)


def _conv(old: nn.Conv2d, classes: int) -> nn.Conv2d:
    return nn.Conv2d(
        old.in_channels,
        classes,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        dtype=old.weight.dtype,
    )


# In order of preference: the last nn.Linear is the classifier of nearly every CNN and ViT.
HEAD_KINDS: tuple[HeadKind, ...] = (
    HeadKind(nn.Linear, _last_linear, lambda m: m.out_features, _linear),
    HeadKind(nn.Conv2d, _final_pointwise_conv, lambda m: m.out_channels, _conv),
)


def _search_head(model: nn.Module) -> str | None:
    return next((n for kind in HEAD_KINDS if (n := kind.find(model)) is not None), None)


def find_head(model: nn.Module, name: str | None = None) -> str:
    """The name of the model's classifier layer: ``name`` (checked) or the one found.

    Found: the last ``nn.Linear``, else a final 1x1 convolution. Anything else must be named.
    """
    if name is not None:
        _kind_of(model, name)
        return name
    found = _search_head(model)
    if found is None:
        raise AutopruneError(
            f"no classifier head found in {type(model).__name__} (no nn.Linear, and the last "
            "convolution is not 1x1): pass the head's name (transfer_head=NAME, "
            "--transfer-head NAME)"
        )
    return found


def _kind_of(model: nn.Module, name: str) -> HeadKind:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise AutopruneError(
            f"the model has no layer {name!r} to use as the classifier head"
        ) from None
    kind = next((k for k in HEAD_KINDS if isinstance(module, k.type)), None)
    if kind is None:
        types = ", ".join(k.type.__name__ for k in HEAD_KINDS)
        raise AutopruneError(
            f"layer {name!r} is a {type(module).__name__}; a classifier head must be one of {types}"
        )
    return kind


def head_classes(model: nn.Module, name: str | None = None) -> int:
    """How many classes the model's head (``name``, or the one found) predicts."""
    name = find_head(model, name)
    return _kind_of(model, name).classes(model.get_submodule(name))


def replace_head(
    model: nn.Module, num_classes: int, name: str | None = None, *, seed: int = 0
) -> str:
    """Give ``model`` a fresh head for ``num_classes`` in place; returns the head's name.

    Every other weight stays. The new head's initial weights come from ``seed`` (not from the
    global random state), so a run repeats. A zoo model's recorded ``num_classes`` follows, so
    :func:`autoprune.io.load` rebuilds it with the new head.
    """
    if num_classes < 1:
        raise AutopruneError(f"num_classes must be >= 1, got {num_classes}")
    name = find_head(model, name)
    old = model.get_submodule(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = _kind_of(model, name).rebuild(old, num_classes)
    model.set_submodule(name, new.to(next(old.parameters()).device))
    spec = spec_of(model)
    if spec is not None and "num_classes" in spec.kwargs:
        set_spec(model, spec.with_kwargs(num_classes=num_classes))
    return name


def load_pretrained(
    model: nn.Module, weights: str | os.PathLike[str], *, head: str | None = None
) -> None:
    """Load a checkpoint whose classifier may be for another number of classes than ``model``'s.

    When only the head's shapes differ, the head is first resized to the checkpoint's classes
    so every tensor loads strictly; :func:`replace_head` then gives it the task's classes. Any
    other mismatch raises the usual :class:`~autoprune.errors.CheckpointError`.
    """
    spec = spec_of(model)
    name = spec.name if spec is not None else None
    remap = model_info(name).remap_keys if name in MODELS else None
    state = read_state_dict(weights)
    if remap is not None:
        state = {remap(k): v for k, v in state.items()}
    own = model.state_dict()
    mismatched = {k for k, v in state.items() if k in own and v.shape != own[k].shape}
    found = head or _search_head(model)
    if mismatched and found is not None and mismatched <= {f"{found}.weight", f"{found}.bias"}:
        replace_head(model, state[f"{found}.weight"].shape[0], found)
    load_weights(model, weights, remap_keys=remap)  # read again: its errors name the file


def needs_transfer(model: nn.Module, num_classes: int | None, head: str | None = None) -> bool:
    """Whether the model's head predicts another number of classes than the data has."""
    if num_classes is None or (head is None and _search_head(model) is None):
        return False
    return head_classes(model, head) != num_classes


# ------------------------------------------------------------------------------ training
# An order maps the settings to (head steps, whole-network steps) before the search.
Order = Callable[["PruneConfig"], tuple[int, int]]
TRANSFER_ORDERS: Registry[Order] = Registry("transfer order")


@TRANSFER_ORDERS.register(
    "adapt-then-prune", description="train the new head, then the whole network, then search"
)
def _adapt_then_prune(config: PruneConfig) -> tuple[int, int]:
    return config.head_steps, config.adapt_steps


@TRANSFER_ORDERS.register(
    "prune-while-adapting",
    description="train the new head, then search: recovery on the new data does the adapting",
)
def _prune_while_adapting(config: PruneConfig) -> tuple[int, int]:
    return config.head_steps, 0


@dataclass(frozen=True)
class Adaptation:
    """What :func:`adapt` did: optimizer steps per phase, seconds, and the result (if measured)."""

    head_steps: int
    full_steps: int
    seconds: float
    accuracy: float | None = None
    loss: float | None = None


@contextmanager
def _only_trainable(model: nn.Module, layer: str) -> Iterator[None]:
    """Freeze every parameter outside ``layer`` for the block (BN statistics still follow the
    new data: they are not weights, and adapting them is what a new domain needs)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    own = set(model.get_submodule(layer).parameters())
    try:
        for p in model.parameters():
            p.requires_grad_(p in own)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _train(
    model: nn.Module,
    train: LoaderFactory,
    config: TrainConfig,
    steps: int,
    offset: int,
    task: Task,
) -> int:
    """``steps`` optimizer steps from the loader's epoch ``offset``; returns the epochs drawn."""
    if steps == 0:
        return 0
    loader = train(config)
    epochs = math.ceil(steps / len(loader))
    config = replace(config, epochs=epochs, max_steps=steps)
    fit(model, loader, config, epoch_offset=offset, task=task)
    return epochs


def adapt(
    model: nn.Module,
    train: LoaderFactory,
    *,
    head: str,
    head_steps: int,
    full_steps: int,
    head_training: TrainConfig | None = None,
    full_training: TrainConfig | None = None,
    val: BatchLoader | None = None,
    task: Task = CLASSIFICATION,
) -> Adaptation:
    """Train the head alone for ``head_steps``, then the whole network for ``full_steps``.

    ``train(config)`` gives training batches at that config's batch size (as
    :class:`~autoprune.search.SearchData` does); each phase takes a fresh optimizer and its own
    epochs of the data. With ``val`` the adapted model's accuracy is measured. ``task`` reads
    the model's outputs (:mod:`autoprune.task`).
    """
    start = time.perf_counter()
    head_training = head_training or TrainConfig(lr=0.05, channels_last=False, progress=False)
    full_training = full_training or TrainConfig(lr=0.01, channels_last=False, progress=False)
    with _only_trainable(model, head):
        drawn = _train(model, train, head_training, head_steps, 0, task)
    _train(model, train, full_training, full_steps, drawn, task)
    model.to(memory_format=torch.contiguous_format)  # one layout outside training (resume)
    ev = evaluate_batches(model, val, task) if val is not None else None
    return Adaptation(
        head_steps,
        full_steps,
        time.perf_counter() - start,
        ev.accuracy if ev else None,
        ev.loss if ev else None,
    )


# ----------------------------------------------------------------- inside a pruning run
def _settings(config: PruneConfig) -> dict[str, Any]:
    """What the adapted model depends on: a saved one is reused only if these match."""
    trainings = {k: asdict(getattr(config, k)) for k in ("head_training", "adaptation")}
    for values in trainings.values():
        values.pop("progress")
    keys = ("transfer_order", "transfer_head", "head_steps", "adapt_steps", "seed")
    return {**{k: getattr(config, k) for k in keys}, **trainings}


def transfer_for_pruning(
    model: nn.Module,
    config: PruneConfig,
    data: SearchData,
    *,
    num_classes: int,
    source: str | None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    input_size: list[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Replace ``model``'s head for ``num_classes`` and adapt it as ``config.transfer_order``
    says, in place; returns the record that goes into the run's ``summary.json``.

    With ``out_dir`` the adapted model is saved in ``out_dir/adapted/`` (loadable with
    :func:`autoprune.io.load`); ``resume=True`` takes it from there instead of training again.
    """
    if data.train is None:
        raise AutopruneError("a transfer run trains on the new task: pass train_data")
    head = find_head(model, config.transfer_head)
    before = head_classes(model, head)
    replace_head(model, num_classes, head, seed=config.seed)
    saved = Path(out_dir) / ADAPTED_DIR if out_dir is not None else None
    settings = _settings(config)
    if resume and saved is not None and (saved / ARCH_FILE).exists():
        adapted = load(saved, model=copy_model(model))  # any model: its dense twin
        metadata: Mapping[str, Any] = adapted.autoprune_metadata
        if metadata.get("transfer_settings") != settings:
            raise AutopruneError(
                f"cannot resume {out_dir}: its model was adapted with other transfer settings; "
                "use the same ones or another output directory"
            )
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in adapted.state_dict().items()})
        return dict(metadata["transfer"])
    head_steps, full_steps = TRANSFER_ORDERS.get(config.transfer_order)(config)
    done = adapt(
        model,
        data.train,
        head=head,
        head_steps=head_steps,
        full_steps=full_steps,
        head_training=replace(config.head_training, seed=config.seed, progress=progress),
        full_training=replace(config.adaptation, seed=config.seed, progress=progress),
        val=data.val,
        task=data.task,
    )
    record = {
        "source": source,
        "classes_before": before,
        "classes_after": num_classes,
        "head": head,
        "order": config.transfer_order,
        "head_steps": done.head_steps,
        "adapt_steps": done.full_steps,
        "adapt_s": round(done.seconds, 3),
        "accuracy": done.accuracy,
        "loss": done.loss,
    }
    if saved is not None:
        metadata = {"transfer": record, "transfer_settings": settings}
        save(model, saved, input_size=input_size, metadata=metadata)
    return record
