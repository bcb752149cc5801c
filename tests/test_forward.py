"""The forward-pass tools: every mode, hook and forward is put back, also on an exception."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune._forward import eval_mode, hooked, kept_modes, patched_forwards, run_eval
from autoprune.search.granularity.weight import mask_weights, sparse_macs


def frozen_norm_net() -> nn.Sequential:
    """A training model whose norm is kept in eval (a frozen BatchNorm)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    net[1].eval()
    return net


def modes(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def test_modes_come_back_per_module_also_on_an_exception():
    net = frozen_norm_net()
    before = modes(net)
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(modes(net))
        raise RuntimeError
    assert modes(net) == before
    with kept_modes(net):
        net.train()
    assert modes(net) == before


def test_a_recording_pass_leaves_weights_statistics_and_hooks_as_they_were():
    net, x = frozen_norm_net(), torch.randn(2, 3, 8, 8)
    net[1].train()
    stats = net[1].running_mean.clone()
    seen = []
    with hooked([(net[0], lambda m, args, out: seen.append(out.shape))]):
        out = run_eval(net, (x,))
    assert seen == [(2, 4, 6, 6)] and not out.requires_grad
    assert torch.equal(net[1].running_mean, stats) and net[1].training
    with pytest.raises(RuntimeError), hooked([(net[0], lambda m, args: seen.append(1))], pre=True):
        raise RuntimeError
    net(x)
    assert seen == [(2, 4, 6, 6)]  # no hook left behind


def test_patched_forwards_return_the_originals():
    relu = nn.ReLU()
    with pytest.raises(RuntimeError), patched_forwards({relu: lambda x: x}):
        assert relu(torch.tensor(-1.0)) == -1
        raise RuntimeError
    assert relu(torch.tensor(-1.0)) == 0 and "forward" not in vars(relu)


def test_sparse_macs_keeps_a_frozen_norm_frozen():
    net = frozen_norm_net()
    mask_weights(net[0], torch.arange(10))
    sparse_macs(net, (torch.randn(1, 3, 8, 8),), dense_macs=10_000)
    assert modes(net) == modes(frozen_norm_net())
