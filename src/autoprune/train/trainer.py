"""The training loop: used by ``autoprune train``, recovery during pruning, and fine-tuning."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from .._progress import console, progress_bar
from ..data import BatchLoader
from ..errors import AutopruneError
from ..io.state import load_state, save_state
from ..measure import evaluate_batches
from ..task import CLASSIFICATION, Task
from ._ddp import data_parallel
from .config import TrainConfig
from .optim import build_optimizer
from .schedules import SCHEDULES

# loss(outputs, targets, inputs): the model's raw outputs (a task's adapter reads them); the
# inputs let a distillation loss query its teacher.
LossFn = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]

# Settings that must match for a checkpoint to be resumed (the rest may change, e.g. progress).
_RESUME_KEYS = ("epochs", "max_steps", "batch_size", "lr", "schedule", "seed", "weight_decay")


@dataclass
class EpochRecord:
    epoch: int
    steps: int
    train_loss: float
    train_accuracy: float | None  # None: the task has no metric
    lr: float
    images_per_s: float
    seconds: float
    val_accuracy: float | None = None
    val_loss: float | None = None


@dataclass
class TrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    steps: int = 0
    resumed_from_epoch: int | None = None


def task_loss(task: Task = CLASSIFICATION, label_smoothing: float = 0.0) -> LossFn:
    """The task's batch-mean loss (cross-entropy by default)."""
    return lambda outputs, y, x: task.mean_loss(outputs, y, label_smoothing)


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    return task_loss(CLASSIFICATION, label_smoothing)


