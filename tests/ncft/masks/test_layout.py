import math

import pytest
import torch

from ncft.masks.layout import chunk_rows, flat_partition, segment_mask


def dense_mask(shape, axis, indices):
    mask = torch.zeros(shape, dtype=torch.bool)
    if axis == 0:
        mask[indices] = True
    else:
        mask[:, indices] = True
    return mask.flatten()


CASES = [(shape, axis) for shape in [(37, 24), (24, 37), (5, 3), (37,), (1, 7)]
         for axis in (0, 1) if axis < len(shape)]  # columns exist only in 2-D


@pytest.mark.parametrize("shape,axis", CASES)
def test_segment_mask_matches_dense_reference(shape, axis):
    gen = torch.Generator().manual_seed(0)
    size = shape[axis]
    indices = torch.randperm(size, generator=gen)[: max(1, size // 3)].sort().values
    ref = dense_mask(shape, axis, indices)
    numel = math.prod(shape)
    for _ in range(40):
        a, b = sorted(torch.randint(0, numel + 1, (2,), generator=gen).tolist())
        got = segment_mask(shape, a, b, axis, indices)
        assert torch.equal(got, ref[a:b]), (shape, axis, a, b)


def test_segment_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        segment_mask((4, 3), 0, 12, 0, torch.tensor([4]), "w")
    with pytest.raises(ValueError, match="axis"):
        segment_mask((4, 3), 0, 12, 2, torch.tensor([0]), "w")
    with pytest.raises(ValueError, match="2-D"):
        segment_mask((4,), 0, 4, 1, torch.tensor([0]), "b")


@pytest.mark.parametrize("rows", [1, 2, 5, 37])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_chunk_rows_follows_torch_chunk(rows, world):
    chunks = torch.chunk(torch.arange(rows), world)
    for rank in range(world):
        lo, hi = chunk_rows(rows, world, rank)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(lo, hi)) == expected


@pytest.mark.parametrize("numel", [1, 7, 888, 889])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_flat_partition_covers_once_with_end_padding(numel, world):
    seen = []
    for rank in range(world):
        start, stop, per = flat_partition(numel, world, rank)
        assert per == -(-numel // world)
        seen.extend(range(start, stop))
    assert seen == list(range(numel))
