"""What each trick of the ``fast`` scorer buys, on one LAASP iteration of ResNet-56.

Every group of ResNet-56 (CIFAR-10-JPEG75 weights) offers the channels each of l1, l2, fpgm,
euclidean and cosine would remove for a ~1 % MACs step (criteria choosing the same channels
are one candidate). The candidates are scored on the same calibration images by the
exhaustive LAASP reference and by ``fast`` with its tricks switched on one after another.
Reported per variant: seconds per iteration, images evaluated (candidate forwards plus, for
hardest-first, the pass that orders the images), whether its winner is the exhaustive
search's, that winner's rank among the exhaustive losses and its regret (exhaustive loss of
the winner minus the best). ``--iterations N`` applies the exhaustive winner and repeats.

Agreement needs more decisions than timing does: ``--decisions N`` then continues the search
for N more iterations, scoring with the exact reference ``fast`` without halving (equal to
exhaustive to float rounding: see the table's last column) and with each halving variant.

    python bench/scorer_tricks.py            # writes docs/benchmarks/scorer_tricks.{json,md}
    python bench/scorer_tricks.py --smoke    # a tiny run, written to a temporary directory
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import DOCS, adapted_weights, cifar10_jpeg75_root, machine, machine_line, write_results

from autoprune.criteria import select
from autoprune.data import load_dataset
from autoprune.graph import PruningGraph, build_graph
from autoprune.models import create_model
from autoprune.search.calibration import CalibrationSet
from autoprune.search.candidates import Candidate
from autoprune.search.scorers import create_scorer

CRITERIA = ("l1", "l2", "fpgm", "euclidean", "cosine")

EXACT = ("fast", {"halving": False})  # the reference for --decisions
KEEP_HALF = "+ successive halving (from 64 images in set order, keep the best half)"
CHANNELS_LAST = "+ channels_last"
DEFAULT = "+ lower bound, hardest images first (the fast default)"
HARDEST = "instead of keep-half: hardest 16 images first, keep a quarter (the earlier default)"
# name -> (scorer, options); each "+" variant adds one trick to the one before; the "instead"
# variant replaces keep-half (channels_last off, to compare with it)
VARIANTS: dict[str, tuple[str, dict]] = {
    "exhaustive (deep copy per candidate)": ("exhaustive", {}),
    "fast: masking only": (
        "fast",
        {"prefix_cache": False, "halving": False, "channels_last": False},
    ),
    "+ prefix cache": ("fast", {"halving": False, "channels_last": False}),
    KEEP_HALF: ("fast", {"channels_last": False, "bound": False}),
    CHANNELS_LAST: ("fast", {"bound": False}),
    DEFAULT: ("fast", {}),
    HARDEST: (
        "fast",
        {
            "hard_first": True,
            "min_images": 16,
            "keep": 0.25,
            "channels_last": False,
            "bound": False,
        },
    ),
}


def make_candidates(graph: PruningGraph, step: float, groups: int | None) -> list[Candidate]:
    """Per group, the channels each criterion removes for ``step`` of the MACs, deduplicated."""
    total = graph.macs()
    candidates = []
    for group in graph.groups()[:groups]:
        n = next(
            (k for k in range(1, group.channels) if group.macs_saved(k) >= step * total),
            group.channels - 1,
        )
        picks: dict[tuple[int, ...], list[str]] = {}
        for name in CRITERIA:
            picks.setdefault(tuple(select(group, name, n).tolist()), []).append(name)
        for key, names in picks.items():
            idxs = torch.tensor(key, dtype=torch.long)
            saved = total - graph.macs(group, idxs)
            candidates.append(Candidate(group.name, tuple(names), idxs, saved))
    return candidates


def score(
    scorer_name: str,
    options: dict,
    graph: PruningGraph,
    candidates: list[Candidate],
    calib: CalibrationSet,
    reference: list[float] | None,
) -> tuple[dict, list[float]]:
    """One scorer call, judged against ``reference`` losses (its own when None)."""
    scorer = create_scorer(scorer_name, **options)
    start = time.perf_counter()
    losses = scorer(graph, candidates, calib, lambda loss, candidate: loss)  # LAASP objective
    seconds = time.perf_counter() - start
    reference = reference or losses
    winner = min(range(len(losses)), key=losses.__getitem__)
    ranked = sorted(range(len(reference)), key=reference.__getitem__)
    scored = [i for i, v in enumerate(losses) if v != float("inf")]
    return {
        "candidates": len(candidates),
        "seconds": seconds,
        "images": scorer.last_stats["images"],
        "winner": f"{candidates[winner].group} ({','.join(candidates[winner].criteria)})",
        "same_winner": ranked[0] == winner,
        "winner_rank_exhaustive": ranked.index(winner) + 1,
        "regret": reference[winner] - reference[ranked[0]],
        "fully_scored": len(scored),
        "max_abs_loss_diff": max(abs(losses[i] - reference[i]) for i in scored),
    }, losses


def apply_best(graph: PruningGraph, candidates: list[Candidate], losses: list[float]) -> None:
    best = candidates[min(range(len(losses)), key=losses.__getitem__)]
    graph.prune(best.group, best.idxs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script")
    parser.add_argument("--calib", type=int, default=512, help="calibration images")
    parser.add_argument("--batch-size", type=int, default=128, help="calibration batch size")
    parser.add_argument("--step", type=float, default=0.01, help="MACs share per candidate")
    parser.add_argument("--iterations", type=int, default=1, help="timed iterations")
    parser.add_argument("--decisions", type=int, default=0, help="extra iterations: agreement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    groups = None
    if args.smoke:
        args.calib, args.iterations, args.decisions, groups = 128, 1, 2, 4
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.smoke else DOCS)
    if args.render:
        result = json.loads((out_dir / "scorer_tricks.json").read_text())
        (out_dir / "scorer_tricks.md").write_text(markdown(result))
        return
    torch.set_num_threads(args.threads)

    model = create_model("resnet56", weights=adapted_weights("resnet56")).eval()
    data = load_dataset("cifar10", "train", root=cifar10_jpeg75_root(), download=False)
    calib = CalibrationSet.from_data(data, args.calib, batch_size=args.batch_size, seed=0)
    graph = build_graph(model, torch.zeros(1, 3, 32, 32))

    dense_macs = graph.macs()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for iteration in range(args.iterations):
        candidates = make_candidates(graph, args.step, groups)
        print(f"iteration {iteration + 1}: {len(candidates)} candidates", flush=True)
        reference: list[float] | None = None
        for name, (scorer_name, options) in VARIANTS.items():
            run, losses = score(scorer_name, options, graph, candidates, calib, reference)
            reference = reference or losses
            runs[name].append({"iteration": iteration + 1, **run})
            print(f"  {name}: {run}", flush=True)
        apply_best(graph, candidates, reference)

    decisions: dict[str, list[dict]] = {DEFAULT: [], HARDEST: []}
    for iteration in range(args.decisions):
        candidates = make_candidates(graph, args.step, groups)
        reduction = 1 - graph.macs() / dense_macs
        _, reference = score(*EXACT, graph, candidates, calib, None)
        ranked = sorted(reference)
        for name, runs_of in decisions.items():
            run, _ = score(*VARIANTS[name], graph, candidates, calib, reference)
            run.update(macs_reduction=reduction, best_loss=ranked[0], gap=ranked[1] - ranked[0])
            runs_of.append({"iteration": args.iterations + iteration + 1, **run})
            print(f"decision {iteration + 1} ({reduction:.1%} MACs off) {name}: {run}", flush=True)
        apply_best(graph, candidates, reference)

    result = {
        "model": "resnet56 (cifar10-jpeg75-resnet-adapted weights)",
        "calibration_images": args.calib,
        "batch_size": args.batch_size,
        "step_macs": args.step,
        "criteria": list(CRITERIA),
        "iterations": args.iterations,
        "smoke": args.smoke,
        "machine": machine(),
        "variants": {name: {"options": VARIANTS[name][1], "runs": r} for name, r in runs.items()},
        "decisions": {
            "reference": {"scorer": EXACT[0], "options": EXACT[1]},
            "variants": {n: {"options": VARIANTS[n][1], "runs": r} for n, r in decisions.items()},
        },
    }
    write_results(out_dir / "scorer_tricks", result, markdown(result))
    print(f"wrote {out_dir / 'scorer_tricks.json'} and .md")


def markdown(result: dict) -> str:
    """The table the docs quote, generated from the JSON."""
    lines = [
        "# Scorer tricks: the cost of a LAASP iteration on ResNet-56",
        "",
        "Generated by `bench/scorer_tricks.py`; do not edit by hand.",
        "",
        f"{result['model']}; candidates: every group x {', '.join(result['criteria'])} at "
        f"~{result['step_macs']:.0%} of the MACs per step, identical channel choices merged; "
        f"calibration: {result['calibration_images']} training images "
        f"(batches of {result['batch_size']}); objective: calibration loss. "
        "The cores are shared: seconds vary with the load, images evaluated do not. "
        "Agreement over whole searches: search_quality.md and search_quality_resnet20.md.",
        "",
        machine_line(result["machine"]),
        "",
        "| variant | s / iteration | speed-up | images evaluated | same winner as exhaustive "
        "| winner's rank under exhaustive | max regret | max abs loss diff (fully scored) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = None
    for name, variant in result["variants"].items():
        runs = variant["runs"]
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        base = base or seconds
        images = sum(r["images"] for r in runs) / len(runs)
        same = sum(r["same_winner"] for r in runs)
        ranks = ", ".join(str(r["winner_rank_exhaustive"]) for r in runs)
        diff = max(r["max_abs_loss_diff"] for r in runs)
        regret = max(r["regret"] for r in runs)
        lines.append(
            f"| {name} | {seconds:.1f} | {base / seconds:.1f}x | {images:,.0f} | "
            f"{same}/{len(runs)} | {ranks} | {regret:.1e} | {diff:.1e} |"
        )
    decisions = result["decisions"]["variants"]
    if any(variant["runs"] for variant in decisions.values()):
        lines += [
            "",
            f"## Agreement over {len(next(iter(decisions.values()))['runs'])} more decisions",
            "",
            "The search continues from the timed iterations, applying the exact winner each "
            "time; the reference is `fast` without halving, equal to exhaustive to float "
            "rounding (last column above). Regret: the reference loss of a variant's winner "
            "minus the best reference loss.",
            "",
            "| variant | same winner | ranks of its winners | max regret | median s / iteration |",
            "|---|---:|---|---:|---:|",
        ]
        for name, variant in decisions.items():
            runs = variant["runs"]
            same = sum(r["same_winner"] for r in runs)
            ranks = ", ".join(str(r["winner_rank_exhaustive"]) for r in runs)
            seconds = sorted(r["seconds"] for r in runs)[len(runs) // 2]
            regret = max(r["regret"] for r in runs)
            lines.append(
                f"| {name} | {same}/{len(runs)} | {ranks} | {regret:.1e} | {seconds:.1f} |"
            )
        gaps = sorted(r["gap"] for r in next(iter(decisions.values()))["runs"])
        lines += [
            "",
            f"Gap between the best and second-best reference loss: median "
            f"{gaps[len(gaps) // 2]:.1e}, smallest {gaps[0]:.1e}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
