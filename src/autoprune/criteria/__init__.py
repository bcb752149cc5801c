"""Channel importance criteria: one registry; every score is per group channel, lower = first out.

Built in: ``l1``, ``l2``, ``bn_scale`` (magnitude), ``fpgm``, ``euclidean``, ``cosine``
(similarity), ``taylor`` (saliency, needs calibration data), ``random`` (control).
"""

from . import control, magnitude, saliency, similarity  # noqa: F401  (registers the criteria)
from ._base import CRITERIA, KINDS, list_criteria, register_criterion, score, select
from .saliency import TaylorAccumulator

__all__ = [
    "CRITERIA",
    "KINDS",
    "TaylorAccumulator",
    "list_criteria",
    "register_criterion",
    "score",
    "select",
]
