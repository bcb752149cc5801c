"""Search speed: candidates stacked in one forward pass against one forward per candidate.

Protocol: one search (search only, no recovery) follows the stacked fp32 variant's decisions; at
every iteration every variant of the fast scorer scores the same candidates, one after the
other, in the same process and thread. So the ratio of their times holds whatever else runs on
a shared machine, and a variant whose winner equals the lead's at every iteration makes the
same whole search (same state, same choice, by induction). A variant's search time is its
scoring time plus the part of the iteration that is not scoring (candidates, criteria, the
step), which every variant pays alike. The before path ("one forward per candidate") may run
on the first iterations only (``--before-iterations``); its ratio is taken on those.

    python bench/search_speed.py                 # CPU: ResNet-56 and ResNet-20, -50 % MACs
    python bench/search_speed.py --smoke         # a tiny run on synthetic data, < 30 s
    python bench/search_speed.py --whole --threads 2   # whole searches: the default vs before
    python bench/search_speed.py --shortlist-ranks    # where predictions rank each best candidate
    python bench/search_speed.py --device cuda --gpu-rows --data-root R   # the GPU section
    python bench/search_speed.py --merge FILE.json   # add a GPU run's rows, rewrite the table
    python bench/search_speed.py --render            # only rewrite the tables from the JSON

Writes docs/benchmarks/search_speed.json and .md (the tables are generated from the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    DOCS,
    SHARED,
    SMOKE,
    accuracy,
    adapted_weights,
    cifar10_jpeg75_root,
    from_history,
    machine,
    machine_line,
    same_decision,
    write_results,
)
from matplotlib.figure import Figure

import autoprune
from autoprune.data import load_dataset
from autoprune.graph import build_graph
from autoprune.search._trials import default_precision
from autoprune.search.scorers import SCORERS, create_scorer

BEFORE = "one forward per candidate, fp32 (before)"
LEAD = "stacked, fp32"  # the variant whose losses the search goes on with
VARIANTS: dict[str, dict[str, Any]] = {
    LEAD: {"precision": "fp32"},
    BEFORE: {"stack": False, "precision": "fp32", "bound": False},
    "stacked, bf16 ranking, fp32 for the best 4": {"precision": "bf16-ranking"},
    "stacked, bf16": {"precision": "bf16"},
}
# On a GPU only: every candidate in one stacked pass from the input, no pass per cut. A GPU
# scores at the rate of passes (launches, Python between them), not of arithmetic, so fewer,
# larger passes may win there what recomputing the shared prefix loses; on a CPU it only loses.
FROM_INPUT = "stacked from the input (no prefix cache), fp32"
GPU_VARIANTS: dict[str, dict[str, Any]] = {
    FROM_INPUT: {"precision": "fp32", "prefix_cache": False},
    "stacked from the input (no prefix cache), bf16": {"precision": "bf16", "prefix_cache": False},
}
ALL_VARIANTS = {**VARIANTS, **GPU_VARIANTS}
# The library stacks on a GPU only; on a CPU the stacked variants stack with this budget, to
# show what stacking does there.
CPU_STACK_BYTES = 64 << 20


def variants_for(device: str) -> dict[str, dict[str, Any]]:
    """``VARIANTS`` (and on a GPU ``GPU_VARIANTS``), the stacked ones given a budget on a CPU
    (where the default is none)."""
    if device != "cpu":
        return ALL_VARIANTS
    return {
        name: options
        if options.get("stack") is False
        else {**options, "stack_bytes": CPU_STACK_BYTES}
        for name, options in VARIANTS.items()
    }


# Recorded searches to compare decisions with: (file, scorer row) of docs/benchmarks; today's
# (the fast scorer before the shortlist) and the exhaustive scorer's.
REFERENCES = {
    "today": {
        "resnet20": ("search_quality_resnet20.json", "fast"),
        "resnet56": ("search_time_idle.json", "fast"),
    },
    "exhaustive": {
        "resnet20": ("search_quality_resnet20.json", "exhaustive"),
        "resnet56": ("search_quality.json", "exhaustive"),
    },
}
LOG: list[dict[str, Any]] = []  # one record per iteration of the current paired search
DEFAULT = create_scorer("fast")  # the shortlist rules the ranks section applies


class OutOfTime(Exception):
    """Raised by the paired scorer once the row's time is up: the iterations so far count."""


