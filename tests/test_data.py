"""Datasets (every registered layout, written tiny in tmp_path) and the batched loader."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from autoprune.data import (
    DatasetInfo,
    ImageData,
    LazyImageFolder,
    _download,
    dataset_info,
    default_data_root,
    fashion_mnist,
    list_datasets,
    load_dataset,
    make_loader,
    register_dataset,
)
from autoprune.errors import AutopruneError, CheckpointError, DataNotFoundError, UnknownNameError

CIFAR10_JPEG75 = Path("~/.cache/autoprune-data/cifar-10-jpeg75").expanduser()
FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


# --- tiny datasets in the official layouts --------------------------------------------------


def pixels(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def dump(path: Path, obj: Any, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, n: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Protocol-2 pickles of dicts with the official keys; returns each split's data and labels."""
    folder = root / "cifar-10-batches-py"
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    out = {}
    for split, names in files.items():
        data = pixels(n * len(names), (3072,), seed=len(names))
        labels = (np.arange(len(data)) * 3 + len(names)) % 10
        for k, name in enumerate(names):
            part = slice(k * n, (k + 1) * n)
            obj = {b"batch_label": b"x", b"labels": labels[part].tolist(), b"data": data[part]}
            dump(folder / name, obj)
        out[split] = (data, labels)
    label_names = [c.encode() for c in "abcdefghij"]
    dump(folder / "batches.meta", {b"num_cases_per_batch": n, b"label_names": label_names})
    return out


def write_cifar100(root: Path, n: int = 6) -> None:
    folder = root / "cifar-100-python"
    for i, split in enumerate(("train", "test")):
        fine = [(7 * k + i) % 100 for k in range(n)]
        obj = {b"data": pixels(n, (3072,), i), b"fine_labels": fine, b"coarse_labels": [0] * n}
        dump(folder / split, obj)
    names = [f"c{i}".encode() for i in range(100)]
    dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20})


def idx_bytes(array: np.ndarray) -> bytes:
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return bytes((0, 0, 8, array.ndim)) + dims + array.tobytes()


def write_fmnist(folder: Path, n: int = 5, gz: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, split in enumerate(("train", "t10k")):
        images, labels = pixels(n, (28, 28), i), np.arange(n, dtype=np.uint8) % 10
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            raw = idx_bytes(arr)
            name = f"{split}-{kind}-ubyte"
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
        out[split] = images
    return out


def write_imagefolder(root: Path, test_dir: str = "val") -> None:
    """Two classes (sorted: cat, dog), mixed PNG/JPEG, one image of a different size."""
    for split, n in (("train", 3), (test_dir, 2)):
        for ci, cls in enumerate(("dog", "cat")):
            (root / split / cls).mkdir(parents=True)
            for k in range(n):
                size = (12, 10) if (split, cls, k) == ("train", "dog", 2) else (8, 6)  # (W, H)
                img = Image.fromarray(pixels(1, (size[1], size[0], 3), 10 * ci + k)[0])
                ext = "png" if k % 2 == 0 else "jpg"
                img.save(root / split / cls / f"{k}.{ext}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


WRITERS: dict[str, Callable[[Path], Any]] = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "fashion-mnist": lambda root: write_fmnist(root / "fashion-mnist"),
    "imagefolder": write_imagefolder,
    "synthetic": lambda root: None,
}


def test_every_registered_dataset_has_a_fixture_here():
    assert set(list_datasets()) == set(WRITERS)


# --- every dataset through load_dataset and make_loader --------------------------------------


@pytest.mark.parametrize("name", list_datasets())
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_dataset_loads_and_batches(name, split, tmp_path):
    WRITERS[name](tmp_path)
    data = load_dataset(name, split, root=tmp_path, download=False)
    info = data.info
    assert isinstance(info, DatasetInfo) and info.name == name
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert data.images.shape[1:] == (info.channels, *info.image_size)
    assert len(info.classes) == info.num_classes > 0
    assert int(data.labels.min()) >= 0 and int(data.labels.max()) < info.num_classes
    image, label = data[0]
    assert image.shape == data.images.shape[1:] and isinstance(label, int)
    x, y = next(iter(make_loader(data, 4, train=split == "train")))
    assert x.dtype == torch.float32 and x.shape[1:] == data.images.shape[1:]
    assert y.dtype == torch.int64 and len(x) == len(y) <= 4
    static = dataset_info(name, root=tmp_path)
    assert (static.num_classes, static.channels) == (info.num_classes, info.channels)


@pytest.mark.parametrize("name", list_datasets())
def test_dataset_info_without_files(name):
    info = dataset_info(name)
    assert info.channels in (1, 3) and len(info.mean) == len(info.std) == info.channels


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("cifar10", info=dataset_info("cifar10"), description="dup")(
            lambda root, split, download: None
        )


def test_unknown_names_and_splits_are_user_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="cifar10"):
        load_dataset("cifar11", root=tmp_path)
    with pytest.raises(AutopruneError, match="train, test"):
        load_dataset("synthetic", "validation")


