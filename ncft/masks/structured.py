"""Structured masks: a segment's trainable elements as selected rows or columns.

A NeuronSet selects whole rows (gate/up/q/k/v output channels, elements of a 1-D
bias) or whole columns (down/o_proj input units) of a parameter, so a segment
(elements `[start, stop)` of the flattened parameter, `ncft.engine.Segment`) needs
no state per element. It is cut into at most three blocks of its flat storage:

- head: the end of a row its start cuts (ZeRO-3 partitions and FSDP1 flat shards
  cut rows mid-way; FSDP2 never does),
- body: its whole rows, viewed `[rows, width]`,
- tail: the beginning of a row its stop cuts,

each with the positions of its trainable rows (`dim` 0), of its trainable columns
(`dim` 1), or "all trainable" (`dim` -1, no index). Row positions are the selected
rows inside the segment (a handful per segment at scale); column positions are the
selection's columns, one tensor per parameter and rank shared by every block (the
edge blocks use slices of it and a `shift`). Indices are stored in the smallest
integer type that holds the dimension (int16 below 2^15) and widened to int64 for one
block at a time when used (`index_select`/`index_copy_` need int64 on CPU).

Segments with fewer than `DENSE_MAX_NUMEL` elements, or whose index would take more
bytes than one bool per element, keep a dense bool mask instead: at most 4 KiB each,
and one `torch.where` instead of the 3-5 small ops a block costs per step.

Applying a mask uses views and `index_select`/`index_copy_` on them: the gathered
values are temporaries of at most one segment's trainable elements, freed before the
next segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ncft.masks.layout import segment_mask

# Below this many elements a segment keeps a dense bool mask (<= 4 KiB): cheaper per
# step than the blocks' small ops, and too small to matter for memory.
DENSE_MAX_NUMEL = 4096
ALL = -1  # Block.dim: every element of the block is trainable


def index_dtype(size: int) -> torch.dtype:
    """The smallest integer dtype that holds positions `0 .. size - 1`."""
    if size <= torch.iinfo(torch.int16).max + 1:
        return torch.int16
    if size <= torch.iinfo(torch.int32).max + 1:
        return torch.int32
    return torch.int64


@dataclass(frozen=True)
class Block:
    """Trainable elements of `flat[base + offset :][: rows * width]` viewed `[rows, width]`.

    Attributes:
        offset: Start of the block inside its segment.
        rows: Rows of the view.
        width: Columns of the view.
        dim: 0: `index` lists the trainable rows; 1: the trainable columns; `ALL`:
            every element is trainable (no index).
        index: Positions along `dim` plus `shift` (sorted, small integer dtype).
        shift: Subtracted from `index` when used (edge blocks share the column list).
    """

    offset: int
    rows: int
    width: int
    dim: int
    index: torch.Tensor | None = None
    shift: int = 0

    def view(self, flat: torch.Tensor, base: int = 0) -> torch.Tensor:
        """The block's `[rows, width]` view of 1-D `flat` (segment starts at `base`)."""
        start = base + self.offset
        return flat[start : start + self.rows * self.width].view(self.rows, self.width)

    def positions(self) -> torch.Tensor | None:
        """The int64 positions along `dim` (a per-use temporary), or None for `ALL`."""
        if self.index is None:
            return None
        pos = self.index.long()  # no copy if already int64: never modify it in place
        return pos - self.shift if self.shift else pos

    def num_trainable(self) -> int:
        """Trainable elements in the block."""
        if self.dim == ALL:
            return self.rows * self.width
        k = self.index.numel()
        return k * self.width if self.dim == 0 else self.rows * k


