"""MACs, parameters, latency, accuracy, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.io.export import export_onnx, export_torchscript
from autoprune.measure import (
    available_backends,
    count_macs,
    count_params,
    evaluate_batches,
    measure_latency,
    profile_model,
)
from autoprune.models import create_model


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def test_macs_match_the_formula_and_leave_the_model_untouched():
    model = tiny_net().train()
    running_mean = model[1].running_mean.clone()
    expected = 3 * 8 * 9 * 32 * 32 + 8 * 9 * 16 * 16 + 8 * 10
    assert count_macs(model, torch.randn(1, 3, 32, 32)) == expected
    assert model.training
    assert torch.equal(model[1].running_mean, running_mean)


def test_attention_matmuls_are_counted():
    class Attn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(x, x, x)

    # q @ k^T and attn @ v: 2 * tokens^2 * dim per head
    assert count_macs(Attn(), torch.randn(1, 2, 16, 8)) == 2 * 2 * 16 * 16 * 8


def test_resnet56_cost_is_the_published_one():
    model = create_model("resnet56")
    assert 124e6 <= count_macs(model, torch.zeros(1, 3, 32, 32)) <= 128e6
    assert 0.85e6 <= count_params(model) <= 0.86e6


def test_nonzero_params():
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight[:2] = 0
    assert count_params(model) == 16
    assert count_params(model, nonzero=True) == 8


def test_evaluate_batches_counts_accuracy_and_loss():
    model = nn.Identity()
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    result = evaluate_batches(nn.Sequential(model, nn.Flatten()), [(logits, labels)])
    assert result.accuracy == pytest.approx(200 / 3)
    assert result.samples == 3
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert result.loss == pytest.approx(expected, rel=1e-6)


def test_latency_is_a_median_per_batch_size():
    timings = measure_latency(tiny_net(), (3, 16, 16), batch_sizes=(1, 4), repeats=3, warmup=1)
    assert [t.batch_size for t in timings] == [1, 4]
    assert all(t.median_ms > 0 and t.repeats >= 3 for t in timings)
    profile = profile_model(tiny_net(), (3, 16, 16), backends=())
    assert profile.latency == [] and profile.macs > 0


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnxruntime not installed")
def test_onnx_export_has_a_dynamic_batch_and_matches_torch(tmp_path):
    import onnxruntime as ort

    model = create_model("resnet20").eval()
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 32, 32))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    (got,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)


def test_torchscript_export_matches_torch(tmp_path):
    model = create_model("resnet20").eval()
    path = export_torchscript(model, tmp_path / "m.pt", torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(path))(x), model(x))
