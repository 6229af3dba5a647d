import numpy as np
import pytest
import torch

from ncft.analysis.neft_utilization import (
    LLAMA2_7B_ROWS,
    STRONG_FRACTION,
    global_ranks,
    max_pearson,
    utilization_shift,
)


def moments(x):
    x = torch.as_tensor(x, dtype=torch.float64)  # [tokens, neurons]
    return x.shape[0], x.sum(0), x.T @ x


def test_max_pearson_hand_case():
    # x1 = 2 x0 (r = 1); x2 = [1, 0, 1, 0] has r = -1/sqrt(5) with both (by hand:
    # centred x0 = [-1.5, -.5, .5, 1.5], x2 = [.5, -.5, .5, -.5], dot -1, norms sqrt5, 1)
    x = [[1, 2, 1], [2, 4, 0], [3, 6, 1], [4, 8, 0]]
    got = max_pearson(*moments(x))
    assert got.tolist() == pytest.approx([1.0, 1.0, -1 / 5**0.5])


def test_max_pearson_constant_neuron_ranks_last():
    x = [[1, 2, 7], [2, 1, 7], [3, 5, 7]]
    got = max_pearson(*moments(x))
    assert got[2] == -1.0 and got[0] == pytest.approx(np.corrcoef([1, 2, 3], [2, 1, 5])[0, 1])


def test_global_ranks_descending_ties_averaged():
    r = global_ranks({"a": [0.5, 0.9], "b": [0.5, 0.1]}, ["a", "b"])
    assert r.tolist() == [2.5, 1.0, 2.5, 4.0]


def test_threshold_scaled_from_7b():
    assert LLAMA2_7B_ROWS == 1_359_872
    assert STRONG_FRACTION * LLAMA2_7B_ROWS == pytest.approx(100_000)


def test_utilization_shift_hand_case():
    # 10 neurons in two groups. Before: ranks 1..10 in order; after: neuron 0 and 9
    # swap (dRank +9 and -9), neurons 1 and 2 swap (+1, -1), the rest stay.
    before = {"g0": torch.tensor([10.0, 9, 8, 7, 6]), "g1": torch.tensor([5.0, 4, 3, 2, 1])}
    after = {"g0": torch.tensor([1.0, 8, 9, 7, 6]), "g1": torch.tensor([5.0, 4, 3, 2, 10])}
    out = utilization_shift(before, after, {"g0": [0, 1]}, strong_fraction=0.5,
                            edges_pct=(0, 10, 50, 100))
    assert out["num_neurons"] == 10 and out["strong_threshold"] == 5.0
    assert out["avg_abs_delta_rank"] == pytest.approx((9 + 9 + 1 + 1) / 10)
    # strongly affected: |dRank| > 5 -> neurons 0 (+9) and 9 (-9); suppressed: the one
    # that went down (0); indirectly affected: the untrained one (9)
    assert out["counts"] == {"strongly_affected": 2, "suppressed": 1,
                             "indirectly_affected": 1, "trained": 2}
    # buckets by before's rank percentile (rank-1)/10*100: [0,10) = neuron 0 (|9|),
    # [10,50) = neurons 1-4 (1+1+0+0)/4, [50,100] = neurons 5-9 (9/5)
    assert out["buckets"]["count"] == [1, 4, 5]
    assert out["buckets"]["avg_abs_delta_rank"] == pytest.approx([9.0, 0.5, 1.8])
    assert out["per_group"]["strongly_affected"] == [1, 1]
    # the one that went DOWN (rank 1 -> 10) is neuron 0, in g0; the untrained one is in g1
    assert out["per_group"]["suppressed"] == [1, 0]
    assert out["per_group"]["indirectly_affected"] == [0, 1]


def test_utilization_shift_checks_inputs():
    with pytest.raises(ValueError, match="same groups"):
        utilization_shift({"a": [1.0]}, {"b": [1.0]}, {})
    with pytest.raises(ValueError, match="outside"):
        utilization_shift({"a": [1.0, 2]}, {"a": [1.0, 2]}, {"a": [5]})
