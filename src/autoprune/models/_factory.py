"""Building a model from a name: the zoo, torchvision / timm, or a user's model file.

Every model built here carries its :class:`~autoprune.models.spec.ModelSpec` (the name or the
factory, with the kwargs), from which :mod:`autoprune.io` rebuilds the dense architecture
before applying a pruned model's shapes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .._registry import Registry
from ..errors import AutopruneError, UnknownNameError
from ._registry import MODELS, list_models, model_info
from ._weights import load_weights
from .spec import ModelSpec, set_spec

ExternalBuilder = Callable[[str, dict[str, Any]], nn.Module]
# "prefix:NAME" -> a builder from another library, imported only when asked for.
SOURCES: Registry[ExternalBuilder] = Registry("model source")
NAME_FORMS = "a zoo name, tv:NAME, timm:NAME, path/to/file.py:factory or package.module:factory"


def _import_optional(package: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except Exception as e:  # a torchvision built for another torch/CUDA fails with OSError etc.
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise AutopruneError(
            f"{package} is not importable here ({type(e).__name__}: {reason}): install it, "
            f"or use a zoo model: {', '.join(list_models())}"
        ) from None


@SOURCES.register("tv")
def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    models = _import_optional("torchvision").models
    if name not in models.list_models():
        raise UnknownNameError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models()"
        )
    return models.get_model(name, **kwargs)


@SOURCES.register("timm")
def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    timm = _import_optional("timm")
    if not timm.is_model(name):
        raise UnknownNameError(f"unknown timm model {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=False, **kwargs)


def _load_model_file(path: Path) -> ModuleType:
    """Import a .py file once per process under a name derived from its absolute path."""
    if not path.is_file():
        raise AutopruneError(f"model file not found: {path}; pass path/to/file.py:factory_name")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_autoprune_model_file_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AutopruneError(f"cannot import model file {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, (ImportError, SyntaxError)):
            raise AutopruneError(f"cannot import model file {path}: {e}") from e
        raise
    return module


def _import_target(target: str) -> ModuleType:
    if target.endswith(".py") or "/" in target or os.sep in target:
        return _load_model_file(Path(target))
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise AutopruneError(
            f"cannot import module {target!r} ({e}); fix the name or pass path/to/file.py:factory"
        ) from e


def _resolve_factory(spec: str) -> Callable[..., nn.Module]:
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name.isidentifier():
        raise AutopruneError(f"cannot parse model {spec!r}; use {NAME_FORMS}")
    module = _import_target(target)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        own = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and getattr(v, "__module__", None) == module.__name__
        )
        raise AutopruneError(
            f"{target} has no function {fn_name!r}; callables defined there: "
            f"{', '.join(own) or '(none)'}"
        )
    return fn


def _call(fn: Callable[..., Any], what: str, kwargs: dict[str, Any]) -> nn.Module:
    """Call a model factory, turning bad keyword arguments into a message about ``what``."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        params = ", ".join(inspect.signature(fn).parameters) or "(none)"
        raise AutopruneError(f"{what}: {e}; its arguments: {params}") from None
    except ValueError:  # builtins without a signature: let the call itself complain
        pass
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"{what} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def create_model(
    name: str,
    num_classes: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name; ``weights`` is a checkpoint path loaded with :func:`load_weights`.

    ``name`` is a zoo name (``list_models()``), ``tv:NAME`` / ``timm:NAME`` (torchvision / timm,
    when installed), or a factory ``path/to/file.py:fn`` / ``package.module:fn`` called with
    ``num_classes`` (when given) and ``kwargs``. The zoo fills ``num_classes`` from the model's
    registered metadata when it is None.
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    remap_keys = None
    source, colon, rest = name.partition(":")
    if colon and source in SOURCES:
        model = SOURCES.get(source)(rest, kwargs)
        spec = ModelSpec(name=name, kwargs=kwargs)
        declared = getattr(model, "pretrained_cfg", None) or {}  # timm's record of the model
        if isinstance(declared, dict) and len(declared.get("input_size") or ()) == 3:
            spec = spec.with_input_size(declared["input_size"])
    elif colon:
        model = _call(_resolve_factory(name), f"model factory {name}", kwargs)
        spec = ModelSpec(factory=name, kwargs=kwargs)
    else:
        try:
            info = model_info(name)
        except UnknownNameError as e:
            raise UnknownNameError(f"{e}; or use tv:NAME, timm:NAME or file.py:factory") from None
        kwargs.setdefault("num_classes", info.num_classes)
        remap_keys = info.remap_keys
        model = _call(MODELS.get(name), f"model {name!r}", kwargs)
        spec = ModelSpec(name=name, kwargs=kwargs)
    set_spec(model, spec)
    if weights is not None:
        load_weights(model, weights, remap_keys=remap_keys)
    return model
