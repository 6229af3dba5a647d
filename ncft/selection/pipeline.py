"""Choose a task's neurons on the current model: candidates -> scorer -> top-k -> NeuronSet.

The one selection path of the project: a run's stages (`ncft.continual.loop`, through
its `Selector` protocol), the run's studies and `ncft neurons score` all call
`SelectionPipeline.select`. The scorer comes from the `ncft.scoring.SCORERS`
registry by its `selection.scorer` name; top-k and the NeuronSet come from
`ncft.selection.topk`.

Every rank computes the same all-reduced scores, so every rank selects the same
set; the checksum is verified across ranks before it is used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ncft.arch import get_adapter
from ncft.continual.methods import method
from ncft.data.examples import encode
from ncft.engine import Engine
from ncft.neuron_set import NeuronSet
from ncft.scoring import ScoringInputs, make_scorer
from ncft.scoring.cosine import finetune_and_score
from ncft.scoring.groups import Group, Scores, row_groups, unit_groups
from ncft.selection.topk import (
    candidate_parameters,
    check_identical_across_ranks,
    selected_of,
    to_neuron_set,
    top_and_bottom,
    top_by_parameters,
    top_k,
    union_with_previous,
)

if TYPE_CHECKING:
    from ncft.continual.task import TaskData

# (engine, task, stage) -> endless micro-batch lists of the task's training data.
StepsProvider = Callable[[Engine, "TaskData", int], Iterable[Sequence[dict]]]


@dataclass(frozen=True)
class SelectConfig:
    """The spec's `selection` section as plain values, same names, no defaults.

    Built by `launcher.spec.SelectionSpec.to_config` (see `ncft.continual.config`).
    """

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
    exclude_previous: bool
    model_id: str
    reversed_fraction: float | None
    fraction_of: str  # candidates | parameters (NeFT's x% of the model's parameters)


def candidate_groups(model: nn.Module, cfg: SelectConfig) -> list[Group]:
    """The candidate groups: FFN units over the chosen roles, or weight rows."""
    if cfg.unit == "neuron":
        roles = [m for m in cfg.modules if m != "attention"]
        return unit_groups(get_adapter(model).mlp_blocks(model), roles)
    return row_groups(model, cfg.modules)


def _no_previous(stage: int) -> NeuronSet | None:
    del stage
    return None


def _no_earlier(stage: int) -> list[NeuronSet]:
    del stage
    return []


def exclude_owned(scores: Scores, groups: Sequence[Group], owned: Sequence[NeuronSet],
                  reverse: bool) -> tuple[Scores, dict[str, torch.Tensor]]:
    """Scores where every unit an earlier task owns ranks last (`exclude_previous`).

    Returns:
        The new scores (-inf, or +inf when the lowest are taken) and the excluded
        indices per group, to check that the choice stayed clear of them.
    """
    excluded = {g.name: torch.zeros(0, dtype=torch.long) for g in groups}
    if owned:
        excluded |= selected_of(functools.reduce(NeuronSet.union, owned), groups)
    worst = float("inf") if reverse else float("-inf")
    out = {}
    for g in groups:
        values = scores[g.name].detach().double().cpu().clone()
        values[excluded[g.name]] = worst
        out[g.name] = values
    return out, excluded


@dataclass(frozen=True)
class SelectionPipeline:
    """Selects a task's neurons on an engine; implements `ncft.continual.services.Selector`.

    Attributes:
        cfg: Selection settings.
        tokenizer: Encodes the task's examples (grad_attribution); gives the pad id.
        train_steps: `(engine, task, stage) -> micro-batch lists` that NeFT's probe
            fine-tunes on (`ncft.continual.task.stage_steps`).
        method: The training method; `random_neurons` scores randomly (the control).
        previous: `stage -> the set the previous task trained`, read only with
            `cfg.union_with_previous`.
        earlier: `stage -> the sets of all earlier tasks`, read only with
            `cfg.exclude_previous`.
        save_probe: If set, called as `(task name, scores)` with NeFT's probe scores
            of every selection (the "before" of the rank-shift study); with method
            `random_neurons` the probe runs before the random choice, which ignores it.
        reference: A fine-tuned checkpoint directory that weight_cosine compares
            against instead of running the probe.
        extra_meta: Recorded in every set after the selection's own metadata.
    """

    cfg: SelectConfig
    tokenizer: Any
    train_steps: StepsProvider
    method: str = "neurons"
    previous: Callable[[int], NeuronSet | None] = _no_previous
    earlier: Callable[[int], list[NeuronSet]] = _no_earlier
    save_probe: Callable[[str, Scores], None] | None = None
    reference: str | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def scorer_name(self) -> str:
        """The registered scorer this pipeline uses (the method can force `random`)."""
        return "random" if method(self.method).random else self.cfg.scorer

    def groups(self, model: nn.Module) -> list[Group]:
        """The candidate groups of `model` (unwrapped: names and shapes)."""
        return candidate_groups(model, self.cfg)

    def probe(self, engine: Engine, groups: Sequence[Group], task: TaskData,
              stage: int) -> tuple[Scores, dict[str, Any]]:
        """NeFT's probe: fine-tune `engine` in place `cosine_steps` steps, score `1 - cos`."""
        steps = self.train_steps(engine, task, stage)
        return finetune_and_score(engine, groups, steps, self.cfg.cosine_steps)

    def select(self, engine: Engine, model: nn.Module, task: TaskData, stage: int) -> NeuronSet:
        """Score on `engine` (built over the candidates) and return the task's NeuronSet.

        Args:
            engine: Engine whose trainable parameters include every candidate; a
                weight_cosine probe fine-tunes it, so train on a fresh one afterwards.
            model: The unwrapped model (adapters and shapes).
            task: The task (its name, training examples and max length).
            stage: Stage index: seeds the random scorer and the probe's data order.
        """
        groups = self.groups(model)
        name = self.scorer_name
        probe = None
        if self.save_probe is not None and name == "random":
            probe, _ = self.probe(engine, groups, task, stage)
        scorer = make_scorer(name, self._inputs(engine, model, task, stage))
        scores, meta = scorer.score(engine, groups), scorer.meta()
        c = self.cfg
        reverse = name == "reversed"
        extra: dict[str, Any] = {}
        excluded, ranked = None, scores
        if c.exclude_previous and stage > 0:
            if name == "neft_plus_reversed":
                raise ValueError("selection.exclude_previous cannot be combined with scorer "
                                 "neft_plus_reversed (it takes both ends of the ranking)")
            # Choose this task's units only among units no earlier task owns: the
            # disjoint-sets variant of NCFT (#14's forgetting diagnosis).
            ranked, excluded = exclude_owned(scores, groups, self.earlier(stage), reverse)
            extra = {"excluded_units": int(sum(v.numel() for v in excluded.values()))}
        if c.fraction_of == "parameters":  # NeFT's x%: of the model's parameters, globally
            shapes = dict(engine.named_parameter_shapes())
            sizes = candidate_parameters(groups, shapes)
            total = sum(math.prod(shape) for shape in shapes.values())
            chosen = top_by_parameters(
                ranked, groups, c.fraction, sizes, total, reverse=reverse,
                reversed_fraction=c.reversed_fraction if name == "neft_plus_reversed" else None)
            owned = sum(int(chosen[g.name].numel()) * sizes[g.name] for g in groups)
            extra = {**extra, "fraction_of": "parameters", "model_parameters": total,
                     "selected_parameters": owned}
            if name == "neft_plus_reversed":
                extra["reversed_fraction"] = c.reversed_fraction
        elif name == "neft_plus_reversed":  # NeFT §6.2's NeFT_x%+Reversed_y%
            if c.reversed_fraction is None:
                raise ValueError("selection.reversed_fraction: scorer neft_plus_reversed needs "
                                 "the fraction of least-changed candidates to add (y of "
                                 "NeFT_x%+Reversed_y%)")
            chosen = top_and_bottom(ranked, groups, c.fraction, c.count, c.reversed_fraction,
                                    c.per_layer)
            extra = {"reversed_fraction": c.reversed_fraction}
        else:
            chosen = top_k(ranked, groups, c.fraction, c.count, c.per_layer, reverse=reverse)
        meta = {**meta, "task": task.name, "fraction": c.fraction, "count": c.count,
                "per_layer": c.per_layer, "unit": c.unit, "modules": list(c.modules),
                "reversed": reverse, **extra, **self.extra_meta}
        if excluded is not None:
            for g in groups:
                if bool(torch.isin(chosen[g.name], excluded[g.name]).any()):
                    raise ValueError(
                        f"selection.exclude_previous: {g.name} has too few units that no "
                        "earlier task owns for the requested count; lower selection.fraction "
                        "or selection.count")
        nset = to_neuron_set(chosen, groups, meta)
        if c.union_with_previous:
            nset = union_with_previous(nset, self.previous(stage))
        check_identical_across_ranks(engine, nset)
        if self.save_probe is not None:
            self.save_probe(task.name, scores if probe is None else probe)
        return nset

    def _inputs(self, engine: Engine, model: nn.Module, task: TaskData,
                stage: int) -> ScoringInputs:
        c, tok = self.cfg, self.tokenizer
        return ScoringInputs(
            blocks=get_adapter(model).mlp_blocks(model),
            encoded=lambda: encode(task.train, tok, task.max_length),
            probe_steps=self.train_steps(engine, task, stage), pad_id=tok.pad_token_id,
            positions=c.positions, num_examples=c.num_examples, batch_size=c.batch_size,
            cosine_steps=c.cosine_steps, seed=c.seed * 1000 + stage, model_id=c.model_id,
            reference=self.reference,
        )


__all__ = ["SelectConfig", "SelectionPipeline", "StepsProvider", "candidate_groups"]
