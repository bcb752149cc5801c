"""Real speed: latency of the dense and pruned models in torch eager and ONNX Runtime.

Protocol: every (model, backend) is prepared once (for ONNX Runtime: one export), then timed
on random inputs at each batch size: ``--warmup`` runs, then the median of ``--repeats`` timed
runs. This is done in ``--rounds`` rounds that visit every model in turn, so that a change in
the load of a shared machine hits all models alike; the latency reported is the median of the
rounds' medians. Torch and ONNX Runtime both use ``--threads`` threads. The measured speed-up (dense
latency over pruned latency) stands next to the MACs ratio (dense MACs over pruned MACs: the
speed-up if latency followed MACs). Pruned models are read, not trained: accuracy plays no part.

    python bench/speed.py                   # ResNet-56 and the models in runs/bench-searched/
    python bench/speed.py --pruned DIR ...  # pruned models (autoprune.io.save or run dirs)
    python bench/speed.py --smoke           # ResNet-20, a few repeats, one thread, for CI

A second table times the dense model with every channel group cut to aligned and unaligned
widths (``WIDTHS``): what ONNX Runtime's blocked kernels make of channel counts.

Without ``--pruned`` or pruned models of ``--model`` in ``--searched`` (other benchmarks save
theirs there; ``--smoke`` does not look), it prunes one without data: L1 magnitude, fixed
schedule, ``--target`` of the MACs. Writes docs/benchmarks/speed.json, .md and .png.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from _common import DOCS, SEARCHED, SMOKE, adapted_weights, machine, machine_line, write_results
from matplotlib.figure import Figure
from torch import nn

import autoprune
from autoprune.errors import AutopruneError
from autoprune.graph import build_graph
from autoprune.io.export import Runner
from autoprune.measure import BACKENDS, count_macs, count_params, time_runner
from autoprune.models.spec import describe
from autoprune.search.run import load_run_model

INPUT_SHAPE = (3, 32, 32)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56", help="the dense model (adapted weights)")
    p.add_argument("--pruned", type=Path, nargs="+", help="pruned models (default: --searched)")
    p.add_argument("--searched", type=Path, default=SEARCHED, help="where to find them")
    p.add_argument("--target", type=float, default=0.5, help="MACs reduction if none is found")
    p.add_argument("--backends", default="eager,onnxruntime")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30, help="timed runs per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before each round")
    p.add_argument(
        "--threads", type=int, help="torch and ORT threads (default: all cores; --smoke: 1)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=DOCS / "speed")
    args = p.parse_args()
    if args.smoke:
        args.model, args.rounds, args.repeats, args.warmup = "resnet20", 1, 3, 1
        args.out, args.searched = SMOKE / "speed", None  # its own pruned model: quick
    if args.threads is None:  # a smoke run shares its machine: one thread spins least
        args.threads = 1 if args.smoke else os.cpu_count()
    return args


def pruned_models(args: argparse.Namespace, dense: nn.Module) -> dict[str, nn.Module]:
    """``--pruned``, else the models of ``--model`` in ``--searched``, else one made here."""
    if args.pruned:
        return {str(path): load_run_model(path) for path in args.pruned}
    found = {}
    searched = args.searched if args.searched is not None and args.searched.is_dir() else None
    for path in sorted(searched.iterdir()) if searched else []:
        try:
            model = load_run_model(path)
        except AutopruneError as err:
            print(f"skipped {path}: {err}")
            continue
        name = describe(model).name
        if name == args.model:
            found[path.name] = model
        else:
            print(f"skipped {path}: a pruned {name}, not {args.model}")
    if found:
        return found
    example = torch.zeros(1, *INPUT_SHAPE)
    result = autoprune.prune(
        dense,
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=args.target,
        example_inputs=example,
        progress=False,
    )
    return {f"{args.model}-l1-fixed-{args.target:g} (data-free)": result.model}


# name -> channels a group keeps, of its c: the same model at aligned and unaligned widths
WIDTHS: dict[str, Callable[[int], int]] = {
    "c - 1 (all unaligned)": lambda c: c - 1,
    "3/4 c": lambda c: 3 * c // 4,
    "3/4 c, rounded up to 16": lambda c: -(-3 * c // 64) * 16,
    "1/2 c": lambda c: c // 2,
    "1/2 c, rounded up to 16": lambda c: -(-c // 32) * 16,
}


def width_variants(dense: nn.Module) -> dict[str, nn.Module]:
    """``dense`` with every channel group cut to each of ``WIDTHS`` (first channels kept: only
    the shapes matter for latency)."""
    variants = {}
    for name, keep in WIDTHS.items():
        graph = build_graph(copy.deepcopy(dense), torch.zeros(1, *INPUT_SHAPE))
        for group in graph.groups():
            cut = group.channels - max(1, min(group.channels, keep(group.channels)))
            if cut:
                graph.prune(group.name, torch.arange(cut))
        variants[f"widths {name}"] = graph.model
    return variants


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    backends = args.backends.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dense = autoprune.create_model(args.model, weights=adapted_weights(args.model)).eval()
    models = {f"{args.model} (dense)": dense, **pruned_models(args, dense)}
    aligned = width_variants(dense)
    models.update(aligned)
    example = torch.zeros(1, *INPUT_SHAPE)
    runners = {
        (name, backend): BACKENDS.get(backend)(model.eval(), example)
        for name, model in models.items()
        for backend in backends
    }
    timings = time_in_rounds(runners, batch_sizes, args)
    dense_macs = count_macs(dense, example)
    rows = []
    for name, model in models.items():
        macs = count_macs(model, example)
        latency = [
            {
                "backend": backend,
                "batch_size": batch_size,
                "median_ms": statistics.median(timings[name, backend, batch_size]),
                "round_medians_ms": timings[name, backend, batch_size],
            }
            for backend in backends
            for batch_size in batch_sizes
        ]
        rows.append(
            {
                "model": name,
                "macs": macs,
                "params": count_params(model),
                "macs_reduction": 1 - macs / dense_macs,
                "macs_ratio": dense_macs / macs,
                "latency": latency,
                "widths": sorted({g.channels for g in build_graph(model, example).groups()}),
                "alignment_study": name in aligned,
            }
        )
    for row in rows:  # speed-up against the dense model at the same backend and batch size
        for lat, base in zip(row["latency"], rows[0]["latency"], strict=True):
            lat["speedup"] = base["median_ms"] / lat["median_ms"]
    results = {
        "machine": machine(),
        "model": args.model,
        "input_shape": list(INPUT_SHAPE),
        "threads": args.threads,
        "protocol": (
            f"{args.rounds} round(s) over all models of {args.warmup} warm-up and "
            f"{args.repeats} timed runs per backend and batch size, random inputs; latency is "
            f"the median of the rounds' medians; {args.threads} thread(s) for torch and ONNX "
            "Runtime"
        ),
        "versions": versions(backends),
        "rows": rows,
    }
    write(args.out, results)
    print(args.out.with_suffix(".md").read_text())


def time_in_rounds(
    runners: dict[tuple[str, str], Runner], batch_sizes: list[int], args: argparse.Namespace
) -> dict[tuple[str, str, int], list[float]]:
    """Each round's median latency per (model, backend, batch size); every round visits every
    runner, so that load from other processes falls on all of them alike."""
    timings: dict[tuple[str, str, int], list[float]] = {}
    for r in range(args.rounds):
        for (name, backend), run in runners.items():
            for lat in time_runner(
                run,
                INPUT_SHAPE,
                backend=backend,
                batch_sizes=batch_sizes,
                warmup=args.warmup,
                repeats=args.repeats,
            ):
                timings.setdefault((name, backend, lat.batch_size), []).append(lat.median_ms)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return timings


def versions(backends: list[str]) -> dict[str, str]:
    if "onnxruntime" not in backends:
        return {}
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def write(out: Path, results: dict) -> None:
    rows = results["rows"]
    columns = [(lat["backend"], lat["batch_size"]) for lat in rows[0]["latency"]]
    runtimes = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [
        f"# Real speed: dense vs pruned {results['model']} "
        f"(input {'x'.join(map(str, results['input_shape']))})",
        "",
        f"Generated by `bench/speed.py`. Protocol: {results['protocol']}. Speed-up: dense latency "
        "over the model's, at the same backend and batch size; MACs ratio: dense MACs over the "
        "model's, the speed-up if latency followed MACs.",
        "",
        "| model | MACs (M) | params (k) | MACs red. | MACs ratio | "
        + " | ".join(f"{backend} batch {batch}" for backend, batch in columns)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(columns),
    ]
    header = lines[-2:]
    study = [r for r in rows if r.get("alignment_study")]
    rows = [r for r in rows if not r.get("alignment_study")]
    lines += [table_row(row) for row in rows]
    lines += ["", *fastest(rows[1:], columns)]
    lines += ["", f"![speed-up vs MACs ratio]({out.with_suffix('.png').name})", ""]
    if study:
        lines += [
            "## Channel alignment",
            "",
            "The dense model with every channel group cut to the widths named (the channel "
            "counts that occur are listed): ONNX Runtime converts a convolution to its blocked "
            "NCHWc kernels only when its input and output channels are multiples of the block "
            "(8 with AVX2, 16 with AVX-512, as here); otherwise it runs im2col + GEMM. "
            "`channel_multiple=16` keeps a pruned model on the fast path.",
            "",
            *header,
            *[table_row(row, widths=True) for row in rows[:1] + study],
            "",
        ]
    lines += [
        machine_line(results["machine"]) + (f" {runtimes}." if runtimes else ""),
    ]
    write_results(out, results, "\n".join(lines) + "\n")
    plot(rows[1:], columns, results).savefig(out.with_suffix(".png"), dpi=120)


def fastest(pruned: list[dict], columns: list[tuple[str, int]]) -> list[str]:
    """Which pruned model is fastest per backend and batch size: a win is not assumed."""
    if not pruned:
        return []
    lines = ["Fastest pruned model:"]
    for i, (backend, batch) in enumerate(columns):
        best = max(pruned, key=lambda row: row["latency"][i]["speedup"])
        lines.append(
            f"- {backend}, batch {batch}: {best['model']} "
            f"({best['latency'][i]['speedup']:.2f}x the dense model)"
        )
    return lines


def table_row(row: dict, widths: bool = False) -> str:
    cells = [f"{lat['median_ms']:.2f} ms ({lat['speedup']:.2f}x)" for lat in row["latency"]]
    name = f"{row['model']}: {', '.join(map(str, row['widths']))}" if widths else row["model"]
    return (
        f"| {name} | {row['macs'] / 1e6:.1f} | {row['params'] / 1e3:.1f} "
        f"| {row['macs_reduction']:.1%} | {row['macs_ratio']:.2f}x | " + " | ".join(cells) + " |"
    )


def plot(pruned: list[dict], columns: list[tuple[str, int]], results: dict) -> Figure:
    """Per pruned model: the MACs ratio (grey) beside the measured speed-ups."""
    fig = Figure(figsize=(max(6.0, 1.0 + 2.2 * len(pruned)), 4.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / (len(columns) + 1)
    x = range(len(pruned))
    series = [("MACs ratio", [row["macs_ratio"] for row in pruned])]
    series += [
        (f"{backend}, batch {batch}", [row["latency"][i]["speedup"] for row in pruned])
        for i, (backend, batch) in enumerate(columns)
    ]
    for i, (label, values) in enumerate(series):
        color = "#b0b0b0" if i == 0 else f"C{i - 1}"
        bars = ax.bar([p + i * width for p in x], values, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize="small")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ticks = [p + width * len(columns) / 2 for p in x]
    ax.set_xticks(ticks, [row["model"] for row in pruned], rotation=15, ha="right")
    ax.set_ylabel("speed-up over the dense model (x)")
    ax.set_title(
        f"{results['model']}: measured speed-up vs MACs ratio (threads: {results['threads']})"
    )
    ax.legend(fontsize="small")
    return fig


if __name__ == "__main__":
    main()
