"""ZeRO-3 partition arithmetic of `ncft.param_shards`, every rank simulated in one process.

Awkward shapes (rows of 37 and 24 elements) so flat partitions cut rows in the middle
at 2-4 ranks; the runs each rank contributes, concatenated in rank order, must be the
exact selected slice.
"""

from __future__ import annotations

import math

import pytest
import torch

from ncft.masks.layout import flat_partition
from ncft.param_shards import local_run, run_sizes

CASES = [((37, 24), 0, [0, 5, 17, 36]), ((24, 37), 1, [0, 5, 17, 36]),
         ((37, 24), 0, [36]), ((24, 37), 1, [1]), ((37,), 0, [0, 2, 30, 36]),
         ((5, 3), 0, [0, 1, 2, 3, 4])]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shape,axis,indices", CASES)
def test_runs_concatenate_to_the_slice(shape, axis, indices, world):
    full = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor(indices)
    numel = math.prod(shape)
    runs = []
    for rank in range(world):
        start, stop, per_rank = flat_partition(numel, world, rank)
        part = torch.full((per_rank,), float("nan"))  # DeepSpeed's padding: never read
        part[: stop - start] = full.reshape(-1)[start:stop]
        runs.append(local_run(shape, axis, idx, part, rank, world))
    assert [r.numel() for r in runs] == run_sizes(shape, axis, idx, world)
    expected = full.index_select(axis, idx).reshape(-1)
    assert torch.equal(torch.cat(runs), expected)
