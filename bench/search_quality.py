"""Fast scorer vs the exhaustive LAASP-style scorer: search time and accuracy after recovery.

Protocol (the same for every scorer): prune the model to the MACs target with the search only
(no recovery during the search), measure test accuracy, fine-tune every pruned model with the
same budget, measure again. The dataset is CIFAR-10-JPEG75 (not CIFAR-10).

    python bench/search_quality.py              # ResNet-56, -50 % MACs (about an hour, 2 cores)
    python bench/search_quality.py --smoke      # a tiny run, for CI
    python bench/search_quality.py --scorers '' # only rewrite the table from the JSON

Writes docs/benchmarks/search_quality.json and .md (the table is generated from the JSON).
Results are written after every method, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
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
    from_history,
    machine,
    machine_line,
    previous_rows,
    same_decision,
    write_results,
)

import autoprune
from autoprune.io import save
from autoprune.measure import count_macs, count_params


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--target", type=float, default=0.5, help="MACs reduction")
    p.add_argument("--scorers", default="fast,exhaustive")
    p.add_argument("--fast-calib", type=int, default=1024)
    p.add_argument("--exhaustive-calib", type=int, default=256)
    p.add_argument(
        "--fast-options",
        type=json.loads,
        default={},
        help="fast scorer options, JSON (e.g. '{\"keep\": 0.75}'): a row of its own",
    )
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=DOCS / "search_quality")
    p.add_argument("--searched", type=Path, default=SEARCHED, help="pruned models go here")
    args = p.parse_args()
    if args.smoke:
        args.model, args.target = "resnet20", 0.03
        args.fast_calib = args.exhaustive_calib = 32
        args.finetune_epochs, args.test_size = 0.01, 256
        args.out, args.searched = SMOKE / "search_quality", SMOKE / "searched"
    return args


def main() -> None:
    args = parse_args()
    search_runs = args.searched.parent / "search-runs"
    if not args.scorers:
        rerender(args, search_runs)
        return
    torch.manual_seed(args.seed)
    train, test = cifar10_jpeg75(args.test_size)
    dense = autoprune.create_model(args.model, weights=adapted_weights(args.model))
    example = torch.zeros(1, 3, 32, 32)
    results = {
        "machine": machine(),
        "dataset": "CIFAR-10-JPEG75",
        "model": args.model,
        "target_macs_reduction": args.target,
        "protocol": (
            "search only (no recovery), then the same fine-tune for every scorer: "
            f"{args.finetune_epochs} epoch(s), SGD lr {args.finetune_lr} cosine, batch 128"
        ),
        "baseline": {
            "accuracy": accuracy(dense, test),
            "macs": count_macs(dense, example),
            "params": count_params(dense),
        },
        "runs": [],
    }
    settings = {"model": args.model, "target_macs_reduction": args.target}
    for scorer in args.scorers.split(","):
        calib = args.fast_calib if scorer == "fast" else args.exhaustive_calib
        options = args.fast_options if scorer == "fast" else {}
        label = " ".join([scorer, *(f"{k}={v}" for k, v in sorted(options.items()))])
        name = run_name(args, label, args.seed)
        result = autoprune.prune(
            dense,
            train_data=train,
            target_macs_reduction=args.target,
            scorer=scorer,
            scorer_options=options,
            calib_size=calib,
            recover_steps=0,
            finetune_epochs=0,
            seed=args.seed,
            progress=True,  # in a log: one line per iteration
            # Checkpointed every iteration: an interrupted hour-long reference run resumes.
            out_dir=search_runs / name,
            resume=True,
        )
        model, history = result.model, result.history
        save(model, args.searched / name)
        after_search = accuracy(model, test)
        finetune(model, train, args.finetune_epochs, lr=args.finetune_lr, seed=args.seed)
        # Re-read: a scorer run at the same time in another process may have added its row.
        # Rows from before seeds were recorded ran with the default seed, 0.
        results["runs"] = [
            r
            for r in previous_rows(args.out, **settings)
            if (r["scorer"], r.get("seed", 0)) != (label, args.seed)
        ]
        results["runs"].append(
            {
                "scorer": label,
                "seed": args.seed,
                "calib_images": calib,
                # the iterations' own times: a run resumed across sessions counts only them
                "search_s": round(sum(h["seconds"] for h in history), 1),
                "iterations": len(history),
                "candidates_scored": sum(h.get("candidates", 0) for h in history),
                "macs_reduction": 1 - count_macs(model, example) / results["baseline"]["macs"],
                "params_reduction": 1 - count_params(model) / results["baseline"]["params"],
                "accuracy_after_search": after_search,
                "accuracy_after_finetune": accuracy(model, test),
                "groups_chosen": [h.get("group") for h in history],
                **from_history(history),
            }
        )
        write(args.out, results)
        print(json.dumps(results["runs"][-1], indent=1)[:2000], flush=True)


def rerender(args: argparse.Namespace, search_runs: Path) -> None:
    """The table again from the JSON as measured, with what older rows lack read from the
    runs' histories (decisions, images scored)."""
    results = json.loads(args.out.with_suffix(".json").read_text())
    for r in results["runs"]:
        history = search_runs / run_name(args, r["scorer"], r.get("seed", 0)) / "history.jsonl"
        if history.exists():
            records = [json.loads(line) for line in history.read_text().splitlines()]
            for key, value in from_history(records).items():
                r.setdefault(key, value)
    write(args.out, results)


