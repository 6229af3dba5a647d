"""Neuron scorers behind one small protocol, chosen by name (`selection.scorer`).

A scorer turns an engine (and whatever it was built with: task data, a reference
state) into `Scores`, one float per candidate of each `ncft.selection.Group`,
higher = selected first, identical on every rank. `meta()` is what the resulting
NeuronSet records. Selection (top-k, reversed, random-matched, union) lives in
`ncft.selection` and `ncft.scoring.controls`.

| name | candidates | needs |
|---|---|---|
| grad_attribution | FFN units | encoded task examples |
| weight_cosine | units or rows | a reference state (snapshot before fine-tuning, or a checkpoint) |
| random | units or rows | a seed |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ncft.engine import Engine
from ncft.scoring.attribution import GradAttribution
from ncft.scoring.controls import RandomScorer
from ncft.scoring.cosine import WeightCosine
from ncft.selection import Group, Scores


class Scorer(Protocol):
    """Scores the candidates of `groups` on `engine`."""

    name: str

    def score(self, engine: Engine, groups: Sequence[Group]) -> Scores:
        """Return `group name -> [group.size]` scores, the same on every rank."""
        ...

    def meta(self) -> dict[str, Any]:
        """Metadata to store with a NeuronSet selected from these scores."""
        ...


SCORERS: dict[str, Callable[..., Scorer]] = {
    "grad_attribution": GradAttribution,
    "weight_cosine": WeightCosine,
    "random": RandomScorer,
}


def make_scorer(name: str, **options: Any) -> Scorer:
    """Build the scorer registered as `name` with its options (see each class).

    Raises:
        ValueError: If `name` is not registered.
    """
    if name not in SCORERS:
        raise ValueError(f"scorer: unknown {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name](**options)


__all__ = ["SCORERS", "GradAttribution", "RandomScorer", "Scorer", "WeightCosine", "make_scorer"]
