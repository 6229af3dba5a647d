"""The selection pipeline: scorers by registry name, method and stage, probe, union."""

from typing import get_args

import pytest
import torch

from launcher.dist import DistInfo
from launcher.engines.common import OptimConfig
from launcher.engines.single import SingleEngine
from launcher.spec.schema import SelectionSpec
from ncft.continual.task import TaskData
from ncft.neuron_set import NeuronSet
from ncft.scoring import SCORERS, ScoringInputs, make_scorer
from ncft.scoring.controls import RandomScorer
from ncft.scoring.cosine import finetune_and_score
from ncft.selection import candidate_parameters, to_neuron_set, top_by_parameters, top_k
from ncft.selection.pipeline import SelectConfig, SelectionPipeline
from tests.support.tiny import VOCAB, tiny_llama, word_tokenizer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
TASK = TaskData("t", "classification", ["a"], train=[], test=[], max_length=16)
IDS = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))


def _cfg(**changes) -> SelectConfig:
    base = dict(scorer="weight_cosine", fraction=None, count=4, per_layer=False,
                modules=("up", "attention"), unit="row", positions="answer", num_examples=8,
                batch_size=4, cosine_steps=2, union_with_previous=False, seed=3,
                exclude_previous=False, model_id="", reversed_fraction=None,
                fraction_of="candidates")
    return SelectConfig(**{**base, **changes})


def _steps(engine, task, stage):
    del engine, task, stage
    return iter([[{"input_ids": IDS, "labels": IDS}]] * 5)


def _pipeline(cfg, **options) -> SelectionPipeline:
    return SelectionPipeline(cfg, word_tokenizer(["a"]), _steps, **options)


def _engine():
    model = tiny_llama(seed=0)
    return SingleEngine(model, OptimConfig(lr=1e-2), INFO), model


def _probe(cfg):
    """NeFT's probe scores of `cfg`'s candidates, on a fresh engine."""
    engine, model = _engine()
    groups = _pipeline(cfg).groups(model)
    return groups, finetune_and_score(engine, groups, _steps(None, None, 0), cfg.cosine_steps)[0]


def test_every_spec_scorer_is_registered():
    assert set(get_args(SelectionSpec.model_fields["scorer"].annotation)) == set(SCORERS)
    inputs = ScoringInputs(blocks=[], encoded=list, probe_steps=(), pad_id=0)
    with pytest.raises(ValueError, match="selection.scorer: unknown 'magic'"):
        make_scorer("magic", inputs)


def test_reversed_takes_the_lowest_probe_scores_and_keeps_them():
    cfg = _cfg(scorer="reversed")
    groups, scores = _probe(cfg)
    kept = {}
    engine, model = _engine()
    nset = _pipeline(cfg, save_probe=lambda task, s: kept.update({task: s})).select(
        engine, model, TASK, 0)
    expected = to_neuron_set(top_k(scores, groups, count=4, per_layer=False, reverse=True),
                             groups, {})
    assert nset.checksum() == expected.checksum()
    assert nset.meta["reversed"] and nset.meta["finetune_steps"] == 2
    assert nset.meta["scorer"] == "weight_cosine" and nset.meta["task"] == "t"
    assert list(kept) == ["t"] and all(torch.equal(kept["t"][g], scores[g]) for g in scores)


def test_random_method_seeds_by_stage_and_keeps_the_probe_for_the_control():
    cfg = _cfg()
    groups, scores = _probe(cfg)
    kept = {}
    engine, model = _engine()
    pipeline = _pipeline(cfg, method="random_neurons",
                         save_probe=lambda task, s: kept.update({task: s}))
    nset = pipeline.select(engine, model, TASK, 2)
    drawn = RandomScorer(seed=3 * 1000 + 2).score(None, groups)
    expected = to_neuron_set(top_k(drawn, groups, count=4, per_layer=False), groups, {})
    assert nset.checksum() == expected.checksum()
    assert nset.meta["scorer"] == "random" and nset.meta["seed"] == 3002
    # The control's "before" scores are NeFT's probe, not the random draw.
    assert all(torch.equal(kept["t"][g], scores[g]) for g in scores)