def run_name(args: argparse.Namespace, label: str, seed: int) -> str:
    return f"{args.model}-{args.target:g}-{label.replace(' ', '-')}-seed{seed}"


def write(out: Path, results: dict) -> None:
    base = results["baseline"]
    lines = [
        f"# Search quality: fast vs exhaustive scorer ({results['model']}, "
        f"{results['dataset']}, -{results['target_macs_reduction']:.0%} MACs)",
        "",
        f"Generated by `bench/search_quality.py`. Protocol: {results['protocol']}. "
        "Search time: the iterations' own times (a resumed run counts only them), on a shared "
        "machine; images scored: candidate evaluations x images, summed over the search. "
        "Same decisions: the iterations, from the first, that chose the same group and channel "
        "count with the same loss as the exhaustive scorer.",
        f"Dense baseline: {base['accuracy']:.2f} % test accuracy, {base['macs'] / 1e6:.1f} M MACs, "
        f"{base['params'] / 1e6:.3f} M params.",
        "",
        "| scorer | calibration images | search time (s) | iterations | images scored "
        "| same decisions as exhaustive | MACs red. | params red. | acc. after search "
        "| acc. after fine-tune |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = next((r for r in results["runs"] if r["scorer"] == "exhaustive"), None)
    for r in results["runs"]:
        lines.append(
            f"| {r['scorer']} | {r['calib_images']} | {r['search_s']:.0f} | {r['iterations']} "
            f"| {r.get('images_scored', 0):,} | {agreement(r, reference)} "
            f"| {r['macs_reduction']:.1%} | {r['params_reduction']:.1%} "
            f"| {r['accuracy_after_search']:.2f} % | {r['accuracy_after_finetune']:.2f} % |"
        )
    lines += ["", machine_line(results["machine"])]
    write_results(out, results, "\n".join(lines) + "\n")


def agreement(row: dict, reference: dict | None) -> str:
    """``k/n``: the first ``k`` of ``row``'s ``n`` decisions equal the reference's."""
    if reference is None or "decisions" not in row or "decisions" not in reference:
        return "-"
    pairs = zip(row["decisions"], reference["decisions"], strict=False)
    same = next((i for i, (a, b) in enumerate(pairs) if not same_decision(a, b)), None)
    n = len(row["decisions"])
    if same is None:
        same = min(n, len(reference["decisions"]))
    return f"{same}/{n}"


if __name__ == "__main__":
    main()
