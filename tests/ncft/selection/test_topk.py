"""Top-k selection: deterministic ties, per-layer vs global counts, controls, rank agreement."""

import pytest
import torch

from ncft.arch import get_adapter
from ncft.neuron_set import NeuronSet
from ncft.scoring.controls import RandomScorer, random_like
from ncft.selection import (
    Group,
    check_identical_across_ranks,
    resolve_count,
    row_groups,
    selected_of,
    to_neuron_set,
    top_k,
    union_with_previous,
    unit_groups,
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


def test_random_control_matches_counts_per_module_and_is_seeded():
    groups = _groups(37, 37, 24)
    empty = torch.tensor([], dtype=torch.long)
    ref = {"g0": torch.tensor([1, 2, 3]), "g1": torch.tensor([5]), "g2": empty}
    a = random_like(ref, groups, seed=7)
    assert {k: len(v) for k, v in a.items()} == {"g0": 3, "g1": 1, "g2": 0}
    assert _lists(a) == _lists(random_like(ref, groups, seed=7))
    assert _lists(a) != _lists(random_like(ref, groups, seed=8))
    # a group's draw does not depend on which other groups exist
    assert _lists(random_like(ref, groups[:1], seed=7))["g0"] == a["g0"].tolist()
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
        self.calls = 0

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
