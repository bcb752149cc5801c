"""The pickle-free state file behind checkpoints and resume."""

from __future__ import annotations

import pytest
import torch

from autoprune.errors import CheckpointError
from autoprune.io.state import load_state, pack, save_state, unpack


def test_round_trip_keeps_nested_structure_and_tensors(tmp_path):
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9, nesterov=True)
    param.grad = torch.randn(4, 3)
    opt.step()
    state = {
        "optimizer": opt.state_dict(),  # int keys inside
        "rng": torch.get_rng_state(),
        "pair": (1, "a"),
        "floats": [0.5, None, True],
    }
    loaded = load_state(save_state(tmp_path / "s.safetensors", state))
    assert loaded["pair"] == (1, "a")
    assert loaded["floats"] == [0.5, None, True]
    assert torch.equal(loaded["rng"], state["rng"])
    buf = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf, opt.state_dict()["state"][0]["momentum_buffer"])
    restored = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4, 3))], lr=1.0)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["lr"] == 0.1


def test_pack_refuses_objects_that_would_need_pickle():
    with pytest.raises(TypeError, match="cannot store"):
        pack({"fn": print})
    skeleton, tensors = pack({"a": torch.ones(2)})
    assert torch.equal(unpack(skeleton, tensors)["a"], torch.ones(2))


def test_write_is_atomic_and_damage_is_reported(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, {"step": 1})
    save_state(path, {"step": 2})
    assert load_state(path)["step"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(path)
    with pytest.raises(CheckpointError, match="no state file"):
        load_state(tmp_path / "missing.safetensors")
