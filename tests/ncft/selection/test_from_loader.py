"""`ncft.score` on the user's own loader selects what `ncft neurons score`'s scorer does."""

from __future__ import annotations

import pytest

import ncft
from ncft.arch import get_adapter
from ncft.data.examples import Example, collate, encode
from ncft.scoring.attribution import GradAttribution
from ncft.scoring.groups import unit_groups
from ncft.selection import to_neuron_set, top_k
from tests.support.fake_engine import FakeEngine
from tests.support.tiny import SAMPLE_TEXT, tiny_llama, word_tokenizer

WORDS = SAMPLE_TEXT.split()


def _encoded():
    examples = [Example(" ".join(WORDS[i : i + 4 + i % 5]), WORDS[i + 4 + i % 5])
                for i in range(0, 120, 5)]
    return encode(examples, word_tokenizer(WORDS), max_length=16, add_eos=False)


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_score_equals_the_pipeline_scorer(positions):
    encoded = _encoded()
    model = tiny_llama(seed=0)
    blocks = get_adapter(model).mlp_blocks(model)
    groups = unit_groups(blocks)
    scores = GradAttribution(encoded, blocks, positions=positions, batch_size=5).score(
        FakeEngine(model), groups)
    expected = to_neuron_set(top_k(scores, groups, fraction=0.2), groups, {})
    loader = [collate(encoded[i : i + 7], 0) for i in range(0, len(encoded), 7)]
    got = ncft.score(model, loader, fraction=0.2, positions=positions)
    assert got.entries == expected.entries and got.num_selected() > 0
    assert got.meta["scorer"] == "grad_attribution"
    assert not any(p.grad is not None for p in model.parameters())  # no parameter grads


def test_score_refuses_other_scorers_and_empty_loaders():
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="ncft neurons"):
        ncft.score(model, [], scorer="weight_cosine")
    with pytest.raises(ValueError, match="no batch"):
        ncft.score(model, [])
