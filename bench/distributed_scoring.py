"""Wall time of one loss-aware iteration of ResNet-56 with 1 and 2 processes (torch.distributed).

One iteration is what the search does before it prunes: compute the criteria (taylor takes
gradients on its images), build the (group, criterion) candidates of a ~1 % MACs step for the
default pool, and score them on the calibration set. With N processes (gloo, one thread each)
every rank computes the criteria, then scores its share of the candidates; the losses are
all-gathered. Reported per process count: the iteration's wall time (slowest rank) and the
scorer's part of it, the median over the repeats, each rank's CPU time (how the work divides,
whatever else the machine runs), and whether the decision and its loss are those of one
process (they must be, bit for bit).

    python bench/distributed_scoring.py            # writes docs/benchmarks/distributed_scoring.*
    python bench/distributed_scoring.py --smoke    # ResNet-20, a small set: a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import (
    DOCS,
    SMOKE,
    adapted_weights,
    cifar10_jpeg75_root,
    machine,
    machine_line,
    write_results,
)

from autoprune import distributed
from autoprune.data import load_dataset
from autoprune.graph import build_graph
from autoprune.models import create_model
from autoprune.search import SCHEDULES, CalibrationSet, PruneConfig, SearchContext, create_scorer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--processes", default="1,2", help="comma-separated process counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--scorer", default="fast")
    p.add_argument("--calib", type=int, default=512, help="calibration images")
    p.add_argument("--taylor", type=int, default=256, help="images taylor's gradients use")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="ResNet-20, 64 images, one repeat")
    p.add_argument("--out", type=Path, default=DOCS / "distributed_scoring")
    args = p.parse_args()
    if args.smoke:
        args.model, args.calib, args.taylor, args.repeats = "resnet20", 64, 32, 1
        args.out = SMOKE / "distributed_scoring"
    return args


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, out: Path) -> None:
    """One process: set up, then time ``repeats`` proposals of the same iteration."""
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = create_model(args.model, weights=adapted_weights(args.model))
        data = load_dataset("cifar10", "train", cifar10_jpeg75_root(), download=False)
        config = PruneConfig(scorer=args.scorer, calib_size=args.calib, taylor_size=args.taylor)
        calib = CalibrationSet.from_data(data, args.calib, seed=config.seed)
        graph = build_graph(model, torch.zeros(1, 3, 32, 32))
        ctx = SearchContext(
            graph,
            config,
            calib,
            create_scorer(config.scorer),
            graph.macs(),
            {g.name: g.channels for g in graph.groups()},
            calib.loss(graph.model),
            None,
        )
        schedule = SCHEDULES.get(config.schedule)(config)
        runs = []
        for _ in range(args.repeats):
            distributed.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            step = schedule.propose(ctx)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            ranks = distributed.all_gather((seconds, step.stats["seconds"], cpu))
            runs.append(
                {
                    "seconds": max(r[0] for r in ranks),
                    "scorer_seconds": max(r[1] for r in ranks),
                    "cpu_seconds_per_rank": [r[2] for r in ranks],
                    "candidates": step.candidates,
                    "decision": f"{next(iter(step.removal))} ({','.join(step.criteria)})",
                    "loss": step.loss,
                }
            )
        if distributed.is_main():
            torch.save(runs, out)
        distributed.barrier()  # no rank tears its connections down while a peer still uses them
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``world`` fresh processes (spawned also for 1, so every count starts alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.pt"
        mp.spawn(_rank, args=(world, str(Path(tmp) / "store"), args, out), nprocs=world)
        return torch.load(out)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)  # what machine() reports: each process's threads
    result: dict[str, Any] = {
        "model": f"{args.model} (cifar10-jpeg75-resnet-adapted weights)",
        "scorer": args.scorer,
        "calibration_images": args.calib,
        "taylor_images": args.taylor,
        "criteria": list(PruneConfig().criteria),
        "threads_per_process": args.threads,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "machine": machine(),
        "runs": {},
    }
    for world in (int(n) for n in args.processes.split(",")):
        runs = measure(world, args)
        result["runs"][str(world)] = runs
        print(f"{world} process(es): {runs}", flush=True)
    result["machine"]["load_average"] = machine()["load_average"]  # after: the load during
    write_results(args.out, result, markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and .md")


def markdown(result: dict[str, Any]) -> str:
    """The table the docs quote, generated from the JSON."""
    lines = [
        "# Distributed candidate scoring: one iteration of the search, 1 vs 2 processes",
        "",
        "Generated by `bench/distributed_scoring.py`; do not edit by hand.",
        "",
        f"{result['model']}; schedule auto with the default criteria pool "
        f"({', '.join(result['criteria'])}), {result['scorer']} scorer, "
        f"{result['calibration_images']} calibration images, taylor on "
        f"{result['taylor_images']}; {result['threads_per_process']} torch thread per process, "
        "gloo. An iteration is the criteria, the candidates and their scores (the scorer's "
        "part is shown apart); seconds are the slowest rank's, median of "
        f"{result['repeats']} repeats.",
        "",
        machine_line(result["machine"]),
        "",
        "| processes | s / iteration | scorer s | speed-up | CPU s per rank | candidates | "
        "decision | same loss as 1 process |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    runs = result["runs"]
    base = None
    reference = next(iter(runs.values()))[0]
    for world, repeats in runs.items():
        seconds = statistics.median(r["seconds"] for r in repeats)
        scorer = statistics.median(r["scorer_seconds"] for r in repeats)
        base = base or seconds
        same = all(r["loss"] == reference["loss"] for r in repeats)
        per_rank = zip(*(r["cpu_seconds_per_rank"] for r in repeats), strict=True)
        cpu = ", ".join(f"{statistics.median(c):.1f}" for c in per_rank)
        lines.append(
            f"| {world} | {seconds:.1f} | {scorer:.1f} | {base / seconds:.2f}x | {cpu} | "
            f"{repeats[0]['candidates']} | {repeats[0]['decision']} | {'yes' if same else 'NO'} |"
        )
    lines += [
        "",
        "The cores are shared with other work: wall seconds vary with the load (see the load "
        "average), and with more busy processes than cores two ranks do not run side by side. "
        "CPU seconds per rank show how the work divides; the decision and its loss do not vary.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
