"""Deactivation by activation and by weight agree exactly and restore bit for bit."""

import pytest
import torch

from launcher.dist import DistInfo
from launcher.engines.common import OptimConfig
from launcher.engines.single import SingleEngine
from ncft.arch import get_adapter
from ncft.data.examples import Example, encode
from ncft.neuron_set import NeuronSet
from ncft.scoring.attribution import GradAttribution
from ncft.scoring.groups import unit_groups
from ncft.selection import to_neuron_set, top_k
from ncft.studies.deactivate import (
    answer_metrics,
    deactivate_activations,
    deactivate_weights,
    random_units,
)
from tests.support.tiny import SAMPLE_TEXT, VOCAB, tiny_llama, word_tokenizer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
UNITS = {0: torch.tensor([0, 5, 36]), 1: torch.tensor([2, 17])}
IDS = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))



def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("wrap", ["model", "engine"])
def test_activation_and_weight_deactivation_agree_and_restore(wrap):
    model = tiny_llama(seed=0)
    blocks = get_adapter(model).mlp_blocks(model)
    target = model if wrap == "model" else SingleEngine(model, OptimConfig(), INFO)
    before, base = _state(model), _logits(model)
    with deactivate_activations(target, blocks, UNITS):
        by_activation = _logits(model)
    with deactivate_weights(target, NeuronSet.from_units(blocks, UNITS)):
        by_weight = _logits(model)
        assert not model.get_parameter("model.layers.0.mlp.down_proj.weight")[:, 5].any()
    assert torch.equal(by_activation, by_weight)
    assert not torch.equal(by_activation, base)
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "weights not restored exactly"
    assert torch.equal(_logits(model), base)


def test_restores_after_an_error_and_edits_frozen_parameters():
    model = tiny_llama(seed=0)
    blocks = get_adapter(model).mlp_blocks(model)
    before, base = _state(model), _logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with deactivate_weights(model, NeuronSet.from_units(blocks, UNITS)):
            raise RuntimeError("boom")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    frozen = "model.layers.1.mlp.up_proj.weight"
    model.get_parameter(frozen).requires_grad_(False)
    engine = SingleEngine(model, OptimConfig(), INFO)
    with deactivate_activations(engine, blocks, UNITS):
        by_activation = _logits(model)
    with deactivate_weights(engine, NeuronSet.from_units(blocks, UNITS)) as how:
        assert torch.equal(_logits(model), by_activation)
    # a frozen parameter has no segment: it goes through Engine.edited
    assert how[frozen] == "edited"
    assert {v for k, v in how.items() if k != frozen} == {"local"}
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.equal(_logits(model), base)


def test_evaluate_deactivation_against_matched_random_set():
    words = SAMPLE_TEXT.split()
    tok = word_tokenizer(words)
    encoded = encode([Example(" ".join(words[i : i + 5]), words[i + 5]) for i in range(0, 120, 3)],
                     tok, 16, add_eos=False)
    model = tiny_llama(seed=0)
    blocks = get_adapter(model).mlp_blocks(model)
    engine = SingleEngine(model, OptimConfig(), INFO)
    groups = unit_groups(blocks)
    scores = GradAttribution(encoded, blocks, batch_size=8).score(engine, groups)
    nset = to_neuron_set(top_k(scores, groups, fraction=0.1), groups, {})
    before = _state(model)
    units = nset.units(blocks)
    control = random_units(units, blocks, seed=3)
    assert sum(len(v) for v in units.values()) == 8

    def loss_off(chosen, by_weights: bool, batch_size: int) -> float:
        off = (deactivate_weights(engine, NeuronSet.from_units(blocks, chosen)) if by_weights
               else deactivate_activations(engine, blocks, chosen))
        with off:
            return answer_metrics(engine, encoded, batch_size, 0)["loss"]

    base = answer_metrics(engine, encoded, 8, 0)["loss"]
    for chosen in (units, control):  # batch 6 vs 8: only summation order differs
        assert loss_off(chosen, False, 6) == pytest.approx(loss_off(chosen, True, 8), rel=1e-5)
    # |a * dL/da| ranks the size of the effect, not its sign (on this untrained model
    # switching the top 10 % off even lowers the loss): it beats as many random units
    assert abs(loss_off(units, False, 8) - base) > 2 * abs(loss_off(control, False, 8) - base)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert {k: len(v) for k, v in control.items()} == {k: len(v) for k, v in units.items()}
