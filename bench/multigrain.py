"""Multi-grain pruning (block, layer, channel, weight; coarse to fine) against channels only.

Studies, written after each so an interrupted benchmark keeps what it finished:

1. ResNet-56 (adapted weights, CIFAR-10-JPEG75), -50 % MACs: ``block,layer,channel,weight``
   vs ``channel`` with the same search settings and the same training steps in all (recovery
   plus fine-tune); compression ratio (dense parameters / non-zero parameters), accuracy lost.
2. VGG-19-BN trained here on Fashion-MNIST (grey images as RGB at 32 x 32: on this 2-core CPU
   one epoch takes ~50 min, CIFAR-10 would need ~15 epochs), pruned multi-grain to at least
   32x parameter compression; accuracy lost.
3. The control for 2: the dense VGG-19 trained as many more steps as the pruned one had.

    python bench/multigrain.py                 # every study (many hours on 2 cores)
    python bench/multigrain.py --studies resnet56
    python bench/multigrain.py --studies vgg19,vgg19_control   # the control trains dense VGG
    python bench/multigrain.py --smoke         # tiny sizes, for CI (< 40 s)

Writes docs/benchmarks/multigrain.json and .md (the table is generated from the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
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
    previous_rows,
    trained_model,
    write_results,
)

import autoprune
from autoprune.data import ImageData, load_dataset
from autoprune.measure import count_params
from autoprune.search.granularity.weight import masks_held
from autoprune.train import TrainConfig

RUNS = REPO / "runs" / "bench-multigrain"
EXAMPLE = torch.zeros(1, 3, 32, 32)
MULTIGRAIN = "block,layer,channel,weight"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", default="resnet56,vgg19,vgg19_control")
    p.add_argument("--target", type=float, default=0.5, help="ResNet-56: MACs reduction")
    p.add_argument("--weight-sparsity", type=float, default=0.5, help="ResNet-56")
    p.add_argument("--resnet-runs", default="channel,multigrain", help="ResNet-56 rows to run")
    p.add_argument(
        "--macs-shares",
        default="",
        help="ResNet-56: also a multi-grain row with these block,layer,channel MACs shares",
    )
    p.add_argument("--vgg-target", type=float, default=0.7, help="VGG-19: MACs reduction")
    p.add_argument("--vgg-sparsity", type=float, default=0.95, help="VGG-19: weight sparsity")
    p.add_argument("--vgg-epochs", type=float, default=1.5, help="training VGG-19 from scratch")
    # 80 steps from scratch: 75.4 % test accuracy at lr 0.01, 20.6 % at 0.05 (too high so early)
    p.add_argument("--vgg-lr", type=float, default=0.01, help="training VGG-19 from scratch")
    p.add_argument("--step", type=float, default=0.02, help="ResNet-56: MACs per search step")
    p.add_argument(
        "--vgg-step", type=float, default=0.05, help="VGG-19 (3x ResNet-56's MACs per image)"
    )
    p.add_argument("--criteria", default=None, help="[default: the whole pool]")
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--recover-steps", type=int, default=50)
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="ResNet-56: recovery + fine-tune steps of every row (rows added to earlier ones "
        "keep their budget) [default: the most recovery of the rows run, plus an epoch]",
    )
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--train-size", type=int, default=0, help="0: the whole training split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=DOCS / "multigrain")
    p.add_argument("--runs", type=Path, default=RUNS)
    args = p.parse_args()
    if args.smoke:
        args.target, args.weight_sparsity, args.vgg_target, args.vgg_sparsity = (
            0.15,
            0.05,
            0.1,
            0.05,
        )
        args.criteria = "l1"
        args.vgg_epochs, args.step, args.vgg_step = 0.05, 0.08, 0.08
        args.calib, args.recover_steps = 16, 1
        args.finetune_epochs, args.test_size, args.train_size = 0.05, 64, 256
        args.out, args.runs = SMOKE / "multigrain", SMOKE / "multigrain-runs"
    return args


def search(
    args: argparse.Namespace,
    dense: torch.nn.Module,
    train: ImageData,
    name: str,
    step: float,
    input_size: int | None = None,
    **settings: Any,
) -> autoprune.PruneResult:
    """The loss-aware search with recovery, resumed when it ran before."""
    return autoprune.prune(
        dense,
        example_inputs=EXAMPLE,
        train_data=train,
        step=step,
        criteria=args.criteria,
        calib_size=args.calib,
        recover_steps=args.recover_steps,
        seed=args.seed,
        progress=True,  # in a log: one line per iteration
        out_dir=args.runs / name,
        resume=True,
        input_size=input_size,
        **settings,
    )


def recovery_steps(result: autoprune.PruneResult) -> int:
    return (
        sum(h["loss_recovered"] is not None for h in result.history)
        * result.summary["config"]["recover_steps"]
    )


def epoch_steps(epochs: float, train: ImageData) -> int:
    return max(1, round(epochs * len(train) / TrainConfig().batch_size))


def steps_as_epochs(steps: int, train: ImageData) -> float:
    """What ``finetune`` takes for ``steps`` optimizer steps (it trains by epochs)."""
    return steps * TrainConfig().batch_size / len(train)


def row(
    args: argparse.Namespace,
    dense: torch.nn.Module,
    result: autoprune.PruneResult,
    train: ImageData,
    test: ImageData,
    finetune_steps: int,
    input_size: int | None = None,
) -> dict[str, Any]:
    """Fine-tune a searched model (masks held) and the row: compression, MACs, accuracy lost."""
    model, summary = result.model, result.summary
    epochs = steps_as_epochs(finetune_steps, train)
    with masks_held(model):  # masked weights stay zero while fine-tuning
        finetune(model, train, epochs, lr=0.01, seed=args.seed, input_size=input_size)
    base = accuracy(dense, test, input_size)
    after = accuracy(model, test, input_size)
    return {
        "granularity": summary["config"]["granularity"],
        "step": summary["config"]["step"],
        "calib_images": args.calib,
        "steps_per_recovery": args.recover_steps,
        "finetune_steps": finetune_steps,
        "train_images": len(train),
        "load_average": machine()["load_average"],
        # the iterations' own times: a run resumed across sessions counts only them
        "search_s": round(sum(h["seconds"] + h["recovery_s"] for h in result.history), 1),
        "iterations": summary["iterations"],
        "recovery_steps": recovery_steps(result),
        "removed": summary["removed"],
        "ended_early": summary["ended_early"],
        "macs_reduction": summary["macs_reduction"],
        "sparse_macs_reduction": 1 - summary["pruned"]["sparse_macs"] / summary["baseline"]["macs"],
        "weight_sparsity": summary["weight_sparsity"],
        "params": count_params(model),
        "nonzero_params": count_params(model, nonzero=True),
        "compression_ratio": count_params(dense) / count_params(model, nonzero=True),
        "accuracy_dense": base,
        "accuracy_after_search": summary["pruned"]["accuracy"],
        "accuracy_after_finetune": after,
        "accuracy_lost": base - after,
    }


def resnet56_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    train, test = cifar10_jpeg75(args.test_size)
    train = train.subset(range(args.train_size)) if args.train_size else train
    model = "resnet20" if args.smoke else "resnet56"
    dense = autoprune.create_model(model, weights=adapted_weights(model))
    common = {"target_macs_reduction": args.target, "val_data": test, "step": args.step}
    multigrain = {"granularity": MULTIGRAIN, "weight_sparsity": args.weight_sparsity}
    runs = {"channel": {"granularity": "channel"}, "multigrain": multigrain}
    selected = args.resnet_runs.split(",")
    if args.macs_shares:  # a multi-grain row with the MACs target shared unequally
        name = f"multigrain-shares-{args.macs_shares.replace(',', '-')}-w{args.weight_sparsity:g}"
        shares = tuple(float(s) for s in args.macs_shares.split(","))
        runs[name] = {**multigrain, "macs_shares": shares}
        selected.append(name)
    searched = {
        name: search(args, dense, train, f"{model}-{name}", **common, **runs[name])
        for name in selected
        if name
    }
    # The same training budget for every row: recovery plus fine-tune steps, the fine-tune
    # filling up to the most recovery any row had plus --finetune-epochs.
    budget = args.train_steps or (
        max(map(recovery_steps, searched.values())) + epoch_steps(args.finetune_epochs, train)
    )
    return [
        {**row(args, dense, r, train, test, budget - recovery_steps(r)), "run": f"{model}-{name}"}
        for name, r in searched.items()
    ]


def trained_vgg(args: argparse.Namespace, train: ImageData) -> torch.nn.Module:
    """VGG-19-BN trained on ``train`` (saved under --runs and reused)."""
    path = args.runs / f"vgg19_bn-fashion-mnist-{args.vgg_epochs:g}ep-lr{args.vgg_lr:g}"
    return trained_model(
        path,
        train,
        "vgg19_bn",
        epochs=args.vgg_epochs,
        lr=args.vgg_lr,
        seed=args.seed,
        input_shape=(3, 32, 32),
    )


def fashion_mnist(args: argparse.Namespace) -> tuple[ImageData, ImageData]:
    """The VGG studies' training split (--train-size) and test images (--test-size)."""
    train = load_dataset("fashion-mnist", "train")
    train = train.subset(range(args.train_size)) if args.train_size else train
    return train, load_dataset("fashion-mnist", "test").subset(range(args.test_size))


