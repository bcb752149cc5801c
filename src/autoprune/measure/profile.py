"""One call that measures what a practitioner asks first: MACs, params, latency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .complexity import count_macs, count_params
from .latency import Latency, available_backends, measure_latency


@dataclass(frozen=True)
class ModelProfile:
    input_shape: tuple[int, ...]
    macs: int
    params: int
    latency: list[Latency] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["latency"] = [
            {**asdict(lat), "images_per_s": round(lat.images_per_s, 1)} for lat in self.latency
        ]
        return data


def profile_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    backends: Sequence[str] | None = None,
    repeats: int = 20,
) -> ModelProfile:
    """MACs per image, parameters, and median latency for each backend and batch size.

    ``backends=()`` skips timing; ``None`` times every backend installed here.
    """
    device = next(model.parameters()).device
    macs = count_macs(model, torch.zeros(1, *input_shape, device=device))
    latency = [
        lat
        for backend in (available_backends() if backends is None else backends)
        for lat in measure_latency(
            model, input_shape, batch_sizes=batch_sizes, backend=backend, repeats=repeats
        )
    ]
    return ModelProfile(tuple(input_shape), macs, count_params(model), latency)
