"""The model registry and the metadata each entry carries.

The CLI reads a model's default input size, class count and dataset from here, so a model
family registers everything a caller needs to build and feed it in one decorator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from .._registry import Registry

ModelFn = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFn)

MODELS: Registry[ModelFn] = Registry("model")


@dataclass(frozen=True)
class Preprocessing:
    """How the images a model's weights were trained on were prepared; loaders repeat it.

    ``input_size`` is the side images are resized to (bilinear), ``mean``/``std`` the
    normalisation; None keeps the dataset's own size or statistics. A caller's explicit input
    size wins (``--input-size``).
    """

    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model expects: its input ``(C, H, W)``, classes and dataset.

    ``remap_keys`` maps a key of the model's published checkpoint to this implementation's
    key; :func:`~autoprune.models.load_weights` applies it before comparing keys.
    ``preprocessing`` is what its published weights need from the data pipeline (e.g. CIFAR
    images upsampled to 64 x 64); the default changes nothing.
    """

    name: str
    input_size: tuple[int, int, int]
    num_classes: int
    dataset: str
    description: str
    remap_keys: Callable[[str], str] | None = None
    preprocessing: Preprocessing = Preprocessing()


def register_model(
    name: str,
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    dataset: str = "cifar10",
    description: str = "",
    remap_keys: Callable[[str], str] | None = None,
    preprocessing: Preprocessing | None = None,
) -> Callable[[F], F]:
    """Register ``fn(num_classes=..., **kwargs) -> nn.Module`` under ``name``."""
    return MODELS.register(
        name,
        input_size=tuple(input_size),
        num_classes=num_classes,
        dataset=dataset,
        description=description,
        remap_keys=remap_keys,
        preprocessing=preprocessing or Preprocessing(),
    )


def model_info(name: str) -> ModelInfo:
    """Metadata of a registered model; raises UnknownNameError listing the known names."""
    entry = MODELS.entry(name)
    return ModelInfo(name=entry.name, **entry.meta)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return MODELS.names(pattern)
