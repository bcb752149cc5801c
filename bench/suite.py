"""Run every benchmark, one after another, each in its own process.

The order puts what others read first: bench/search_quality.py saves the exhaustive search's
model that bench/quality.py loads, and bench/quality.py saves the pruned models whose latency
bench/speed.py measures. The suite stops at the first failure.

    python bench/suite.py            # every benchmark at full size: hours, writes docs/benchmarks/
    python bench/suite.py --smoke    # smoke sizes, for CI; a script's output shows if it fails
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import SMOKE

BENCH = Path(__file__).resolve().parent
SCRIPTS = (  # a script, with its arguments where it runs more than once
    "search_quality.py",
    "quality.py",
    "search_cost.py",
    "speed.py",
    "latency.py --finetune-seeds 0,1",
    "latency.py --model mobilenetv2",
    "scorer_tricks.py",
    "search_speed.py",
    "objective_distill.py",
    "distributed_scoring.py",
    "multigrain.py",
    "mobilevit.py",
    "transfer.py",
    "custom_layers.py",
    "graph_verify.py",
    "fixed_landing.py",
    "zoo_sweep.py",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every script with --smoke")
    args = parser.parse_args()
    extra = ["--smoke"] if args.smoke else []
    if args.smoke:
        # A smoke run starts clean: a search state left by an older version would be refused.
        shutil.rmtree(SMOKE, ignore_errors=True)
    total = time.perf_counter()
    for name in SCRIPTS:
        script, *script_args = name.split()
        print(f"+ python bench/{name} {' '.join(extra)}".rstrip(), flush=True)
        start, cpu = time.perf_counter(), _children_cpu()
        # A smoke run's output matters only when it fails; a full run's progress is worth seeing.
        done = subprocess.run(
            [sys.executable, str(BENCH / script), *script_args, *extra],
            capture_output=args.smoke,
            text=True,
            check=False,
        )
        seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
        if done.returncode != 0:
            if args.smoke:
                print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            sys.exit(
                f"bench/{name} failed (exit {done.returncode}) after {seconds:.0f} s; "
                "the suite stops here"
            )
        # On a shared machine the wall time depends on the others; the CPU time much less.
        print(f"  bench/{name}: {seconds:.0f} s ({cpu:.0f} s of CPU)", flush=True)
    print(f"suite done in {time.perf_counter() - total:.0f} s", flush=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
