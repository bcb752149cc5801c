"""Saving and loading a (pruned) model as a directory, without pickle.

``arch.json`` holds how to build the dense model (the
:class:`~autoprune.models.spec.ModelSpec` that :func:`~autoprune.models.create_model`
attaches: a registry name or a factory, with kwargs;
for a user's own module, only its class, and loading is then given a fresh instance),
what multi-grain pruning removed beyond channels (one key per granularity,
:mod:`.removals`: ``removed`` blocks and layers, ``masked`` layers) and each layer's current
shape; ``model.safetensors`` holds the state_dict,
masks included. Loading builds the dense model, puts the identity in place of the removed
modules, gives the masked layers their mask buffers, shrinks its layers to the recorded
shapes, then loads the tensors strictly. No code is
ever unpickled, and the files are readable by anything that reads JSON and safetensors.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AutopruneError, CheckpointError
from ..graph import NORMALIZED_ATTR, normalize_model
from ..models import MODELS, check_state_dict, create_model, model_info
from ..models.spec import ModelSpec, describe, set_spec
from ._atomic import write_atomic, write_text_atomic
from .removals import read_removals, restore_removals
from .shapes import apply_layers, record_layers

ARCH_FILE, WEIGHTS_FILE = "arch.json", "model.safetensors"
FORMAT_VERSION = 2  # 2: removed blocks and layers, weight masks
METADATA_ATTR = "autoprune_metadata"


def _spec_of(model: nn.Module, factory: str | None, kwargs: dict[str, Any] | None) -> ModelSpec:
    if factory is not None:
        return ModelSpec(factory=factory, kwargs=dict(kwargs or {}))
    return describe(model)


def _input_size(spec: ModelSpec, given: Sequence[int] | None, needed: bool) -> list[int] | None:
    """The (C, H, W) to record: given, or carried over from the model's record (pruning and
    timm models set it); when loading must trace the model again, else the zoo's."""
    size = given if given is not None else spec.input_size
    if size is None and needed and spec.name in MODELS:
        size = model_info(spec.name).input_size
    if size is None and needed:
        raise AutopruneError(
            "this model's layers were rewritten for pruning and loading must trace it again: "
            "pass input_size=(C, H, W) to save"
        )
    return None if size is None else [int(v) for v in size]


def _split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One contiguous CPU copy per distinct tensor, and ``{alias: name}`` for shared ones.

    safetensors refuses tensors that share memory; tied weights are stored once.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        storage = t.untyped_storage().data_ptr()
        view = (t.device, storage, t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() and view in seen:
            tied[name] = seen[view]
            continue
        seen[view] = name
        tensors[name] = t.detach().cpu().clone(memory_format=torch.contiguous_format)
    return tensors, tied


def _dumps(record: dict[str, Any], layers: dict[str, Any]) -> str:
    """JSON with one line per top-level key and per layer: readable and diffable."""
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()]
    layer_lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in layers.items())
    lines.append(f'"layers": {{\n{layer_lines}\n }}')
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    factory: str | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to the directory ``path`` (``arch.json`` + ``model.safetensors``).

    Models from ``create_model`` know how they were built; others need ``factory`` (a
    ``create_model`` name such as ``"pkg.mod:fn"``) and its ``factory_kwargs``. ``input_size``
    (C, H, W) is recorded in the loaded model's :class:`~autoprune.models.spec.ModelSpec`; it
    is required for a non-zoo model whose ``F.pad`` shortcuts the pruning graph rewrote, since
    loading re-traces it. ``metadata`` (JSON values: accuracy, MACs, how it was pruned) is
    merged into the model's
    ``autoprune_metadata`` and restored by :func:`load`.
    """
    path = Path(path)
    tensors, tied = _split_tied(model.state_dict())
    text = _arch_text(model, factory, factory_kwargs, input_size, metadata, tied)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
    )
    write_text_atomic(path / ARCH_FILE, text)
    return path


def _arch_text(
    model: nn.Module,
    factory: str | None,
    factory_kwargs: dict[str, Any] | None,
    input_size: Sequence[int] | None,
    metadata: dict[str, Any] | None,
    tied: dict[str, str],
) -> str:
    """``arch.json``'s text; raises what would keep the model from being saved."""
    spec = _spec_of(model, factory, factory_kwargs)
    arch = spec.to_json()
    arch.pop("input_size", None)
    record: dict[str, Any] = {"format_version": FORMAT_VERSION, **arch}
    rewritten = getattr(model, NORMALIZED_ATTR, None)
    size = _input_size(spec, input_size, needed=rewritten is not None)
    if size is not None:
        record["input_size"] = size
    if rewritten is not None:
        record["normalized"] = list(rewritten)
    record["metadata"] = {**getattr(model, METADATA_ATTR, {}), **(metadata or {})}
    record.update(read_removals(model))
    record["tied"] = tied
    try:
        return _dumps(record, record_layers(model))
    except TypeError as e:
        raise AutopruneError(
            f"cannot save {spec.label}: its kwargs or metadata are not JSON ({e}); build it with "
            "JSON-valued arguments (e.g. an activation's name, not its class), or pass "
            "factory='file.py:fn' and JSON factory_kwargs"
        ) from e


