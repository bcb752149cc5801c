"""Transfer: the CIFAR-10 ResNet-56 adapted to Fashion-MNIST and pruned to -50 % MACs.

Rows: (a) the transferred dense model (new head trained alone, then the whole network);
(b) transferred and pruned, per schedule and transfer order; (c) the architecture of the first
pruned model, re-initialised and trained from scratch for the same number of optimizer steps.
Images are grey, replicated to 3 channels and resized 28 -> 32 px; training uses a subset of the
training split, the test split is whole. Orders get the same step budget: prune-while-adapting
spreads the whole-network adapting steps over its recoveries.

    python bench/transfer.py            # ResNet-56, 10,000 training images (~40 min, 2 cores)
    python bench/transfer.py --smoke    # a tiny run, for CI (< 30 s)

Writes docs/benchmarks/transfer.json and .md (the table is generated from the JSON), after
every row. Runs live in runs/bench-transfer/ and are resumed, so an interrupted benchmark
continues where it stopped.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from _common import DOCS, REPO, SMOKE, machine, machine_line, original_weights, write_results
from torch import nn

import autoprune
from autoprune.api import loader_for
from autoprune.data import ImageData, load_dataset
from autoprune.io import load
from autoprune.measure import count_macs, count_params, evaluate_batches
from autoprune.train import TrainConfig, fit
from autoprune.transfer import ADAPTED_DIR

DATASET, SIZE = "fashion-mnist", 32


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--target", type=float, default=0.5, help="MACs reduction")
    p.add_argument(
        "--runs",
        default="saliency-then-similarity/adapt-then-prune,auto/adapt-then-prune,"
        "saliency-then-similarity/prune-while-adapting",
        help="comma-separated schedule/order pairs; the first one's architecture is (c)'s",
    )
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--head-steps", type=int, default=50)
    p.add_argument("--adapt-steps", type=int, default=150)
    p.add_argument("--step", type=float, default=0.02, help="MACs per search iteration")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--recover-every", type=float, default=0.05)
    p.add_argument("--recover-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--scratch-lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=DOCS / "transfer")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "bench-transfer")
    args = p.parse_args()
    if args.smoke:
        args.model, args.target, args.train_size, args.test_size = "resnet20", 0.03, 128, 128
        args.head_steps = args.adapt_steps = args.recover_steps = 2
        args.step, args.calib, args.recover_every, args.batch_size = 0.03, 16, 0.03, 32
        args.out, args.runs_dir = SMOKE / "transfer", SMOKE / "transfer-runs"
        shutil.rmtree(args.runs_dir, ignore_errors=True)
        torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    return args


def settings(args: argparse.Namespace, order: str) -> dict[str, Any]:
    """The prune settings of one run; prune-while-adapting's recoveries take the adapting steps."""
    train = TrainConfig(batch_size=args.batch_size, lr=0.01, channels_last=False, progress=False)
    recoveries = math.ceil(args.target / args.recover_every - 1e-9)
    extra = args.adapt_steps // recoveries if order == "prune-while-adapting" else 0
    return {
        "target_macs_reduction": args.target,
        "step": args.step,
        "calib_size": args.calib,
        "recover_every": args.recover_every,
        "recover_steps": args.recover_steps + extra,
        "recovery": train,
        "head_steps": args.head_steps,
        "head_training": TrainConfig(
            batch_size=args.batch_size, lr=0.05, channels_last=False, progress=False
        ),
        "adapt_steps": args.adapt_steps,
        "adaptation": train,
        "transfer_order": order,
        "seed": args.seed,
    }


def run_dir(args: argparse.Namespace, run: str) -> Path:
    return args.runs_dir / run.replace("/", "-")


def prune(
    args: argparse.Namespace, run: str, train: ImageData, test: ImageData, adapted: Path | None
) -> autoprune.PruneResult:
    """One ``schedule/order`` run, resumed from its directory; it starts from the ``adapted``
    model if given (every adapt-then-prune run prunes the same transferred model)."""
    schedule, order = run.split("/")
    source: Any = load(adapted) if adapted is not None else args.model
    return autoprune.prune(
        source,
        weights=None if adapted is not None else original_weights(args.model),
        transfer=adapted is None,
        schedule=schedule,
        train_data=train,
        val_data=test,
        input_size=SIZE,
        out_dir=run_dir(args, run),
        resume=True,
        **settings(args, order),
    )


