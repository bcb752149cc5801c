"""Quality at equal budget: autoprune against the exhaustive LAASP scorer and Torch-Pruning.

Protocol, the same for every method: prune the dense model to the MACs target without any
recovery (search only), then give every pruned model the same fine-tune (autoprune's trainer,
knowledge distillation from the dense model) and measure test accuracy before and after. The
dataset is CIFAR-10-JPEG75 (not CIFAR-10). Torch-Pruning's pruners run through its own API
(bench/_tp_baselines.py says how they are brought to the MACs target).

    python bench/quality.py                     # ResNet-56, -50 % MACs, seed 0: ~4 h, 2 cores
    python bench/quality.py --seeds 0,1,2       # three seeds (~12 h): error bars in the plot
    python bench/quality.py --methods tp-taylor # one method joins the existing table
    python bench/quality.py --smoke             # a tiny run, for CI

Writes docs/benchmarks/quality.{json,md,png}; results are written after every method. Each
pruned model (before fine-tuning) is saved to runs/bench-searched/ for bench/speed.py. The
exhaustive search takes about an hour: a model that bench/search_quality.py already searched
with the same scorer, calibration size and seed (runs/bench-searched/MODEL-TARGET-SCORER-seedS,
for autoprune-auto and laasp-exhaustive) is loaded instead, with the search time recorded in
docs/benchmarks/search_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import (
    DOCS,
    SEARCHED,
    SMOKE,
    accuracy,
    adapted_weights,
    cifar10_jpeg75,
    finetune,
    machine,
    machine_line,
    previous_rows,
    write_results,
)
from _tp_baselines import MAX_RATIO, STEPS, TP_METHODS, prune_with_tp
from matplotlib.figure import Figure
from torch import nn

import autoprune
from autoprune.data import ImageData
from autoprune.io import load, save
from autoprune.measure import count_macs, count_params
from autoprune.search import PruneConfig
from autoprune.search.calibration import CalibrationSet
from autoprune.search.schedules import TOLERANCE
from autoprune.train import LossFn, distillation

DEFAULTS = PruneConfig()


@dataclass
class Setup:
    """What every method gets: the same dense model, data, target and seed."""

    args: argparse.Namespace
    dense: nn.Module
    train: ImageData
    example: torch.Tensor
    seed: int


@dataclass
class Pruned:
    """A method's pruned model, before fine-tuning."""

    model: nn.Module
    loaded_from: str | None = None  # where a model searched earlier came from
    recorded_search_s: float | None = None  # that search's time, where it was recorded


def autoprune_method(schedule: str, scorer: str) -> Callable[[Setup], Pruned]:
    def run(setup: Setup) -> Pruned:
        args = setup.args
        result = autoprune.prune(
            setup.dense,
            train_data=setup.train,
            target_macs_reduction=args.target,
            schedule=schedule,
            scorer=scorer,
            calib_size=args.exhaustive_calib if scorer == "exhaustive" else args.calib,
            recover_steps=0,
            finetune_epochs=0,
            seed=setup.seed,
            progress=True,  # in a log: one line per iteration
        )
        return Pruned(result.model)

    return run


def searched_dir(args: argparse.Namespace, scorer: str, seed: int) -> Path:
    """Where bench/search_quality.py saves the model its search with ``scorer`` found."""
    return args.searched / f"{args.model}-{args.target:g}-{scorer}-seed{seed}"


def searched(scorer: str) -> Callable[[Setup], Pruned]:
    """``auto`` with ``scorer``, or the model bench/search_quality.py found with the same
    scorer, calibration size and seed (it saves the search time it recorded)."""

    def run(setup: Setup) -> Pruned:
        args = setup.args
        calib = args.exhaustive_calib if scorer == "exhaustive" else args.calib
        saved = searched_dir(args, scorer, setup.seed)
        rows = previous_rows(
            args.search_quality, model=args.model, target_macs_reduction=args.target
        )
        row = next(
            (
                r
                for r in rows  # rows from before seeds were recorded ran with the default seed
                if (r["scorer"], r.get("seed", 0), r["calib_images"]) == (scorer, setup.seed, calib)
            ),
            None,
        )
        if row is None or not saved.exists():
            return autoprune_method("auto", scorer)(setup)
        return Pruned(load(saved), saved.name, row["search_s"])

    return run


