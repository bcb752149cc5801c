"""Loss-aware automatic pruning to a MACs target (LAASP, made fast), plus the baselines.

Every iteration a schedule proposes a removal (for the loss-aware ones: the best of the
(group, criterion) candidates scored on a calibration set), it is applied physically, the
model recovers briefly every ``recover_every`` of the original MACs, and the run is
checkpointed so it can resume. Schedules, allocations, objectives, scorers and granularities
(blocks, layers, channels, weights: multi-grain pruning, coarse to fine) are registries.

The modules, one concept each: :mod:`.pruner` (the engine: one step at a time, undo, state for
resume), :mod:`.loop` (a whole run over it), :mod:`.training` (recovery and fine-tuning),
:mod:`.state` (what a run saves), :mod:`.summary` (``summary.json``), :mod:`.run` (the run
directory) and :mod:`._display` (progress).
"""

from .calibration import CalibrationSet
from .candidates import OBJECTIVES, Candidate, Objective, make_candidates
from .config import PruneConfig, default_criteria
from .granularity import GRANULARITIES, Granularity
from .loop import PruneResult, run_search
from .pruner import Pruner
from .run import RunDir
from .schedules import ALLOCATIONS, SCHEDULES, Schedule, SearchContext, Step
from .scorers import SCORERS, create_scorer
from .training import Recover, SearchData

__all__ = [
    "ALLOCATIONS",
    "GRANULARITIES",
    "OBJECTIVES",
    "SCHEDULES",
    "SCORERS",
    "CalibrationSet",
    "Candidate",
    "Granularity",
    "Objective",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "Recover",
    "RunDir",
    "Schedule",
    "SearchContext",
    "SearchData",
    "Step",
    "create_scorer",
    "default_criteria",
    "make_candidates",
    "run_search",
]
