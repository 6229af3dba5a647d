import numpy as np
import pytest
import torch

from ncft.analysis.overlap import iou_matrix, layer_of
from ncft.arch import get_adapter
from ncft.neuron_set import NeuronSet, Selection
from tests.support.tiny import tiny_llama


def _down(layer):
    return f"model.layers.{layer}.mlp.down_proj.weight"


def _set(spec):
    return NeuronSet(
        {k: Selection(a, torch.tensor(v, dtype=torch.int64)) for k, (a, v) in spec.items()}
    )


A = _set({_down(0): (1, [0, 1, 2, 3]), _down(1): (1, [0, 1])})
B = _set({_down(0): (1, [2, 3, 4, 5]), _down(1): (1, [0, 1])})
C = _set({_down(1): (1, [7])})


def test_layer_of():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("transformer.h.3.mlp.c_fc.bias") == 3
    assert layer_of("model.embed_tokens.weight") is None


def test_iou_known_values():
    out = iou_matrix({"a": A, "b": B, "c": C})
    assert out["tasks"] == ["a", "b", "c"] and out["sizes"] == [6, 6, 1]
    assert out["unit"] == "triple" and out["layers"] == [0, 1]
    w = out["whole"]
    assert w[0][1] == pytest.approx(4 / 8) and w[1][0] == pytest.approx(0.5)
    assert w[0][2] == 0.0 and w[0][0] == 1.0
    l0, l1 = out["per_layer"]
    assert l0[0][1] == pytest.approx(2 / 6) and l1[0][1] == 1.0
    assert l0[0][2] == 0.0  # c selects nothing in layer 0, a does
    assert l0[2][2] is None  # neither selects anything: undefined, not 1
    # off-diagonal whole: (0.5, 0, 0) twice -> 1/6
    assert out["mean_offdiag"] == pytest.approx(1 / 6)
    assert out["mean_offdiag_per_layer"][1] == pytest.approx(1 / 3)


def test_whole_model_matches_neuron_set_iou_with_unlayered_entries():
    a = A.union(_set({"model.embed_tokens.weight": (0, [1])}))
    out = iou_matrix({"a": a, "b": B})
    assert out["whole"][0][1] == pytest.approx(a.iou(B)) == pytest.approx(4 / 9)
    assert out["layers"] == [0, 1]


def test_unit_mode_agrees_with_triples_on_unit_sets():
    model = tiny_llama()
    blocks = get_adapter(model).mlp_blocks(model)
    sa = NeuronSet.from_units(blocks, {0: torch.tensor([0, 1, 2]), 1: torch.tensor([5])})
    sb = NeuronSet.from_units(blocks, {0: torch.tensor([2, 3]), 1: torch.tensor([5, 6])})
    units = iou_matrix({"a": sa, "b": sb}, blocks)
    triples = iou_matrix({"a": sa, "b": sb})
    assert units["unit"] == "unit" and units["sizes"] == [4, 4]
    assert units["whole"][0][1] == pytest.approx(2 / 6)
    assert units["per_layer"][0][0][1] == pytest.approx(1 / 4)
    assert triples["whole"][0][1] == pytest.approx(units["whole"][0][1])
    np.testing.assert_allclose(triples["per_layer"], units["per_layer"])


def test_empty_input_rejected():
    with pytest.raises(ValueError, match="sets"):
        iou_matrix({})
