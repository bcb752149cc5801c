"""A pruning run's ``summary.json``: the model before and after, and what the search chose."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..graph import scope_report
from ..measure import count_macs, count_params, evaluate_batches
from .granularity import GRANULARITIES
from .granularity.weight import masked_count, sparse_macs
from .pruner import Inputs, Pruner
from .training import SearchData


def measure(model: nn.Module, example_inputs: Inputs, data: SearchData) -> dict[str, Any]:
    """MACs, parameters, and the metric and loss on the validation batches (None without)."""
    ev = evaluate_batches(model, data.val, data.task) if data.val is not None else None
    return {
        "macs": count_macs(model, example_inputs),
        "params": count_params(model),
        "accuracy": ev.accuracy if ev else None,
        "loss": ev.loss if ev else None,
    }


def run_summary(
    pruner: Pruner,
    *,
    model_name: str,
    data: SearchData,
    example_inputs: Inputs,
    widths_before: Mapping[str, int],
    scope_macs: Mapping[str, int],
) -> dict[str, Any]:
    """The summary of ``pruner``'s finished run (its state holds the baseline and timings)."""
    model, state = pruner.model, pruner.state
    pruned = {**measure(model, example_inputs, data), "calib_loss": state.loss}
    summary = summarize(
        model_name=model_name,
        dataset=data.dataset,
        baseline=state.baseline,
        pruned=pruned,
        widths_before=widths_before,
        widths_after=layer_widths(model),
        history=state.history,
        timings={**state.timings, "total_s": state.total_s},
        config=asdict(pruner.config.resolved()),
    )
    summary["ended_early"] = state.ended_early
    summary["frozen_by_verify"] = pruner.frozen_by_verify  # group -> what broke
    summary["scopes"] = scope_report(scope_macs, pruner.graph.macs_by_scope())
    if pruner.latency is not None:  # the stop rule was predicted: the measurement beside it
        checks = state.latency_checks
        summary["latency"] = {**pruner.latency.report(checks, state.iteration), "checks": checks}
    extra = accounting(
        model, pruner.graph.example_inputs, state.baseline["params"], pruned["macs"], state.history
    )
    summary["pruned"]["sparse_macs"] = extra.pop("sparse_macs")
    summary.update(extra)
    return summary


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
    return widths


def criteria_chosen(history: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How often each criterion picked the applied channels (criteria that picked the same
    channels share the credit: each is counted)."""
    counts: dict[str, int] = {}
    for entry in history:
        for name in entry["criteria"]:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(
    *,
    model_name: str,
    dataset: str | None,
    baseline: Mapping[str, Any],
    pruned: Mapping[str, Any],
    widths_before: Mapping[str, int],
    widths_after: Mapping[str, int],
    history: Sequence[Mapping[str, Any]],
    timings: Mapping[str, float],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """The run's ``summary.json``: before and after, per-layer widths, what the search chose."""
    return {
        "model": model_name,
        "dataset": dataset,
        "baseline": dict(baseline),
        "pruned": dict(pruned),
        "macs_reduction": 1.0 - pruned["macs"] / baseline["macs"],
        "params_reduction": 1.0 - pruned["params"] / baseline["params"],
        "layers": [
            {"name": name, "before": before, "after": widths_after.get(name, 0)}  # 0: removed
            for name, before in widths_before.items()
        ],
        "criteria_chosen": criteria_chosen(history),
        "iterations": len(history),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "config": dict(config),
    }


def accounting(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    baseline_params: int,
    dense_macs: int,
    history: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """What summary.json reports of a multi-grain run: removals per granularity, non-zero
    parameters and the compression they give, weight sparsity and the sparse MACs estimate."""
    removed = {GRANULARITIES.get(n).counts: 0 for n in GRANULARITIES.names()}
    for entry in history:
        removed[GRANULARITIES.get(entry["granularity"]).counts] += entry["count"]
    nonzero = count_params(model, nonzero=True)
    masked, total = masked_count(model)
    return {
        "nonzero_params": nonzero,
        "compression_ratio": baseline_params / max(1, nonzero),
        "weight_sparsity": masked / max(1, total),
        "sparse_macs": sparse_macs(model, example_inputs, dense_macs),
        "removed": removed,
    }