def vgg_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    train, test = fashion_mnist(args)
    dense = trained_vgg(args, train)
    name = "vgg19_bn-multigrain"
    result = search(
        args,
        dense,
        train,
        name,
        step=args.vgg_step,
        input_size=32,
        granularity=MULTIGRAIN,
        target_macs_reduction=args.vgg_target,
        weight_sparsity=args.vgg_sparsity,
        val_data=test,
    )
    steps = epoch_steps(args.finetune_epochs, train)
    vgg = row(args, dense, result, train, test, steps, input_size=32)
    return [{**vgg, "run": name, "dataset": "Fashion-MNIST (as RGB, 32 x 32)"}]


def vgg_control_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The dense VGG-19 trained as many more steps as the pruned one had (recovery plus
    fine-tune, same recipe): how much of the pruned model's accuracy the extra training gives.
    Run after ``vgg19``, whose row it reads."""
    train, test = fashion_mnist(args)
    pruned = next(r for r in previous_rows(args.out) if r["run"] == "vgg19_bn-multigrain")
    steps = pruned["recovery_steps"] + pruned["finetune_steps"]
    dense = trained_vgg(args, train)
    model = copy.deepcopy(dense)
    finetune(model, train, steps_as_epochs(steps, train), lr=0.01, seed=args.seed, input_size=32)
    base, after = accuracy(dense, test, 32), accuracy(model, test, 32)
    params = count_params(dense)
    return [
        {
            "run": "vgg19_bn-dense-same-steps",
            "dataset": pruned["dataset"],
            "granularity": [],
            "step": 0,
            "calib_images": 0,
            "finetune_steps": steps,
            "train_images": len(train),
            "load_average": machine()["load_average"],
            "search_s": 0,
            "recovery_steps": 0,
            "removed": dict.fromkeys(("blocks", "layers", "channels", "weights"), 0),
            "macs_reduction": 0.0,
            "sparse_macs_reduction": 0.0,
            "params": params,
            "nonzero_params": count_params(model, nonzero=True),
            "compression_ratio": params / count_params(model, nonzero=True),
            "accuracy_dense": base,
            "accuracy_after_finetune": after,
            "accuracy_lost": base - after,
        }
    ]


STUDIES = {"resnet56": resnet56_rows, "vgg19": vgg_rows, "vgg19_control": vgg_control_rows}


def main() -> None:
    args = parse_args()
    for study in args.studies.split(","):
        rows = STUDIES[study](args)
        names = {r["run"] for r in rows}
        # read again: the other study may have run beside this one
        kept = [r for r in previous_rows(args.out) if r["run"] not in names]
        write(args.out, {"machine": machine(), "runs": kept + rows})
        print(json.dumps(rows, indent=1)[:3000], flush=True)


def write(out: Path, results: dict[str, Any]) -> None:
    lines = [
        "# Multi-grain pruning vs channels only",
        "",
        "Generated by `bench/multigrain.py`. Protocol: loss-aware search (fast scorer) with "
        "brief distilled recovery every 2 % of MACs; multi-grain runs share the MACs target "
        "between block, layer and channel (equally unless the run names its shares), then "
        "mask weights step by step to the sparsity, recovering after each step; then a "
        "fine-tune (SGD lr 0.01, cosine, masks held). Every ResNet row trains the same number "
        "of steps in all (recovery + fine-tune, batch 128): the fine-tune fills up to the most "
        "recovery any row had plus one epoch. Compression: dense parameters / non-zero "
        "parameters.",
        "ResNet runs: CIFAR-10-JPEG75 (adapted weights). VGG-19-BN: trained by the script on "
        "Fashion-MNIST (grey as RGB, 32 x 32).",
        "",
        "| run | granularity | removed (blocks / layers / channels / weights) | MACs red. "
        "| sparse MACs red. | compression | dense acc. | acc. after fine-tune | lost "
        "| search + recovery (s) | recovery + fine-tune steps | step / calib. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        rm, grains = r["removed"], ",".join(r["granularity"]) or "none (dense)"
        lines.append(
            f"| {r['run']} | {grains} | {rm['blocks']} / {rm['layers']} / "
            f"{rm['channels']} / {rm['weights']} | {r['macs_reduction']:.1%} "
            f"| {r['sparse_macs_reduction']:.1%} | {r['compression_ratio']:.1f}x "
            f"| {r['accuracy_dense']:.2f} % | {r['accuracy_after_finetune']:.2f} % "
            f"| {r['accuracy_lost']:+.2f} | {r['search_s']:.0f} "
            f"| {r['recovery_steps']} + {r['finetune_steps']} "
            f"| {r['step']:g} / {r['calib_images']} |"
        )
    lines += ["", machine_line(results["machine"])]
    write_results(out, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
