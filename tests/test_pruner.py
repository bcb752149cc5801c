"""The Pruner: stepping it by hand is prune(), its state resumes it, the README example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _small import EXAMPLE, SMALL, TRAIN

import autoprune
from autoprune.errors import AutopruneError
from autoprune.models import create_model
from autoprune.search import PruneConfig, Pruner

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIG = PruneConfig(**{**SMALL, "recover_steps": 0, "distill": False})


@pytest.fixture(scope="module")
def smallcnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("smallcnn")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def decisions(history: list[dict]) -> list[tuple]:
    return [(h["granularity"], h["removed"], h["criteria"], h["loss"]) for h in history]


def readme_block() -> str:
    text = README.read_text()
    marker = "<!-- tests/test_pruner.py runs this block -->"
    match = re.search(re.escape(marker) + r"\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its Pruner example"
    return match.group(1)


def test_readme_example_steps_to_the_same_model_as_prune(capsys):
    scope: dict = {}
    exec(compile(readme_block(), str(README), "exec"), scope)  # asserts bit-equality itself
    pruner, result = scope["pruner"], scope["result"]
    assert same_weights(pruner.model, result.model)
    assert decisions(pruner.history) == decisions(result.history)
    assert len(pruner.history) >= 2 and pruner.macs_reduction >= 0.2 - 0.005
    recovered = [h["loss_recovered"] for h in result.history if h["loss_recovered"] is not None]
    assert recovered  # the user's training ran as the recovery
    assert capsys.readouterr().out.count("MACs -") == len(pruner.history)
    assert not same_weights(scope["model"], pruner.model)  # the user's model is left as it was


def test_step_chooses_the_best_scored_candidate(smallcnn):
    pruner = Pruner(smallcnn, EXAMPLE, CONFIG, calib_data=TRAIN)
    candidates = pruner.candidates()
    losses = pruner.score(candidates)
    assert len(losses) == len(candidates) > 1
    best = candidates[min(range(len(losses)), key=losses.__getitem__)]
    entry = pruner.step()
    assert entry is not None and entry["loss"] == min(losses)
    assert entry["group"] == best.group and entry["channels"] == len(best.idxs)
    assert pruner.history == [entry] and pruner.macs_reduction == entry["macs_reduction"]


def chain(width: int = 16, depth: int = 6) -> torch.nn.Module:
    """Convolutions of one width in a row: no group alone can give half of the MACs."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU()]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10)]
    return torch.nn.Sequential(*layers)


def test_a_step_no_group_can_give_is_filled_from_the_next_best_groups():
    settings = {"recover_steps": 0, "distill": False, "step": 0.5, "target_macs_reduction": 0.6}
    pruner = Pruner(chain(), EXAMPLE, PruneConfig(**{**SMALL, **settings}), calib_data=TRAIN)
    candidates = pruner.candidates()
    most = max(c.macs_saved for c in candidates) / pruner.original_macs
    assert most < 0.5 - 0.005  # a single group falls short of the step
    entry = pruner.step()
    assert entry is not None and len(entry["removed"]) >= 2 and entry["group"] is None
    assert entry["scorer"]["filled_groups"] == len(entry["removed"]) - 1
    assert abs(entry["macs_reduction"] - 0.5) <= 0.005  # a whole step
    assert entry["loss"] == pytest.approx(pruner.calib_loss("now"), rel=1e-5)
    while pruner.step() is not None:
        pass
    assert abs(pruner.macs_reduction - 0.6) <= 0.005 and len(pruner.history) <= 3


def test_state_dict_resumes_to_the_uninterrupted_result(smallcnn):
    whole = Pruner(smallcnn, EXAMPLE, CONFIG, calib_data=TRAIN)
    while whole.step() is not None:
        pass
    first = Pruner(smallcnn, EXAMPLE, CONFIG, calib_data=TRAIN)
    first.step()
    first.step()
    resumed = Pruner(smallcnn, EXAMPLE, CONFIG, calib_data=TRAIN)
    resumed.load_state_dict(first.state_dict())
    while resumed.step() is not None:
        pass
    assert same_weights(resumed.model, whole.model)
    assert decisions(resumed.history) == decisions(whole.history)
    with pytest.raises(AutopruneError, match=r"other settings.*step"):
        other = PruneConfig(**{**SMALL, "recover_steps": 0, "distill": False, "step": 0.02})
        Pruner(smallcnn, EXAMPLE, other, calib_data=TRAIN).load_state_dict(first.state_dict())


def test_fixed_schedule_has_no_candidates_and_needs_no_data(smallcnn):
    config = PruneConfig(schedule="fixed", criteria=("l1",), target_macs_reduction=0.3)
    pruner = Pruner(smallcnn, EXAMPLE, config)
    with pytest.raises(AutopruneError, match="scores no candidates"):
        pruner.candidates()
    while pruner.step() is not None:
        pass
    assert pruner.macs_reduction >= 0.3 - 0.005
    assert autoprune.count_macs(pruner.model, EXAMPLE) < autoprune.count_macs(smallcnn, EXAMPLE)


def test_a_loss_aware_pruner_without_data_is_refused(smallcnn):
    with pytest.raises(AutopruneError, match="needs data"):
        Pruner(smallcnn, EXAMPLE, CONFIG)