def test_default_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOPRUNE_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("AUTOPRUNE_DATA_ROOT")
    assert default_data_root() == Path.home() / ".cache" / "autoprune-data"


# --- CIFAR -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", [False, True], ids=["parent", "folder"])
def test_cifar10_matches_the_pickled_arrays(tmp_path, inside):
    want = write_cifar10(tmp_path, n=3)
    root = tmp_path / "cifar-10-batches-py" if inside else tmp_path
    for split, n in (("train", 15), ("test", 3)):
        data = load_dataset("cifar10", split, root=root, download=False)
        x, y = want[split]
        assert data.images.shape == (n, 3, 32, 32)
        assert torch.equal(data.images, torch.from_numpy(x.reshape(n, 3, 32, 32)))
        assert data.labels.tolist() == y.tolist()
        assert data.info.classes == tuple("abcdefghij")
        assert data.info.mean == (0.485, 0.456, 0.406) and data.info.std == (0.229, 0.224, 0.225)


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    write_cifar100(tmp_path, n=6)
    data = load_dataset("cifar100", "test", root=tmp_path, download=False)
    assert data.labels.tolist() == [(7 * k + 1) % 100 for k in range(6)]
    assert data.info.num_classes == 100 and data.info.classes[42] == "c42"


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_malicious_cifar_pickle_is_refused_and_never_run(tmp_path, protocol):
    write_cifar10(tmp_path, n=2)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    dump(batch, {b"data": Exploit(marker), b"labels": [0]}, protocol)
    with pytest.raises(CheckpointError, match=r"refused: .*data_batch_1 .*other than arrays"):
        load_dataset("cifar10", root=tmp_path, download=False)
    assert not marker.exists()


