import numpy as np
import pytest
import torch

from ncft.analysis.neft_stats import (
    CATEGORIES,
    categorize,
    rank_shift,
    ranks,
    selected_from_set,
    weight_movement_rank_shift,
)
from ncft.neuron_set import NeuronSet, Selection


def test_ranks_descending_with_average_ties():
    assert ranks([0.1, 0.9, 0.5]).tolist() == [2.0, 0.0, 1.0]
    assert ranks([1.0, 1.0, 0.0]).tolist() == [0.5, 0.5, 2.0]


def test_rank_shift_on_reversal():
    before = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    after = before.flip(0)
    assert rank_shift(before, after).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert rank_shift([1.0], [2.0]).tolist() == [0.0]


def test_categories_on_constructed_scores():
    shift = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 0.7])
    sel = np.array([True, False, False, False, True, False])
    names = [CATEGORIES[k] for k in categorize(shift, sel, 0.5)]
    assert names == [
        "lost", "lost", "stable", "gained_untrained",
        "gained_trained", "gained_untrained",
    ]


def test_utilization_shift_counts_per_group_and_global():
    before = {"l0": torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]), "l1": torch.tensor([1.0, 2.0])}
    after = {"l0": before["l0"].flip(0), "l1": torch.tensor([2.0, 1.0])}
    out = weight_movement_rank_shift(before, after, {"l0": [4, 0]}, shift_threshold=0.5, top=5)
    c = out["counts"]
    assert c["gained_trained"] == {"selected": 1, "unselected": 0}
    assert c["lost"] == {"selected": 1, "unselected": 2}  # l0 rows 0, 1; l1 row 1
    assert c["gained_untrained"] == {"selected": 0, "unselected": 2}  # l0 row 3, l1 row 0
    assert c["stable"] == {"selected": 0, "unselected": 1}
    assert out["counts_per_group"]["lost"] == [2, 1]
    assert out["num_rows"] == 7 and out["num_selected"] == 2
    assert out["top_gained_untrained"] == [["l1", 0, 1.0], ["l0", 3, 0.5]]
    assert sum(sum(v) for v in out["hist"]["counts"].values()) == 7
    glob = weight_movement_rank_shift(before, after, {"l0": [4, 0]}, 0.5, scope="global")
    assert glob["scope"] == "global" and glob["num_rows"] == 7


def test_utilization_shift_errors():
    x = {"g": torch.zeros(3)}
    with pytest.raises(ValueError, match="same groups"):
        weight_movement_rank_shift(x, {"h": torch.zeros(3)}, {})
    with pytest.raises(ValueError, match="selected"):
        weight_movement_rank_shift(x, x, {"g": [3]})
    with pytest.raises(ValueError, match="scope"):
        weight_movement_rank_shift(x, x, {}, scope="layer")
    with pytest.raises(ValueError, match="shift_threshold"):
        weight_movement_rank_shift(x, x, {}, shift_threshold=0.0)


class _Group:
    def __init__(self, name, pieces):
        self.name, self.pieces = name, pieces


def test_selected_from_set():
    s = NeuronSet({"w": Selection(1, torch.tensor([2, 5]))})
    out = selected_from_set(s, [_Group("m", (("w", 1), ("b", 0))), _Group("n", (("v", 0),))])
    assert list(out) == ["m"] and out["m"].tolist() == [2, 5]
    with pytest.raises(ValueError, match="axis"):
        selected_from_set(s, [_Group("m", (("w", 0),))])
