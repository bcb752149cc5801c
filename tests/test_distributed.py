"""Pruning under torch.distributed: two CPU processes (gloo) must prune like one.

Two processes with a total batch of 32 (16 each) and one process with a batch of 32 train on
the same images, so they end with the same model up to float rounding: the gradient
all-reduce averages two half-batch means where one process takes one mean, and batch norm
combines two halves' statistics. Measured: ~4e-7; asserted: ``ATOL``. Every candidate's loss
is computed exactly as in one process (same images, same operations), so the decisions are
the same and the scorers' losses are equal bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _small import EXAMPLE, SMALL, TRAIN, VAL

import autoprune
from autoprune import cli, distributed
from autoprune.data import make_loader
from autoprune.errors import AutopruneError
from autoprune.graph import build_graph
from autoprune.io import load
from autoprune.models import create_model
from autoprune.search import OBJECTIVES, SCORERS, CalibrationSet, RunDir, create_scorer
from autoprune.search import _trials as trials
from autoprune.search import training as search_training
from autoprune.search.candidates import criteria_state, make_candidates, removable

WORLD = 2
ATOL = 1e-5

# What the command-line run does: resnet20 on synthetic images, two iterations, one recovery.
CLI_ARGV = ["prune", "-m", "resnet20", "-d", "synthetic", "--input-size", "16"]
CLI_ARGV += ["--target-flops", "0.1", "--step", "0.05", "--criteria", "l1,fpgm", "--calib-size"]
CLI_ARGV += ["16", "--recover-every", "0.1", "--recover-steps", "1", "--batch-size", "16"]


def prune(out_dir: Path | None, resume: bool = False) -> autoprune.PruneResult:
    torch.manual_seed(0)
    model = create_model("smallcnn")
    return autoprune.prune(
        model,
        train_data=TRAIN,
        val_data=VAL,
        out_dir=out_dir,
        resume=resume,
        progress=False,
        **SMALL,
    )


def score_one_step() -> dict[str, list[float]]:
    """Every scorer's losses for the first step's candidates of a fresh smallcnn."""
    torch.manual_seed(0)
    graph = build_graph(create_model("smallcnn"), EXAMPLE)
    calib = CalibrationSet.from_data(TRAIN, 32, batch_size=8)
    pool = ("l1", "fpgm", "taylor")
    limits = {g.name: removable(g, g.channels, 0.75) for g in graph.groups()}
    state = criteria_state(graph, pool, calib, 0, 16)
    candidates = make_candidates(graph, pool, 0.05 * graph.macs(), limits, state)
    objective = OBJECTIVES.get("loss")(calib.loss(graph.model))
    options = {"fast": {"min_images": 8, "min_keep": 2}}
    return {
        name: create_scorer(name, **options.get(name, {}))(graph, candidates, calib, objective)
        for name in SCORERS.names()
    }


def count_masks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the candidate trials (one masked copy per candidate and batch) from now on, alone
    (a mask) or stacked (a stacked mask of one copy per candidate)."""
    calls, real, real_stacked = [0], trials.mask_channels, trials.StackedMask

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    def stacked(removals):
        calls[0] += len(removals)
        return real_stacked(removals)

    monkeypatch.setattr(trials, "mask_channels", counted)
    monkeypatch.setattr(trials, "StackedMask", stacked)
    return calls


def interrupted_then_resumed(out: Path) -> autoprune.PruneResult:
    """A run killed inside its second recovery, then resumed."""
    real, calls = search_training.fit, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(search_training, "fit", killed)
        with pytest.raises(KeyboardInterrupt):
            prune(out)
    return prune(out, resume=True)