def from_scratch(
    model: nn.Module, train: ImageData, steps: int, args: argparse.Namespace
) -> nn.Module:
    """``model``'s architecture with fresh weights, trained for ``steps`` optimizer steps."""
    torch.manual_seed(args.seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    loader = loader_for(
        model, train, batch_size=args.batch_size, train=True, seed=args.seed, input_size=SIZE
    )
    config = TrainConfig(
        epochs=math.ceil(steps / len(loader)),
        max_steps=steps,
        batch_size=args.batch_size,
        lr=args.scratch_lr,
        channels_last=False,
        seed=args.seed,
    )
    fit(model, loader, config)
    return model


def accuracy_on(model: nn.Module, test: ImageData) -> float:
    batches = loader_for(model, test, batch_size=256, train=False, input_size=SIZE)
    return evaluate_batches(model, batches).accuracy


def row(what: str, run: str | None, **values: Any) -> dict[str, Any]:
    schedule, order = run.split("/") if run else ("-", "-")
    return {"model": what, "schedule": schedule, "order": order, **values}


def main() -> None:
    args = parse_args()
    perm = torch.randperm(60_000, generator=torch.Generator().manual_seed(args.seed))
    train = load_dataset(DATASET, "train").subset(perm[: args.train_size])
    test = load_dataset(DATASET, "test").subset(range(args.test_size))
    results: dict[str, Any] = {
        "machine": machine(),
        "model": args.model,
        "source": f"{original_weights(args.model).name} (akamaster, original CIFAR-10)",
        "dataset": "Fashion-MNIST",
        "train_images": len(train),
        "test_images": len(test),
        "target_macs_reduction": args.target,
        "protocol": (
            f"grey -> 3 channels, 28 -> {SIZE} px; new head {args.head_steps} steps alone "
            f"(lr 0.05), whole network {args.adapt_steps} steps (lr 0.01); search in steps of "
            f"{args.step:.0%} of the MACs on {args.calib} calibration images; recovery every "
            f"{args.recover_every:.0%} of the MACs, {args.recover_steps} steps at lr 0.01 "
            "(prune-while-adapting: plus its share of the adapting steps) with distillation "
            f"from the unpruned model; no final fine-tune; batch {args.batch_size}; scratch: "
            f"lr {args.scratch_lr}, cosine, PyTorch default initialisation"
        ),
        "rows": [],
    }
    # The first adapt-then-prune run's adapted model and transfer record: the later ones reuse it.
    adapted: tuple[Path, dict[str, Any]] | None = None
    first: tuple[str, autoprune.PruneResult, int] | None = None
    for run in args.runs.split(","):
        order = run.split("/")[1]
        reuse = adapted[0] if adapted and order == "adapt-then-prune" else None
        result = prune(args, run, train, test, reuse)
        summary = result.summary
        transfer = summary["transfer"] if reuse is None else adapted[1]
        if adapted is None and order == "adapt-then-prune":
            adapted = (run_dir(args, run) / ADAPTED_DIR, transfer)
            results["rows"].append(
                row(
                    "(a) transferred, dense",
                    None,
                    accuracy=transfer["accuracy"],
                    macs_reduction=0.0,
                    params_reduction=0.0,
                    steps=transfer["head_steps"] + transfer["adapt_steps"],
                    seconds=transfer["adapt_s"],
                )
            )
        recoveries = sum(1 for h in result.history if h["loss_recovered"] is not None)
        steps = transfer["head_steps"] + transfer["adapt_steps"]
        steps += recoveries * summary["config"]["recover_steps"]
        results["rows"].append(
            row(
                "(b) transferred, pruned",
                run,
                accuracy=summary["pruned"]["accuracy"],
                macs_reduction=summary["macs_reduction"],
                params_reduction=summary["params_reduction"],
                steps=steps,
                seconds=summary["timings"]["total_s"]
                + summary.get("transfer", {}).get("adapt_s", 0),
            )
        )
        write(args.out, results)
        first = first or (run, result, steps)
    assert first is not None
    run, result, steps = first
    start = time.perf_counter()
    model = from_scratch(load(run_dir(args, run) / "model"), train, steps, args)
    base, example = result.summary["baseline"], torch.zeros(1, 3, SIZE, SIZE)
    results["rows"].append(
        row(
            "(c) from scratch, same architecture",
            run,
            accuracy=accuracy_on(model, test),
            macs_reduction=1 - count_macs(model, example) / base["macs"],
            params_reduction=1 - count_params(model) / base["params"],
            steps=steps,
            seconds=round(time.perf_counter() - start, 1),
        )
    )
    write(args.out, results)


def write(out: Path, results: dict[str, Any]) -> None:
    lines = [
        f"# Transfer: {results['model']} from CIFAR-10 to {results['dataset']}, "
        f"-{results['target_macs_reduction']:.0%} MACs",
        "",
        f"Generated by `bench/transfer.py`. Source: {results['source']}. Training on "
        f"{results['train_images']:,} {results['dataset']} training images, test accuracy on "
        f"{results['test_images']:,} test images. Protocol: {results['protocol']}.",
        "",
        "Optimizer steps count from the source checkpoint: adapting, then recoveries. Time: "
        "adapting plus search and recovery; the later adapt-then-prune runs reuse the first "
        "one's transferred model (row (a)), so theirs is search and recovery only.",
        "",
        "| model | schedule | order | MACs red. | params red. | optimizer steps "
        "| test accuracy | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['schedule']} | {r['order']} | {r['macs_reduction']:.1%} "
            f"| {r['params_reduction']:.1%} | {r['steps']} | {r['accuracy']:.2f} % "
            f"| {r['seconds']:.0f} |"
        )
    lines += ["", machine_line(results["machine"])]
    write_results(out, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
