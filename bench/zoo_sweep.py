"""Zoo sweep: every torchvision classification model and the smallest timm models of every
family, pruned by autoprune (fixed L1 and the loss-aware search) and by Torch-Pruning 1.6.1.

Each model runs in processes of its own (bench/_zoo_checks.py), each phase under a timeout, so
a hang or a crash is recorded, not fatal. Checks per run: forward at another batch size, MACs within
0.5 % of the -30 % target, save/load exact; for the graph, masked == pruned outputs when every
group loses its lowest-L1 30 % at once. Writes docs/benchmarks/zoo_sweep.{json,md}.

    python bench/zoo_sweep.py --jobs 2            # the full sweep
    python bench/zoo_sweep.py --only 'timm:vit*'  # rerun some models, merged into the table
    python bench/zoo_sweep.py --failed            # rerun the models that did not pass, merged
    python bench/zoo_sweep.py --smoke             # a few models, for CI, into /tmp
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import zip_longest
from pathlib import Path
from typing import Any

from _common import DOCS, SMOKE, machine, machine_line, write_results
from _zoo_checks import install_shim

BENCH = Path(__file__).resolve().parent
SMOKE_MODELS = ("tv:resnet18", "timm:convnext_atto")  # a plain CNN, layer scales
TIMM_PER_FAMILY = 1  # the smallest model of every timm family, then the next smallest overall
TIMM_MODELS = 120
PHASES = ("fixed", "search", "masked")
CHECKS = ("batch", "macs", "saveload")


def torchvision_models() -> list[str]:
    import torchvision

    return [f"tv:{n}" for n in sorted(torchvision.models.list_models(module=torchvision.models))]


def timm_models() -> list[str]:
    """Per timm module (family) its smallest model by parameter count (built on the meta
    device: no memory, no weights), then the next smallest ones up to ``TIMM_MODELS``."""
    import timm
    import torch

    ranked: dict[str, list[tuple[int, str]]] = {}
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            try:
                with torch.device("meta"):
                    net = timm.create_model(name, num_classes=10)
            except Exception:  # a model that cannot be built is not swept
                continue
            ranked.setdefault(module, []).append((sum(p.numel() for p in net.parameters()), name))
    for models in ranked.values():
        models.sort()
    chosen = [m[0] for m in ranked.values()][:TIMM_MODELS]
    rest = sorted(m for models in ranked.values() for m in models[TIMM_PER_FAMILY:])
    chosen += rest[: max(0, TIMM_MODELS - len(chosen))]
    family = {name: module for module, models in ranked.items() for _, name in models}
    return [f"timm:{name}|{family[name]}" for _, name in sorted(chosen, key=lambda m: m[1])]


def run_model(
    spec: str, sizes: str, timeout: float, tp_record: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Both processes of one model; a timeout or crash marks the phases it did not finish.
    ``tp_record``: Torch-Pruning's result from an earlier sweep, kept instead of rerun."""
    name, _, family = spec.partition("|")
    default = "torchvision" if name.startswith("tv:") else "timm"
    record: dict[str, Any] = {"model": name, "family": family or default, "commit": _commit()}
    if tp_record is not None:
        record["tp"] = tp_record
    processes = (("ap", PHASES),) if tp_record is not None else (("ap", PHASES), ("tp", ("tp",)))
    for which, phases in processes:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            script = str(BENCH / "_zoo_checks.py")
            cmd = [sys.executable, script, name, which, tmp.name, sizes, str(timeout)]
            # each phase stops itself at ``timeout``; this catches a hang in native code
            whole = timeout * (len(phases) + 1) + 60
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=whole)
                failure = f"process died (exit {done.returncode}): {_last_line(done.stderr)}"
            except subprocess.TimeoutExpired:
                failure = f"no answer within {whole:.0f} s"
            text = Path(tmp.name).read_text()
        part = json.loads(text) if text else {}
        record.update(part)
        for phase in ("build", *phases):
            if phase not in record:
                record[phase] = {
                    "error": "Timeout" if "within" in failure else "Died",
                    "kind": "crash",
                    "message": failure,
                }
            if phase == "build" and "error" in record["build"]:
                break
    return record


