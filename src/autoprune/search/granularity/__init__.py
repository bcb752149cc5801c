"""Granularities: what the search removes, from whole blocks down to single weights.

Pruning a network at one granularity leaves long chains of thin layers (channels only) or
very sparse dense layers (weights only); multi-grain pruning (MGP, Kollek et al. 2021) works
coarse to fine instead. A run goes through ``config.granularities`` in the registered order
(``rank``), each until its goal, with recovery in between:

- ``block`` and ``layer`` (:mod:`.units`): every removable unit is a
  candidate, tried by letting its input pass through; goal: a share of the MACs target;
- ``channel``: the schedule's (group, criterion) candidates, as in a channel-only run; goal:
  the MACs target (it is the last structured granularity, so it finishes the MACs);
- ``weight`` (:mod:`.weight`): steps of ``weight_step`` of all conv and
  linear weights, taken from one layer by magnitude or spread over every layer by a score
  comparable across layers (LAMP, global magnitude); goal: ``weight_sparsity``, unless
  recovery cannot hold the loss under ``weight_loss_limit`` times its value when the phase
  began (:attr:`Granularity.loss_limit`): then the step is undone and the phase ends early.

Candidates are scored by the same scorer on the same calibration loss; with the
``loss_per_mac`` objective weight candidates count parameters instead of MACs. Each
granularity is one module that owns what it removes: how to find it, try it, apply it and
(:mod:`autoprune.io.removals`) save and load it. Adding one is one such module, imported here.
"""

from . import channel, units, weight  # noqa: F401  (registers the granularities)
from ._base import GRANULARITIES, Granularity, check_granularity, plan

__all__ = ["GRANULARITIES", "Granularity", "check_granularity", "plan"]
