"""Top-k selection: deterministic ties, per-layer vs global counts, controls, rank agreement."""

import pytest
import torch

from ncft.arch import get_adapter
from ncft.neuron_set import NeuronSet
from ncft.scoring.controls import RandomScorer
from ncft.scoring.groups import Group, row_groups, unit_groups
from ncft.selection import (
    candidate_parameters,
    check_identical_across_ranks,
    resolve_count,
    selected_of,
    to_neuron_set,
    top_by_parameters,
    top_k,
    union_with_previous,
)
from tests.support.tiny import tiny_llama


def _groups(*sizes, layers=None):
    layers = layers or list(range(len(sizes)))
    return [Group(f"g{i}", layers[i], n, ((f"w{i}", 0),)) for i, n in enumerate(sizes)]


def _lists(selected):
    return {k: v.tolist() for k, v in selected.items()}


def test_ties_break_by_index_and_repeat_exactly():
    groups = _groups(6)
    scores = {"g0": torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 1.0])}
    assert _lists(top_k(scores, groups, count=2)) == {"g0": [1, 2]}
    assert _lists(top_k(scores, groups, count=4)) == {"g0": [0, 1, 2, 4]}
    assert _lists(top_k(scores, groups, count=2, reverse=True)) == {"g0": [0, 3]}
    flat = {"g0": torch.zeros(6)}
    assert all(_lists(top_k(flat, groups, count=3)) == {"g0": [0, 1, 2]} for _ in range(5))
    with pytest.raises(ValueError, match="NaN"):
        top_k({"g0": torch.tensor([0.0, float("nan"), 0, 0, 0, 0])}, groups, count=1)


def test_global_ties_break_by_group_order():
    groups = _groups(3, 3)
    scores = {"g0": torch.tensor([0.0, 1.0, 0.0]), "g1": torch.tensor([1.0, 1.0, 0.0])}
    got = top_k(scores, groups, count=2, per_layer=False)
    assert _lists(got) == {"g0": [1], "g1": [0]}


def test_per_layer_vs_global_counts():
    groups = _groups(10, 10, 20, layers=[0, 1, 1])  # layer 1 pools two groups (rows)
    scores = {"g0": torch.arange(10.0), "g1": torch.arange(10.0) + 100, "g2": -torch.arange(20.0)}
    per_layer = top_k(scores, groups, fraction=0.1)
    assert [len(v) for v in per_layer.values()] == [1, 3, 0]
    glob = top_k(scores, groups, fraction=0.1, per_layer=False)
    assert [len(v) for v in glob.values()] == [0, 4, 0]
    assert glob["g1"].tolist() == [6, 7, 8, 9]
    counted = top_k(scores, groups, count=2)
    assert [len(v) for v in counted.values()] == [2, 2, 0]


def test_resolve_count():
    assert resolve_count(37, 0.05, None) == 2  # 1.85 rounds half-up to 2
    assert resolve_count(10, 0.05, None) == 1  # 0.5 -> 1 (half-up, not banker's)
    assert resolve_count(3, 0.01, None) == 1  # a positive fraction takes at least one
    assert resolve_count(3, None, 7) == 3
    for bad in [(0.0, None), (1.5, None), (None, None), (0.1, 2)]:
        with pytest.raises(ValueError):
            resolve_count(10, *bad)


def test_random_control_is_seeded():
    groups = _groups(37, 37, 24)
    scores = RandomScorer(seed=3).score(None, groups)
    again = RandomScorer(seed=3).score(None, groups)
    assert all(torch.equal(scores[k], v) for k, v in again.items())
    assert [len(v) for v in top_k(scores, groups, count=4).values()] == [4, 4, 4]


def test_unit_groups_give_neuron_set_from_units():
    model = tiny_llama()
    blocks = get_adapter(model).mlp_blocks(model)
    groups = unit_groups(blocks)
    chosen = {groups[0].name: torch.tensor([3, 1]), groups[1].name: torch.tensor([36])}
    nset = to_neuron_set(chosen, groups, {"scorer": "x"})
    ref = NeuronSet.from_units(blocks, {0: torch.tensor([1, 3]), 1: torch.tensor([36])})
    assert nset.checksum() == ref.checksum()
    assert _lists(selected_of(nset, groups)) == {groups[0].name: [1, 3], groups[1].name: [36]}
    only_down = unit_groups(blocks, roles=("down",))
    assert {f for f, _ in only_down[0].pieces} == {"model.layers.0.mlp.down_proj.weight"}


def test_row_groups_cover_projection_rows_and_attention():
    model = tiny_llama()
    groups = row_groups(model, ["down", "attention"])
    names = [g.name for g in groups if g.layer == 0]
    assert names == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [
        "model.layers.0.mlp.down_proj"
    ]
    down = groups[4]
    assert down.size == 24 and down.pieces == (("model.layers.0.mlp.down_proj.weight", 0),
                                               ("model.layers.0.mlp.down_proj.bias", 0))


def test_union_with_previous_keeps_new_meta():
    groups = _groups(5)
    new = to_neuron_set({"g0": torch.tensor([0])}, groups, {"task": "b"})
    old = to_neuron_set({"g0": torch.tensor([4])}, groups, {"task": "a"})
    merged = union_with_previous(new, old)
    assert merged.entries["w0"].indices.tolist() == [0, 4]
    assert merged.meta == {"task": "b", "union_with": old.checksum()}
    assert union_with_previous(new, None) is new


