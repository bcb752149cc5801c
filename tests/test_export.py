"""Checked export: the written file computes what the pruned model does, at any batch size,
and is timed against eager; the CLI command and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import autoprune
from autoprune._registry import Registry
from autoprune.errors import AutopruneError
from autoprune.io import load
from autoprune.io.export import FORMATS, ExportFormat, export_torchscript, run_torchscript
from autoprune.io.export_check import export_checked
from autoprune.measure import available_backends, measure_latency
from autoprune.models import create_model

# 24 pixels: the adaptive 3x3 pool then divides its input, which ONNX requires.
EXAMPLE = torch.zeros(1, 1, 24, 24)
FAST = {"batch_sizes": (1,), "repeats": 2, "warmup": 1}


def formats_here() -> list:
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                not FORMATS.get(name).available(), reason=f"{name} runtime not installed"
            ),
        )
        for name in FORMATS.names()
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished data-free pruning run of a small CNN (seconds)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    autoprune.prune(
        create_model("smallcnn"),
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=0.4,
        example_inputs=EXAMPLE,
        out_dir=out,
        progress=False,
    )
    return out


def run_file(name: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """The exported file run by its own runtime, independently of autoprune's runners."""
    if name == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    return torch.jit.load(str(path))(x)


@pytest.mark.parametrize("name", formats_here())
def test_export_matches_the_pruned_model_at_any_batch_size(run, tmp_path, name):
    model = load(run / "model").eval()
    result = export_checked(model, tmp_path / f"m{name}", EXAMPLE, format=name, **FAST)
    assert result.path.is_file() and result.format == name
    assert 0 <= result.max_abs_diff <= result.tolerance
    with torch.no_grad():
        for batch_size in (1, 3):
            x = torch.randn(batch_size, *EXAMPLE.shape[1:])
            got = run_file(name, result.path, x)
            assert got.shape == (batch_size, 10)
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=0)
    assert [lat.backend for lat in result.eager + result.exported] == ["eager", result.runtime]
    assert result.speedups[0] == pytest.approx(
        result.eager[0].median_ms / result.exported[0].median_ms
    )


def test_an_export_that_computes_something_else_is_refused(run, tmp_path, monkeypatch):
    off = ExportFormat(
        ".pt", "torchscript", export_torchscript, lambda p: lambda x: run_torchscript(p)(x) + 0.01
    )
    formats = Registry[ExportFormat]("export format")
    formats.register("torchscript")(off)
    monkeypatch.setattr("autoprune.io.export_check.FORMATS", formats)
    with pytest.raises(AutopruneError, match=r"does not match the torch model: max abs difference"):
        export_checked(load(run / "model"), tmp_path / "m.pt", EXAMPLE, format="torchscript")


@pytest.mark.skipif(not FORMATS.get("onnx").available(), reason="onnxruntime not installed")
def test_a_model_onnx_cannot_express_is_a_clear_error(tmp_path):
    model = create_model("smallcnn")  # at 16 pixels its 3x3 adaptive pool gets a 4x4 map
    with pytest.raises(AutopruneError, match="cannot export SmallCNN to ONNX: Unsupported"):
        export_checked(model, tmp_path / "m.onnx", torch.zeros(1, 1, 16, 16), **FAST)


def test_every_export_format_is_a_latency_backend():
    runtimes = [FORMATS.get(n).runtime for n in FORMATS.names() if FORMATS.get(n).available()]
    assert set(runtimes) <= set(available_backends())
    (lat,) = measure_latency(create_model("smallcnn"), (1, 16, 16), backend="torchscript", **FAST)
    assert lat.backend == "torchscript" and lat.median_ms > 0


@pytest.mark.skipif(not FORMATS.get("onnx").available(), reason="onnxruntime not installed")
def test_cli_exports_a_run_to_onnx(cli, run):
    code, out, _ = cli("export", str(run), "--batch-sizes", "1,2", "--repeats", "2", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["path"] == str(run / "model.onnx") and Path(report["path"]).is_file()
    assert report["max_abs_diff"] <= report["tolerance"] == 1e-4
    assert [lat["batch_size"] for lat in report["exported"]] == [1, 2]
    assert [lat["backend"] for lat in report["exported"]] == ["onnxruntime"] * 2


def test_cli_exports_a_saved_model_to_torchscript(cli, run, tmp_path):
    target = tmp_path / "deploy" / "pruned.pt"
    code, out, _ = cli(
        "export", str(run / "model"), "-f", "torchscript", "--out", str(target), "--repeats", "2"
    )
    assert code == 0 and target.is_file()
    assert f"wrote {target} (torchscript, dynamic batch): matches torch within 0.0001" in out
    assert out.count("ms  torchscript") == 2  # batch 1 and 64


@pytest.mark.parametrize(
    ("leave", "expected"),
    [(None, "holds no model"), ("state.safetensors", "unfinished pruning run")],
)
def test_cli_refuses_a_directory_without_a_model(cli, tmp_path, leave, expected):
    if leave:
        (tmp_path / leave).write_bytes(b"")
    code, _, err = cli("export", str(tmp_path), "--format", "torchscript")
    assert code == 2 and expected in err and "Traceback" not in err


def test_cli_refuses_an_unknown_format(cli, run):
    code, _, err = cli("export", str(run), "--format", "tflite")
    assert code == 2 and "unknown export format 'tflite'; known: onnx, torchscript" in err
