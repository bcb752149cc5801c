"""Fashion-MNIST from its IDX files (gzipped or not), as Zalando and Debian ship them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..errors import AutopruneError, DataNotFoundError
from ._base import DatasetInfo, ImageData, register_dataset
from ._download import fetch

# Where Debian's `dataset-fashion-mnist` package installs the four .gz files.
SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MD5 = {  # of the official .gz files
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
_CLASSES += ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
INFO = DatasetInfo("fashion-mnist", 10, 1, (28, 28), (0.2860,), (0.3530,), _CLASSES)
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (gzipped or not)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise AutopruneError(f"cannot read {path}: {e}; replace it with the official file") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise AutopruneError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic {raw[:4].hex()}, "
            f"expected 000008{ndim:02x}); replace it with the official file"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise AutopruneError(
            f"{path} is truncated: header says {shape}, found {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _resolve(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)


def _find(root: Path, names: tuple[str, ...]) -> list[Path] | None:
    for folder in (root, root / "fashion-mnist", *SYSTEM_DIRS):
        paths = [_resolve(folder, n) for n in names]
        if all(paths):
            return paths
    return None


@register_dataset(
    "fashion-mnist",
    info=INFO,
    description="Fashion-MNIST (28x28 grayscale, 10 classes), IDX files; also found in "
    "/usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist), downloaded when missing",
)
def load_fashion_mnist(root: Path, split: str, download: bool) -> ImageData:
    names = FILES[split]
    paths = _find(root, names)
    if paths is None:
        searched = ", ".join(str(d) for d in (root, root / "fashion-mnist", *SYSTEM_DIRS))
        missing = (
            f"fashion-mnist {split} split not found: expected {' and '.join(names)} (or .gz) "
            f"in one of {searched}"
        )
        if not download:
            raise DataNotFoundError(f"{missing}; pass --data-root DIR pointing to them")
        folder = root / "fashion-mnist"
        paths = [fetch(f"{URL}{n}.gz", MD5[n], folder / f"{n}.gz", missing=missing) for n in names]
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if len(images) != len(labels) or images.shape[1:] != INFO.image_size:
        raise AutopruneError(
            f"{paths[0]} holds {images.shape} images for {len(labels)} labels in {paths[1]}; "
            "expected N x 28 x 28 images and N labels"
        )
    if labels.max(initial=0) >= INFO.num_classes:
        raise AutopruneError(f"{paths[1]} has labels outside 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return ImageData(INFO, x, torch.from_numpy(labels.astype(np.int64)))
