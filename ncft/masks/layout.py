"""Pure arithmetic: which elements of a flattened parameter slice a selection covers.

Every engine stores a rank's part of a parameter as a run of the flattened full
tensor: ZeRO-3 keeps `[r * P, (r + 1) * P)` of the end-padded flat parameter,
FSDP2's `Shard(0)` keeps whole rows (a contiguous run too), FSDP1 packs several such
runs into one flat shard. So one function, "mask of elements `[start, stop)` of a
tensor of shape S for rows/columns I", serves all of them, with no process group.

Flattened element `e` of a `[R, C]` tensor is row `e // C`, column `e % C`.
"""

from __future__ import annotations

import math

import torch


def _row_width(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _selected(length: int, indices: torch.Tensor, field: str) -> torch.Tensor:
    """Boolean vector of `length` with `indices` set."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= length):
        raise ValueError(
            f"{field}: index out of range for a dimension of size {length} "
            f"(got min {int(indices.min())}, max {int(indices.max())})"
        )
    sel = torch.zeros(length, dtype=torch.bool)
    sel[indices.long()] = True
    return sel


def segment_mask(
    shape: tuple[int, ...],
    start: int,
    stop: int,
    axis: int,
    indices: torch.Tensor,
    fqn: str = "parameter",
) -> torch.Tensor:
    """Mask of the selected elements inside flattened elements `[start, stop)`.

    Args:
        shape: Full storage shape of the parameter.
        start: First flattened element of the slice.
        stop: One past the last flattened element of the slice (<= numel).
        axis: 0 selects rows (for a 1-D tensor: elements), 1 selects columns of a
            2-D tensor.
        indices: Selected rows or columns (int64).
        fqn: Parameter name, used in error messages.

    Returns:
        Bool tensor of length `stop - start`, True where the element is selected.
    """
    numel = math.prod(shape)
    assert 0 <= start <= stop <= numel, (fqn, start, stop, numel)
    if stop == start:
        return torch.zeros(0, dtype=torch.bool)
    width = _row_width(shape)
    first_row, last_row = start // width, (stop - 1) // width
    num_rows = last_row - first_row + 1
    if axis == 0:
        rows = _selected(shape[0], indices, f"{fqn} rows")[first_row : last_row + 1]
        covered = rows.repeat_interleave(width)
    elif axis == 1:
        if len(shape) != 2:
            raise ValueError(f"{fqn}: column selection (axis 1) needs a 2-D tensor, got {shape}")
        cols = _selected(shape[1], indices, f"{fqn} columns")
        covered = cols.repeat(num_rows)
    else:
        raise ValueError(f"{fqn}: axis must be 0 (rows) or 1 (columns), got {axis}")
    offset = start - first_row * width
    return covered[offset : offset + stop - start]


def chunk_rows(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Row range `[lo, hi)` of `torch.chunk(t, world_size, dim=0)[rank]`.

    `torch.chunk` gives every rank `ceil(R / W)` rows until they run out, so trailing
    ranks may hold fewer rows or none (FSDP2's `Shard(0)` follows this rule).
    """
    per_rank = -(-num_rows // world_size)
    lo = min(rank * per_rank, num_rows)
    return lo, min(lo + per_rank, num_rows)


def flat_partition(numel: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """ZeRO-3's slice of a flattened parameter: `(start, stop, partition_numel)`.

    DeepSpeed pads the flattened parameter to `world_size * ceil(numel / world_size)`
    and gives rank r the run `[r * P, (r + 1) * P)`; the part past `numel` is padding.
    """
    per_rank = -(-numel // world_size)
    start = min(rank * per_rank, numel)
    return start, min(start + per_rank, numel), per_rank
