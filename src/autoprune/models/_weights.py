"""Loading checkpoints into a model without ever unpickling code.

``.safetensors`` files are read with safetensors; anything else only with
``torch.load(weights_only=True)``, which refuses pickled objects other than tensors and plain
containers. Training checkpoints are unwrapped (``{"state_dict": ...}`` and friends), a
DataParallel ``module.`` prefix is stripped, and keys and shapes are compared with the model
before anything is copied, so a mismatch names the offending keys instead of failing halfway.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError
from .spec import model_label

# Keys under which training scripts commonly nest the state_dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Buffers that old checkpoints lack and that the module fills in itself when loading.
OPTIONAL_SUFFIXES = (".num_batches_tracked",)
SHOWN = 5
# What torch.load / safetensors raise for missing, truncated or corrupt files.
READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError)


def _read_safetensors(path: Path) -> Any:
    return load_file(str(path), device="cpu")


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:  # an opcode the restricted unpickler does not know: corrupt data
            raise CheckpointError(
                f"cannot read {path}: corrupt, or not a PyTorch checkpoint"
            ) from None
        raise CheckpointError(
            f"refused: {path} contains pickled Python objects beyond tensors ({found[1]}); "
            "loading it would run code. Re-save it as a state_dict "
            "(torch.save(model.state_dict(), ...)) or safetensors"
        ) from None


READERS: dict[str, Callable[[Path], Any]] = {".safetensors": _read_safetensors}


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and without a ``module.`` prefix."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower(), _read_torch)
    try:
        obj = reader(path)
    except CheckpointError:
        raise
    except READ_ERRORS as e:
        # torch's messages run to several sentences of advice; the first one is the fact.
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, EOFError):
            reason = "the file ends early (truncated or empty)"
        raise CheckpointError(f"cannot read {path}: {reason}") from None
    return _strip_prefix(_unwrap(obj, path))


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__
        if isinstance(obj, Mapping):
            what = f"keys {sorted(map(str, obj))[:SHOWN]}"
        raise CheckpointError(
            f"cannot read {path}: no state_dict found (got {what}); save the model's "
            f"state_dict, alone or under one of {', '.join(WRAPPER_KEYS)}"
        )
    return dict(obj)


def _strip_prefix(
    state: dict[str, torch.Tensor], prefix: str = "module."
) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _listing(items: list[str]) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def check_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    source: str = "the checkpoint",
) -> None:
    """Raise CheckpointError naming missing/unexpected keys (if strict) and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [f"shape mismatches: {_listing(mismatched)}"] if mismatched else []
    if strict and missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match the architecture {model_label(model)}: "
            f"{'; '.join(problems)}. "
            "Pick the model the checkpoint was trained with (and its kwargs, e.g. num_classes)"
        )


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    remap_keys: Callable[[str], str] | None = None,
) -> nn.Module:
    """Copy a checkpoint's tensors into ``model`` and return it.

    ``remap_keys`` renames each checkpoint key (after unwrapping and prefix stripping) to the
    model's naming. With ``strict=False`` missing and unexpected keys are ignored; shape
    mismatches always raise.
    """
    state = read_state_dict(path)
    if remap_keys is not None:
        state = {remap_keys(k): v for k, v in state.items()}
    check_state_dict(model, state, strict=strict, source=f"checkpoint {path}")
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model
