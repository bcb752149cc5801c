"""Prune for measured speed: latency-targeted autoprune beside MACs-targeted and Torch-Pruning.

Protocol (issue 16), for each ``--targets`` entry ``backend:batch`` (default: ONNX Runtime at
batch 1, torch eager at batch 64): prune ``--model`` (the adapted CIFAR ResNet-56 on
CIFAR-10-JPEG75, or a MobileNetV2 on Fashion-MNIST, trained here once) with

- ``autoprune-latency``: ``target_latency_reduction`` for a ``--speedup`` predicted on that
  backend and batch (the latency model is built there, from per-layer tables), removing
  ``--granularity`` (blocks, then channels, by default);
- ``autoprune-macs``: the same search to ``--macs-target`` of the MACs;
- ``tp-l1-global``: Torch-Pruning's L1 global ranking to the same MACs target;

all without recovery (the last two do not depend on the backend: pruned and fine-tuned once,
timed under every target), then give each the same distilled fine-tune (``--finetune-epochs``, as in
bench/quality.py) and measure test accuracy on the model's data. Dense and pruned models are
timed in the same run on that backend and batch: ``--rounds`` rounds visiting every model in
turn, median of the rounds' medians. The latency-targeted model's predicted latency stands
beside its measurement.

    python bench/latency.py                 # the issue's protocol: ResNet-56, hours on 2 cores
    python bench/latency.py --model mobilenetv2   # the second architecture
    python bench/latency.py --reduced       # ResNet-20, small calibration and fine-tune
    python bench/latency.py --smoke         # tiny, for CI (writes under /tmp)
    python bench/latency.py --render        # the .md again from the .json
    python bench/latency.py --shares-table A.json,B.json   # runs with other shares, side by side

Writes docs/benchmarks/latency.{json,md}, latency_<model>.{json,md} for other models
(``--smoke``: under /tmp).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import (
    DOCS,
    REPO,
    SMOKE,
    accuracy,
    adapted_weights,
    cifar10_jpeg75,
    finetune,
    machine,
    machine_line,
    trained_model,
    write_results,
)
from _tp_baselines import prune_with_tp
from torch import nn

import autoprune
from autoprune._forward import eval_mode
from autoprune.data import ImageData, load_dataset
from autoprune.feed import calibration_for
from autoprune.measure import BACKENDS, count_macs, time_runner
from autoprune.search.schedules import TOLERANCE
from autoprune.task import Task
from autoprune.train import distillation

RUNS = REPO / "runs" / "bench-latency"


@dataclass(frozen=True)
class Setup:
    """A benchmark model with its data: ``splits(test_size)`` gives the train and test
    images, ``dense(args, train)`` the trained model, one input of ``input_shape``."""

    data: str
    input_shape: tuple[int, int, int]
    splits: Callable[[int], tuple[ImageData, ImageData]]
    dense: Callable[[argparse.Namespace, ImageData], nn.Module]


def _adapted_resnet(args: argparse.Namespace, train: ImageData) -> nn.Module:
    return autoprune.create_model(args.model, weights=adapted_weights(args.model))


def _fashion_mnist(test_size: int) -> tuple[ImageData, ImageData]:
    test = load_dataset("fashion-mnist", "test").subset(range(test_size))
    return load_dataset("fashion-mnist", "train"), test


# No shipped weights: trained here once (3 epochs, width 0.5: a CPU-sized MobileNetV2).
def _trained_mobilenetv2(args: argparse.Namespace, train: ImageData) -> nn.Module:
    epochs = 0.01 if args.smoke else 3
    return trained_model(
        args.runs / f"mobilenetv2_0.5-fashion-mnist-{epochs:g}ep-lr0.05",
        train,
        "mobilenetv2",
        epochs=epochs,
        lr=0.05,
        seed=args.seed,
        input_shape=(1, 28, 28),
        width_mult=0.5,
        in_channels=1,
    )


SETUPS: dict[str, Setup] = {
    "resnet56": Setup("CIFAR-10-JPEG75", (3, 32, 32), cifar10_jpeg75, _adapted_resnet),
    "resnet20": Setup("CIFAR-10-JPEG75", (3, 32, 32), cifar10_jpeg75, _adapted_resnet),
    "mobilenetv2": Setup("Fashion-MNIST", (1, 28, 28), _fashion_mnist, _trained_mobilenetv2),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, choices=SETUPS, help="default: resnet56 (resnet20)")
    p.add_argument("--targets", default="onnxruntime:1,eager:64", help="backend:batch, ...")
    p.add_argument("--speedup", type=float, default=2.0, help="predicted speed-up to reach")
    p.add_argument("--macs-target", type=float, default=0.5)
    p.add_argument("--methods", default="autoprune-latency,autoprune-macs,tp-l1-global")
    p.add_argument("--granularity", default=None, help="autoprune-latency's (default: autoprune's)")
    p.add_argument(
        "--shares", default="", help="autoprune-latency's share of the target per granularity"
    )
    p.add_argument("--calib", type=int, default=512, help="calibration images")
    p.add_argument(
        "--adapt-norms",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="blocks scored with BatchNorm statistics re-estimated (autoprune's default)",
    )
    p.add_argument(
        "--calib-targets",
        default="labels",
        choices=("labels", "teacher"),
        help="what autoprune-latency's calibration loss compares with: the labels "
        "(cross-entropy, autoprune's), or the dense model's outputs (T^2 KL at "
        "--calib-temperature, the distillation's soft term)",
    )
    p.add_argument("--calib-temperature", type=float, default=4.0)
    p.add_argument(
        "--break-unit-ties",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="autoprune-latency: of blocks whose losses tie, remove the one with fewest parameters",
    )
    p.add_argument("--step", type=float, default=0.01)
    p.add_argument("--recover-steps", type=int, default=0, help="0: the protocol's none")
    p.add_argument("--train-size", type=int, default=50_000)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--finetune-seeds",
        default="",
        help="comma-separated: each pruned model fine-tuned once per seed, from the same "
        "pruned weights (default: --seed); its accuracy is their mean",
    )
    p.add_argument("--reduced", action="store_true", help="ResNet-20, small sizes")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=None, help="default: docs/benchmarks/latency*")
    p.add_argument("--runs", type=Path, default=RUNS, help="trained dense models")
    p.add_argument("--render", action="store_true", help="rewrite the .md from the .json")
    p.add_argument(
        "--shares-table",
        default="",
        help="results (.json, comma-separated) of runs with other --granularity / --shares / "
        "--no-adapt-norms / --calib-targets: their autoprune-latency rows side by side in "
        "docs/benchmarks/latency_shares (_MODEL but for resnet56)",
    )
    p.add_argument("--keep", action="store_true", help="keep the JSON's other targets")
    args = p.parse_args()
    small = args.reduced or args.smoke
    args.model = args.model or ("resnet20" if small else "resnet56")
    suffix = "" if args.model == "resnet56" else f"_{args.model}"
    name = f"latency{suffix}"
    args.out = args.out or DOCS / name
    args.shares_out = DOCS / f"latency_shares{suffix}"
    if small:
        args.calib, args.step, args.test_size = 64, 0.05, 2000
        args.finetune_epochs, args.train_size = 0.1, 10_000
    if args.smoke:
        args.targets, args.rounds, args.repeats, args.test_size = "eager:16", 1, 3, 256
        args.calib, args.step, args.finetune_epochs, args.train_size = 16, 0.1, 0.005, 512
        args.speedup, args.macs_target, args.out = 1.25, 0.2, SMOKE / name
        args.runs = SMOKE / "latency-runs"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.finetune_seeds = [int(s) for s in args.finetune_seeds.split(",") if s] or [args.seed]
    return args


Method = Callable[[nn.Module, ImageData, str, int, argparse.Namespace], tuple[nn.Module, dict]]


def autoprune_latency(dense, train, backend, batch, args) -> tuple[nn.Module, dict]:
    result = autoprune.prune(
        dense,
        train_data=train,
        target_latency_reduction=1 - 1 / args.speedup,
        latency_backend=backend,
        latency_batch=batch,
        **_grains(args),
        **_search(args),
        **CALIB_TARGETS[args.calib_targets](dense, train, args),
    )
    summary = result.summary
    units = [h["group"] for h in result.history if h["granularity"] in ("block", "layer")]
    return result.model, {
        "latency_model": summary["latency"],
        "removed": summary["removed"],
        "removed_units": units,  # the blocks and layers, in the order the search took them
    }


def autoprune_macs(dense, train, backend, batch, args) -> tuple[nn.Module, dict]:
    result = autoprune.prune(
        dense, train_data=train, target_macs_reduction=args.macs_target, **_search(args)
    )
    return result.model, {}


def tp_l1_global(dense, train, backend, batch, args) -> tuple[nn.Module, dict]:
    example = torch.zeros(1, *SETUPS[args.model].input_shape)
    return prune_with_tp(dense, example, "tp-l1-global", args.macs_target, TOLERANCE, None), {}


def _teacher_targets(dense: nn.Module, train: ImageData, args) -> dict[str, Any]:
    """The calibration images autoprune draws (the same ones), each with the dense model's
    log-probabilities at ``--calib-temperature`` for a target, and the loss that compares a
    candidate's with them: ``T^2 KL(dense || candidate)`` per image, as the fine-tune's soft
    term (never below 0, so the fast scorer's bound holds)."""
    t = args.calib_temperature
    calib = calibration_for(dense, train, args.calib, seed=args.seed)
    with torch.no_grad(), eval_mode(dense):
        images = torch.cat([x for x, _ in calib.batches])
        targets = torch.log_softmax(dense(images) / t, dim=1)

    def soft_kl(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(prediction.float() / t, dim=1)
        return t * t * (target.exp() * (target - log_q)).sum(1)

    data = torch.utils.data.TensorDataset(images, targets)
    return {
        "calib_data": torch.utils.data.DataLoader(data, batch_size=128),
        "task": Task(loss_fn=soft_kl, loss_floor=0.0),
    }


CALIB_TARGETS: dict[str, Callable[[nn.Module, ImageData, argparse.Namespace], dict[str, Any]]] = {
    "labels": lambda dense, train, args: {},
    "teacher": _teacher_targets,
}


def _grains(args: argparse.Namespace) -> dict[str, Any]:
    """autoprune-latency's granularities and their shares: autoprune's defaults unless given."""
    shares = tuple(float(x) for x in args.shares.split(",") if x)
    return {
        "granularity": args.granularity,
        "macs_shares": shares,
        "break_unit_ties": args.break_unit_ties,
    }


def _search(args: argparse.Namespace) -> dict[str, Any]:
    """The search settings every autoprune method shares: no fine-tune, no recovery unless
    asked for."""
    return {
        "calib_size": args.calib,
        "adapt_norms": args.adapt_norms,
        "step": args.step,
        "recover_steps": args.recover_steps,
        "finetune_epochs": 0,
        "seed": args.seed,
        "progress": True,
    }


METHODS: dict[str, Method] = {
    "autoprune-latency": autoprune_latency,
    "autoprune-macs": autoprune_macs,
    "tp-l1-global": tp_l1_global,
}
ANY_BACKEND = {"autoprune-macs", "tp-l1-global"}  # pruned once, timed under every target


def timed_in_rounds(
    models: dict[str, nn.Module], backend: str, batch: int, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Median of the rounds' medians per model; every round visits every model in turn."""
    shape = SETUPS[args.model].input_shape
    example = torch.zeros(1, *shape)
    runners = {name: BACKENDS.get(backend)(m.eval(), example) for name, m in models.items()}
    rounds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, run in runners.items():
            (lat,) = time_runner(
                run, shape, backend=backend, batch_sizes=(batch,), repeats=args.repeats
            )
            rounds[name].append(lat.median_ms)
    return {n: {"median_ms": statistics.median(r), "round_ms": r} for n, r in rounds.items()}


def run_target(
    backend: str,
    batch: int,
    dense: nn.Module,
    train: ImageData,
    test: ImageData,
    args,
    done: dict[str, tuple[nn.Module, dict[str, Any]]],
) -> dict[str, Any]:
    """Prune, fine-tune and time every method for one target; ``done`` keeps the methods of
    :data:`ANY_BACKEND` for the next target."""
    example = torch.zeros(1, *SETUPS[args.model].input_shape)
    kd = distillation(dense, temperature=4.0, weight=0.5)
    dense_macs = count_macs(dense, example)
    rows, models = [], {"dense": dense}
    for method in args.methods.split(","):
        if method in done:
            models[method], row = done[method]
            rows.append(dict(row))
            continue
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model, extra = METHODS[method](dense, train, backend, batch, args)
        search_s = time.perf_counter() - start
        after_prune = accuracy(model, test)
        macs_reduction = 1 - count_macs(model, example) / dense_macs
        model, finetuned = finetuned_per_seed(model, train, test, kd, args)
        models[method] = model
        rows.append(
            {
                "method": method,
                "macs_reduction": macs_reduction,
                "accuracy_after_prune": after_prune,
                "accuracy_after_finetune": statistics.mean(finetuned),
                "accuracy_after_finetune_per_seed": finetuned,
                "finetune_seeds": args.finetune_seeds,
                "search_s": round(search_s, 1),
                **extra,
            }
        )
        if method in ANY_BACKEND:
            done[method] = (model, dict(rows[-1]))
        print(f"{backend}:{batch} {method}: {rows[-1]}", flush=True)
    timings = timed_in_rounds(models, backend, batch, args)
    dense_ms = timings["dense"]["median_ms"]
    for row in rows:
        row.update(timings[row["method"]])
        row["speedup"] = dense_ms / row["median_ms"]
    return {
        "backend": backend,
        "batch": batch,
        "dense_ms": dense_ms,
        "dense_accuracy": accuracy(dense, test),
        "rows": rows,
        "machine": machine(),  # each target's own: ``--keep`` may join targets of two runs
    }


def finetuned_per_seed(
    pruned: nn.Module, train: ImageData, test: ImageData, kd, args: argparse.Namespace
) -> tuple[nn.Module, list[float]]:
    """The pruned model fine-tuned from the same weights once per ``--finetune-seeds`` (the
    order of the batches and augmentations differs): the first seed's model, to time (every
    seed's has the same layers), and each one's test accuracy. Several seeds show how much of
    a difference between methods the fine-tune alone can make."""
    models, accuracies = [], []
    for i, seed in enumerate(args.finetune_seeds):
        model = pruned if i == len(args.finetune_seeds) - 1 else copy.deepcopy(pruned)
        finetune(model, train, args.finetune_epochs, lr=args.finetune_lr, seed=seed, loss_fn=kd)
        models.append(model)
        accuracies.append(accuracy(model, test))
    return models[0], accuracies


def _finetuned(row: dict[str, Any]) -> str:
    """Accuracy after the fine-tune: the mean, ± the standard deviation over fine-tune seeds
    where there were several (runs before ``--finetune-seeds`` had one)."""
    per_seed = row.get("accuracy_after_finetune_per_seed", [])
    spread = f" ± {statistics.stdev(per_seed):.2f}" if len(per_seed) > 1 else ""
    return f"{row['accuracy_after_finetune']:.2f}{spread}"


def write(out: Path, results: dict[str, Any]) -> None:
    """The Markdown of ``results`` (results written before the MobileNetV2 setup have no
    ``data``: they are all CIFAR-10-JPEG75)."""
    data = results.get("data", "CIFAR-10-JPEG75")
    lines = [
        f"# Pruning for measured speed: {results['model']} on {data}",
        "",
        f"Generated by `bench/latency.py{results['flags']}`. {results['protocol']} "
        f"autoprune-latency's blocks scored with BatchNorm statistics re-estimated on the "
        f"calibration images (adaptive BN): {_adapted(results['settings'])}; blocks ranked "
        f"by {_block_ranking(results)}.",
        "",
        machine_line(results["machine"]),
        "",
    ]
    for target in results["targets"]:
        lines += [
            f"## {target['backend']}, batch {target['batch']} "
            f"(dense: {target['dense_ms']:.2f} ms, {target['dense_accuracy']:.2f} %)",
            "",
            *([machine_line(target["machine"]), ""] if "machine" in target else []),
            "| method | MACs red. | blocks removed | measured (ms) | speed-up | predicted speed-up "
            "| predicted / measured | checked in the search | acc. after prune "
            "| acc. after fine-tune | search (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in target["rows"]:
            model = row.get("latency_model")
            predicted = f"{model['speedup_predicted']:.2f}x" if model else "–"
            error = f"{model['speedup_predicted'] / row['speedup']:.2f}" if model else "–"
            checks = " → ".join(
                f"{1 / (1 - c['measured_reduction']):.2f}x" for c in (model or {}).get("checks", [])
            )
            lines.append(
                f"| {row['method']} | {100 * row['macs_reduction']:.1f} % | "
                f"{row.get('removed', {}).get('blocks', 0)} | "
                f"{row['median_ms']:.2f} | {row['speedup']:.2f}x | {predicted} | {error} | "
                f"{checks or '–'} | "
                f"{row['accuracy_after_prune']:.2f} | {_finetuned(row)} | "
                f"{row['search_s']:.0f} |"
            )
        lines.append("")
    lines += [
        "Predicted speed-up: the latency model's, when the search stopped (dense over pruned, "
        "both predicted); measured: the same run's timing of both on the backend. Speed-ups, "
        "not milliseconds, are compared: the load of the machine changes between the search "
        "and the timing. Checked in the search: the speed-ups measured on the way (at half and "
        "four fifths of the target, predicted: predicted savings then scaled to the "
        "measurement) and when the prediction said the target was reached (short of it, "
        "scaled again and pruning went on).",
        "",
        results["note"],
    ]
    write_results(out, results, "\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    if args.render:
        write(args.out, json.loads(args.out.with_suffix(".json").read_text()))
        return
    if args.shares_table:
        shares_table([Path(p) for p in args.shares_table.split(",")], args.shares_out)
        return
    torch.manual_seed(args.seed)
    setup = SETUPS[args.model]
    train, test = setup.splits(args.test_size)
    dense = setup.dense(args, train).eval()  # trained on the whole split, fine-tunes on a part
    train = train.subset(range(min(args.train_size, len(train))))
    targets = kept_targets(args) if args.keep else []
    done: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for spec in args.targets.split(","):
        backend, batch = spec.split(":")
        targets.append(run_target(backend, int(batch), dense, train, test, args, done))
        report(args, targets)  # after every target: a long run shows what it has


def kept_targets(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The existing results' targets that this run does not measure, each with its machine."""
    path = args.out.with_suffix(".json")
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    measured = set(args.targets.split(","))
    return [
        {"machine": old["machine"], **t}
        for t in old["targets"]
        if f"{t['backend']}:{t['batch']}" not in measured
    ]


def _removing(args: argparse.Namespace) -> str:
    """What autoprune-latency removed, in order, with each granularity's share of the target."""
    config = autoprune.PruneConfig(
        target_latency_reduction=1 - 1 / args.speedup, **_grains(args)
    ).resolved()
    grains, shares = config.granularity, config.macs_shares
    if len(shares) > 1 and shares[-1] == 0:
        return (
            f"{', then '.join(grains[:-1])} to the target, then {grains[-1]} where they fall short"
        )
    return (
        f"{', then '.join(grains)} (shares of the target: {' / '.join(f'{s:g}' for s in shares)})"
    )


def _adapted(settings: dict[str, Any]) -> str:
    """Whether autoprune-latency's blocks were scored with adaptive BN (runs recorded before
    ``--adapt-norms`` were not)."""
    return "yes" if settings.get("adapt_norms", False) else "no"


def _calib_against(settings: dict[str, Any]) -> str:
    """What autoprune-latency's calibration loss compared with (the labels in runs recorded
    before ``--calib-targets``)."""
    if settings.get("calib_targets", "labels") == "labels":
        return "the labels"
    return f"the dense model's outputs, T^2 KL at T = {settings['calib_temperature']:g}"


def _calibration(settings: dict[str, Any]) -> str:
    """How many calibration images autoprune-latency scored on, and the seed that drew them."""
    return f"{settings['calib']} (seed {settings['seed']})"


def _block_ranking(results: dict[str, Any]) -> str:
    """How autoprune-latency ranked blocks: by the loss (each block's saving counted as one
    step), but in the runs recorded while blocks were counted whole (1d7c460 up to b7d9a73)."""
    ranking = results.get("block_ranking", "loss")
    if results["settings"].get("break_unit_ties"):
        ranking += "; of tied ones (within one standard error), the fewest parameters"
    return ranking


def _seeds(args: argparse.Namespace) -> str:
    seeds = args.finetune_seeds
    if len(seeds) == 1:
        return ""
    return (
        f" (repeated from the same pruned model with seeds {', '.join(map(str, seeds))}: "
        "accuracy after fine-tune is their mean ± standard deviation)"
    )


def _recovery(args: argparse.Namespace) -> str:
    if not args.recover_steps:
        return "without recovery"
    every = 100 * autoprune.PruneConfig().recover_every
    return f"with {args.recover_steps} recovery steps every {every:g} % of the MACs"


def shares_table(paths: list[Path], out: Path) -> None:
    """autoprune-latency's rows from runs that removed with other granularities or shares, or
    scored blocks without adaptive BN (the first run's protocol otherwise): what each does at
    the same target."""
    loaded = [(path, json.loads(path.read_text())) for path in paths]
    runs = []
    for path, results in loaded:
        for target in results["targets"]:
            runs += [
                {
                    "source": _beside_docs(path),
                    "removing": results["removing"],
                    "adapted": _adapted(results["settings"]),
                    "ranking": _block_ranking(results),
                    "against": _calib_against(results["settings"]),
                    "calibration": _calibration(results["settings"]),
                    "target": f"{target['backend']}, batch {target['batch']}",
                    "machine": target.get("machine", results["machine"]),
                    **row,
                }
                for row in target["rows"]
                if row["method"] == "autoprune-latency"
            ]
    first = loaded[0][1]
    protocol = re.sub(
        r"removing .*?; the others", "removing as the table says; the others", first["protocol"]
    )
    protocol = re.sub(r"; autoprune-latency's calibration loss against [^)]*", "", protocol)
    lines = [
        f"# Latency target: the share of blocks, and adaptive BN ({first['model']} on "
        f"{first.get('data', 'CIFAR-10-JPEG75')})",
        "",
        f"Generated by `bench/latency.py --shares-table` from {len(paths)} runs of "
        f"`bench/latency.py{first['flags']}` with other `--granularity` / `--shares` / "
        f"`--no-adapt-norms` / `--calib-targets` / `--seed` (the draw of the calibration "
        f"images) / `--break-unit-ties`. {protocol} Adaptive BN: blocks scored, and "
        "applied, with BatchNorm statistics re-estimated on the calibration images (runs "
        "before it: no). Blocks ranked by the loss (each block's saving counted as one step) "
        "or, in runs recorded from 1d7c460 up to b7d9a73, by the loss per ms saved; with "
        "`--break-unit-ties`, of the blocks whose loss lies within one standard error (of the "
        "per-image difference) of the first's, the one with the fewest parameters. The "
        "calibration loss: cross-entropy against the labels (autoprune's), or T^2 KL against "
        "the dense model's outputs at temperature T. Accuracy after fine-tune: mean ± sd "
        "where the run fine-tuned with several seeds.",
        "",
        "| removing | adaptive BN | blocks ranked by | calibration loss against | calibration "
        "images (draw) | target | MACs red. | blocks removed | speed-up measured | acc. after "
        "prune | acc. after fine-tune | load (1 min) | results |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['removing']} | {r['adapted']} | {r['ranking']} | {r['against']} | "
        f"{r['calibration']} | {r['target']} | "
        f"{100 * r['macs_reduction']:.1f} % | "
        f"{r.get('removed', {}).get('blocks', 0)} | {r['speedup']:.2f}x | "
        f"{r['accuracy_after_prune']:.2f} | {_finetuned(r)} | "
        f"{r['machine']['load_average'][0]:.1f} | {r['source']} |"
        for r in runs
    ]
    lines += ["", "Results files: relative to docs/benchmarks/.", "", first["note"]]
    write_results(
        out, {"sources": [_beside_docs(p) for p in paths], "runs": runs}, "\n".join(lines) + "\n"
    )


def _beside_docs(path: Path) -> str:
    """``path`` relative to docs/benchmarks (its name where it lies elsewhere)."""
    try:
        return str(path.resolve().relative_to(DOCS.resolve()))
    except ValueError:
        return path.name


def report(args: argparse.Namespace, targets: list[dict[str, Any]]) -> None:
    flags = " --smoke" if args.smoke else " --reduced" if args.reduced else ""
    if args.model not in ("resnet56", "resnet20"):
        flags += f" --model {args.model}"
    removing = _removing(args)  # as the defaults of this run's autoprune resolve it
    results = {
        "model": args.model,
        "data": SETUPS[args.model].data,
        "flags": flags,
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "removing": removing,
        "protocol": (
            f"Each method prunes {_recovery(args)} (calibration {args.calib} images, step "
            f"{args.step:g}; autoprune-latency's calibration loss against "
            f"{_calib_against(vars(args))}), then gets {args.finetune_epochs:g} epoch(s) of "
            "distilled fine-tune "
            f"on {args.train_size} training images{_seeds(args)}; accuracy on {args.test_size} "
            "test images. "
            f"autoprune-latency targets a {args.speedup:g}x speed-up on the backend and batch "
            "of its table (predicted, and measured on the way and at the end of the search: "
            "pruning goes on while the measurement falls short), removing "
            f"{removing}; "
            f"the others -{100 * args.macs_target:.0f} % MACs. Latency: "
            f"median of {args.rounds} round(s) of {args.repeats} timed runs, all models of a "
            "table timed in the same run."
        ),
        "note": (
            "Measured on a shared 2-core machine (see the load average): single timed runs "
            "of the dense model vary by 15 % or more here, so speed-ups and prediction errors "
            "move from run to run; they are what this run measured."
        ),
        "targets": targets,
    }
    write(args.out, results)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