@SCORERS.register("bench-paired")
@dataclass
class PairedScorer:
    """Every variant on the same candidates; the search goes on with the first one's losses."""

    variants: dict[str, dict[str, Any]]
    before_iterations: int | None = None
    seconds: float | None = None  # the search stops this long after its first scoring
    max_iterations: int | None = None  # the search stops after this many
    exhaustive_sample: int = 0  # also time the exhaustive scorer on this many candidates, once
    last_stats: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.scorers = {name: create_scorer("fast", **o) for name, o in self.variants.items()}

    def __call__(self, graph, candidates, calib, objective) -> list[float]:
        now = time.perf_counter()
        elapsed = now - LOG[0]["started"] if LOG else 0.0
        if elapsed > (self.seconds or math.inf) or len(LOG) >= (self.max_iterations or math.inf):
            raise OutOfTime
        record: dict[str, Any] = {"started": now, "candidates": len(candidates), "variants": {}}
        results: dict[str, list[float]] = {}
        for name, scorer in self.scorers.items():
            if name == BEFORE and len(LOG) >= (self.before_iterations or math.inf):
                continue
            seconds, results[name] = timed(lambda s=scorer: s(graph, candidates, calib, objective))
            best = winner(results[name], candidates, objective)
            record["variants"][name] = {
                "seconds": seconds,
                "winner": best,
                "loss": results[name][best],
                "images": scorer.last_stats["images"],
            }
        if BEFORE in results:
            record["max_loss_diff"] = max(
                abs(a - b)
                for a, b in zip(results[LEAD], results[BEFORE], strict=True)
                if math.isfinite(a) and math.isfinite(b)
            )
        if self.exhaustive_sample and not LOG:
            sample = list(candidates[: self.exhaustive_sample])
            seconds, _ = timed(lambda: create_scorer("exhaustive")(graph, sample, calib, objective))
            record["exhaustive_s_per_candidate"] = seconds / len(sample)
        LOG.append(record)
        best = record["variants"][LEAD]["winner"]
        record["decision"] = {
            "group": candidates[best].group,
            "channels": len(candidates[best].idxs),
            "loss": results[LEAD][best],
        }
        self.last_stats = self.scorers[LEAD].last_stats
        return results[LEAD]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn`` takes, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


@SCORERS.register("bench-ranks")
@dataclass
class RanksScorer:
    """Every candidate on the whole set (the exhaustive scorer's losses, fast): where the
    loss predicted from gradients ranks the best of them, and would the shortlist keep it."""

    max_iterations: int | None = None
    last_stats: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        options = {"halving": False, "shortlist": 1.0, "precision": "fp32"}
        self.scorer = create_scorer("fast", **options)

    def __call__(self, graph, candidates, calib, objective) -> list[float]:
        if len(LOG) >= (self.max_iterations or math.inf):
            raise OutOfTime
        losses = self.scorer(graph, candidates, calib, objective)
        self.last_stats = self.scorer.last_stats
        predicted = [i for i, c in enumerate(candidates) if c.predicted_loss is not None]
        best = winner(losses, candidates, objective)
        order = sorted(
            predicted, key=lambda i: (objective(candidates[i].predicted_loss, candidates[i]), i)
        )
        rank = order.index(best) if best in order else None
        first = DEFAULT.shortlisted(candidates, objective)
        measured = {i: losses[i] for i in first}
        unscored = [i for i in range(len(candidates)) if i not in measured]
        winners = DEFAULT.predicted_winners(candidates, objective, measured, unscored)
        LOG.append(
            {
                "candidates": len(candidates),
                "predicted": len(predicted),
                "rank": rank,
                "shortlisted": best in first or best in winners,
            }
        )
        return losses