def torch_pruning_method(name: str) -> Callable[[Setup], Pruned]:
    def run(setup: Setup) -> Pruned:
        args = setup.args
        calib = None
        if TP_METHODS[name].gradients:
            calib = CalibrationSet.from_data(setup.train, args.taylor_images, seed=setup.seed)
        model = prune_with_tp(setup.dense, setup.example, name, args.target, TOLERANCE, calib)
        return Pruned(model)

    return run


METHODS: dict[str, Callable[[Setup], Pruned]] = {
    "autoprune-auto": searched("fast"),
    "autoprune-sts": autoprune_method("saliency-then-similarity", "fast"),
    "laasp-exhaustive": searched("exhaustive"),
    **{name: torch_pruning_method(name) for name in TP_METHODS},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--target", type=float, default=0.5, help="MACs reduction")
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0", help="comma-separated")
    # the exhaustive reference's 256 images: bench/search_quality.py's fast search is reused
    p.add_argument("--calib", type=int, default=256, help="autoprune's fast scorer")
    p.add_argument("--exhaustive-calib", type=int, default=256)
    p.add_argument("--taylor-images", type=int, default=DEFAULTS.taylor_size, help="tp-taylor")
    p.add_argument("--finetune-epochs", type=float, default=3.0)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=DOCS / "quality")
    p.add_argument("--searched", type=Path, default=SEARCHED, help="pruned models go here")
    p.add_argument("--search-quality", type=Path, default=DOCS / "search_quality")
    args = p.parse_args()
    if args.smoke:
        args.model, args.target = "resnet20", 0.03
        args.calib = args.exhaustive_calib = args.taylor_images = 32
        args.finetune_epochs, args.test_size = 0.01, 256
        args.out, args.searched = SMOKE / "quality", SMOKE / "searched"
        args.search_quality = SMOKE / "search_quality"
    methods = args.methods.split(",")
    unknown = set(methods) - METHODS.keys()
    if unknown:
        p.error(f"unknown method(s) {', '.join(sorted(unknown))}; known: {', '.join(METHODS)}")
    reference = searched_dir(args, "exhaustive", 0)
    if args.smoke and "laasp-exhaustive" in methods and not reference.exists():
        # Even tiny, the exhaustive search is the slow part of a smoke run (bench/suite.py
        # runs bench/search_quality.py --smoke first, which saves the model this one loads).
        print("smoke: skipping laasp-exhaustive (run bench/search_quality.py --smoke first)")
        methods.remove("laasp-exhaustive")
    args.methods = methods
    return args


def main() -> None:
    args = parse_args()
    train, test = cifar10_jpeg75(args.test_size)
    dense = autoprune.create_model(args.model, weights=adapted_weights(args.model)).eval()
    example = torch.zeros(1, 3, 32, 32)
    teacher = copy.deepcopy(dense).requires_grad_(False)
    kd = distillation(teacher, DEFAULTS.distill_temperature, DEFAULTS.distill_weight)
    protocol = (
        f"prune to -{args.target:.0%} MACs (within {TOLERANCE:.1%}) without recovery, then the "
        f"same fine-tune for every method: {args.finetune_epochs:g} epoch(s) of "
        f"autoprune.train.fit, SGD lr {args.finetune_lr:g} cosine, batch 128, with knowledge "
        f"distillation from the dense model (T = {DEFAULTS.distill_temperature:g}, weight "
        f"{DEFAULTS.distill_weight:g}); test accuracy on {args.test_size} images"
    )
    settings = {"model": args.model, "target_macs_reduction": args.target, "protocol": protocol}
    results = {
        "machine": machine(),
        "dataset": "CIFAR-10-JPEG75",
        **settings,
        "calibration": {
            "autoprune_fast": args.calib,
            "exhaustive": args.exhaustive_calib,
            "tp_taylor_gradients": args.taylor_images,
        },
        "baseline": {
            "accuracy": accuracy(dense, test),
            "macs": count_macs(dense, example),
            "params": count_params(dense),
        },
        "runs": [],
    }
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods:
            setup = Setup(args, dense, train, example, seed)
            row = measure(method, setup, test, kd, results["baseline"])
            # Re-read: a method run at the same time in another process may have added its row.
            runs = [
                r
                for r in previous_rows(args.out, **settings)
                if (r["method"], r["seed"]) != (method, seed)
            ]
            results["runs"] = [*runs, row]
            results["machine"] = machine()
            write(args.out, results)
            print(json.dumps(row), flush=True)