class _FakeEngine:
    """All-reduce as if `world_size` ranks held `others` besides this one's tensor."""

    def __init__(self, others):
        self.world_size, self.rank, self.others = len(others) + 1, 0, others
        self.device, self.calls = torch.device("cpu"), 0

    def all_reduce_(self, t):
        self.calls += 1
        if self.calls == 1:  # the digest words: add the other ranks' digests
            for o in self.others:
                t += o
        else:  # the verdict: every rank saw the same sum, so it's world * own
            t *= self.world_size
        return t


def test_checksum_agreement_across_ranks():
    from ncft.selection.topk import _digest_words

    nset = to_neuron_set({"g0": torch.tensor([1])}, _groups(3), {})
    other = to_neuron_set({"g0": torch.tensor([2])}, _groups(3), {})
    same = _digest_words(nset.checksum())
    assert check_identical_across_ranks(_FakeEngine([same, same]), nset) == nset.checksum()
    with pytest.raises(RuntimeError, match="differs across ranks"):
        check_identical_across_ranks(_FakeEngine([same, _digest_words(other.checksum())]), nset)


def test_top_and_bottom_is_neft_plus_reversed_by_hand():
    # NeFT_x%+Reversed_y% per layer. Layer 0 pools g0 (4 rows) and g1 (6 rows), 10 in
    # all: x = 20% -> the 2 highest (g0[1] 0.9, g1[4] 0.8); y = 30% -> the 3 lowest of
    # the rest (g1[0] 0.0, g0[3] 0.05, then the tie 0.1 at g0[0] and g1[2]: lower
    # candidate index first -> g0[0]). Layer 1 (g2, 3 rows): 20% of 3 -> 1 (round
    # half up 0.6), 30% -> 1 (0.9): the highest g2[2] and the lowest g2[0].
    from ncft.selection.topk import top_and_bottom

    groups = [Group("g0", 0, 4, (("g0.w", 0),)), Group("g1", 0, 6, (("g1.w", 0),)),
              Group("g2", 1, 3, (("g2.w", 0),))]
    scores = {"g0": torch.tensor([0.1, 0.9, 0.5, 0.05]),
              "g1": torch.tensor([0.0, 0.3, 0.1, 0.6, 0.8, 0.4]),
              "g2": torch.tensor([0.2, 0.5, 0.7])}
    got = top_and_bottom(scores, groups, 0.2, None, 0.3)
    assert got["g0"].tolist() == [0, 1, 3] and got["g1"].tolist() == [0, 4]
    assert got["g2"].tolist() == [0, 2]
    # disjoint even when x + y exceeds the pool: everything, once
    every = top_and_bottom(scores, groups, 0.8, None, 0.8)
    assert every["g0"].tolist() == [0, 1, 2, 3] and every["g2"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="reversed_fraction"):
        top_and_bottom(scores, groups, 0.2, None, 0.0)


def test_top_by_parameters_is_neft_x_percent_of_the_model_by_hand():
    # g0: 3 rows of a [3, 10] matrix (10 parameters each), layer 0; g1: 2 columns of a
    # [4, 2] matrix plus a 2-element bias (4 + 1 = 5 parameters each), layer 1.
    groups = [Group("g0", 0, 3, (("w0", 0),)), Group("g1", 1, 2, (("w1", 1), ("b1", 0)))]
    sizes = candidate_parameters(groups, {"w0": (3, 10), "w1": (4, 2), "b1": (2,)})
    assert sizes == {"g0": 10, "g1": 5}
    scores = {"g0": torch.tensor([0.9, 0.1, 0.5]), "g1": torch.tensor([0.8, 0.7])}
    # Global order: g0[0] (10), g1[0] (5), g1[1] (5), g0[2] (10), g0[1] (10).
    # Of 100 model parameters, 20% = 20: g0[0] + g1[0] + g1[1] = 20 fits, + g0[2] does not.
    got = top_by_parameters(scores, groups, 0.2, sizes, 100)
    assert _lists(got) == {"g0": [0], "g1": [0, 1]}
    # 0.24 -> 24: still those three (the next one would make 30), never a partial row.
    assert _lists(top_by_parameters(scores, groups, 0.24, sizes, 100)) == _lists(got)
    # A fraction of candidates per layer picks differently: 1 of 3 and 1 of 2 (rounded).
    assert _lists(top_k(scores, groups, fraction=0.4)) == {"g0": [0], "g1": [0]}
    # Too small a budget still takes the best candidate.
    assert _lists(top_by_parameters(scores, groups, 0.01, sizes, 100)) == {"g0": [0], "g1": []}
    # NeFT_x%+Reversed_y%: then the lowest scores, up to y% more: g0[1] (10 of 10).
    both = top_by_parameters(scores, groups, 0.2, sizes, 100, reversed_fraction=0.1)
    assert _lists(both) == {"g0": [0, 1], "g1": [0, 1]}
    assert _lists(top_by_parameters(scores, groups, 0.1, sizes, 100, reverse=True)) == \
        {"g0": [1], "g1": []}


def test_candidate_parameters_of_the_tiny_llama_units_and_rows():
    model = tiny_llama(seed=0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    units = unit_groups(get_adapter(model).mlp_blocks(model))
    # A gated-MLP unit: a gate row, an up row (24 each), a down column (24), and the
    # gate/up bias elements of this biased tiny model.
    assert set(candidate_parameters(units, shapes).values()) == {24 * 3 + 2}
    # A row: up's (24 inputs) or down's (37), each with its output's bias element.
    rows = row_groups(model, ["up", "down"])
    assert sorted(set(candidate_parameters(rows, shapes).values())) == [24 + 1, 37 + 1]