def ranks_row(args: argparse.Namespace, name: str, train: Any) -> dict[str, Any]:
    """Where the prediction ranks each iteration's best candidate, over one search of ``name``
    (every candidate scored on the whole set, so the best is the exhaustive scorer's)."""
    LOG.clear()
    dense = autoprune.create_model(name, weights=adapted_weights(name))
    target, calib = (0.03, 32) if args.smoke else (args.target, args.calib)
    with contextlib.suppress(OutOfTime):
        autoprune.prune(
            dense,
            train_data=train,
            target_macs_reduction=target,
            scorer="bench-ranks",
            scorer_options={"max_iterations": args.max_iterations},
            calib_size=calib,
            recover_steps=0,
            finetune_epochs=0,
            progress=False,
        )
    shares = sorted((r["rank"] + 1) / r["predicted"] for r in LOG if r["rank"] is not None)
    return {
        "model": name,
        "iterations": len(LOG),
        "stopped_at_iteration_cap": len(LOG) >= (args.max_iterations or math.inf),
        "candidates_median": statistics.median(r["candidates"] for r in LOG),
        "share_max": max(shares),
        "share_median": statistics.median(shares),
        "shortlisted": sum(r["shortlisted"] for r in LOG),
        "shortlist": DEFAULT.shortlist,
        "per_iteration": LOG[:],
    }


def winner(losses: Sequence[float], candidates: Sequence[Any], objective: Any) -> int:
    return min(range(len(losses)), key=lambda i: (objective(losses[i], candidates[i]), i))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet56,resnet20")
    p.add_argument("--target", type=float, default=0.5, help="MACs reduction")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--before-iterations", type=int, default=None)
    p.add_argument("--max-iterations", type=int, default=None, help="stop the searches there")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU section)")
    p.add_argument("--gpu-rows", default="", help="also these: pipeline, resnet50 (comma list)")
    p.add_argument("--data-root", type=Path, default=None, help="holds cifar-10-batches-py")
    p.add_argument("--r50-seconds", type=float, default=150, help="ResNet-50 search time cap")
    p.add_argument("--r50-size", type=int, default=224, help="ResNet-50 image side")
    p.add_argument("--r50-calib", type=int, default=512, help="ResNet-50 calibration images")
    p.add_argument("--merge", type=Path, nargs="+", default=(), help="runs' JSON files to add")
    p.add_argument("--render", action="store_true", help="only rewrite the tables from the JSON")
    p.add_argument("--whole", action="store_true", help="whole searches, default vs before")
    p.add_argument("--shortlist-ranks", action="store_true", help="where predictions rank")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=DOCS / "search_speed")
    args = p.parse_args()
    if args.smoke:
        args.out, args.models = SMOKE / "search_speed", "resnet20"
    return args


def main() -> None:
    args = parse_args()
    out = args.out
    results = load(out)
    if args.merge or args.render:
        for path in args.merge:
            merge(results, json.loads(path.read_text()))
        write(out, results)
        return
    torch.set_num_threads(args.threads)
    device = args.device
    section: dict[str, Any] = {"machine": machine(), "rows": []}
    if device == "cuda":
        section["machine"]["gpu"] = torch.cuda.get_device_name()
    train, test = data(args)
    if args.whole or args.smoke:  # a smoke run tries both kinds of row
        whole = results["cpu_default"] = {"machine": machine(), "rows": []}
        for name in filter(None, args.models.split(",")):
            whole["rows"] += [whole_row(args, name, train, v) for v in WHOLE_SCORERS]
            write(out, results)
        if args.whole:
            return
    if args.shortlist_ranks or args.smoke:
        ranks = results["shortlist_ranks"] = {"machine": machine(), "rows": []}
        for name in filter(None, args.models.split(",")):
            ranks["rows"].append(ranks_row(args, name, train))
            write(out, results)
        if args.shortlist_ranks:
            return
    results["gpu" if device == "cuda" else "cpu"] = section
    for name in filter(None, args.models.split(",")):
        section["rows"].append(paired_row(args, name, train, device))
        write(out, results)
    if "pipeline" in args.gpu_rows:
        section["pipeline"] = pipeline_row(args, train, test, device)
        write(out, results)
    if "resnet50" in args.gpu_rows:
        section["resnet50"] = resnet50_row(args, device)
        write(out, results)