def test_union_with_previous_reads_the_previous_stage():
    cfg = _cfg(scorer="random", union_with_previous=True)
    engine, model = _engine()
    groups = _pipeline(cfg).groups(model)
    earlier = to_neuron_set({groups[0].name: torch.tensor([0, 1])}, groups, {})
    asked = []

    def previous(stage: int) -> NeuronSet:
        asked.append(stage)
        return earlier

    nset = _pipeline(cfg, previous=previous).select(engine, model, TASK, 1)
    alone = _pipeline(_cfg(scorer="random")).select(engine, model, TASK, 1)
    assert asked == [1] and nset.meta["union_with"] == earlier.checksum()
    assert nset.checksum() == alone.union(earlier).checksum() != alone.checksum()


def test_neft_plus_reversed_takes_top_and_bottom_of_the_probe():
    cfg = _cfg(scorer="neft_plus_reversed", count=3, reversed_fraction=0.01)
    groups, scores = _probe(cfg)
    engine, model = _engine()
    nset = _pipeline(cfg).select(engine, model, TASK, 0)
    top = top_k(scores, groups, count=3, per_layer=False)
    low = top_k(scores, groups, fraction=0.01, per_layer=False, reverse=True)
    expected = to_neuron_set({g: torch.cat([top[g], low[g]]).unique() for g in top}, groups, {})
    assert nset.checksum() == expected.checksum()
    n = sum(g.size for g in groups)
    assert nset.meta["reversed_fraction"] == 0.01 and round(0.01 * n) > 0
    with pytest.raises(ValueError, match="selection.reversed_fraction"):
        engine, model = _engine()
        _pipeline(_cfg(scorer="neft_plus_reversed")).select(engine, model, TASK, 0)


def _unit_cfg(**changes) -> SelectConfig:
    return _cfg(scorer="random", unit="neuron", modules=("gate", "up", "down"),
                per_layer=True, count=None, fraction=0.25, **changes)


def test_exclude_previous_picks_only_units_no_earlier_task_owns():
    engine, model = _engine()
    groups = _pipeline(_unit_cfg()).groups(model)
    # Two earlier tasks own different units of every group.
    first = to_neuron_set({g.name: torch.tensor([0, 1]) for g in groups}, groups, {})
    second = to_neuron_set({g.name: torch.tensor([2, 3]) for g in groups}, groups, {})
    free = _pipeline(_unit_cfg()).select(engine, model, TASK, 2)
    asked = []

    def earlier(stage):
        asked.append(stage)
        return [first, second]

    nset = _pipeline(_unit_cfg(exclude_previous=True), earlier=earlier).select(
        engine, model, TASK, 2)
    assert asked == [2] and nset.meta["excluded_units"] == 4 * len(groups)
    assert nset.num_selected() == free.num_selected()  # the same number per layer...
    owned = first.union(second)
    assert nset.intersection(owned).num_selected() == 0  # ...and none an earlier task owns
    assert free.intersection(owned).num_selected() > 0  # which the plain choice did take
    # The first stage has nothing to exclude: the plain choice.
    assert _pipeline(_unit_cfg(exclude_previous=True), earlier=earlier).select(
        engine, model, TASK, 0).checksum() == _pipeline(_unit_cfg()).select(
        engine, model, TASK, 0).checksum()


def test_exclude_previous_refuses_when_a_layer_runs_out_of_free_units():
    engine, model = _engine()
    groups = _pipeline(_unit_cfg()).groups(model)
    everything = to_neuron_set({g.name: torch.arange(g.size - 1) for g in groups}, groups, {})
    with pytest.raises(ValueError, match="selection.exclude_previous: .* too few units"):
        _pipeline(_unit_cfg(exclude_previous=True), earlier=lambda s: [everything]).select(
            engine, model, TASK, 1)


def test_fraction_of_parameters_counts_the_model_and_ranks_globally():
    cfg = _cfg(fraction=0.02, count=None, fraction_of="parameters")
    groups, scores = _probe(cfg)
    engine, model = _engine()
    nset = _pipeline(cfg).select(engine, model, TASK, 0)
    total = sum(p.numel() for p in model.parameters())
    sizes = candidate_parameters(groups, {n: p.shape for n, p in model.named_parameters()})
    expected = to_neuron_set(top_by_parameters(scores, groups, 0.02, sizes, total), groups, {})
    assert nset.checksum() == expected.checksum()
    assert nset.meta["model_parameters"] == total
    assert 0 < nset.meta["selected_parameters"] <= round(0.02 * total)
    per_candidate = _pipeline(_cfg(fraction=0.02, count=None)).select(*_engine(), TASK, 0)
    assert per_candidate.checksum() != nset.checksum()