def test_a_truncated_or_wrong_cifar_batch_names_the_file(tmp_path):
    write_cifar10(tmp_path, n=2)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(AutopruneError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)
    dump(batch, {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    with pytest.raises(AutopruneError, match="test_batch is not a CIFAR batch"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)


# --- missing files and downloads -------------------------------------------------------------


EXPECTED = {
    "cifar10": ["data_batch_1", "data_batch_5", "batches.meta", "cifar-10-batches-py"],
    "cifar100": ["train", "meta", "cifar-100-python"],
    "fashion-mnist": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
    "imagefolder": ["train/<class>", "val/<class>"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_files_say_what_was_expected_where(name, tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(name, root=tmp_path / "nowhere", download=False)
    message = str(err.value)
    assert "\n" not in message and "--data-root" in message
    assert str(tmp_path / "nowhere") in message
    for expected in EXPECTED[name]:
        assert expected in message


def test_an_offline_download_explains_the_fix(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(_download.urllib.request, "urlopen", offline)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    message = str(err.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz failed" in message
    assert "no network" in message and "data_batch_1" in message and "--data-root" in message
    with pytest.raises(DataNotFoundError, match=r"fashion-mnist.*train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", root=tmp_path)
    assert not list(tmp_path.rglob("*.part"))


def test_fetch_and_extract_verifies_md5_and_unpacks(tmp_path):
    src = tmp_path / "src"
    write_cifar10(src, n=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "root"
    with pytest.raises(DataNotFoundError, match="md5"):
        _download.fetch_and_extract(archive.as_uri(), "0" * 32, root, missing="x")
    _download.fetch_and_extract(archive.as_uri(), md5, root, missing="x")
    assert len(load_dataset("cifar10", root=root, download=False)) == 10
    assert not list(root.glob("*.tar.gz")) and not list(root.glob("*.part"))


# --- Fashion-MNIST ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    want = write_fmnist(tmp_path, n=5, gz=gz)
    data = load_dataset("fashion-mnist", "test", root=tmp_path, download=False)
    assert data.images.shape == (5, 1, 28, 28)
    assert torch.equal(data.images[:, 0], torch.from_numpy(want["t10k"]))
    assert data.labels.tolist() == [0, 1, 2, 3, 4]
    assert data.info.mean == (0.2860,) and data.info.classes[9] == "Ankle boot"


def test_corrupt_idx_files_name_the_file(tmp_path):
    write_fmnist(tmp_path, n=3, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    images.write_bytes(b"\x00\x00\x08\x01" + raw[4:])
    with pytest.raises(AutopruneError, match=r"train-images-idx3-ubyte is not an IDX file"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)
    images.write_bytes(raw[:-10])
    with pytest.raises(AutopruneError, match=r"train-images-idx3-ubyte is truncated"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip")
    images.write_bytes(raw)
    with pytest.raises(AutopruneError, match=r"train-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)


# --- image folders ---------------------------------------------------------------------------


def test_imagefolder_sorts_classes_and_resizes_to_the_first_image(tmp_path):
    write_imagefolder(tmp_path)
    data = load_dataset("imagefolder", root=tmp_path)
    assert data.info.classes == ("cat", "dog") and data.info.num_classes == 2
    assert data.images.shape == (6, 3, 6, 8)  # first image (cat/0.png) is 8 wide, 6 high
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    png = np.array(Image.open(tmp_path / "train" / "cat" / "0.png"))
    assert torch.equal(data.images[0], torch.from_numpy(png).permute(2, 0, 1))
    test = load_dataset("imagefolder", "test", root=tmp_path)
    assert len(test) == 4 and test.images.shape[1:] == (3, 6, 8)
    assert load_dataset("imagefolder", root=tmp_path, image_size=16).images.shape[2:] == (16, 16)
    info = dataset_info("imagefolder", root=tmp_path)
    assert info.image_size == (6, 8) and info.classes == ("cat", "dog")
    assert dataset_info("imagefolder").num_classes == 0


def test_imagefolder_test_split_may_be_called_test(tmp_path):
    write_imagefolder(tmp_path, test_dir="test")
    assert len(load_dataset("imagefolder", "test", root=tmp_path)) == 4


def test_imagefolder_without_the_split_says_so(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "val").rename(tmp_path / "holdout")
    with pytest.raises(DataNotFoundError, match=r"val or .*test"):
        load_dataset("imagefolder", "test", root=tmp_path)


def test_lazy_imagefolder_matches_the_in_memory_one(tmp_path):
    write_imagefolder(tmp_path)
    eager = load_dataset("imagefolder", root=tmp_path)
    lazy = load_dataset("imagefolder", root=tmp_path, lazy=True)
    assert isinstance(lazy, LazyImageFolder) and len(lazy) == len(eager)
    for i in range(len(eager)):
        assert torch.equal(lazy[i][0], eager[i][0]) and lazy[i][1] == eager[i][1]
    assert torch.equal(lazy.subset([4, 1]).labels, eager.subset([4, 1]).labels)
    batches = [make_loader(d, 4, train=True, seed=3) for d in (eager, lazy)]
    for (xe, ye), (xl, yl) in zip(*batches, strict=True):
        assert torch.equal(xe, xl) and torch.equal(ye, yl)


# --- synthetic -------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_splits_differ():
    kw = {"num_classes": 3, "channels": 1, "image_size": 8, "size": 30, "seed": 5}
    a, b = load_dataset("synthetic", **kw), load_dataset("synthetic", **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (30, 1, 8, 8) and a.labels.bincount().tolist() == [10, 10, 10]
    assert not torch.equal(load_dataset("synthetic", "test", **kw).images, a.images)
    assert not torch.equal(load_dataset("synthetic", **{**kw, "seed": 6}).images, a.images)


def test_synthetic_is_learnable():
    kw = {"num_classes": 4, "image_size": 8, "size": 256}
    train, test = load_dataset("synthetic", **kw), load_dataset("synthetic", "test", **kw)
    weight = torch.zeros(3 * 8 * 8, 4, requires_grad=True)
    loader = make_loader(train, 32, train=True, augment=False)  # 4-pixel shifts of 8x8: too hard
    losses = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, y in loader:  # plain SGD on a linear model (torch.optim takes seconds to import)
            loss = F.cross_entropy(x.flatten(1) @ weight, y)
            (grad,) = torch.autograd.grad(loss, weight)
            weight.data -= 0.05 * grad
            losses.append(loss.item())
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:3])
    x, y = next(iter(make_loader(test, 256, train=False)))
    assert ((x.flatten(1) @ weight).argmax(1) == y).float().mean() > 0.9


# --- loader ----------------------------------------------------------------------------------


def ids_data(n: int = 20, channels: int = 3, size: int = 6) -> ImageData:
    """Random images whose label is their index, so each batch row can be traced to its source."""
    info = DatasetInfo("ids", n, channels, (size, size), (0.0,) * channels, (1.0,) * channels)
    images = torch.from_numpy(pixels(n, (channels, size, size), 0))
    return ImageData(info, images, torch.arange(n))


def run_epoch(loader, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(e)
    return list(loader)


def test_same_seed_and_epoch_give_identical_batches_other_epochs_differ():
    data = ids_data()
    a, b = make_loader(data, 8, train=True, seed=1), make_loader(data, 8, train=True, seed=1)
    for (xa, ya), (xb, yb) in zip(run_epoch(a, 2), run_epoch(b, 2), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    e2, e3 = run_epoch(a, 2), run_epoch(a, 3)
    assert not torch.equal(e2[0][1], e3[0][1])
    other_seed = run_epoch(make_loader(data, 8, train=True, seed=2), 2)
    assert not torch.equal(e2[0][1], other_seed[0][1])
    state = torch.random.get_rng_state()
    run_epoch(a, 4)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_train_loaders_shuffle_and_drop_last_eval_loaders_keep_order():
    data = ids_data(20)
    train = make_loader(data, 8, train=True)
    assert len(train) == 2 and [len(y) for _, y in train] == [8, 8]
    assert sorted(torch.cat([y for _, y in train]).tolist()) != list(range(16))
    evaluation = make_loader(data, 8, train=False)
    assert len(evaluation) == 3
    assert torch.cat([y for _, y in evaluation]).tolist() == list(range(20))
    assert len(make_loader(data, 64, train=True)) == 1  # smaller than a batch: keep it
    assert len(make_loader(data, 8, train=True, drop_last=False)) == 3


def test_without_augmentation_batches_are_exactly_normalised_pixels():
    data, mean, std = ids_data(20), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x, y = next(iter(make_loader(data, 20, train=True, augment=False, mean=mean, std=std)))
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(x, (data.images[y].float() / 255 - mean_t) / std_t)
    data = load_dataset("synthetic", size=20)
    x, _ = next(iter(make_loader(data, 20, train=False, mean=(0.5,), std=(2.0,))))
    assert torch.equal(x, (data.images.float() / 255 - 0.5) / 2.0)


def test_crops_and_flips_are_valid_and_vary_per_sample():
    data, pad = ids_data(64), 2
    loader = make_loader(data, 64, train=True, crop_padding=pad, drop_last=False)
    ((x, y),) = run_epoch(loader, 0)
    padded = F.pad(data.images.float() / 255, (pad,) * 4)
    seen = set()
    for xi, i in zip(x, y.tolist(), strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(xi, crop(padded[i], dy, dx, flip, 6))
        ]
        assert matches, f"sample {i} is no crop/flip of its source"
        seen.update(matches)
    assert len(seen) > 10 and {f for _, _, f in seen} == {False, True}
    x, y = next(iter(make_loader(data, 64, train=True, crop_padding=0, hflip=False)))
    assert torch.equal(x, data.images[y].float() / 255)  # a no-op augmentation


def crop(padded: torch.Tensor, dy: int, dx: int, flip: bool, size: int) -> torch.Tensor:
    out = padded[:, dy : dy + size, dx : dx + size]
    return out.flip(-1) if flip else out


def test_grayscale_to_three_channels_and_resize():
    data = load_dataset("synthetic", channels=1, image_size=8, size=10, num_classes=2)
    loader = make_loader(data, 10, train=False, channels=3, input_size=20)
    x, _ = next(iter(loader))
    assert x.shape == (10, 3, 20, 20)
    assert loader.info.channels == 3 and loader.info.image_size == (20, 20)
    assert loader.info.mean == (0.5,) * 3
    # the documented order: replicate, resize, normalise
    want = (data.images.float() / 255).expand(-1, 3, -1, -1)
    want = F.interpolate(want, size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.equal(x, (want - 0.5) / 0.25)
    with pytest.raises(AutopruneError, match="3-channel images into 1"):
        make_loader(load_dataset("synthetic", size=4), 2, train=False, channels=1)
    with pytest.raises(AutopruneError, match="mean has 2 values"):
        make_loader(data, 2, train=False, channels=3, mean=(0.1, 0.2))


def test_channels_last_and_subset():
    data = load_dataset("synthetic", size=12).subset(torch.arange(0, 12, 2))
    assert len(data) == 6
    x, _ = next(iter(make_loader(data, 6, train=True, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


# --- the real data, where this machine has it ------------------------------------------------


def test_real_cifar10_jpeg75_has_the_official_sizes():
    if not (CIFAR10_JPEG75 / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"CIFAR-10-JPEG75 is not unpacked at {CIFAR10_JPEG75}")
    train = load_dataset("cifar10", root=CIFAR10_JPEG75, download=False)
    test = load_dataset("cifar10", "test", root=CIFAR10_JPEG75, download=False)
    assert (len(train), len(test)) == (50000, 10000)
    assert train.labels.bincount().tolist() == [5000] * 10
    assert train.info.classes[0] == "airplane"


def test_debian_fashion_mnist_has_the_official_sizes(tmp_path):
    if not FMNIST_SYSTEM.is_dir():
        pytest.skip(f"{FMNIST_SYSTEM} is missing: apt-get install dataset-fashion-mnist")
    train = load_dataset("fashion-mnist", root=tmp_path, download=False)  # found system-wide
    test = load_dataset("fashion-mnist", "test", root=tmp_path, download=False)
    assert (len(train), len(test)) == (60000, 10000) and train.images.shape[1:] == (1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
