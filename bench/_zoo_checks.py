"""One model of the zoo sweep (bench/zoo_sweep.py), run in its own process.

Every phase writes its result to the JSON file as soon as it ends, so a phase that hangs or
crashes the process leaves the ones before it recorded; each phase has its own time limit
(the sweep's ``--timeout``), so a slow phase does not take the others' time. Phases:
``build`` (the smallest input size the model accepts), ``fixed`` (fixed L1 to the target
through ``autoprune.prune``), ``search`` (the loss-aware search, a few iterations on synthetic
data), ``masked`` (the graph's masks against its physical removal) and, in a process of its
own, ``tp`` (Torch-Pruning 1.6.1 with L1 to the same target).
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import autoprune
from autoprune.criteria import select
from autoprune.data.synthetic import load_synthetic
from autoprune.errors import AutopruneError
from autoprune.graph import PruningGraph, build_graph, mask_channels, verify_groups
from autoprune.measure import count_macs
from autoprune.models import create_model

TARGET = 0.3
TOLERANCE = 0.005  # |reduction - target|, as the search promises
MASK_ATOL = 1e-4
CLASSES = 10
OTHER_BATCH = 3
SIZE_KWARG = {"timm": "img_size", "tv": "image_size"}


def save_load(model: nn.Module, size: int) -> nn.Module:
    """The one place the sweep saves and reloads a model (switch to autoprune.save/load here)."""
    with tempfile.TemporaryDirectory() as tmp:
        autoprune.io.save(model, Path(tmp) / "m", input_size=(3, size, size))
        return autoprune.io.load(Path(tmp) / "m", trust_factory=True)


def build(spec: str, sizes: list[int]) -> tuple[nn.Module, int]:
    """The model at the first of ``sizes`` it runs at (built for that size where it takes one)."""
    errors = []
    for size in sizes:
        kwarg = SIZE_KWARG.get(spec.partition(":")[0])
        for kwargs in ({kwarg: size}, {}) if kwarg else ({},):
            torch.manual_seed(0)
            try:
                model = create_model(spec, num_classes=CLASSES, **kwargs)
            except TypeError as e:  # no such size argument: build it without
                errors.append(e)
                continue
            except Exception as e:  # the size refused when built (a patch size): the next one
                errors.append(e)
                break
            model.eval()
            try:
                with torch.no_grad():
                    out = model(torch.zeros(1, 3, size, size))
                if isinstance(out, torch.Tensor) and out.shape == (1, CLASSES):
                    return model, size
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                errors.append(NotAClassifier(f"output {shape} is not (1, {CLASSES})"))
            except Exception as e:  # too small for the model: try the next size
                errors.append(e)
            break
    raise next((e for e in errors if isinstance(e, NotAClassifier)), errors[-1])


class NotAClassifier(ValueError):
    """The model runs but gives features, not class scores: not counted in the sweep."""


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def checks(original: nn.Module, pruned: nn.Module, size: int, target: float) -> dict[str, Any]:
    """Forward at another batch size, landing within the tolerance, save/load exact."""
    x1 = torch.zeros(1, 3, size, size)
    dense, macs = count_macs(original, x1), count_macs(pruned, x1)
    reduction = 1 - macs / dense
    x = torch.randn(OTHER_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = _outputs(pruned, x)
    result: dict[str, Any] = {
        "reduction": round(reduction, 5),
        "batch": tuple(out.shape) == (OTHER_BATCH, CLASSES) and bool(out.isfinite().all()),
        "macs": abs(reduction - target) <= TOLERANCE,
    }
    try:
        result["saveload"] = torch.equal(_outputs(save_load(pruned, size), x), out)
    except Exception as e:  # recorded as the check's failure
        result["saveload"] = False
        result["saveload_error"] = one_line(e)
    return result


def fixed(model: nn.Module, size: int) -> dict[str, Any]:
    res = autoprune.prune(
        model,
        example_inputs=torch.zeros(1, 3, size, size),
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=TARGET,
        progress=False,
    )
    return checks(model, res.model, size, TARGET)


def search(model: nn.Module, size: int, step: float = 0.15) -> dict[str, Any]:
    """The loss-aware search to the target in steps of ``step`` (a few iterations), no training."""
    data = load_synthetic(Path("."), "train", False, CLASSES, 3, size, size=32)
    res = autoprune.prune(
        model,
        example_inputs=torch.zeros(1, 3, size, size),
        train_data=data,
        schedule="auto",
        criteria=("l1", "taylor"),
        target_macs_reduction=TARGET,
        step=step,
        recover_steps=0,
        distill=False,
        calib_size=16,
        taylor_size=16,
        progress=False,
    )
    return {**checks(model, res.model, size, TARGET), "iterations": len(res.history)}


def masked(model: nn.Module, size: int) -> dict[str, Any]:
    """Masked against pruned on every group the library would prune: those
    :func:`verify_groups` leaves (it freezes the ones it finds broken)."""
    graph = build_graph(copy.deepcopy(model).eval(), torch.zeros(1, 3, size, size))
    frozen = verify_groups(graph)
    return {**masked_vs_pruned(graph, size), "frozen_by_verify": len(frozen)}


def masked_vs_pruned(graph: PruningGraph, size: int) -> dict[str, Any]:
    """Every group loses its lowest-L1 30 % at once: masked outputs must equal pruned ones."""
    removal = {
        g.name: select(g, "l1", math.floor(TARGET * g.channels))
        for g in graph.groups()
        if math.floor(TARGET * g.channels) >= 1
    }
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with mask_channels(graph, removal):
        expected = _outputs(graph.model, x)
    graph.prune(removal)
    diff = float((_outputs(graph.model, x) - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    return {"groups": len(removal), "max_diff": diff, "masked": diff <= MASK_ATOL * scale}


def torch_pruning(model: nn.Module, size: int) -> dict[str, Any]:
    """Torch-Pruning's own MetaPruner with L1 to the target, stepping its ratio 0.5 % at a
    time and stopping at the first step at or past the target (its own pass/fail)."""
    import torch_pruning as tp

    x = torch.zeros(1, 3, size, size)
    model = copy.deepcopy(model).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == CLASSES]
    dense = count_macs(model, x)
    steps = 150
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.75,
        iterative_steps=steps,
        ignored_layers=head,
    )
    for _ in range(steps):
        pruner.step()
        if count_macs(model, x) <= (1 - TARGET) * dense:
            break
    return checks_tp(model, dense, size)


def checks_tp(model: nn.Module, dense: int, size: int) -> dict[str, Any]:
    reduction = 1 - count_macs(model, torch.zeros(1, 3, size, size)) / dense
    out = _outputs(model, torch.randn(OTHER_BATCH, 3, size, size))
    return {
        "reduction": round(reduction, 5),
        "batch": tuple(out.shape) == (OTHER_BATCH, CLASSES),
        "macs": abs(reduction - TARGET) <= TOLERANCE,
    }


def one_line(e: BaseException) -> str:
    text = (str(e).splitlines() or [""])[0]
    return text[:300]


class PhaseTimeout(Exception):
    pass


def run_phase(
    record: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], out: Path, limit: float
) -> None:
    def expire(signum: int, frame: Any) -> None:
        raise PhaseTimeout(f"no answer within {limit:.0f} s")

    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        record[name] = fn()
    except PhaseTimeout as e:
        record[name] = {"error": "Timeout", "kind": "crash", "message": str(e)}
    except Exception as e:  # the sweep records every failure
        kind = {AutopruneError: "refused", NotAClassifier: "excluded"}.get(type(e), "crash")
        record[name] = {"error": type(e).__name__, "kind": kind, "message": one_line(e)}
        if kind == "crash":
            tb = traceback.extract_tb(e.__traceback__)
            record[name]["where"] = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    record[name]["seconds"] = round(time.perf_counter() - t0, 2)
    out.write_text(json.dumps(record))


def install_shim() -> None:
    """torchvision and timm import here only through the shared CPU shim (see ../shared)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tools"))
    import torchvision_cpu_shim

    torchvision_cpu_shim.install()


def main() -> None:
    install_shim()
    spec, which, out, sizes = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    limit = float(sys.argv[5])
    torch.set_num_threads(1)
    record: dict[str, Any] = {"model": spec}
    holder: dict[str, Any] = {}

    def do_build() -> dict[str, Any]:
        holder["model"], holder["size"] = build(spec, [int(s) for s in sizes.split(",")])
        params = sum(p.numel() for p in holder["model"].parameters())
        return {"input_size": holder["size"], "params": params}

    run_phase(record, "build", do_build, out, limit)
    if "model" not in holder:
        return
    model, size = holder["model"], holder["size"]
    phases = {
        "ap": {
            "fixed": lambda: fixed(model, size),
            "search": lambda: search(model, size),
            "masked": lambda: masked(model, size),
        },
        "tp": {"tp": lambda: torch_pruning(model, size)},
    }[which]
    for name, fn in phases.items():
        run_phase(record, name, fn, out, limit)


if __name__ == "__main__":
    main()
