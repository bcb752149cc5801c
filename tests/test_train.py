"""Training loop, schedules, optimizer, checkpoint and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.data import load_dataset, make_loader
from autoprune.errors import AutopruneError
from autoprune.train import SCHEDULES, TrainConfig, build_optimizer, distillation, fit


def small_net(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def loaders(batch_size: int = 32):
    kw = {"num_classes": 4, "image_size": 16, "size": 256}
    train = load_dataset("synthetic", "train", **kw)
    test = load_dataset("synthetic", "test", **kw)
    # Augmentation is the data tests' business; 4-pixel crops of 16-pixel images slow this down.
    return (
        make_loader(train, batch_size, train=True, seed=1, augment=False),
        make_loader(test, 128, train=False),
    )


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 0.1, "progress": False, **kw})


def test_training_learns_the_synthetic_task():
    model = small_net()
    train_loader, val_loader = loaders()
    result = fit(model, train_loader, config(epochs=3), val_loader=val_loader)
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].val_accuracy > 60.0  # 4 classes: chance is 25 %
    assert result.steps == 3 * len(train_loader)


def test_max_steps_caps_training_across_epochs():
    train_loader, _ = loaders()
    result = fit(small_net(), train_loader, config(epochs=5, max_steps=3))
    assert result.steps == 3
    assert len(result.history) == 1


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedules_start_low_or_at_base_and_end_low(name):
    factor = SCHEDULES.get(name)
    values = [factor(step, 100, 0) for step in range(100)]
    assert max(values) == pytest.approx(1.0, abs=0.01)
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in values)
    if name != "constant":
        assert values[-1] < 0.01


def test_warmup_rises_linearly():
    factor = SCHEDULES.get("cosine")
    assert [factor(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_no_weight_decay_on_norms_and_biases():
    model = small_net()
    groups = build_optimizer(model, config(weight_decay=1e-3)).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-3 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight), id(model[5].weight)}


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    train_loader, _ = loaders()
    reference = small_net()
    fit(reference, train_loader, config())

    class Interrupt(Exception):
        pass

    calls = {"n": 0}
    steps_per_epoch = len(train_loader)

    def dies_in_epoch_two(logits, y, x):
        calls["n"] += 1
        if calls["n"] > steps_per_epoch + 2:
            raise Interrupt
        return nn.functional.cross_entropy(logits, y)

    checkpoint = tmp_path / "state.safetensors"
    with pytest.raises(Interrupt):
        fit(small_net(), train_loader, config(), checkpoint=checkpoint, loss_fn=dies_in_epoch_two)
    resumed = small_net()
    result = fit(resumed, train_loader, config(), checkpoint=checkpoint, resume=True)
    assert result.resumed_from_epoch == 1
    assert [r.epoch for r in result.history] == [1, 2]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # A finished run is not redone.
    again = fit(resumed, train_loader, config(), checkpoint=checkpoint, resume=True)
    assert again.resumed_from_epoch == 2 and again.steps == result.steps


def test_resume_with_other_settings_is_refused(tmp_path):
    train_loader, _ = loaders()
    checkpoint = tmp_path / "state.safetensors"
    fit(small_net(), train_loader, config(epochs=1), checkpoint=checkpoint)
    with pytest.raises(AutopruneError, match=r"lr: 0\.1 -> 0\.2"):
        fit(small_net(), train_loader, config(epochs=1, lr=0.2), checkpoint=checkpoint, resume=True)


def test_diverging_loss_stops_with_a_clear_error():
    train_loader, _ = loaders()
    with pytest.raises(AutopruneError, match="lower the learning rate"):
        fit(
            small_net(),
            train_loader,
            config(),
            loss_fn=lambda logits, y, x: logits.sum() * float("nan"),
        )


def test_distillation_mixes_cross_entropy_and_the_teachers_soft_targets():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logits = torch.randn(8, 3)
    ce = nn.functional.cross_entropy(logits, y)
    assert torch.allclose(distillation(teacher, 4.0, 0.0)(logits, y, x), ce)
    own = teacher(x).detach()  # a student that matches its teacher: no soft loss left
    assert torch.allclose(distillation(teacher, 4.0, 1.0)(own, y, x), torch.zeros(()), atol=1e-6)
    half = distillation(teacher, 2.0, 0.5)(logits, y, x)
    kd = nn.functional.kl_div(
        (logits / 2).log_softmax(1),
        (own / 2).log_softmax(1),
        reduction="batchmean",
        log_target=True,
    )
    assert torch.allclose(half, 0.5 * ce + 0.5 * 4.0 * kd)
