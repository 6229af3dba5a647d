"""Reading tensor ranges from safetensors files (launcher/engines/weights.py), one process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from launcher.engines.weights import Replay, SafetensorsWeights

TENSORS = {
    "w": torch.arange(35, dtype=torch.float32).reshape(7, 5),
    "b": torch.arange(7, dtype=torch.bfloat16),
    "s": torch.tensor(2.5),
    "i": torch.arange(12, dtype=torch.int64).reshape(3, 2, 2),
}


@pytest.fixture
def file(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


def test_rows_and_flat_ranges_equal_slices(file):
    weights = SafetensorsWeights.from_path(file)
    assert weights.keys() == set(TENSORS)
    assert weights.shape("i") == (3, 2, 2)
    for key, full in TENSORS.items():
        if full.dim() == 0:
            assert torch.equal(weights.rows(key, 0, 0), full)
            continue
        for lo, hi in ((0, 1), (2, full.shape[0]), (1, 1)):
            assert torch.equal(weights.rows(key, lo, hi), full[lo:hi]), (key, lo, hi)
        flat = full.reshape(-1)
        for start, stop in ((0, flat.numel()), (3, 4), (4, flat.numel() - 1), (5, 5)):
            got = weights.flat(key, start, stop)
            assert got.dtype == full.dtype and torch.equal(got, flat[start:stop]), key
    weights.close()


def test_directory_with_index_reads_every_shard(tmp_path):
    from tests.support.tiny import tiny_llama

    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    weights = SafetensorsWeights.from_path(tmp_path)
    state = model.state_dict()
    assert weights.keys() == set(state)
    for key, full in state.items():
        assert torch.equal(weights.rows(key, 0, full.shape[0]), full), key
    assert weights.bytes_read == sum(t.numel() * t.element_size() for t in state.values())


def test_directory_without_safetensors_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.name_or_path"):
        SafetensorsWeights.from_path(tmp_path)


def test_replay_serves_the_recorded_reads_once(file):
    weights = SafetensorsWeights.from_path(file)
    weights.record()
    first = weights.rows("w", 2, 5)
    part = weights.flat("i", 1, 7)
    replay = Replay(weights)
    assert weights.recorded is None  # the source stops recording
    assert replay.keys() == {"w", "i"} and replay.shape("w") == (7, 5)
    assert torch.equal(replay.rows("w", 2, 5), first)
    assert torch.equal(replay.flat("i", 1, 7), part)
    with pytest.raises(ValueError, match="must shard like the first"):
        replay.rows("w", 2, 5)  # served once
    with pytest.raises(ValueError, match="must shard like the first"):
        replay.flat("i", 0, 7)  # another range than the first build read
