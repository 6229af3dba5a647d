"""Neuron selection: which candidates a task trains.

- `ncft.selection.topk`: pure functions from per-candidate scores to a NeuronSet
  (candidate groups, top-k per layer or global, reversed, union, rank agreement),
  re-exported here.
- `ncft.selection.pipeline`: the one selection pipeline (candidates -> a scorer from
  `ncft.scoring.SCORERS` -> top-k -> NeuronSet) that runs, studies and
  `ncft neurons score` share. Import it from its module: the scorers import this
  package for `Group`, so re-exporting the pipeline here would be circular.
"""

from ncft.selection.topk import *  # noqa: F403 - the package's names are topk's
from ncft.selection.topk import __all__ as __all__
