"""Weights for a sparse-delta model built on meta: deltas read from their base's rows.

With sharded loading (`launcher.engines.loading`) a stage's model is built on the meta
device and every rank reads only its own shard of each parameter from the files, by
parameter name. A model with sparse deltas (`training.update: sparse_delta`) has
parameters no file holds, `X.ncft_delta.weight|bias`; their values are the selected
rows/columns of `X.weight|bias` at the start of the stage. `DeltaWeights` serves
them from the base tensors, reading only the selected rows (row selections) or this
shard's rows (column selections), so the sharded build stays one pass over the files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ncft.sparse_delta import DeltaEntry


class DeltaWeights:
    """A `launcher.engines.weights.Weights` that adds the deltas of `entries` to `base`."""

    def __init__(self, base, entries: Iterable[DeltaEntry]) -> None:
        self.base = base
        # delta key -> (base key, storage axis, sorted indices)
        self._deltas: dict[str, tuple[str, int, torch.Tensor]] = {}
        for entry in entries:
            for delta, base_key, axis, idx in entry.pairs:
                if base_key not in base.keys():
                    raise ValueError(f"training.update=sparse_delta: the weights have no "
                                     f"{base_key!r} to start {delta!r} from")
                self._deltas[delta] = (base_key, axis, idx)

    @property
    def bytes_read(self) -> int:
        """Bytes the base returned (deltas are read through it, so counted there)."""
        return getattr(self.base, "bytes_read", 0)

    def keys(self) -> set[str]:  # noqa: D102
        return set(self.base.keys()) | set(self._deltas)

    def shape(self, key: str) -> tuple[int, ...]:  # noqa: D102
        if key not in self._deltas:
            return self.base.shape(key)
        base_key, axis, idx = self._deltas[key]
        shape = list(self.base.shape(base_key))
        shape[axis] = idx.numel()
        return tuple(shape)

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:  # noqa: D102
        if key not in self._deltas:
            return self.base.rows(key, lo, hi)
        base_key, axis, idx = self._deltas[key]
        if axis == 1:  # columns: this shard's rows of the base, the selected columns
            return self.base.rows(base_key, lo, hi).index_select(1, idx).contiguous()
        picked = idx[lo:hi].tolist()
        parts, start = [], 0
        for i in range(1, len(picked) + 1):  # one read per run of consecutive rows
            if i == len(picked) or picked[i] != picked[i - 1] + 1:
                parts.append(self.base.rows(base_key, picked[start], picked[i - 1] + 1))
                start = i
        if not parts:
            return torch.empty((0, *self.shape(key)[1:]), dtype=self._dtype(base_key))
        return torch.cat(parts).contiguous()

    def flat(self, key: str, start: int, stop: int) -> torch.Tensor:  # noqa: D102
        if key not in self._deltas:
            return self.base.flat(key, start, stop)
        width = math.prod(self.shape(key)[1:])
        first, last = start // width, -(-stop // width)
        rows = self.rows(key, first, last).reshape(-1)
        return rows[start - first * width : stop - first * width].contiguous()

    def _dtype(self, base_key: str) -> torch.dtype:
        return self.base.rows(base_key, 0, 0).dtype if self.base.shape(base_key) else \
            torch.float32

    def close(self) -> None:
        """Close the base's files, if it has any."""
        close = getattr(self.base, "close", None)
        if callable(close):
            close()
