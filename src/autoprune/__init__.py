"""autoprune: automatic loss-aware structured pruning for PyTorch CNNs and hybrids."""

from .api import build_model, complexity, evaluate, prune, train
from .data import list_datasets, load_dataset, make_loader
from .errors import AutopruneError, CheckpointError, DataNotFoundError, UnknownNameError
from .graph import LayerPruner, register_layer
from .io import load, save
from .measure import count_macs, count_params, profile_model
from .models import create_model, list_models, load_weights
from .report import write_report
from .search import PruneConfig, Pruner, PruneResult
from .task import Task, default_adapter
from .train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "AutopruneError",
    "CheckpointError",
    "DataNotFoundError",
    "LayerPruner",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "Task",
    "TrainConfig",
    "UnknownNameError",
    "__version__",
    "build_model",
    "complexity",
    "count_macs",
    "count_params",
    "create_model",
    "default_adapter",
    "evaluate",
    "list_datasets",
    "list_models",
    "load",
    "load_dataset",
    "load_weights",
    "make_loader",
    "profile_model",
    "prune",
    "register_layer",
    "save",
    "train",
    "write_report",
]