def data(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.smoke:
        options = {"num_classes": 10, "image_size": 32}
        return (
            load_dataset("synthetic", "train", size=256, **options),
            load_dataset("synthetic", "test", size=64, **options),
        )
    root = args.data_root or cifar10_jpeg75_root()
    return load_dataset("cifar10", "train", root), load_dataset("cifar10", "test", root)


def paired_row(args: argparse.Namespace, name: str, train: Any, device: str) -> dict[str, Any]:
    """One paired search of ``name``, every variant at every iteration (see the docstring)."""
    LOG.clear()
    dense = autoprune.create_model(name, weights=adapted_weights(name))
    target, calib = (0.03, 32) if args.smoke else (args.target, args.calib)
    start = time.perf_counter()
    options = {
        "variants": variants_for(device),
        "before_iterations": args.before_iterations,
        "max_iterations": args.max_iterations,
    }
    try:
        autoprune.prune(
            dense,
            train_data=train,
            target_macs_reduction=target,
            scorer="bench-paired",
            scorer_options=options,
            calib_size=calib,
            recover_steps=0,
            finetune_epochs=0,
            progress=False,
            device=device,
        )
        stopped = False
    except OutOfTime:
        stopped = True
    wall = time.perf_counter() - start
    other_s = outside_scoring(LOG)
    decisions = [r["decision"] for r in LOG]
    return {
        "model": name,
        "device": device,
        "calib_images": calib,
        "target_macs_reduction": target,
        "iterations": len(LOG),
        "stopped_at_iteration_cap": stopped,
        "wall_s": round(wall, 1),
        "other_s": round(other_s, 2),  # the iterations' time outside scoring
        "variants": summarise(LOG, other_s),
        "max_loss_diff_default_vs_before": max(
            (r["max_loss_diff"] for r in LOG if "max_loss_diff" in r), default=None
        ),
        "final_loss": decisions[-1]["loss"] if decisions else None,
        "same_decisions_as_today": (
            agreement(name, decisions) if device == "cpu" and not args.smoke else None
        ),
        "decisions": decisions,
    }


# Whole searches: the scorer before this benchmark's work (fp32, every candidate scored), then
# the library's default on this machine.
WHOLE_BEFORE = "before: fp32, every candidate scored"
WHOLE_SCORERS = {
    WHOLE_BEFORE: {"precision": "fp32", "shortlist": 1.0, "bound": False},
    "default": {},
}


def whole_row(args: argparse.Namespace, name: str, train: Any, scorer: str) -> dict:
    """One whole search, search only, as a user runs it (the scorer's defaults but for the
    ``WHOLE_SCORERS`` options): its time, final calibration loss and decisions against
    today's."""
    dense = autoprune.create_model(name, weights=adapted_weights(name))
    target, calib = (0.03, 32) if args.smoke else (args.target, args.calib)
    result = autoprune.prune(
        dense,
        train_data=train,
        target_macs_reduction=target,
        scorer_options=WHOLE_SCORERS[scorer],
        calib_size=calib,
        recover_steps=0,
        finetune_epochs=0,
        progress=False,
    )
    history = result.history
    recorded = from_history(history)
    decisions = recorded["decisions"]
    return {
        "model": name,
        "scorer": scorer,
        "precision": create_scorer("fast", **WHOLE_SCORERS[scorer]).precision
        or default_precision(torch.device("cpu")),
        "calib_images": calib,
        "target_macs_reduction": target,
        "iterations": len(history),
        "search_s": round(sum(h["seconds"] for h in history), 1),
        "scoring_s": round(sum(h["scorer"]["seconds"] for h in history), 1),
        "images": recorded["images_scored"],
        "final_loss": decisions[-1]["loss"] if decisions else None,
        "macs_reductions": [h["macs_reduction"] for h in history],
        "same_decisions_as_today": None if args.smoke else agreement(name, decisions),
        "same_decisions_as_exhaustive": (
            None if args.smoke else agreement(name, decisions, "exhaustive")
        ),
        "decisions": decisions,
    }


def replayed_macs_reductions(row: dict[str, Any]) -> list[float]:
    """The MACs reduction after each of the row's decisions, replayed on the model's widths,
    which alone decide its MACs (for rows recorded before whole searches recorded it)."""
    model = autoprune.create_model(row["model"])
    graph = build_graph(model, torch.zeros(1, 3, 32, 32))
    dense = graph.macs()
    out = []
    for decision in row["decisions"]:
        graph.prune(decision["group"], torch.arange(decision["channels"]))
        out.append(1 - graph.macs() / dense)
    return out


def loss_at(row: dict[str, Any], reduction: float) -> float:
    """The row's calibration loss at a MACs reduction it reached, interpolated linearly
    between its iterations (the dense model's loss is not recorded: from the first)."""
    losses = [d["loss"] for d in row["decisions"]]
    return float(np.interp(reduction, row["macs_reductions"], losses))


def outside_scoring(log: list[dict[str, Any]]) -> float:
    """The iterations' time outside the scorers, from the gaps between scorer calls (the last
    iteration's taken as the mean of the others)."""
    gaps = [
        b["started"] - a["started"] - sum(v["seconds"] for v in a["variants"].values())
        for a, b in itertools.pairwise(log)
    ]
    return sum(gaps) * len(log) / len(gaps) if gaps else 0.0


def summarise(log: list[dict[str, Any]], other_s: float) -> dict[str, dict[str, Any]]:
    """Per variant: scoring time, the search time it would take, ratio and winner agreement."""
    summary = {}
    for name in ALL_VARIANTS:
        ran = [r for r in log if name in r["variants"]]
        if not ran:
            continue
        mine = sum(r["variants"][name]["seconds"] for r in ran)
        both = [r for r in ran if BEFORE in r["variants"]]
        before = sum(r["variants"][BEFORE]["seconds"] for r in both)
        after = sum(r["variants"][name]["seconds"] for r in both)
        summary[name] = {
            "iterations": len(ran),
            "scoring_s": round(mine, 2),
            "search_s": round(mine + other_s, 1) if len(ran) == len(log) else None,
            "median_iteration_s": round(
                statistics.median(r["variants"][name]["seconds"] for r in ran), 3
            ),
            "speedup_vs_before": round(before / after, 2) if both else None,
            "same_winner_as_lead": sum(
                r["variants"][name]["winner"] == r["variants"][LEAD]["winner"] for r in ran
            ),
            "images": sum(r["variants"][name]["images"] for r in ran),
        }
    return summary


def agreement(model: str, decisions: list[dict[str, Any]], reference: str = "today") -> str | None:
    """``k/n``: the first ``k`` decisions equal a recorded search of ``model``
    (``REFERENCES``)."""
    if model not in REFERENCES[reference]:
        return None
    file, scorer = REFERENCES[reference][model]
    rows = json.loads((DOCS / file).read_text())["runs"]
    recorded = next(r for r in rows if r["scorer"] == scorer)["decisions"]
    same = 0
    for a, b in zip(decisions, recorded, strict=False):
        if not same_decision(a, b):
            break
        same += 1
    return f"{same}/{len(recorded)}"


def pipeline_row(args: argparse.Namespace, train: Any, test: Any, device: str) -> dict[str, Any]:
    """The default pipeline on ResNet-56: search, default recovery, a 1-epoch fine-tune."""
    name = "resnet20" if args.smoke else "resnet56"
    dense = autoprune.create_model(name, weights=adapted_weights(name))
    start = time.perf_counter()
    result = autoprune.prune(
        dense,
        train_data=train,
        target_macs_reduction=0.05 if args.smoke else args.target,
        calib_size=args.calib,
        recover_steps=1 if args.smoke else None,  # None: the default recovery
        finetune_epochs=1,
        progress=False,
        device=device,
    )
    total = time.perf_counter() - start
    return {
        "model": name,
        "train_images": len(train),
        "test_images": len(test),
        "total_s": round(total, 1),
        "search_iterations_s": round(sum(h["seconds"] for h in result.history), 1),
        "accuracy": accuracy(result.model, test),
        "dense_accuracy": accuracy(dense.to(device), test),
    }


def resnet50_row(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """torchvision ResNet-50 at 224 px to -50 % MACs, search only, 512 synthetic images; the
    search stops ``--r50-seconds`` after its first scoring, and the iterations done are what
    is reported."""
    torchvision = import_torchvision()
    LOG.clear()
    options = {"num_classes": 1000, "image_size": args.r50_size}
    calib = load_dataset("synthetic", "train", size=args.r50_calib, **options)
    model = torchvision.models.resnet50(weights=None)
    start = time.perf_counter()
    stopped = False
    try:
        autoprune.prune(
            model,
            example_inputs=torch.zeros(1, 3, args.r50_size, args.r50_size, device=device),
            train_data=calib,
            target_macs_reduction=args.target,
            scorer="bench-paired",
            scorer_options={
                "variants": {
                    name: options
                    for name, options in variants_for(device).items()
                    if name in (LEAD, "stacked, bf16", FROM_INPUT)
                },
                "seconds": args.r50_seconds,
                "exhaustive_sample": 8,
            },
            calib_size=args.r50_calib,
            recover_steps=0,
            finetune_epochs=0,
            progress=False,
            device=device,
        )
    except OutOfTime:
        stopped = True
    first = LOG[0] if LOG else {}
    return {
        "model": f"torchvision resnet50, {args.r50_size} px, random weights",
        "calib_images": args.r50_calib,
        "stopped_at_time_cap": stopped,
        "wall_s": round(time.perf_counter() - start, 1),
        "iterations": len(LOG),
        "candidates_first_iteration": first.get("candidates"),
        "variants": summarise(LOG, 0.0),
        "exhaustive_s_per_iteration": round(
            first["exhaustive_s_per_candidate"] * first["candidates"], 1
        )
        if first
        else None,
    }


def merge(results: dict[str, Any], other: dict[str, Any]) -> None:
    """``other``'s sections into ``results``; a row replaces the row of the same model."""
    for key, section in other.items():
        mine = results.setdefault(key, {"rows": []})
        models = {r["model"] for r in section.get("rows", [])}
        rows = [r for r in mine.get("rows", []) if r["model"] not in models]
        mine.update({k: v for k, v in section.items() if k != "rows"})
        mine["rows"] = rows + section.get("rows", [])


def import_torchvision() -> Any:
    """torchvision, through the shared CPU shim where there is one (the package never needs
    it; the GPU machine has it as is)."""
    shim = SHARED / "tools"
    if (shim / "torchvision_cpu_shim.py").exists():
        sys.path.insert(0, str(shim))
        import torchvision_cpu_shim

        torchvision_cpu_shim.install()
    import torchvision

    return torchvision


def load(out: Path) -> dict[str, Any]:
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def write(out: Path, results: dict[str, Any]) -> None:
    lines = [
        "# Search speed: candidate-batched scoring",
        "",
        "Generated by `bench/search_speed.py`; do not edit by hand. " + PROTOCOL,
    ]
    if "cpu_default" in results:
        for row in results["cpu_default"]["rows"]:
            if "macs_reductions" not in row:
                row["macs_reductions"] = replayed_macs_reductions(row)
        lines += whole_lines(results["cpu_default"])
        plot_whole(out.parent / "search_speed_whole.png", results["cpu_default"])
    if "shortlist_ranks" in results:
        lines += ranks_lines(results["shortlist_ranks"])
    for key in ("cpu", "gpu"):
        section = results.get(key)
        if not section:
            continue
        facts = section["machine"]
        lines += ["", f"## {key.upper()}" + (f": {facts['gpu']}" if "gpu" in facts else ""), ""]
        lines += [machine_line(facts), "", SECTION_NOTES[key], ""]
        for row in section["rows"]:
            lines += paired_table(row)
        if "pipeline" in section:
            p = section["pipeline"]
            lines += [
                f"Full {p['model']} pipeline (search, default recovery, 1-epoch fine-tune on "
                f"{p['train_images']:,} training images): {p['total_s']} s in all, search "
                f"iterations {p['search_iterations_s']} s; accuracy {p['accuracy']:.2f} % on "
                f"{p['test_images']:,} test images (dense {p['dense_accuracy']:.2f} %).",
                "",
            ]
        if "resnet50" in section:
            lines += resnet50_lines(section["resnet50"])
    write_results(out, results, "\n".join(lines) + "\n")


SECTION_NOTES = {
    "cpu": (
        "The stacked CPU variants stack with a 64 MiB budget for the widest activation. The "
        "library does not stack on a CPU by default: these rows found it no faster there. "
        "The load average is the one at the start; other agents' jobs shared the 2 cores."
    ),
    "gpu": (
        "Data: the 30,000-image training subset and the 10,000 test images of "
        "../shared/device, so the calibration images differ from the CPU rows'. The stacked "
        "variants use the default budget, a sixteenth of the GPU's memory."
    ),
}

PROTOCOL = (
    "Each search follows the stacked fp32 variant; at every iteration every variant scores "
    "the same candidates in the same process and thread, so the speed-ups are ratios under "
    "the same load. Search time: the variant's scoring time plus the iterations' time outside "
    "scoring. Same winner: iterations at which the variant picked the stacked fp32 variant's "
    "candidate."
)


def table_head(title: str, facts: dict[str, Any], text: str, columns: str, align: str) -> list[str]:
    """A section's title, machine, protocol text and table header."""
    return ["", f"## {title}", "", machine_line(facts), "", text, "", columns, align]


def whole_lines(section: dict[str, Any]) -> list[str]:
    lines = table_head(
        "CPU: whole searches, the library's default against the scorer before",
        section["machine"],
        "Each search runs once, search only, as a user runs it (the scorer's defaults but for"
        f" the options of the row: {WHOLE_BEFORE!r} is fp32 with the shortlist and the bound "
        "off), one after the other on the same machine. Search time: the iterations' time, "
        "scoring and the rest (criteria, gradients, the step). Same decisions: the "
        "iterations, from the first, equal to a recorded search (group, channels, loss to "
        "1e-5): today's (the fast scorer before the shortlist, "
        "docs/benchmarks/search_time_idle.json and search_quality_resnet20.json) and the "
        "exhaustive scorer's (search_quality.json, search_quality_resnet20.json).",
        "| model | scorer | precision | search time (s) | scoring (s) | speed-up vs before "
        "| iterations | images scored | final MACs red. | final calibration loss | calibration "
        "loss at equal MACs | same decisions as today | same decisions as exhaustive |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    )
    rows = section["rows"]
    before = {r["model"]: r["search_s"] for r in rows if r["scorer"] == WHOLE_BEFORE}
    equal: dict[str, float] = {}  # per model: the smallest final MACs reduction
    for r in rows:
        equal[r["model"]] = min(equal.get(r["model"], 1.0), r["macs_reductions"][-1])
    for r in rows:
        ratio = before[r["model"]] / r["search_s"] if r["model"] in before else None
        lines.append(
            f"| {r['model']} | {r['scorer']} | {r['precision']} | {r['search_s']:.1f} | "
            f"{r['scoring_s']:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
            f"{r['iterations']} | {r['images']:,} | {100 * r['macs_reductions'][-1]:.2f} % | "
            f"{r['final_loss']:.4f} | {loss_at(r, equal[r['model']]):.4f} "
            f"(-{100 * equal[r['model']]:.2f} %) | {r['same_decisions_as_today'] or '-'} | "
            f"{r.get('same_decisions_as_exhaustive') or '-'} |"
        )
    return [
        *lines,
        "",
        "![calibration loss against MACs reduction](search_speed_whole.png)",
        "",
        "Each search stops within the landing tolerance of the target, not on it, and the loss "
        "rises fastest at the end: final losses compare searches that stopped at different "
        "MACs. Calibration loss at equal MACs: each search's loss at the smallest final MACs "
        "reduction among the model's searches, "
        "interpolated linearly between its iterations (MACs after each decision: recorded, or "
        "replayed on the widths for runs recorded before they were).",
    ]


def plot_whole(path: Path, section: dict[str, Any]) -> None:
    """Each whole search's calibration loss against its MACs reduction, one panel per model:
    where one search is above another at the same MACs."""
    models = list(dict.fromkeys(r["model"] for r in section["rows"]))
    fig = Figure(figsize=(5 * len(models), 4), layout="constrained")
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models, strict=True):
        for r in (r for r in section["rows"] if r["model"] == model):
            losses = [d["loss"] for d in r["decisions"]]
            ax.plot([100 * x for x in r["macs_reductions"]], losses, marker=".", label=r["scorer"])
        ax.set_xlabel("MACs reduction (%)")
        ax.set_ylabel("calibration loss after the step")
        ax.set_title(f"{model}, {section['rows'][0]['calib_images']} calibration images")
        ax.legend()
    fig.savefig(path, dpi=120)


def ranks_lines(section: dict[str, Any]) -> list[str]:
    lines = table_head(
        "The shortlist: where the predicted loss ranks the best candidate",
        section["machine"],
        "One search per model with every candidate scored on the whole calibration set (so "
        "each iteration's best is the exhaustive scorer's); at each iteration, the rank of that "
        "best among the candidates ordered by the loss predicted from gradients, as a share of "
        "them (1/n: ranked first). The fast scorer scores the best predicted `shortlist` "
        "share of the candidates, then any other predicted to beat the best loss measured "
        "among them: where the best is among those scored, the shortlist changes nothing.",
        "| model | iterations | candidates (median) | share needed, median | share needed, "
        "largest | best shortlisted (default share) |",
        "|---|---:|---:|---:|---:|---:|",
    )
    for r in section["rows"]:
        lines.append(
            f"| {r['model']} | {r['iterations']}"
            f"{' (the first: stopped there)' if r.get('stopped_at_iteration_cap') else ''} | "
            f"{r['candidates_median']:g} | "
            f"{r['share_median']:.3f} | {r['share_max']:.3f} | "
            f"{r['shortlisted']}/{r['iterations']} (share {r['shortlist']:g}) |"
        )
    return lines


def paired_table(row: dict[str, Any]) -> list[str]:
    lines = [
        f"### {row['model']}, -{row['target_macs_reduction']:.0%} MACs, "
        f"{row['calib_images']} calibration images, {row['iterations']} iterations"
        + (" (the first ones: stopped there)" if row.get("stopped_at_iteration_cap") else ""),
        "",
        "| variant | search time (s) | scoring (s) | median s / iteration | speed-up vs before "
        "| same winner as stacked fp32 | images scored |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in row["variants"].items():
        search = "-" if v["search_s"] is None else f"{v['search_s']:.1f}"
        ratio = "-" if v["speedup_vs_before"] is None else f"{v['speedup_vs_before']:.2f}x"
        lines.append(
            f"| {name} | {search} | {v['scoring_s']:.1f} | {v['median_iteration_s']:.3f} | "
            f"{ratio} | {v['same_winner_as_lead']}/{v['iterations']} | {v['images']:,} |"
        )
    lines += projection(row)
    diff = row["max_loss_diff_default_vs_before"]
    today = row["same_decisions_as_today"] if row["device"] == "cpu" else None
    lines += [
        "",
        f"Final calibration loss {row['final_loss']:.4f}; decisions equal to today's recorded "
        f"CPU search: {today or 'not compared (other device or data)'}; largest loss "
        "difference, default vs "
        f"before: {'-' if diff is None else f'{diff:.1e}'}; time outside scoring "
        f"{row['other_s']} s.",
        "",
    ]
    return lines


def projection(row: dict[str, Any]) -> list[str]:
    """Each variant's search time on the idle machine of search_time_idle.md, by its ratio to
    the before path measured here (CPU rows of the model that file timed)."""
    idle = json.loads((DOCS / "search_time_idle.json").read_text())
    before = row["variants"].get(BEFORE, {}).get("search_s")
    if row["device"] != "cpu" or row["model"] != idle["model"] or not before:
        return []
    base = idle["runs"][0]["search_s"]
    parts = [
        f"{name} {base * v['search_s'] / before:.0f} s"
        for name, v in row["variants"].items()
        if v["search_s"] is not None
    ]
    return [
        "",
        f"Projected onto the idle machine of search_time_idle.md (the before path: {base:.0f} s "
        f"for the whole search, 2 threads) by the ratios measured here: {'; '.join(parts)}.",
    ]


def resnet50_lines(row: dict[str, Any]) -> list[str]:
    lines = [
        f"### {row['model']}, {row['calib_images']} synthetic calibration images",
        "",
        f"{row['iterations']} iterations in {row['wall_s']} s"
        + (" (stopped at the time cap)" if row["stopped_at_time_cap"] else "")
        + f"; {row['candidates_first_iteration']} candidates at the first; the exhaustive "
        f"scorer: {row['exhaustive_s_per_iteration']} s per iteration (8 candidates timed, "
        "scaled to all).",
        "",
        "| variant | median s / iteration | scoring (s) | same winner as stacked fp32 |",
        "|---|---:|---:|---:|",
    ]
    for name, v in row["variants"].items():
        lines.append(
            f"| {name} | {v['median_iteration_s']:.3f} | {v['scoring_s']:.1f} | "
            f"{v['same_winner_as_lead']}/{v['iterations']} |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    main()
