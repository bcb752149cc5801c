"""How to rebuild a model dense: one typed record, read and written only through this module.

A model built by :func:`~autoprune.models.create_model` carries its :class:`ModelSpec` (the
zoo or ``tv:``/``timm:`` name, or the factory, with the keyword arguments, and the input size
once known), as timm models carry their ``pretrained_cfg``. :mod:`autoprune.io` writes it to
``arch.json`` and rebuilds the dense architecture from it before applying a pruned model's
shapes. The record is kept here, keyed by the module object, not patched onto the user's
module: a bare ``copy.deepcopy`` does not carry it, so the library copies models with
:func:`copy_model` and a rewrite that returns a new module calls :func:`carry_spec`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from torch import nn

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class ModelSpec:
    """Exactly one of ``name`` (zoo, ``tv:NAME``, ``timm:NAME``), ``factory``
    (``file.py:fn``, ``package.module:fn``) or ``module`` (a user's class, rebuilt only from a
    fresh instance) says what builds the model; ``kwargs`` are its arguments."""

    name: str | None = None
    factory: str | None = None
    module: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None  # (C, H, W) the model runs at, when known

    @property
    def label(self) -> str:
        """What to call the model in messages and summaries."""
        return str(self.name or self.factory or self.module)

    def with_input_size(self, size: Sequence[int] | None) -> ModelSpec:
        return replace(self, input_size=None if size is None else tuple(int(v) for v in size))

    def with_kwargs(self, **kwargs: Any) -> ModelSpec:
        return replace(self, kwargs={**self.kwargs, **kwargs})

    def to_json(self) -> dict[str, Any]:
        """The ``arch.json`` form: the keys that are set (``module`` records carry no kwargs)."""
        record: dict[str, Any] = {}
        for key in ("name", "factory", "module"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        if self.module is None:
            record["kwargs"] = self.kwargs
        if self.input_size is not None:
            record["input_size"] = list(self.input_size)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ModelSpec:
        size = record.get("input_size")
        return cls(
            name=record.get("name"),
            factory=record.get("factory"),
            module=record.get("module"),
            kwargs=dict(record.get("kwargs", {})),
            input_size=None if size is None else tuple(int(v) for v in size),
        )


# Weak keys: a record lives exactly as long as its module.
_SPECS: WeakKeyDictionary[nn.Module, ModelSpec] = WeakKeyDictionary()


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The record ``model`` was built with (None for a module built otherwise)."""
    return _SPECS.get(model)


def set_spec(model: nn.Module, spec: ModelSpec) -> None:
    _SPECS[model] = spec


def carry_spec(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (a copy or rewrite of ``src``) ``src``'s record, if it has one."""
    spec = spec_of(src)
    if spec is not None:
        set_spec(dst, spec)


def copy_model(model: M) -> M:
    """``copy.deepcopy(model)`` with its record: how the library copies a model it may save."""
    twin = copy.deepcopy(model)
    carry_spec(model, twin)
    return twin


def describe(model: nn.Module) -> ModelSpec:
    """``model``'s record, or for a module built otherwise its class: loading that needs a
    fresh instance, ``load(path, model=MyNet())``."""
    spec = spec_of(model)
    if spec is not None:
        return spec
    cls = type(model)
    return ModelSpec(module=f"{cls.__module__}.{cls.__qualname__}")


def model_label(model: nn.Module) -> str:
    """The model's name or factory, else its class name."""
    spec = spec_of(model)
    return spec.label if spec is not None else type(model).__name__
