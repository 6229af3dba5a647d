"""Neuron scorers behind one small protocol, chosen by name (`selection.scorer`).

A scorer turns an engine (and whatever it was built with: task data, a reference
state) into `Scores`, one float per candidate of each `ncft.selection.Group`,
higher = selected first, identical on every rank. `meta()` is what the resulting
NeuronSet records. `SCORERS` maps each `selection.scorer` name to a builder that
takes what that scorer needs from one `ScoringInputs`; `ncft.selection.pipeline`
is its one caller. Selection itself (top-k, reversed, union) lives in
`ncft.selection`, the matched random control in `ncft.scoring.controls`.

| name | candidates | needs |
|---|---|---|
| grad_attribution | FFN units | encoded task examples |
| weight_cosine | units or rows | probe steps (NeFT's fine-tune), or a fine-tuned checkpoint |
| reversed | units or rows | as weight_cosine; the pipeline takes the lowest scores |
| neft_plus_reversed | units or rows | weight_cosine; top `fraction` + lowest `reversed_fraction` |
| random | units or rows | a seed |
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from ncft.arch import MlpBlock
from ncft.engine import Engine
from ncft.scoring.attribution import GradAttribution
from ncft.scoring.controls import RandomScorer
from ncft.scoring.cosine import CheckpointReference, NeftProbe, WeightCosine
from ncft.scoring.groups import Group, Scores


class Scorer(Protocol):
    """Scores the candidates of `groups` on `engine`."""

    name: str

    def score(self, engine: Engine, groups: Sequence[Group]) -> Scores:
        """Return `group name -> [group.size]` scores, the same on every rank."""
        ...

    def meta(self) -> dict[str, Any]:
        """Metadata to store with a NeuronSet selected from these scores (after `score`)."""
        ...


@dataclass(frozen=True)
class ScoringInputs:
    """Everything a registered scorer may be built from, for one task; each takes its part.

    Attributes:
        blocks: MLP blocks of the unwrapped model (grad_attribution).
        encoded: Returns the task's encoded training examples (grad_attribution); a
            callable, so only the scorer that reads them pays for tokenizing.
        probe_steps: Micro-batch lists NeFT's probe fully fine-tunes on (weight_cosine).
        pad_id: Token id that pads batches.
        positions: Token positions whose attribution is summed ("answer" or "all").
        num_examples: Examples grad_attribution scores on.
        batch_size: Scoring batch size per rank.
        cosine_steps: Probe fine-tuning steps before weight_cosine compares rows.
        seed: Seed of the random scorer.
        model_id: Recorded in metadata.
        reference: A fine-tuned HF checkpoint directory weight_cosine compares against
            instead of running the probe (None: run the probe).
    """

    blocks: Sequence[MlpBlock]
    encoded: Callable[[], Sequence[Mapping[str, torch.Tensor]]]
    probe_steps: Iterable[Sequence[dict]]
    pad_id: int
    positions: Literal["all", "answer"] = "answer"
    num_examples: int | None = None
    batch_size: int = 8
    cosine_steps: int = 20
    seed: int = 0
    model_id: str = ""
    reference: str | None = None


def _grad_attribution(inputs: ScoringInputs) -> Scorer:
    return GradAttribution(
        encoded=inputs.encoded(), blocks=inputs.blocks, positions=inputs.positions,
        num_examples=inputs.num_examples, batch_size=inputs.batch_size, pad_id=inputs.pad_id,
        model_id=inputs.model_id,
    )


def _weight_cosine(inputs: ScoringInputs) -> Scorer:
    if inputs.reference is not None:
        return WeightCosine(CheckpointReference(inputs.reference), {"reference": inputs.reference})
    return NeftProbe(inputs.probe_steps, inputs.cosine_steps)


def _random(inputs: ScoringInputs) -> Scorer:
    return RandomScorer(seed=inputs.seed)


SCORERS: dict[str, Callable[[ScoringInputs], Scorer]] = {
    "grad_attribution": _grad_attribution,
    "weight_cosine": _weight_cosine,
    "reversed": _weight_cosine,  # NeFT's control: the same scores, lowest taken
    "neft_plus_reversed": _weight_cosine,  # NeFT §6.2: highest x% plus lowest y%
    "random": _random,
}


def make_scorer(name: str, inputs: ScoringInputs) -> Scorer:
    """Build the scorer registered as `name` from the parts of `inputs` it needs.

    Raises:
        ValueError: If `name` is not registered.
    """
    if name not in SCORERS:
        raise ValueError(f"selection.scorer: unknown {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name](inputs)


__all__ = [
    "SCORERS", "GradAttribution", "NeftProbe", "RandomScorer", "Scorer", "ScoringInputs",
    "WeightCosine", "make_scorer",
]
