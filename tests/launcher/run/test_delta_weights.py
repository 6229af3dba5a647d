"""DeltaWeights: sparse-delta start values read from their base tensors in the files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from launcher.engines.weights import SafetensorsWeights
from launcher.run.delta_weights import DeltaWeights
from ncft.sparse_delta import DeltaEntry


@pytest.fixture
def weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(9, 7, generator=gen),
               "a.bias": torch.randn(9, generator=gen),
               "b.weight": torch.randn(7, 9, generator=gen)}
    save_file(tensors, tmp_path / "model.safetensors")
    rows, cols = torch.tensor([0, 1, 2, 5, 8]), torch.tensor([1, 4, 5])
    entries = [DeltaEntry("a", 0, rows, rows, None), DeltaEntry("b", 1, cols, None, None)]
    source = SafetensorsWeights.from_path(tmp_path / "model.safetensors")
    yield tensors, DeltaWeights(source, entries), rows, cols
    source.close()


def test_delta_rows_flat_and_shapes_match_index_select(weights):
    tensors, w, rows, cols = weights
    want = {"a.ncft_delta.weight": tensors["a.weight"][rows],
            "a.ncft_delta.bias": tensors["a.bias"][rows],
            "b.ncft_delta.weight": tensors["b.weight"][:, cols]}
    assert set(want) <= w.keys() and set(tensors) <= w.keys()
    for key, full in want.items():
        assert w.shape(key) == tuple(full.shape)
        n = full.shape[0]
        for lo, hi in ((0, n), (1, 3), (2, 2), (n - 1, n)):
            assert torch.equal(w.rows(key, lo, hi), full[lo:hi]), (key, lo, hi)
        flat = full.reshape(-1)
        for start, stop in ((0, flat.numel()), (3, 11), (5, 5), (flat.numel() - 2, flat.numel())):
            assert torch.equal(w.flat(key, start, stop), flat[start:stop]), (key, start, stop)
    assert torch.equal(w.rows("a.weight", 2, 4), tensors["a.weight"][2:4])  # base untouched


def test_missing_base_is_named(weights):
    _, w, rows, _ = weights
    with pytest.raises(ValueError, match="training.update=sparse_delta"):
        DeltaWeights(w.base, [DeltaEntry("c", 0, rows, None, None)])
