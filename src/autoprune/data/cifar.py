"""CIFAR-10 and CIFAR-100 from the official python layout (pickled numpy batches).

The batches are pickles, so they are read with an unpickler that can only build numpy arrays:
a tampered file is refused instead of running code.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AutopruneError, CheckpointError, DataNotFoundError
from ._base import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, ImageData, register_dataset
from ._download import fetch_and_extract

try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

# Everything a pickled ndarray needs, under the module names numpy 1.x and 2.x write, plus
# `_codecs.encode`, which protocol-2 pickles written by Python 3 use for bytes.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"{m}.multiarray", "_reconstruct"): _reconstruct for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.numeric", "_frombuffer"): _frombuffer for m in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[module, name]
        except KeyError:
            raise CheckpointError(
                f"refused: {self.path} contains pickled objects other than arrays "
                f"({module}.{name}); replace it with the official file"
            ) from None


def read_array_pickle(path: Path) -> dict:
    """Unpickle a dict of arrays, lists and strings; anything executable is refused."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle: pickle raises many types
        raise AutopruneError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise AutopruneError(f"cannot read {path}: expected a dict, found {type(obj).__name__}")
    return obj


_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
_CIFAR10_CLASSES += ("dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class _Spec:
    info: DatasetInfo
    folder: str
    url: str
    md5: str
    files: dict[str, tuple[str, ...]]
    labels_key: bytes
    meta: str
    names_key: bytes


_SPECS = (
    _Spec(
        info=DatasetInfo("cifar10", 10, 3, (32, 32), IMAGENET_MEAN, IMAGENET_STD, _CIFAR10_CLASSES),
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        labels_key=b"labels",
        meta="batches.meta",
        names_key=b"label_names",
    ),
    _Spec(
        info=DatasetInfo("cifar100", 100, 3, (32, 32), IMAGENET_MEAN, IMAGENET_STD),
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        files={"train": ("train",), "test": ("test",)},
        labels_key=b"fine_labels",
        meta="meta",
        names_key=b"fine_label_names",
    ),
)


def _find(spec: _Spec, root: Path, needed: list[str]) -> Path | None:
    for d in (root / spec.folder, root):
        if all((d / f).is_file() for f in needed):
            return d
    return None


def _read_batch(spec: _Spec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = read_array_pickle(path)
    data, labels = batch.get(b"data"), batch.get(spec.labels_key)
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not (ok and data.shape[1] == 3072 and labels is not None and len(labels) == len(data)):
        raise AutopruneError(
            f"{path} is not a CIFAR batch (need b'data' uint8 [N, 3072] and "
            f"{spec.labels_key!r} with N labels); replace it with the official file"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.info.num_classes):
        raise AutopruneError(f"{path} has labels outside 0..{spec.info.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _load(spec: _Spec, root: Path, split: str, download: bool) -> ImageData:
    needed = [*spec.files[split], spec.meta]
    folder = _find(spec, root, needed)
    if folder is None:
        missing = (
            f"{spec.info.name} {split} split not found: expected {', '.join(needed)} "
            f"in {root / spec.folder} (or in {root} itself)"
        )
        if not download:
            raise DataNotFoundError(f"{missing}; pass --data-root DIR pointing to them")
        fetch_and_extract(spec.url, spec.md5, root, missing=missing)
        folder = root / spec.folder
    batches = [_read_batch(spec, folder / name) for name in spec.files[split]]
    names = read_array_pickle(folder / spec.meta).get(spec.names_key, [])
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    info = replace(spec.info, classes=classes or spec.info.classes)
    images = torch.from_numpy(np.concatenate([x for x, _ in batches]))
    return ImageData(info, images, torch.from_numpy(np.concatenate([y for _, y in batches])))


for _spec in _SPECS:
    register_dataset(
        _spec.info.name,
        info=_spec.info,
        description=f"{_spec.info.name.upper()} (32x32 RGB, {_spec.info.num_classes} classes), "
        "official python layout, downloaded when missing",
    )(partial(_load, _spec))