def worker(out: Path) -> None:
    """One rank, started by torchrun (this file is its script): prune through the API (once
    through, once interrupted and resumed) and the CLI, score one step with every scorer, then
    make rank 1 diverge and check it is caught."""
    torch.set_num_threads(1)
    stdout = io.StringIO()  # outside the session, which sends rank 1's output to /dev/null
    with contextlib.redirect_stdout(stdout), distributed.torchrun_session():
        rank = distributed.rank()
        masks = count_masks(pytest.MonkeyPatch())  # the process ends: no undo needed
        result = prune(out / "run")
        scores = score_one_step()
        masked = masks[0]
        resumed = interrupted_then_resumed(out / "resumed")
        cli.main([*CLI_ARGV, "--out", str(out / "cli"), "--no-progress"])
        weights = {k: v.clone() for k, v in result.model.state_dict().items()}
        if rank == 1:
            with torch.no_grad():
                next(result.model.parameters())[0].add_(1e-3)
        diverged = None
        try:
            distributed.check_in_sync(result.model, "in the test")
        except AutopruneError as error:
            diverged = str(error)
    saved = {"weights": weights, "history": result.history, "scores": scores}
    saved |= {"resumed": resumed.model.state_dict(), "resumed_history": resumed.history}
    saved |= {"masks": masked, "diverged": diverged, "stdout": stdout.getvalue()}
    torch.save(saved, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("ddp")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += [f"--nproc-per-node={WORLD}", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOPRUNE_DATA_ROOT": str(out)}
    done = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out


@pytest.fixture(scope="module")
def one_rank() -> tuple[autoprune.PruneResult, dict[str, list[float]], int]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        masks = count_masks(monkeypatch)
        return prune(None), score_one_step(), masks[0]


def decisions(history: list[dict]) -> list[tuple]:
    return [(h["group"], tuple(h["criteria"]), h["removed"]) for h in history]


# ------------------------------------------------------------------------- two processes


def test_both_ranks_end_with_identical_parameters(two_ranks):
    (r0, r1), _ = two_ranks
    assert r0["weights"].keys() == r1["weights"].keys()
    for name, tensor in r0["weights"].items():
        assert torch.equal(tensor, r1["weights"][name]), name


def test_two_processes_equal_one_with_the_same_seed_and_total_batch(two_ranks, one_rank):
    (r0, _), _ = two_ranks
    single, _, _ = one_rank
    assert decisions(r0["history"]) == decisions(single.history)
    assert any(h["loss_recovered"] is not None for h in single.history)
    reference = single.model.state_dict()
    assert r0["weights"].keys() == reference.keys()
    for name, tensor in r0["weights"].items():
        torch.testing.assert_close(tensor, reference[name], atol=ATOL, rtol=0, msg=name)
    for a, b in zip(r0["history"], single.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_candidates_are_shared_out_and_scored_exactly_as_in_one_process(two_ranks, one_rank):
    (r0, r1), _ = two_ranks
    _, scores, masks = one_rank
    assert r0["scores"] == r1["scores"] == scores  # bit for bit, every scorer
    assert 0 < r0["masks"] < masks and r0["masks"] + r1["masks"] == masks  # split, not repeated


def test_an_interrupted_run_resumes_under_torchrun_to_the_uninterrupted_result(two_ranks):
    for rank in two_ranks[0]:
        assert rank["resumed"].keys() == rank["weights"].keys()
        for name, tensor in rank["resumed"].items():
            assert torch.equal(tensor, rank["weights"][name]), name
        assert decisions(rank["resumed_history"]) == decisions(rank["history"])


def test_a_diverged_rank_is_caught_on_every_rank(two_ranks):
    (r0, r1), _ = two_ranks
    for rank in (r0, r1):
        assert rank["diverged"] is not None and "rank 1's model differs" in rank["diverged"]


def test_rank_0_wrote_the_run_directory(two_ranks):
    (r0, _), out = two_ranks
    run = out / "run"
    assert {"state.safetensors", "summary.json", "history.jsonl", "model"} <= {
        p.name for p in run.iterdir()
    }
    reloaded = load(run / "model")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, r0["weights"][name]), name


def test_the_cli_under_torchrun_prints_once_and_rank_0_writes(two_ranks):
    (r0, r1), out = two_ranks
    assert r0["stdout"].count("criteria chosen") == 1 and r1["stdout"] == ""
    summary = json.loads((out / "cli" / "summary.json").read_text())
    assert abs(summary["macs_reduction"] - 0.1) <= 0.005 and summary["iterations"] == 2


# -------------------------------------------------------------------------- one process


def test_one_process_is_rank_0_of_1():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_gather({"a": 1}) == [{"a": 1}]
    assert distributed.share_map(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    distributed.check_in_sync(torch.nn.Linear(2, 2), "alone")  # nothing to compare with
    distributed.barrier()


def test_checksum_sees_values_shapes_and_channel_order():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    before = distributed.checksum(conv)
    with torch.no_grad():
        conv.weight.copy_(conv.weight[[1, 0, 2, 3]])  # same values, two channels swapped
    assert distributed.checksum(conv) != before
    assert distributed.checksum(conv) == distributed.checksum(conv)


def test_shards_of_a_batch_are_the_batch_split_in_equal_parts():
    loader = make_loader(TRAIN, 32, train=True, seed=3)  # shuffled and augmented
    loader.set_epoch(5)
    shards = [loader.shard(r, 4) for r in range(4)]
    for shard in shards:
        shard.set_epoch(5)
    assert all(len(s) == len(loader) for s in shards)
    for whole, *parts in zip(loader, *shards, strict=True):
        assert all(len(y) == 8 for _, y in parts)
        assert torch.equal(torch.cat([x for x, _ in parts]), whole[0])
        assert torch.equal(torch.cat([y for _, y in parts]), whole[1])
    with pytest.raises(AutopruneError, match="does not split evenly over 3 processes"):
        loader.shard(0, 3)


def test_only_rank_0_writes_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    run = RunDir(tmp_path / "run")
    run.checkpoint({"iteration": 1}, [{"iteration": 1}])
    assert not run.path.exists()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
