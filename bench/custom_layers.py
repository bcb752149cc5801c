"""A user's own layers and reshapes (issue 18): exact accounting and landing, per model.

The models are the hand-written ones of tests/test_custom_layers.py, built by autoprune's own
``file.py:factory`` loader: layers registered with a ``LayerPruner`` (a factored conv, a
sigmoid gate, a layer with its own masking hook), raw per-channel parameters next to an unused
root parameter, a Linear viewed into conv channels and a conv flattened into a Linear. For
each:

- one removal of the lowest-L1 third of every group: MACs the graph predicts it saves vs
  what torch's counter measures after pruning, and the largest |masked - pruned| output;
- the fixed schedule (L1) at -30 % and -50 %: the MACs reduction reached and the most any
  group lost, as a fraction of its channels (the cap is 75 %);
- the loss-aware search at -30 % on random data (no recovery): the reduction reached.

    python bench/custom_layers.py            # every model and target (about a minute idle)
    python bench/custom_layers.py --smoke    # one model, -30 % only, for CI (seconds)

Writes docs/benchmarks/custom_layers.json and .md (the table is generated from the JSON).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import DOCS, REPO, SMOKE, machine, machine_line, write_results
from torch.utils.data import TensorDataset

import autoprune
from autoprune.criteria import select
from autoprune.graph import build_graph, mask_channels
from autoprune.measure import count_macs

MODELS = REPO / "tests" / "test_custom_layers.py"
# name -> example input shape (batch 1)
SHAPES: dict[str, tuple[int, ...]] = {
    "custom_net": (1, 3, 16, 16),
    "shift_net": (1, 16),
    "UnusedRootParameter": (1, 3, 16, 16),
    "LinearViewConv": (1, 16),
    "ConvFlattenLinear": (1, 3, 16, 16),
}
CAP = 0.75


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--targets", default="0.3,0.5", help="fixed-schedule MACs reductions")
    p.add_argument("--search-target", type=float, default=0.3)
    p.add_argument("--smoke", action="store_true", help="one model, -30 % only")
    p.add_argument("--out", type=Path, default=DOCS / "custom_layers")
    args = p.parse_args()
    if args.smoke:
        args.models, args.targets = "custom_net", "0.3"
        args.out = SMOKE / "custom_layers"
    return args


def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return autoprune.create_model(f"{MODELS}:{name}").eval()


def exactness(name: str, example: torch.Tensor) -> dict[str, Any]:
    """One removal of every group's lowest-L1 third: predicted vs measured MACs, masked vs
    pruned outputs."""
    graph = build_graph(model(name), example)
    dense = count_macs(graph.model, example)
    removal = {g.name: select(g, "l1", g.channels // 3) for g in graph.groups()}
    x = torch.randn(8, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mask_channels(graph, removal):
        masked = graph.model(x)
    predicted = graph.macs() - graph.macs(removal)
    graph.prune(removal)
    with torch.no_grad():
        pruned = graph.model(x)
    return {
        "groups": len(removal),
        "macs": dense,
        "predicted_saving": predicted,
        "measured_saving": dense - count_macs(graph.model, example),
        "masked_max_diff": float((masked - pruned).abs().max()),
    }


def landing(name: str, example: torch.Tensor, target: float, **options: Any) -> dict[str, Any]:
    """Prune to ``target``; the reduction reached and the most any group lost."""
    dense = model(name)
    before = {g.name: g.channels for g in build_graph(dense, example).groups()}
    start = time.perf_counter()
    result = autoprune.prune(
        dense, example_inputs=example, target_macs_reduction=target, progress=False, **options
    )
    seconds = time.perf_counter() - start
    after = {g.name: g.channels for g in build_graph(result.model, example).groups()}
    reached = 1 - count_macs(result.model, example) / count_macs(dense, example)
    return {
        "target": target,
        "reached": round(reached, 5),
        "error": round(reached - target, 5),
        "most_lost": round(max(1 - after[n] / c for n, c in before.items()), 4),
        "seconds": round(seconds, 1),
    }


def random_data(example: torch.Tensor, size: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(size, *example.shape[1:], generator=generator)
    return TensorDataset(inputs, torch.randint(0, 10, (size,), generator=generator))


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    example = torch.zeros(SHAPES[name])
    fixed = {"schedule": "fixed", "criteria": "l1", "cap": CAP}
    search = {
        "calib_data": random_data(example),
        "calib_size": 32,
        "step": 0.05,
        "recover_steps": 0,
        "finetune_epochs": 0,
        "cap": CAP,
    }
    return {
        "model": name,
        **exactness(name, example),
        "fixed": [landing(name, example, float(t), **fixed) for t in args.targets.split(",")],
        "search": landing(name, example, args.search_target, **search),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Custom layers and reshapes: exact accounting and landing",
        "",
        "Generated by `bench/custom_layers.py` from `custom_layers.json`; the models are the "
        "hand-written ones of `tests/test_custom_layers.py`. Saving: MACs one removal of every "
        "group's lowest-L1 third saves, as predicted by the graph and as measured by torch's "
        "counter after pruning. Fixed and search: MACs reduction reached for the target, and "
        f"the most any group lost (cap {CAP:.0%}).",
        "",
        "| model | groups | MACs | saving predicted | saving measured | max abs(masked - pruned) "
        "| fixed: target -> reached (most lost) | search -30 %: reached (most lost) |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["runs"]:
        fixed = "; ".join(
            f"{f['target']:.0%} -> {f['reached']:.2%} ({f['most_lost']:.0%})" for f in r["fixed"]
        )
        s = r["search"]
        lines.append(
            f"| {r['model']} | {r['groups']} | {r['macs']:,} | {r['predicted_saving']:,} | "
            f"{r['measured_saving']:,} | {r['masked_max_diff']:.1e} | {fixed} | "
            f"{s['reached']:.2%} ({s['most_lost']:.0%}) |"
        )
    lines += ["", machine_line(result["machine"]), ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    runs = [run(name, args) for name in args.models.split(",")]
    result = {"machine": machine(), "cap": CAP, "runs": runs}
    write_results(args.out, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