def distillation(
    teacher: nn.Module,
    temperature: float,
    weight: float,
    label_smoothing: float = 0.0,
    task: Task = CLASSIFICATION,
) -> LossFn:
    """``(1 - weight) * task loss + weight * soft term``, the soft term matching the teacher.

    ``teacher`` (the unpruned model, in eval mode) sees the same inputs as the student; both
    outputs are read by the task's adapter. For classification the soft term is
    ``T^2 * KL(teacher || student)`` at temperature ``T`` (the ``T^2`` keeps its gradients on
    the scale of the hard term's); for any other loss, the mean squared difference of the two
    predictions, since softened class probabilities mean nothing for a regression.
    """

    def loss(outputs: Any, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        student = task.prediction(outputs).float()
        with torch.no_grad():
            target = task.prediction(teacher(x)).float()
        if task.classification:
            soft = (
                temperature
                * temperature
                * F.kl_div(
                    F.log_softmax(student / temperature, dim=1),
                    F.log_softmax(target / temperature, dim=1),
                    reduction="batchmean",
                    log_target=True,
                )
            )
        else:
            soft = F.mse_loss(student, target)
        return (1.0 - weight) * task.mean_loss(outputs, y, label_smoothing) + weight * soft

    return loss


def fit(
    model: nn.Module,
    train_loader: BatchLoader,
    config: TrainConfig,
    *,
    val_loader: BatchLoader | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    loss_fn: LossFn | None = None,
    epoch_offset: int = 0,
    task: Task = CLASSIFICATION,
) -> TrainResult:
    """Train ``model`` in place on the loader's device.

    With ``checkpoint`` set, the full state (weights, optimizer, schedule, history) is written
    there atomically after every epoch; ``resume=True`` continues from it and reproduces an
    uninterrupted run, and a finished run is returned as it is. ``epoch_offset`` shifts the
    epochs the loader's shuffle and the per-epoch seed come from, so successive brief
    trainings (recovery during pruning) see different batches.

    Under an initialised process group (``torchrun``) the model is trained with
    DistributedDataParallel, built for this call and dropped at its end (the caller may change
    the parameters between calls), and each process reads its part of every batch: the batch
    size is the total over the processes. Rank 0 alone writes the checkpoint and shows progress.

    ``task`` reads the model's outputs, gives the default loss (``loss_fn`` replaces it) and
    the accuracy shown (none for a task without a metric).
    """
    device = next(model.parameters()).device
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = loss_fn or task_loss(task, config.label_smoothing)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise AutopruneError("the training set is smaller than one batch: lower --batch-size")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = build_optimizer(model, config)
    factor = SCHEDULES.get(config.schedule)
    warmup = round(config.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: factor(step, total_steps, warmup)
    )
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    if distributed.is_distributed():
        train_loader = train_loader.shard(distributed.rank(), distributed.world_size())
    show = config.progress and distributed.is_main()

    result = TrainResult()
    start_epoch = 0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        start_epoch = _restore(checkpoint, config, model, optimizer, scheduler, scaler, result)
        result.resumed_from_epoch = start_epoch
    with data_parallel(model) as net:
        for epoch in range(start_epoch, config.epochs):
            if result.steps >= total_steps:
                break
            record = _train_epoch(
                net,
                train_loader,
                loss_fn,
                task,
                optimizer,
                scheduler,
                scaler,
                epoch=epoch,
                data_epoch=epoch + epoch_offset,
                config=config,
                step=result.steps,
                total_steps=total_steps,
                amp=(use_amp, amp_dtype),
                show=show,
            )
            result.steps += record.steps
            if val_loader is not None:
                ev = evaluate_batches(model, val_loader, task)
                record.val_accuracy, record.val_loss = ev.accuracy, ev.loss
            result.history.append(record)
            if show:
                console.print(_summary_line(record, config.epochs))
            if checkpoint is not None and distributed.is_main():
                save_state(
                    checkpoint,
                    {
                        "epoch": epoch + 1,
                        "steps": result.steps,
                        "config": asdict(config),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "history": [asdict(r) for r in result.history],
                    },
                )
    return result


def _train_epoch(
    model: nn.Module,
    loader: BatchLoader,
    loss_fn: LossFn,
    task: Task,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    epoch: int,
    data_epoch: int,
    config: TrainConfig,
    step: int,
    total_steps: int,
    amp: tuple[bool, torch.dtype],
    show: bool,
) -> EpochRecord:
    # Seeding per epoch makes dropout etc. independent of where a resumed run started; each
    # process draws its own (one process: rank 0 of 1, the same seed as ever).
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed((config.seed * 100_003 + data_epoch) * world + rank)
    loader.set_epoch(data_epoch)
    model.train()
    use_amp, amp_dtype = amp
    device_type = next(model.parameters()).device.type
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    correct = torch.zeros((), dtype=torch.float64, device=loss_sum.device)
    scored = True  # False once a batch had no metric: no accuracy for the epoch
    samples = steps = shown = 0
    budget = min(len(loader), total_steps - step)
    start = time.perf_counter()
    with progress_bar(f"epoch {epoch + 1}/{config.epochs}", budget, enabled=show) as bar:
        for x, y in loader:
            if steps >= budget:
                break
            with torch.autocast(device_type, dtype=amp_dtype, enabled=use_amp):
                outputs = model(x)
                loss = loss_fn(outputs, y, x)
            if not torch.isfinite(loss):
                raise AutopruneError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, step {steps + 1}: "
                    "lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            with torch.no_grad():
                hits = task.correct(outputs, y) if scored else None
            scored = hits is not None
            if scored:
                correct += hits
            samples += len(y)
            steps += 1
            if steps % 10 == 0 or steps == budget:  # reading the sums syncs a GPU: not every step
                elapsed = time.perf_counter() - start
                bar.update(
                    steps - shown,
                    loss=float(loss_sum) / samples,
                    acc=100.0 * float(correct) / samples if scored else "-",
                    img_s=samples / elapsed,
                )
                shown = steps
    seconds = time.perf_counter() - start
    # Summed over the processes' parts: the record is the whole batches', as in one process.
    sums = torch.stack([loss_sum.double(), correct.double(), loss_sum.new_tensor(samples).double()])
    total_loss, total_correct, samples = distributed.all_reduce_sum(sums).tolist()
    return EpochRecord(
        epoch=epoch + 1,
        steps=steps,
        train_loss=total_loss / max(1, samples),
        train_accuracy=100.0 * total_correct / max(1, samples) if scored else None,
        lr=scheduler.get_last_lr()[0],
        images_per_s=samples / seconds,
        seconds=seconds,
    )


def _restore(
    path: str | Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    result: TrainResult,
) -> int:
    state = load_state(path)
    saved = state["config"]
    changed = [k for k in _RESUME_KEYS if saved.get(k) != getattr(config, k)]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)} -> {getattr(config, k)}" for k in changed)
        raise AutopruneError(
            f"cannot resume from {path}: it was written with other settings ({diffs}); "
            "use the same settings or another output directory"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise AutopruneError(
            f"cannot resume from {path}: the model does not match ({err})"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    result.history = [EpochRecord(**r) for r in state["history"]]
    result.steps = int(state["steps"])
    return int(state["epoch"])


def _summary_line(record: EpochRecord, epochs: int) -> str:
    line = (
        f"epoch {record.epoch}/{epochs}  loss {record.train_loss:.4f}  "
        + (f"acc {record.train_accuracy:.2f}%  " if record.train_accuracy is not None else "")
        + f"lr {record.lr:.3g}  "
        f"{record.images_per_s:.0f} img/s  {record.seconds:.0f}s"
    )
    if record.val_accuracy is not None:
        line += f"  val acc {record.val_accuracy:.2f}%"
    if record.val_loss is not None:
        line += f"  val loss {record.val_loss:.4f}"
    return line
