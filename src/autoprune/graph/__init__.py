"""Coupled channel groups, trial removal by masking, and physical removal.

Built on Torch-Pruning's ``DependencyGraph`` with our own rules: option-A shortcuts
(:class:`~autoprune.layers.ChannelPadShortcut`, also rewritten from ``F.pad``), attention
heads and head dimensions, scopes, checks for layers and ops it would get wrong, exact MAC
accounting and exact masking; a user's own layer types join through :func:`register_layer`.
"""

from . import _swin  # noqa: F401  (registers torchvision Swin attention)
from ._clone import clone_graph
from ._fx import NORMALIZED_ATTR, normalize_model
from ._verify import verify_groups
from .build import build_graph
from .custom import LayerPruner, register_layer
from .groups import ChannelGroup, Member
from .masking import ChannelMask, mask_channels, mask_pieces
from .pruning_graph import DEFAULT_PRUNABLE_TYPES, PruningGraph
from .scopes import SCOPES, list_scopes, scope_report
from .stacking import StackedMask, stackable

__all__ = [
    "DEFAULT_PRUNABLE_TYPES",
    "NORMALIZED_ATTR",
    "SCOPES",
    "ChannelGroup",
    "ChannelMask",
    "LayerPruner",
    "Member",
    "PruningGraph",
    "StackedMask",
    "build_graph",
    "clone_graph",
    "list_scopes",
    "mask_channels",
    "mask_pieces",
    "normalize_model",
    "register_layer",
    "scope_report",
    "stackable",
    "verify_groups",
]
