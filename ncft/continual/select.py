"""Choose a task's neurons on the current model: scorer -> top-k -> NeuronSet.

Every rank computes the same all-reduced scores, so every rank selects the same
set; the checksum is verified across ranks before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ncft.arch import get_adapter
from ncft.data.examples import encode
from ncft.engine import Engine
from ncft.neuron_set import NeuronSet
from ncft.scoring import GradAttribution, RandomScorer
from ncft.scoring.cosine import finetune_and_score
from ncft.selection import (
    check_identical_across_ranks,
    row_groups,
    to_neuron_set,
    top_k,
    union_with_previous,
    unit_groups,
)


@dataclass(frozen=True)
class SelectConfig:
    """The spec's `selection` section as plain values."""

    scorer: str
    fraction: float | None
    count: int | None
    per_layer: bool
    modules: tuple[str, ...]
    unit: str
    positions: str
    num_examples: int
    batch_size: int
    cosine_steps: int
    union_with_previous: bool
    seed: int
    model_id: str = ""


def candidate_groups(model: nn.Module, cfg: SelectConfig):
    """The candidate groups: FFN units over the chosen roles, or weight rows."""
    if cfg.unit == "neuron":
        roles = [m for m in cfg.modules if m != "attention"]
        return unit_groups(get_adapter(model).mlp_blocks(model), roles)
    return row_groups(model, cfg.modules)


def select_neurons(
    engine: Engine, model: nn.Module, cfg: SelectConfig, *, method: str, encoded_train,
    train_steps, task: str, stage: int, pad_id: int, previous: NeuronSet | None,
    keep_scores: dict | None = None,
) -> NeuronSet:
    """Score on `engine` (built over the candidates) and return the task's NeuronSet.

    Args:
        engine: Engine whose trainable parameters include every candidate.
        model: The unwrapped model (adapters and shapes).
        cfg: Selection settings.
        method: The training method (`random_neurons` forces random selection).
        encoded_train: Encoded training examples (grad_attribution scores on them).
        train_steps: Micro-batch steps for NeFT's probe fine-tune (weight_cosine).
        task: Task name (metadata).
        stage: Stage index (seeds the random control per task).
        pad_id: Padding token id.
        previous: The previous task's set, for `union_with_previous`.
        keep_scores: If given, filled with the per-candidate scores (group name ->
            1-D tensor) the selection was made from.
    """
    groups = candidate_groups(model, cfg)
    scorer_name = "random" if method == "random_neurons" else cfg.scorer
    meta: dict[str, Any]
    if scorer_name == "grad_attribution":
        scorer = GradAttribution(
            encoded=encoded_train, blocks=get_adapter(model).mlp_blocks(model),
            positions=cfg.positions, num_examples=cfg.num_examples,
            batch_size=cfg.batch_size, pad_id=pad_id, model_id=cfg.model_id,
        )
        scores, meta = scorer.score(engine, groups), scorer.meta()
    elif scorer_name in ("weight_cosine", "reversed"):
        scores, meta = finetune_and_score(engine, groups, train_steps, cfg.cosine_steps)
    else:
        scorer = RandomScorer(seed=cfg.seed * 1000 + stage)
        scores, meta = scorer.score(engine, groups), scorer.meta()
    if keep_scores is not None:
        keep_scores.update(scores)
    chosen = top_k(scores, groups, cfg.fraction, cfg.count, cfg.per_layer,
                   reverse=scorer_name == "reversed")  # fmt: skip
    meta = {**meta, "task": task, "fraction": cfg.fraction, "count": cfg.count,
            "per_layer": cfg.per_layer, "unit": cfg.unit, "modules": list(cfg.modules),
            "reversed": scorer_name == "reversed"}  # fmt: skip
    nset = to_neuron_set(chosen, groups, meta)
    if cfg.union_with_previous:
        nset = union_with_previous(nset, previous)
    check_identical_across_ranks(engine, nset)
    return nset


__all__ = ["SelectConfig", "candidate_groups", "encode", "select_neurons"]
