"""MobileViT-XXS on CIFAR-10-JPEG75: the stem scope (ICCAS 2024) and the whole hybrid.

Two loss-aware runs from the shared checkpoint (64 x 64 input, ImageNet normalisation, as the
model's registered preprocessing says), each with brief recovery and no final fine-tune:

- ``stem`` scope to -30 % of the stem's MACs (stem conv and MobileNetV2 blocks only);
- ``all`` scope to -30 % of the total MACs (convolutions, attention heads and head
  dimensions, MLP widths, embedding widths).

Accuracy is measured on the test set before and after, next to each other; the MACs reductions
of every scope come from the run's summary. The dataset is CIFAR-10-JPEG75 (not CIFAR-10).

    python bench/mobilevit.py            # about 15-20 minutes on 2 idle CPU cores
    python bench/mobilevit.py --smoke    # a tiny run, for CI (about half a minute)

Writes docs/benchmarks/mobilevit.json and .md (the table is generated from the JSON). Each run
is checkpointed under runs/bench-mobilevit/ and resumes when interrupted.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import (
    DOCS,
    REPO,
    SHARED,
    SMOKE,
    accuracy,
    cifar10_jpeg75,
    machine,
    machine_line,
    write_results,
)

import autoprune
from autoprune.attention import MultiHeadAttention
from autoprune.measure import count_params
from autoprune.search import PruneConfig

WEIGHTS = SHARED / "weights" / "cifar10-mobilevit-xxs" / "mobilevit_xxs_cifar10_64px.pth"
RUNS = REPO / "runs" / "bench-mobilevit"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scopes", default="stem,all", help="runs to make, by scope")
    p.add_argument("--target", type=float, default=0.3, help="MACs reduction of the scope")
    p.add_argument("--step", type=float, default=0.02, help="MACs one iteration removes")
    p.add_argument("--criteria", default=",".join(PruneConfig().criteria))
    # Many groups here cannot save a whole step: head groups, and MobileNetV2 outputs whose
    # readers lie outside the stem scope. Judged by loss alone they win by removing less
    # (first stem step, probed: "loss" took 0.6 % of the stem MACs for calibration loss
    # 0.96, "loss_per_mac" 2.5 % for 0.57).
    p.add_argument("--objective", default="loss_per_mac")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--taylor-size", type=int, default=128)
    p.add_argument("--recover-every", type=float, default=0.1)
    p.add_argument("--recover-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--input-size", type=int, default=None, help="default: the model's 64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=DOCS / "mobilevit")
    p.add_argument("--runs", type=Path, default=RUNS, help="run directories (resumable)")
    args = p.parse_args()
    if args.smoke:
        args.target = args.step = args.recover_every = 0.02
        args.criteria, args.calib_size = "l1", 16
        args.recover_steps, args.batch_size, args.test_size = 1, 16, 128
        args.input_size = 32  # the search and recovery only; accuracy is measured at 64
        args.out, args.runs = SMOKE / "mobilevit", SMOKE / "mobilevit-runs"
        shutil.rmtree(args.runs, ignore_errors=True)  # a smoke run starts afresh
    return args


def config(args: argparse.Namespace, scope: str) -> PruneConfig:
    base = PruneConfig()
    return PruneConfig(
        target_macs_reduction=args.target,
        scope=scope,
        criteria=args.criteria,
        objective=args.objective,
        step=args.step,
        calib_size=args.calib_size,
        taylor_size=args.taylor_size,
        recover_every=args.recover_every,
        recover_steps=args.recover_steps,
        recovery=replace(base.recovery, batch_size=args.batch_size),
        finetune_epochs=0,
        seed=args.seed,
    )


def group_kind(name: str | None) -> str:
    """What kind of group the search chose: a head group, an MLP width or conv channels."""
    if name is None:
        return "several"
    if name.endswith("]"):
        return name.rsplit("[", 1)[1][:-1]
    return "mlp" if ".mlp." in name else "channels"


def attention_shapes(model: torch.nn.Module) -> dict[str, str]:
    """``heads x head_dim / value_dim`` of every attention layer."""
    return {
        name: f"{m.num_heads}x{m.head_dim}/{m.value_dim}"
        for name, m in model.named_modules()
        if isinstance(m, MultiHeadAttention)
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    train, test = cifar10_jpeg75(args.test_size)
    dense = autoprune.create_model("mobilevit_xxs", weights=WEIGHTS)
    results: dict[str, Any] = {
        "machine": machine(),
        "dataset": "CIFAR-10-JPEG75",
        "model": "mobilevit_xxs",
        "input": "64 x 64 (bilinear from 32), ImageNet mean/std",
        "test_images": len(test),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs", "smoke")},
        "baseline": {"accuracy": accuracy(dense, test), "params": count_params(dense)},
        "runs": [],
    }
    print(f"dense: {results['baseline']['accuracy']:.2f} %", flush=True)
    for scope in args.scopes.split(","):
        start = time.perf_counter()
        result = autoprune.prune(
            dense,
            train_data=train,
            config=config(args, scope),
            input_size=args.input_size,
            progress=True,  # in a log: one line per iteration
            out_dir=args.runs / scope,
            resume=True,
        )
        summary = result.summary
        chosen = Counter(group_kind(h["group"]) for h in result.history)
        results["baseline"].setdefault("macs", summary["baseline"]["macs"])
        results["runs"].append(
            {
                "scope": scope,
                "target": args.target,
                "seconds": round(time.perf_counter() - start, 1),
                "timings": summary["timings"],
                "iterations": summary["iterations"],
                "macs": summary["pruned"]["macs"],
                "macs_reduction": summary["macs_reduction"],
                "params_reduction": summary["params_reduction"],
                "scopes": summary["scopes"],
                "accuracy": accuracy(result.model, test),
                "groups_chosen": dict(chosen),
                "criteria_chosen": summary["criteria_chosen"],
                "attention": attention_shapes(result.model),
            }
        )
        write(args.out, results)
        run = results["runs"][-1]
        print(f"{scope}: {run['accuracy']:.2f} %, total MACs -{run['macs_reduction']:.1%}")


def write(out: Path, results: dict[str, Any]) -> None:
    base = results["baseline"]
    settings = results["settings"]
    lines = [
        f"# MobileViT-XXS: stem scope and whole hybrid ({results['dataset']})",
        "",
        "Generated by `bench/mobilevit.py`. Loss-aware search from the shared checkpoint "
        f"({results['input']}), objective `{settings['objective']}`, steps of "
        f"{settings['step']:.0%} of the scope's MACs, "
        f"{settings['calib_size']} calibration images, recovery of "
        f"{settings['recover_steps']} steps (batch {settings['batch_size']}, distillation) every "
        f"{settings['recover_every']:.0%}, no final fine-tune; accuracy on "
        f"{results['test_images']} test images.",
        "",
        "| run | stem MACs | conv MACs | total MACs | params | accuracy | time (s) "
        "| groups chosen |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | | | {base['macs'] / 1e6:.2f} M | {base['params'] / 1e6:.3f} M "
        f"| {base['accuracy']:.2f} % | | |",
    ]
    for r in results["runs"]:
        red = {k: f"-{v['macs_reduction']:.1%}" for k, v in r["scopes"].items()}
        groups = ", ".join(f"{k} {v}" for k, v in sorted(r["groups_chosen"].items()))
        lines.append(
            f"| `{r['scope']}` to -{r['target']:.0%} | {red['stem']} | {red['conv']} "
            f"| {red['all']} ({r['macs'] / 1e6:.2f} M) | -{r['params_reduction']:.1%} "
            f"| {r['accuracy']:.2f} % ({r['accuracy'] - base['accuracy']:+.2f}) "
            f"| {r['seconds']:.0f} | {groups} |"
        )
    lines += [
        "",
        "Stem: the stem conv and the MobileNetV2 blocks; conv: every convolution; total: every "
        "conv, linear and attention matmul. Attention layers after the `all` run "
        "(heads x head_dim / value_dim, from 4x8/8):",
        "",
    ]
    for r in results["runs"]:
        if r["scope"] == "all":
            lines += [f"- `{name}`: {shape}" for name, shape in r["attention"].items()]
    lines += ["", machine_line(results["machine"])]
    write_results(out, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
