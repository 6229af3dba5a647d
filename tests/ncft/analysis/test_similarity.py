import math

import numpy as np
import pytest
import torch

from ncft.analysis.similarity import correlation, correlation_per_task, layer_similarity
from ncft.arch import MlpBlock, Projection, get_adapter
from tests.support.tiny import tiny_llama

D_FF, D = 4, 4


def _block(layer):
    pre = f"layers.{layer}.mlp"
    projs = tuple(
        Projection(role, f"{pre}.{role}", f"{pre}.{role}.weight", None, axis, rows)
        for role, axis, rows in (("gate", 0, D_FF), ("up", 0, D_FF), ("down", 1, D))
    )
    return MlpBlock(layer, pre, f"{pre}.down", D_FF, projs)


def _params(layers=(0,)):
    # Unit u owns e_u in every piece, so different units are orthogonal.
    eye = torch.eye(D)
    out = {}
    for layer in layers:
        out |= {f"layers.{layer}.mlp.{r}.weight": eye.clone() for r in ("gate", "up", "down")}
    return out


@pytest.mark.parametrize("method", ["mean", "masked"])
def test_identical_orthogonal_and_partial(method):
    params = _params()
    calls = []

    def get(fqn):
        calls.append(fqn)
        return params[fqn]

    units = {"a": {0: [0, 1]}, "b": {0: [0, 1]}, "c": {0: [2, 3]}, "d": {0: [0]}}
    out = layer_similarity([_block(0)], units, get, method=method)
    pl = out["per_layer"]
    assert out["layers"] == [0] and out["method"] == method
    assert pl[0][1] == [pytest.approx(1.0)]  # identical sets
    assert pl[0][2] == [pytest.approx(0.0)]  # orthogonal units
    assert pl[3][0] == [pytest.approx(1 / math.sqrt(2))]  # e0 vs (e0 + e1) / 2
    assert out["mean"][0][1] == pytest.approx(1.0)
    assert sorted(calls) == sorted(params)  # each parameter fetched exactly once


def test_mean_method_sees_parallel_disjoint_units():
    params = _params()
    # Unit 3 gets unit 0's parameters: disjoint sets, parallel vectors.
    for role in ("gate", "up"):
        params[f"layers.0.mlp.{role}.weight"][3] = params[f"layers.0.mlp.{role}.weight"][0]
    params["layers.0.mlp.down.weight"][:, 3] = params["layers.0.mlp.down.weight"][:, 0]
    units = {"a": {0: [0]}, "b": {0: [3]}}
    mean = layer_similarity([_block(0)], units, params.__getitem__, "mean")
    masked = layer_similarity([_block(0)], units, params.__getitem__, "masked")
    assert mean["per_layer"][0][1] == [pytest.approx(1.0)]
    assert masked["per_layer"][0][1] == [pytest.approx(0.0)]


def test_layer_without_units_is_none_and_mean_skips_it():
    params = _params((0, 1))
    units = {"a": {0: [0, 1], 1: [2]}, "b": {0: [0, 1]}}
    out = layer_similarity([_block(0), _block(1)], units, params.__getitem__)
    assert out["per_layer"][0][1] == [pytest.approx(1.0), None]
    assert out["mean"][0][1] == pytest.approx(1.0)


def test_real_tiny_llama_blocks_with_biases():
    model = tiny_llama()
    blocks = get_adapter(model).mlp_blocks(model)
    params = dict(model.named_parameters())
    units = {"a": {0: [1, 2], 1: [3]}, "b": {0: [1, 2], 1: [3]}, "c": {0: [5]}}
    out = layer_similarity(blocks, units, lambda f: params[f])
    assert out["per_layer"][0][1] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert -1.0 <= out["per_layer"][0][2][0] <= 1.0 and out["per_layer"][0][2][1] is None


def test_errors():
    params = _params()
    with pytest.raises(ValueError, match="method"):
        layer_similarity([_block(0)], {"a": {0: [0]}}, params.__getitem__, "sorted")
    with pytest.raises(ValueError, match=r"units\['a'\]"):
        layer_similarity([_block(0)], {"a": {0: [9]}}, params.__getitem__)
    with pytest.raises(ValueError, match="unsharded"):
        layer_similarity([_block(0)], {"a": {0: [0]}}, lambda f: torch.zeros(2, 2))


def test_correlation_monotone():
    # Off-diagonal pairs in row-major order get x = 1..6, y = x^2 (monotone, non-linear).
    x = [[0, 1, 2], [3, 0, 4], [5, 6, 0]]
    y = [[None, 1, 4], [9, None, 16], [25, 36, None]]
    out = correlation(x, y)
    assert out["n"] == 6 and out["pairs"][0] == [0, 1]
    assert out["spearman"]["r"] == pytest.approx(1.0)
    xs = np.arange(1, 7)
    assert out["pearson"]["r"] == pytest.approx(np.corrcoef(xs, xs**2)[0, 1])
    assert 0.0 <= out["pearson"]["p"] < 0.05


def test_correlation_per_test_task_is_table_4_by_hand():
    # 4 models x 4 test tasks; column j pairs model i's similarity and score on T_j.
    sim = [[1.0, 0.2, 0.9, 0.1], [0.3, 1.0, 0.8, 0.4], [0.5, 0.6, 1.0, 0.7], [0.9, 0.1, 0.2, 1.0]]
    perf = [[0.9, 0.5, 0.7, 0.3], [0.2, 0.8, 0.6, 0.9], [0.4, 0.6, 0.9, 0.5], [0.8, 0.1, 0.3, 0.7]]
    per_task = correlation_per_task(sim, perf)
    assert len(per_task) == 4
    for j, got in enumerate(per_task):
        rows = [i for i in range(4) if i != j]
        assert got["n"] == 3 and got["pairs"] == [[i, j] for i in rows]
        want = np.corrcoef([sim[i][j] for i in rows], [perf[i][j] for i in rows])[0, 1]
        assert got["pearson"]["r"] == pytest.approx(want)
    # Not the pooled r over all 12 pairs.
    assert correlation(sim, perf)["n"] == 12
    assert all(c["pearson"]["r"] != pytest.approx(correlation(sim, perf)["pearson"]["r"])
               for c in per_task)
    # Two tasks: one model per test task, no r.
    assert [c["pearson"]["r"] for c in correlation_per_task([[1, 2], [2, 1]],
                                                            [[0, 1], [1, 0]])] == [None, None]


def test_correlation_undefined_cases():
    out = correlation([[1, 2], [2, 1]], [[0, 1], [1, 0]])
    assert out["n"] == 2 and out["pearson"]["r"] is None  # fewer than 3 pairs
    with pytest.raises(ValueError, match="generalization"):
        correlation([[1, 2], [2, 1]], [[0, 1]])
