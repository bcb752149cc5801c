"""Datasets as uint8 tensors plus a batched, device-side, reproducible loader.

Importing this package registers every built-in dataset; ``list_datasets()`` names them.
"""

from . import cifar, fashion_mnist, imagefolder, synthetic  # noqa: F401  (registration)
from ._base import (
    DATASETS,
    DatasetInfo,
    ImageData,
    dataset_info,
    default_data_root,
    list_datasets,
    load_dataset,
    register_dataset,
)
from .imagefolder import LazyImageFolder
from .loader import BatchLoader, make_loader
from .user import UserBatches, UserData, first_batches, is_user_data

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DatasetInfo",
    "ImageData",
    "LazyImageFolder",
    "UserBatches",
    "UserData",
    "dataset_info",
    "default_data_root",
    "first_batches",
    "is_user_data",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "register_dataset",
]
