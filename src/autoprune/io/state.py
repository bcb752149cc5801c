"""Nested training/search state in one safetensors file, never pickle.

Tensors go into the safetensors body; everything else (numbers, strings, lists, dicts, also
with int keys, as optimizers use) goes as JSON into its metadata. One file means one atomic
``os.replace``: a run killed at any moment leaves either the old state or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ._atomic import write_atomic

_TENSOR = "__tensor__"
_ITEMS = "__items__"  # a dict whose keys are not all strings
_TUPLE = "__tuple__"


def pack(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> tuple[Any, dict]:
    """Split ``obj`` into a JSON-able skeleton and a flat name -> tensor dict."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}, tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, tensors)[0] for k, v in obj.items()}, tensors
        return {_ITEMS: [[k, pack(v, tensors)[0]] for k, v in obj.items()]}, tensors
    if isinstance(obj, tuple):
        return {_TUPLE: [pack(v, tensors)[0] for v in obj]}, tensors
    if isinstance(obj, list):
        return [pack(v, tensors)[0] for v in obj], tensors
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} in a state file")


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _ITEMS in skeleton:
            return {k: unpack(v, tensors) for k, v in skeleton[_ITEMS]}
        if _TUPLE in skeleton:
            return tuple(unpack(v, tensors) for v in skeleton[_TUPLE])
        return {k: unpack(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unpack(v, tensors) for v in skeleton]
    return skeleton


def save_state(path: str | Path, state: Any) -> Path:
    """Write ``state`` to ``path`` atomically (tmp file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = pack(state)
    metadata = {"state": json.dumps(skeleton)}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_state(path: str | Path) -> Any:
    """Read a file written by :func:`save_state`; a damaged file raises CheckpointError."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        skeleton = json.loads(metadata["state"])
    except FileNotFoundError:
        raise CheckpointError(f"no state file at {path}") from None
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
        raise CheckpointError(
            f"cannot read state file {path}: corrupt or not ours ({err})"
        ) from None
    return unpack(skeleton, tensors)