def check_savable(model: nn.Module, input_size: Sequence[int] | None = None) -> None:
    """Raise now what :func:`save` would raise for ``model``: a run that writes its model
    checks this before its search, not after it."""
    _arch_text(model, None, None, input_size, None, {})


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads((path / ARCH_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"cannot read {path}: no {ARCH_FILE}; is it a directory written by autoprune.io.save?"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / ARCH_FILE}: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("layers"), dict):
        raise CheckpointError(f"cannot read {path / ARCH_FILE}: not an autoprune model record")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was saved by a newer autoprune (format {record['format_version']}); upgrade"
        )
    return record


def _build(
    record: dict[str, Any], path: Path, trust_factory: bool, fresh: nn.Module | None
) -> nn.Module:
    """The dense model the record names (or ``fresh``), rewritten as it was before pruning."""
    name = record.get("name") or record.get("factory")
    kwargs, size = record.get("kwargs", {}), record.get("input_size")
    if fresh is not None:
        model = fresh
        spec = ModelSpec.from_json(record).with_input_size(None)
    elif "module" in record:
        raise CheckpointError(
            f"{path} holds a {record['module']} that autoprune cannot rebuild by itself: pass a "
            "fresh, unpruned instance, autoprune.load(path, model=YourNet(...))"
        )
    elif not isinstance(name, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"cannot read {path / ARCH_FILE}: no model 'name' or 'factory'")
    elif "factory" in record and not trust_factory:
        raise CheckpointError(
            f"refused: {path} is built by the code {name!r}; loading it would import and run "
            "that code. If you trust it, load with trust_factory=True (or pass a fresh instance "
            "as model=)"
        )
    else:
        model = create_model(name, **kwargs)
        spec = describe(model)
    if size is not None:
        spec = spec.with_input_size(size)
    if "normalized" in record:
        example = torch.zeros(1, *size) if isinstance(size, list) else None
        model = normalize_model(model, example)
    set_spec(model, spec)  # a rewritten top-level model is a new GraphModule
    return model


def load(
    path: str | os.PathLike[str], *, trust_factory: bool = False, model: nn.Module | None = None
) -> nn.Module:
    """The model saved by :func:`save` in directory ``path``, with its pruned shapes and weights.

    Zoo (and ``tv:``/``timm:``) models load without running any code from the files. A model
    saved with a ``factory`` is built by calling that Python code, which the directory names
    and so could be anything: it loads only with ``trust_factory=True``. A user's own module
    (saved by its class) is rebuilt from ``model``, a fresh unpruned instance of it, which is
    shrunk in place; any saved model can be loaded that way. Returned in training mode like any
    fresh module, with its :class:`~autoprune.models.spec.ModelSpec` and ``autoprune_metadata``
    restored.
    """
    path = Path(path)
    record = _read_record(path)
    model = _build(record, path, trust_factory, model)
    try:
        restore_removals(model, record)
        apply_layers(model, record["layers"])
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot read {path / ARCH_FILE}: malformed layer record ({e})"
        ) from e
    try:
        state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path / WEIGHTS_FILE}: {e}") from None
    for alias, name in record.get("tied", {}).items():
        if name in state:
            state[alias] = state[name]
    check_state_dict(model, state, source=str(path))
    # Layers that version their state_dict (torchvision's MNASNet) read it from the metadata
    # a state_dict carries; a fresh model of this code has the versions its tensors match.
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state)
    setattr(model, METADATA_ATTR, record.get("metadata", {}))
    return model
