"""The command line: listings, JSON outputs, and one-line errors with exit code 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer

from autoprune.cli import app
from autoprune.cli import prune as cli_prune
from autoprune.cli._config_options import config_parameters, config_values
from autoprune.errors import AutopruneError
from autoprune.models import create_model
from autoprune.search import PruneConfig


def test_listings_show_the_registries(cli):
    code, out, _ = cli("models")
    assert code == 0 and "resnet56" in out and "vgg19_bn" in out
    code, out, _ = cli("datasets")
    assert code == 0 and "fashion-mnist" in out and "imagefolder" in out


def test_profile_resnet56_reports_the_published_cost(cli):
    code, out, _ = cli("profile", "--model", "resnet56", "--no-latency", "--json")
    report = json.loads(out)
    assert code == 0
    assert 124e6 <= report["macs"] <= 128e6
    assert 0.85e6 <= report["params"] <= 0.86e6


def test_profile_times_each_batch_size(cli):
    code, out, _ = cli(
        "profile",
        "-m",
        "smallcnn",
        "--batch-sizes",
        "1,8",
        "--backends",
        "eager",
        "--repeats",
        "3",
        "--json",
    )
    latency = json.loads(out)["latency"]
    assert code == 0
    assert [(t["backend"], t["batch_size"]) for t in latency] == [("eager", 1), ("eager", 8)]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["eval", "--model", "resnet99", "--data", "cifar10"], "unknown model 'resnet99'; known:"),
        (["eval", "--model", "resnet20", "--data", "cifar11"], "unknown dataset 'cifar11'; known:"),
        (["eval", "-m", "resnet20", "-d", "cifar10", "--data-root", "{tmp}"], "test_batch"),
        (["eval", "-m", "resnet20", "-d", "synthetic", "-w", "{tmp}/bad.th"], "cannot read"),
        (["eval", "-m", "resnet20", "-d", "synthetic", "-w", "{tmp}/r56.th"], "layer1.3.conv1"),
        (["train", "-m", "resnet20", "-d", "synthetic", "--schedule", "zigzag"], "zigzag"),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(cli, tmp_path, monkeypatch, argv, expected):
    monkeypatch.setenv("AUTOPRUNE_DATA_ROOT", str(tmp_path))
    (tmp_path / "bad.th").write_bytes(b"not a checkpoint")
    torch.save(create_model("resnet56").state_dict(), tmp_path / "r56.th")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = cli(*argv)
    assert code == 2
    assert expected in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_errors_carry_no_traceback_from_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "autoprune", "eval", "--model", "nope", "--data", "cifar10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'nope'" in proc.stderr


def test_eval_akamaster_resnet20_on_cifar10_jpeg75(cli, shared_dir, cifar10_jpeg75_root):
    weights = shared_dir / "weights" / "cifar10-resnet-akamaster" / "resnet20-12fca82f.th"
    code, out, _ = cli(
        "eval",
        "--model",
        "resnet20",
        "--weights",
        str(weights),
        "--data",
        "cifar10",
        "--data-root",
        str(cifar10_jpeg75_root),
        "--json",
    )
    report = json.loads(out)
    assert code == 0 and report["samples"] == 10_000
    assert report["accuracy"] == pytest.approx(81.0, abs=0.3)
    assert report["macs"] == 40_551_040


def test_train_writes_a_run_and_resumes_without_redoing(cli, tmp_path):
    argv = [
        "train",
        "-m",
        "resnet20",
        "-d",
        "synthetic",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
        "--json",
    ]
    code, out, _ = cli(*argv)
    assert code == 0 and len(json.loads(out)["history"]) == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"]["name"] == "resnet20" and summary["macs"] > 0
    state = (tmp_path / "run" / "train_state.safetensors").read_bytes()
    code, out, _ = cli(*argv, "--resume")
    assert code == 0 and json.loads(out)["steps"] == 2 * 4  # 256 images / 64, nothing redone
    assert (tmp_path / "run" / "train_state.safetensors").read_bytes() == state


def test_demo_prints_the_report_and_the_exported_model(cli, tmp_path: Path) -> None:
    """The README's main job ends with the paths a user opens next, and those files exist."""
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    weights = tmp_path / "smallcnn.pt"
    torch.save(create_model("smallcnn").state_dict(), weights)
    code, out, err = cli(
        "demo", "--weights", str(weights), "--target-flops", "0.05", "--out", str(tmp_path / "d")
    )
    assert code == 0, err
    report = next(line for line in out.splitlines() if line.strip().startswith("report"))
    exported = next(line for line in out.splitlines() if line.strip().startswith("exported"))
    assert Path(report.split()[1]).is_file() and report.split()[1].endswith("report.html")
    assert Path(exported.split()[1]).is_file() and "checked against torch" in exported


# ------------------------------------------------------- prune options, generated from PruneConfig


def prune_options() -> dict[str, list[str]]:
    """Option names of ``autoprune prune`` by parameter name, as click sees them."""
    command = typer.main.get_command(app).commands["prune"]  # type: ignore[attr-defined]
    return {p.name: [*p.opts, *p.secondary_opts] for p in command.params}


def test_prune_help_lists_every_config_field(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no option name cut short
    code, help_text, _ = cli("prune", "--help")
    assert code == 0
    options = prune_options()
    for f in dataclasses.fields(PruneConfig):
        assert f.name in options, f"PruneConfig.{f.name} has no `autoprune prune` option"
        assert all(name in help_text for name in options[f.name]), f.name
    assert "--target-macs" in options["target_macs_reduction"]
    assert "--target-flops" in options["target_macs_reduction"]  # the old name still works


def test_prune_option_defaults_are_the_config_defaults():
    shown = {p.name: p.default for p in config_parameters(PruneConfig)}
    assert PruneConfig(**config_values(PruneConfig, shown)) == PruneConfig()


def test_a_config_field_without_an_option_is_refused():
    @dataclasses.dataclass
    class Settings:
        documented: int = dataclasses.field(
            default=1, metadata={"help": "x", "choices": None, "option": None, "aliases": ()}
        )
        forgotten: int = 2

    with pytest.raises(AutopruneError, match="'forgotten' has no command-line option"):
        config_parameters(Settings)


@pytest.mark.parametrize("flag", ["--target-macs", "--target-flops"])
def test_prune_options_reach_the_config(cli, monkeypatch, flag):
    seen = {}

    def fake_prune(model, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(summary={})

    monkeypatch.setattr(cli_prune.api, "prune", fake_prune)
    argv = ["prune", "-m", "resnet20", flag, "0.3", "--macs-shares", "0.4,0.6", "--json"]
    argv += ["--granularity", "block,channel", "--scorer-options", '{"keep": 0.5}', "--lr", "0.2"]
    argv += ["--weight-loss-limit", "0", "--distill-weight", "0.25", "--batch-size", "8"]
    code, _, err = cli(*argv)
    assert code == 0, err
    config = seen["config"]
    assert config.target_macs_reduction == 0.3 and config.macs_shares == (0.4, 0.6)
    assert config.scorer_options == {"keep": 0.5} and config.weight_loss_limit is None
    assert config.recovery.lr == 0.2 and config.finetune.lr == PruneConfig().finetune.lr
    assert config.distill_weight == 0.25 and config.granularity == ("block", "channel")
    assert {t.batch_size for t in (config.recovery, config.finetune, config.adaptation)} == {8}
    assert seen["schedule"] is None  # not chosen: a transfer run picks its own
