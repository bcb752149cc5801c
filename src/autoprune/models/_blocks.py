"""Small building blocks shared by the model families.

Activations are chosen by name through one table, so a family (or a new one, such as a
MobileViT with SiLU) picks its nonlinearity without its own copy of conv-BN-act.
"""

from __future__ import annotations

from torch import nn

from ..errors import AutopruneError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def create_act(name: str) -> nn.Module:
    """A fresh activation module by name (never in-place: hooks may keep its input)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        known = ", ".join(sorted(ACTIVATIONS))
        raise AutopruneError(f"unknown activation {name!r}; known: {known}") from None


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, losing at most 10 %."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """``conv -> bn -> act`` with "same" padding; children are named ``conv``, ``bn``, ``act``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = create_act(act)


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: kaiming (fan-out) convs, unit BN, small-normal linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
