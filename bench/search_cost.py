"""Search cost: seconds per iteration of the fast scorer and the exhaustive one, by depth.

Each model (ResNet-20/32/44/56) is pruned for a few iterations with each scorer by
``autoprune.prune`` itself (the default criteria pool, no recovery), on the same calibration
images, and the per-iteration times it records are reported: median seconds per iteration,
candidates scored per iteration, and an estimate of the whole search to the target (iterations
needed, from the MACs each measured iteration removed, times the median). For the exhaustive
scorer the cost per calibration image is also scaled to the 10,000 images LAASP evaluates each
candidate on: an extrapolation, marked as such, not a measurement.

Only timing matters here: ResNet-20 and -56 use the CIFAR-10-JPEG75-adapted weights, ResNet-32
and -44 (for which none exist) the original CIFAR-10 ones (akamaster).

    python bench/search_cost.py            # ResNet-20/32/44/56, 3 iterations: ~10 min, 2 cores
    python bench/search_cost.py --smoke    # ResNet-20, 1 iteration, for CI

Writes docs/benchmarks/search_cost.{json,md,png}; results are written after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

from _common import (
    DOCS,
    SHARED,
    SMOKE,
    adapted_weights,
    cifar10_jpeg75_root,
    machine,
    machine_line,
    previous_rows,
    write_results,
)
from matplotlib.figure import Figure
from torch import nn

import autoprune
from autoprune.data import ImageData, load_dataset
from autoprune.search import PruneConfig

LAASP_IMAGES = 10_000  # calibration images per candidate in the LAASP paper
STEP = PruneConfig().step  # MACs share one iteration removes


def weights(model: str) -> tuple[Path, str]:
    """The adapted CIFAR-10-JPEG75 weights where they exist, else the original CIFAR-10 ones."""
    adapted = adapted_weights(model)
    if adapted.exists():
        return adapted, "CIFAR-10-JPEG75-adapted"
    original = SHARED / "weights" / "cifar10-resnet-akamaster"
    return next(original.glob(f"{model}-*.th")), "original CIFAR-10 (akamaster)"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet32,resnet44,resnet56")
    p.add_argument("--scorers", default="fast,exhaustive")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per run")
    p.add_argument("--calib", type=int, default=256, help="calibration images, both scorers")
    p.add_argument("--target", type=float, default=0.5, help="MACs reduction for the estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=DOCS / "search_cost")
    args = p.parse_args()
    if args.smoke:
        args.models, args.iterations, args.calib = "resnet20", 1, 32
        args.out = SMOKE / "search_cost"
    return args


def main() -> None:
    args = parse_args()
    train = load_dataset("cifar10", "train", cifar10_jpeg75_root())
    settings = {
        "calibration_images": args.calib,
        "iterations_timed": args.iterations,
        "target_macs_reduction": args.target,
    }
    results = {
        "machine": machine(),
        "dataset": "CIFAR-10-JPEG75 (training images, for calibration)",
        **settings,
        "runs": previous_rows(args.out, **settings),
    }
    for model in args.models.split(","):
        path, origin = weights(model)
        dense = autoprune.create_model(model, weights=path)
        for scorer in args.scorers.split(","):
            row = {"model": model, "depth": int(model.removeprefix("resnet")), "weights": origin}
            row |= time_iterations(dense, train, scorer, args)
            runs = [r for r in results["runs"] if (r["model"], r["scorer"]) != (model, scorer)]
            runs.append(row)
            results["runs"] = sorted(runs, key=lambda r: (r["depth"], r["scorer"] != "fast"))
            results["machine"] = machine()
            write(args.out, results)
            print(json.dumps(row), flush=True)


def time_iterations(
    dense: nn.Module, train: ImageData, scorer: str, args: argparse.Namespace
) -> dict:
    """The first ``args.iterations`` iterations of a real search with ``scorer``, timed.

    The target is set a little beyond those iterations so none of them is the trimmed last
    step (which scores only the candidates that land on the target).
    """
    result = autoprune.prune(
        dense,
        train_data=train,
        target_macs_reduction=(args.iterations + 0.4) * STEP,
        scorer=scorer,
        calib_size=args.calib,
        recover_steps=0,
        finetune_epochs=0,
        seed=args.seed,
        progress=False,
    )
    history = result.history[: args.iterations]
    median = statistics.median(h["seconds"] for h in history)
    per_iteration = history[-1]["macs_reduction"] / len(history)
    iterations = math.ceil(args.target / per_iteration)
    row = {
        "scorer": scorer,
        "iterations": len(history),
        "seconds": [h["seconds"] for h in history],
        "median_s": median,
        "candidates": statistics.median(h["candidates"] for h in history),
        "iterations_to_target": iterations,
        "search_estimate_s": iterations * median,
        "load_1min": round(os.getloadavg()[0], 1),  # rows may come from different runs
    }
    if scorer == "exhaustive":  # LAASP's cost grows with its images; extrapolated, not measured
        row["laasp_median_s_extrapolated"] = median / args.calib * LAASP_IMAGES
        row["laasp_search_s_extrapolated"] = iterations * row["laasp_median_s_extrapolated"]
    return row


def clock(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.0f} h"


def write(out: Path, results: dict) -> None:
    target = results["target_macs_reduction"]
    lines = [
        "# Search cost: fast vs exhaustive scorer by depth",
        "",
        "Generated by `bench/search_cost.py`; do not edit by hand. Each row: the first "
        f"{results['iterations_timed']} iteration(s) of `autoprune.prune` (default criteria "
        f"pool, ~{STEP:.0%} of the MACs per iteration, no recovery) on "
        f"{results['calibration_images']} calibration images of {results['dataset']}. "
        f"Search to -{target:.0%}: iterations needed (from the MACs each measured iteration "
        "removed) x the median, an estimate. The last column scales the exhaustive scorer's "
        f"time per calibration image to LAASP's {LAASP_IMAGES:,} images: **extrapolated**, "
        "not measured, and an upper bound (the per-candidate cost of copying the model is "
        "scaled with the images too). Weights: only timing matters, so ResNet-32/44 use the "
        "original CIFAR-10 weights (no CIFAR-10-JPEG75-adapted ones exist). A scorer can be "
        "re-measured on its own (`--scorers`): the load column says how busy the shared "
        "machine was when each row was measured (- : not recorded, an earlier run).",
        "",
        "| model | weights | scorer | s / iteration (median) | candidates / iteration "
        f"| iterations to -{target:.0%} | search to -{target:.0%} (estimate) "
        f"| at {LAASP_IMAGES:,} images (extrapolated) | load (1 min) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        laasp = r.get("laasp_median_s_extrapolated")
        extrapolated = (
            f"{laasp:.0f} s / iteration, {clock(r['laasp_search_s_extrapolated'])}"
            if laasp is not None
            else "-"
        )
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['scorer']} | {r['median_s']:.2f} "
            f"| {r['candidates']:.0f} | {r['iterations_to_target']} "
            f"| {clock(r['search_estimate_s'])} | {extrapolated} | {r.get('load_1min', '-')} |"
        )
    lines += ["", machine_line(results["machine"])]
    write_results(out, results, "\n".join(lines) + "\n")
    plot(out.with_suffix(".png"), results)


def plot(path: Path, results: dict) -> None:
    """Seconds per iteration against depth, both scorers, on a log scale."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    styles = {"fast": ("tab:blue", "o"), "exhaustive": ("tab:gray", "s")}
    for scorer, (color, marker) in styles.items():
        runs = [r for r in results["runs"] if r["scorer"] == scorer]
        if not runs:
            continue
        depths = [r["depth"] for r in runs]
        ax.plot(depths, [r["median_s"] for r in runs], marker=marker, color=color, label=scorer)
        if scorer == "exhaustive":
            ax.plot(
                depths,
                [r["laasp_median_s_extrapolated"] for r in runs],
                marker=marker,
                color=color,
                linestyle="--",
                label=f"exhaustive at {LAASP_IMAGES:,} images (extrapolated)",
            )
    ax.set_yscale("log")
    ax.set_xlabel("ResNet depth")
    ax.set_ylabel("seconds per search iteration (median)")
    ax.set_xticks(sorted({r["depth"] for r in results["runs"]}))
    ax.set_title(f"CIFAR ResNets, {results['calibration_images']} calibration images")
    ax.legend()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