def measure(method: str, setup: Setup, test: ImageData, kd: LossFn, base: dict) -> dict:
    """Prune with ``method``, check and save the result, fine-tune it: one row of the table."""
    args, seed = setup.args, setup.seed
    torch.manual_seed(seed)
    start = time.perf_counter()
    pruned = METHODS[method](setup)
    search_s: float | None = time.perf_counter() - start
    if pruned.loaded_from is not None:
        search_s = pruned.recorded_search_s
    model = pruned.model
    macs, params = check(model, setup.example, base, args.target)
    if pruned.loaded_from is None:
        name = f"{args.model}-{args.target:g}-{method}-seed{seed}"
        save(model, args.searched / name, metadata={"method": method, "seed": seed})
    after_prune = accuracy(model, test)
    start = time.perf_counter()
    finetune(model, setup.train, args.finetune_epochs, lr=args.finetune_lr, seed=seed, loss_fn=kd)
    finetune_s = time.perf_counter() - start
    return {
        "method": method,
        "seed": seed,
        "loaded_from": pruned.loaded_from,
        "accuracy_after_prune": after_prune,
        "accuracy_after_finetune": accuracy(model, test),
        "macs_reduction": macs,
        "params_reduction": params,
        "search_s": None if search_s is None else round(search_s, 1),
        "finetune_s": round(finetune_s, 1),
        "total_s": None if search_s is None else round(search_s + finetune_s, 1),
    }


def check(
    model: nn.Module, example: torch.Tensor, base: dict, target: float
) -> tuple[float, float]:
    """(MACs, params) reduction of a model that runs, is physically smaller and is on target."""
    with torch.no_grad():
        out = model.eval()(example)
    if out.shape != (1, 10) or not torch.isfinite(out).all():
        raise RuntimeError(f"the pruned model gives {tuple(out.shape)} outputs, not finite logits")
    macs = 1 - count_macs(model, example) / base["macs"]  # counted on the layers' real shapes
    params = 1 - count_params(model) / base["params"]
    if abs(macs - target) > TOLERANCE + 1e-9 or params <= 0:
        raise RuntimeError(
            f"the pruned model has {macs:.2%} fewer MACs and {params:.2%} fewer parameters; "
            f"the target is -{target:.0%} MACs (within {TOLERANCE:.1%}), physically removed"
        )
    return macs, params


def summarize(results: dict) -> list[dict]:
    """One row per method (in METHODS order): means over seeds, the spread where several."""
    rows = []
    for method in METHODS:
        runs = [r for r in results["runs"] if r["method"] == method]
        if not runs:
            continue
        row = {"method": method, "seeds": len(runs)}
        for key in (
            "accuracy_after_prune",
            "accuracy_after_finetune",
            "macs_reduction",
            "params_reduction",
            "search_s",
            "total_s",
        ):
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = statistics.mean(values) if values else None
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
        row["loaded"] = any(r["loaded_from"] for r in runs)
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> str:
    """Who is best after fine-tuning, said plainly whether or not it is autoprune."""
    ranked = sorted(rows, key=lambda r: -r["accuracy_after_finetune"])
    ours = [r for r in ranked if r["method"].startswith("autoprune")]
    if len(ranked) < 2 or not ours:
        return ""
    best, mine = ranked[0], ours[0]
    if best is mine:
        runner_up = ranked[1]
        line = (
            f"**autoprune wins**: {mine['method']} is best after fine-tuning, "
            f"{mine['accuracy_after_finetune'] - runner_up['accuracy_after_finetune']:+.2f} "
            f"points over the next method ({runner_up['method']})."
        )
    else:
        gap = best["accuracy_after_finetune"] - mine["accuracy_after_finetune"]
        line = (
            f"**autoprune does not win**: {best['method']} is best after fine-tuning; "
            f"autoprune's best ({mine['method']}) is {gap:.2f} points behind."
        )
    if max(r["seeds"] for r in rows) == 1:
        line += " One seed only: differences of a few tenths of a point may be noise (`--seeds`)."
    return line


def cell(row: dict, key: str, fmt: str) -> str:
    if row[key] is None:
        return "n/a"
    spread = f" ± {format(row[key + '_sd'], fmt)}" if row[key + "_sd"] is not None else ""
    return format(row[key], fmt) + spread