@dataclass(frozen=True)
class SegmentMask:
    """Which elements of one segment are trainable.

    Attributes:
        numel: Elements in the segment.
        blocks: The trainable blocks (structured form); empty = all frozen.
        frozen: Dense form instead: bool over the segment, True = frozen.
    """

    numel: int
    blocks: tuple[Block, ...] = ()
    frozen: torch.Tensor | None = None

    def num_trainable(self) -> int:
        """Trainable elements in the segment."""
        if self.frozen is not None:
            return self.numel - int(torch.count_nonzero(self.frozen))
        return sum(b.num_trainable() for b in self.blocks)

    def dense_frozen(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The mask as one bool per element, True = frozen (built on demand)."""
        if self.frozen is not None:
            return self.frozen.clone()
        trainable = torch.zeros(self.numel, dtype=torch.bool, device=device)
        for b in self.blocks:
            view = b.view(trainable)
            pos = b.positions()
            if pos is None:
                view.fill_(True)
            else:
                view.index_fill_(b.dim, pos.to(view.device), True)
        return ~trainable

    def mask_grad(self, grad: torch.Tensor) -> None:
        """Zero `grad` (1-D, this segment) where frozen, in place; inf/nan there too."""
        if self.frozen is not None:
            # A select, not a multiply, so inf/nan in frozen slots become 0.
            torch.where(self.frozen, grad.new_zeros(()), grad, out=grad)
            return
        # Keep the trainable values, clear the whole segment with a memset, put them
        # back: the kept values are this segment's trainable elements at most.
        kept = []
        for b in self.blocks:
            pos = b.positions()
            view = b.view(grad)
            kept.append((b, pos, view.clone() if pos is None else view.index_select(b.dim, pos)))
        grad.zero_()
        for b, pos, values in kept:
            view = b.view(grad)
            if pos is None:
                view.copy_(values)
            else:
                view.index_copy_(b.dim, pos, values)


@dataclass
class TensorMask:
    """The masks of every segment laid on one optimizer tensor's local flat storage.

    Elements no segment covers (padding, other parameters' pieces) are frozen.

    Attributes:
        numel: Local elements of the tensor.
        pieces: `(opt_offset, SegmentMask)` per segment on the tensor.
    """

    numel: int
    pieces: list[tuple[int, SegmentMask]] = field(default_factory=list)

    def dense_frozen(self, device: torch.device | str | None = None) -> torch.Tensor:
        """One bool per local element, True = frozen (built on demand)."""
        frozen = torch.ones(self.numel, dtype=torch.bool, device=device)
        for offset, mask in self.pieces:
            frozen[offset : offset + mask.numel].copy_(mask.dense_frozen(device))
        return frozen


def _check(shape: tuple[int, ...], axis: int, idx: torch.Tensor, fqn: str) -> None:
    if axis not in (0, 1):
        raise ValueError(f"{fqn}: axis must be 0 (rows) or 1 (columns), got {axis}")
    if axis == 1 and len(shape) != 2:
        raise ValueError(f"{fqn}: column selection (axis 1) needs a 2-D tensor, got {shape}")
    size = shape[axis] if shape else 1
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= size):
        what = "rows" if axis == 0 else "columns"
        raise ValueError(
            f"{fqn} {what}: index out of range for a dimension of size {size} "
            f"(got min {int(idx[0])}, max {int(idx[-1])})"
        )


class MaskBuilder:
    """Builds `SegmentMask`s on one device, sharing each parameter's column list.

    Attributes:
        device: Where index and bool tensors are put (the optimizer tensors' device).
        owned: Every tensor the masks hold (one storage each): their bytes are the
            mask bookkeeping of the rank.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.owned: list[torch.Tensor] = []
        self._columns: dict[str, torch.Tensor] = {}

    def nbytes(self) -> int:
        """Bytes of every tensor the built masks hold."""
        return sum(t.numel() * t.element_size() for t in self.owned)

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        self.owned.append(t)
        return t

    def segment(
        self,
        fqn: str,
        shape: tuple[int, ...],
        start: int,
        stop: int,
        axis: int,
        indices: torch.Tensor,
    ) -> SegmentMask:
        """Mask of elements `[start, stop)` of `fqn` for a row or column selection.

        Args:
            fqn: Parameter name (column lists are shared per name; error messages).
            shape: Full storage shape of the parameter.
            start: First flattened element of the segment.
            stop: One past its last.
            axis: 0 selects rows (elements of a 1-D tensor), 1 columns of a 2-D one.
            indices: The selected rows or columns (full storage coordinates).

        Raises:
            ValueError: For a bad axis or an index out of range.
        """
        idx = torch.unique(indices.detach().to("cpu", torch.int64))  # sorted
        _check(shape, axis, idx, fqn)
        assert 0 <= start <= stop <= math.prod(shape), (fqn, start, stop, shape)
        numel = stop - start
        if numel == 0:
            return SegmentMask(0)
        size = shape[axis] if shape else 1
        cut = _Cut.of(start, stop, math.prod(shape[1:]) if len(shape) > 1 else 1)
        if axis == 0:
            lo, hi = _bounds(idx, cut.body_row, cut.body_row + cut.nbody)
            entries = hi - lo
        else:
            entries = idx.numel()  # shared by the parameter's segments, counted once each
        index_bytes = entries * torch.empty(0, dtype=index_dtype(size)).element_size()
        if numel < DENSE_MAX_NUMEL or numel <= index_bytes:

            chosen = segment_mask(shape, start, stop, axis, idx, fqn)
            return SegmentMask(numel, frozen=self._own(~chosen))
        if axis == 0:
            blocks = self._row_blocks(idx, cut, lo, hi, size)
        else:
            blocks = self._column_blocks(fqn, idx, cut)
        return SegmentMask(numel, blocks=tuple(blocks))

    def _row_blocks(self, idx: torch.Tensor, cut: _Cut, lo: int, hi: int, size: int) -> list:
        blocks = []
        if cut.head and bool((idx == cut.body_row - 1).any()):
            blocks.append(Block(0, 1, cut.head, ALL))
        if cut.nbody and hi - lo == cut.nbody:
            blocks.append(Block(cut.head, cut.nbody, cut.width, ALL))
        elif hi > lo:
            local = (idx[lo:hi] - cut.body_row).to(index_dtype(size))
            blocks.append(Block(cut.head, cut.nbody, cut.width, 0, self._own(local)))
        if cut.tail and bool((idx == cut.body_row + cut.nbody).any()):
            blocks.append(Block(cut.tail_offset, 1, cut.tail, ALL))
        return blocks

    def _column_blocks(self, fqn: str, idx: torch.Tensor, cut: _Cut) -> list:
        if not idx.numel():
            return []
        if idx.numel() == cut.width:  # every column: the whole segment trains
            return [Block(0, 1, cut.numel, ALL)]
        shared = self._columns.get(fqn)
        if shared is None:
            shared = self._columns[fqn] = self._own(idx.to(index_dtype(cut.width)))
        blocks = []
        if cut.head:
            a, b = _bounds(idx, cut.c0, cut.c0 + cut.head)
            if b > a:
                blocks.append(Block(0, 1, cut.head, 1, shared[a:b], shift=cut.c0))
        if cut.nbody:
            blocks.append(Block(cut.head, cut.nbody, cut.width, 1, shared))
        if cut.tail:
            _, b = _bounds(idx, 0, cut.tail)
            if b:
                blocks.append(Block(cut.tail_offset, 1, cut.tail, 1, shared[:b]))
        return blocks


def _bounds(idx: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
    """Positions in sorted `idx` of the first entry >= lo and the first >= hi."""
    a, b = torch.searchsorted(idx, torch.tensor([lo, hi])).tolist()
    return a, b


@dataclass(frozen=True)
class _Cut:
    """How elements `[start, stop)` of a `[*, width]` tensor fall into rows.

    `head` elements finish the row `start` cuts (columns `c0 ..`), `nbody` whole rows
    follow from row `body_row`, and `tail` elements begin the next row.
    """

    numel: int
    width: int
    c0: int
    head: int
    body_row: int
    nbody: int
    tail: int

    @property
    def tail_offset(self) -> int:
        return self.head + self.nbody * self.width

    @classmethod
    def of(cls, start: int, stop: int, width: int) -> _Cut:
        numel = stop - start
        c0 = start % width
        head = min(width - c0, numel) if c0 else 0
        body_row = start // width + (1 if c0 else 0)
        nbody = (numel - head) // width
        return cls(numel, width, c0, head, body_row, nbody, numel - head - nbody * width)