def _commit() -> str:
    """The autoprune commit a record was measured on: a merged table mixes sweeps."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def passed(record: dict[str, Any], phase: str) -> bool:
    r = record.get(phase, {})
    if "error" in r:
        return False
    if phase == "masked":
        return bool(r.get("masked"))
    wanted = CHECKS if phase != "tp" else ("batch", "macs")
    return all(r.get(c) for c in wanted)


def model_passes(record: dict[str, Any]) -> bool:
    """(a) and (b): fixed and search each pass their checks, and masked == pruned."""
    return all(passed(record, p) for p in PHASES)


def cell(record: dict[str, Any], phase: str) -> str:
    r = record.get(phase)
    if r is None:
        return "–"
    if "error" in r:
        return f"**{r['kind']}** {r['error']}: {r['message'][:140]}".replace("|", "/")
    if phase == "masked":
        return f"{'ok' if r['masked'] else 'FAIL'} ({r['max_diff']:.1e}, {r['groups']} groups)"
    failed = [c for c in (CHECKS if phase != "tp" else ("batch", "macs")) if not r.get(c)]
    mark = "ok" if not failed else "FAIL " + ",".join(failed)
    return f"{mark} -{100 * r['reduction']:.1f} %, {r['seconds']:.0f} s"


def excluded(record: dict[str, Any]) -> bool:
    """Not a classifier (its output is not ``(batch, classes)``): listed, not counted."""
    return record.get("build", {}).get("kind") == "excluded"


def totals(records: list[dict[str, Any]], source: str) -> dict[str, Any]:
    mine = [r for r in records if r["model"].partition(":")[0] == source]
    rows = [r for r in mine if not excluded(r)]
    n = len(rows)
    both = sum(model_passes(r) for r in rows)
    tp = sum(passed(r, "tp") for r in rows)
    return {
        "models": n,
        "families": len({r["family"] for r in rows}),
        "pass_both": both,
        "pass_both_pct": round(100 * both / n, 1) if n else 0.0,
        **{f"pass_{p}": sum(passed(r, p) for r in rows) for p in PHASES},
        "tp_pass": tp,
        "tp_pass_pct": round(100 * tp / n, 1) if n else 0.0,
        "excluded": [r["model"] for r in mine if excluded(r)],
    }


def _by_commit(result: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for r in result["runs"]:
        counts[r.get("commit", "earlier")] = counts.get(r.get("commit", "earlier"), 0) + 1
    return ", ".join(f"{c} {n}" for c, n in counts.items())


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Zoo sweep: torchvision and timm models, autoprune against Torch-Pruning 1.6.1",
        "",
        "Written by `bench/zoo_sweep.py`. Each model (random weights, 10 classes) at the "
        "smallest of "
        f"{result['sizes']} px it runs at. (a) fixed: `autoprune.prune(schedule='fixed', "
        "criteria='l1', target_macs_reduction=0.3)`; (b) search: the loss-aware search "
        "(l1, taylor) to -30 % in steps of 15 % on synthetic data, no training. Checks: "
        "`batch` forward at batch 3, `macs` reduction within 0.5 % of -30 % (FlopCounterMode), "
        "`saveload` outputs identical after `autoprune.io.save`/`load`; masked: every group "
        "loses its lowest-L1 30 % at once, masked outputs == pruned outputs (1e-4 of the "
        "largest output where that is above 1: the difference shown is absolute). A model "
        "passes when (a), (b) and masked all pass. Torch-Pruning: `MetaPruner` with "
        "`GroupMagnitudeImportance(p=1)`, ratio stepped 0.5 % at a time up to -30 % MACs; it "
        "passes when it runs, forwards at batch 3 and lands within 0.5 %. Timeout per phase: "
        f"{' s, or '.join(f'{t:g}' for t in result.get('timeouts', [result['timeout']]))} s "
        "(a merged table: each model under the timeout of the sweep that last ran it).",
        "",
        machine_line(result["machine"]),
        "",
        f"{len(result['runs'])} of the {len(result['models'])} listed models were run "
        f"({result['seconds']:.0f} s). Records by the commit they were measured on (a merged "
        f"table mixes sweeps; 'earlier': before commits were recorded): {_by_commit(result)}.",
        "",
        "| | models | families | pass (a)+(b) | fixed | search | masked | Torch-Pruning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label in (("torchvision", "torchvision"), ("timm", "timm")):
        t = result["totals"][key]
        lines.append(
            f"| {label} | {t['models']} | {t['families']} | {t['pass_both']} "
            f"({t['pass_both_pct']} %) | {t['pass_fixed']} | {t['pass_search']} | "
            f"{t['pass_masked']} | {t['tp_pass']} ({t['tp_pass_pct']} %) |"
        )
    left_out = [m for key in ("torchvision", "timm") for m in result["totals"][key]["excluded"]]
    if left_out:
        lines += [
            "",
            "Not counted, not classifiers (their output is not (batch, classes)): "
            + ", ".join(left_out)
            + ".",
        ]
    lines += [
        "",
        "| model | family | px | (a) fixed | (b) search | masked | Torch-Pruning |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        size = r.get("build", {}).get("input_size", "–")
        if "error" in r.get("build", {}):
            cells = [cell(r, "build")] + ["–"] * 3
        else:
            cells = [cell(r, p) for p in (*PHASES, "tp")]
        lines.append(f"| {r['model']} | {r['family']} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel")
    parser.add_argument(
        "--only", help="fnmatch patterns on 'tv:NAME' / 'timm:NAME', comma-separated; merged"
    )
    parser.add_argument(
        "--failed", action="store_true", help="rerun the recorded models that did not pass; merged"
    )
    parser.add_argument("--smoke", action="store_true", help=f"{len(SMOKE_MODELS)} models, /tmp")
    parser.add_argument("--input-size", type=int, default=32, help="smallest size tried (px)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per phase")
    parser.add_argument(
        "--reuse-tp",
        action="store_true",
        help="keep Torch-Pruning's recorded results (they do not depend on autoprune's code)",
    )
    args = parser.parse_args()
    install_shim()
    if args.smoke:
        args.jobs = max(args.jobs, 2)
    tried = {args.input_size, 64, 96, 112, 128, 192, 224, 240, 256}
    sizes = ",".join(str(s) for s in sorted(tried) if s >= args.input_size)
    out = (SMOKE if args.smoke else DOCS) / "zoo_sweep"
    old = (
        json.loads(out.with_suffix(".json").read_text())
        if out.with_suffix(".json").exists()
        else {}
    )
    if args.smoke:
        specs = list(SMOKE_MODELS)
    else:
        specs = old.get("models") or [*torchvision_models(), *timm_models()]
    recorded = {r["model"]: r for r in old.get("runs", [])}
    old_timeout = old.get("timeout", 0.0)
    patterns = args.only.split(",") if args.only else []
    selected = [
        s
        for s in specs
        if (not args.only or any(fnmatch.fnmatch(s.partition("|")[0], p) for p in patterns))
        and (not args.failed or not model_passes(recorded.get(s.partition("|")[0], {})))
    ]
    start = time.perf_counter()
    fresh: dict[str, dict[str, Any]] = {}
    kept = recorded if args.only or args.failed else {}
    earlier = old.get("seconds", 0.0) if kept else 0.0  # a merged table counts both sweeps
    lock = threading.Lock()

    def write() -> dict[str, Any]:
        """The results so far: written after every model, so a cut-short sweep leaves them."""
        done = {**kept, **fresh}
        runs = [done[m] for m in (s.partition("|")[0] for s in specs) if m in done]
        result = {
            "models": specs,
            "sizes": sizes,
            "timeout": args.timeout,
            "timeouts": sorted({*old.get("timeouts", [old_timeout] if kept else []), args.timeout}),
            "machine": machine(),
            "seconds": round(earlier + time.perf_counter() - start, 1),
            "totals": {"torchvision": totals(runs, "tv"), "timm": totals(runs, "timm")},
            "runs": runs,
        }
        write_results(out, result, markdown(result))
        return result

    def one(spec: str) -> None:
        name = spec.partition("|")[0]
        tp = recorded.get(name, {}).get("tp") if args.reuse_tp else None
        if tp is not None and tp.get("error") == "Timeout" and args.timeout > old_timeout:
            tp = None  # a timeout is rerun where the timeout is longer this time
        record = run_model(spec, sizes, args.timeout, tp)
        with lock:
            fresh[record["model"]] = record
            write()
        print(f"{record['model']}: {'pass' if model_passes(record) else 'FAIL'}", flush=True)

    write()  # the model list first: a rerun need not rank timm's models again
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, interleaved(selected)))
    print(json.dumps(write()["totals"], indent=1))


def interleaved(specs: list[str]) -> list[str]:
    """torchvision and timm models taken in turn, smallest first, so that a sweep cut short
    covers both and as many models as it can."""
    tv = sorted((s for s in specs if s.startswith("tv:")), key=_params)
    other = sorted((s for s in specs if not s.startswith("tv:")), key=_params)
    return [s for pair in zip_longest(tv, other) for s in pair if s is not None]


def _params(spec: str) -> int:
    """Parameter count of a model built on the meta device (no memory, no weights)."""
    import torch

    from autoprune.models import create_model

    try:
        with torch.device("meta"):
            net = create_model(spec.partition("|")[0], num_classes=10)
    except Exception:  # built for real later, where the failure is recorded
        return 0
    return sum(p.numel() for p in net.parameters())


if __name__ == "__main__":
    main()