def write(out: Path, results: dict) -> None:
    base = results["baseline"]
    rows = summarize(results)
    calib = results["calibration"]
    lines = [
        f"# Quality at equal budget ({results['model']}, {results['dataset']}, "
        f"-{results['target_macs_reduction']:.0%} MACs)",
        "",
        f"Generated by `bench/quality.py`; do not edit by hand. Protocol: {results['protocol']}.",
        f"Dense baseline: {base['accuracy']:.2f} % test accuracy, {base['macs'] / 1e6:.1f} M MACs, "
        f"{base['params'] / 1e6:.3f} M params. Mean over seeds, ± standard deviation where "
        "several.",
        "",
        "| method | seeds | acc. dense | acc. after prune | acc. after fine-tune | MACs red. "
        "| params red. | search (s) | total (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: -r["accuracy_after_finetune"]):
        lines.append(
            f"| {r['method']}{' (loaded)' if r['loaded'] else ''} | {r['seeds']} "
            f"| {base['accuracy']:.2f} % | {cell(r, 'accuracy_after_prune', '.2f')} % "
            f"| {cell(r, 'accuracy_after_finetune', '.2f')} % "
            f"| {100 * r['macs_reduction']:.1f} % | {100 * r['params_reduction']:.1f} % "
            f"| {cell(r, 'search_s', '.1f')} | {cell(r, 'total_s', '.0f')} |"
        )
    lines += [
        "",
        verdict(rows),
        "",
        "Notes:",
        f"- autoprune-auto / autoprune-sts: `autoprune.prune` with the fast scorer, schedule "
        f"`auto` / `saliency-then-similarity`, {calib['autoprune_fast']} calibration images, "
        "`recover_steps=0`, `finetune_epochs=0`.",
        f"- laasp-exhaustive: the exhaustive LAASP-style scorer (a deep copy per candidate) on "
        f"{calib['exhaustive']} calibration images (LAASP used 10,000). (loaded): the model "
        "bench/search_quality.py searched with the same settings, with the search time it "
        "recorded.",
        "- tp-*: Torch-Pruning's `BasePruner` with `GroupMagnitudeImportance(p=1)` (local or "
        "global ranking), `GroupTaylorImportance` (gradients of the cross-entropy on "
        f"{calib['tp_taylor_gradients']} calibration images, taken before every step) or "
        f"`RandomImportance`; {STEPS} iterative steps of the channel ratio up to {MAX_RATIO:g} "
        "(autoprune's default cap, also TP's `max_pruning_ratio`), groups pruned one at a time "
        "until the MACs reduction is on target; the classifier is ignored.",
        "- Torch-Pruning cannot prune the CIFAR ResNet's option-A shortcut (`F.pad` of "
        "channels) by itself: the model is passed through autoprune's rewrite "
        "(`autoprune.graph.normalize_model`; the zoo's ResNets are built with its "
        "`ChannelPadShortcut`) and TP is given autoprune's `ChannelPadPruner` as a customized "
        "pruner. It is the only way TP runs on this model.",
        "- Search time is pruning only; total adds the fine-tune. Times are wall-clock on the "
        "machine below, which other jobs may share.",
        "",
        machine_line(results["machine"]),
    ]
    write_results(out, results, "\n".join(lines) + "\n")
    plot(out.with_suffix(".png"), results, rows)


def plot(path: Path, results: dict, rows: list[dict]) -> None:
    """Accuracy after fine-tuning per method, with the spread over seeds as error bars."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    names = [r["method"] for r in rows]
    values = [r["accuracy_after_finetune"] for r in rows]
    errors = [r["accuracy_after_finetune_sd"] or 0.0 for r in rows]
    colors = ["tab:blue" if n.startswith("autoprune") else "tab:gray" for n in names]
    bars = ax.bar(names, values, yerr=errors if any(errors) else None, capsize=4, color=colors)
    ax.bar_label(bars, fmt="%.2f", padding=2)
    dense = results["baseline"]["accuracy"]
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense {dense:.2f} %")
    span = [*values, dense]
    ax.set_ylim(max(0.0, min(span) - 5), min(100.0, max(span) + 2))
    ax.set_ylabel("test accuracy after fine-tune (%)")
    seeds = max(r["seeds"] for r in rows)
    spread = f", mean ± sd over {seeds} seeds" if seeds > 1 else ""
    ax.set_title(
        f"{results['model']}, {results['dataset']}, "
        f"-{results['target_macs_reduction']:.0%} MACs{spread}"
    )
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
