"""Where sharded loading reads tensors: safetensors files by range, or a kept copy.

`SafetensorsWeights` reads a row range or a flat element range of one tensor from a
HF directory (one `model.safetensors` or shards listed in `model.safetensors.index.json`)
or a single file, touching only those bytes. `Replay` serves again what a recording
`SafetensorsWeights` returned, from this rank's memory (`launcher.engines.loading`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_Key = tuple[str, str, int, int]  # (kind, tensor key, lo, hi)


class Weights(Protocol):
    """Where a build reads tensors from (`SafetensorsWeights` or `Replay`)."""

    def keys(self) -> set[str]:
        """Names of the tensors this source holds."""

    def shape(self, key: str) -> tuple[int, ...]:
        """Full shape of tensor `key`."""

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Rows `[lo, hi)` of tensor `key` (a 0-d tensor: the whole of it, lo = hi = 0)."""

    def flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements `[start, stop)` of tensor `key` flattened."""


# safetensors dtype names (the format's header) -> torch dtypes.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class _File:
    """One safetensors file: its header, and byte ranges read with plain `readinto`.

    The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header
    length N, N bytes of JSON `{key: {dtype, shape, data_offsets: [begin, end]}}`, then
    the data, offsets relative to its start, tensors row-major. We read bytes into a
    fresh tensor rather than take `safe_open(...).get_slice(key)[lo:hi]`: those slices
    are views of a memory map, and the mapped pages a copy touches count in the rank's
    resident set on top of the copy (measured: 2x the shard at peak, not 1x).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            self.header = json.loads(handle.read(size))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + size
        self._handle = None

    def read(self, key: str, first: int, count: int) -> torch.Tensor:
        """Flattened elements `[first, first + count)` of `key`, as a new tensor."""
        entry = self.header[key]
        dtype = _DTYPES[entry["dtype"]]
        item = torch.empty((), dtype=dtype).element_size()
        out = torch.empty(count * item, dtype=torch.uint8)
        if self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed in close)
        self._handle.seek(self.data_start + entry["data_offsets"][0] + first * item)
        view, done = memoryview(out.numpy()), 0
        while done < len(view):  # a read may return less than asked (2 GiB cap on Linux)
            got = self._handle.readinto(view[done:])
            if not got:
                raise ValueError(f"{self.path}: truncated data for {key}")
            done += got
        return out.view(dtype)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class SafetensorsWeights:
    """Tensors in safetensors files, read by row or flat range without loading a file.

    Args:
        files: Tensor key -> the file holding it.

    Attributes:
        bytes_read: Bytes of tensor data returned so far.
        recorded: While recording (`record()`), every tensor returned, by request.
    """

    def __init__(self, files: Mapping[str, Path]) -> None:
        opened = {path: _File(path) for path in {Path(f) for f in files.values()}}
        self._file_of = {key: opened[Path(f)] for key, f in files.items()}
        self.bytes_read = 0
        self.recorded: dict[_Key, torch.Tensor] | None = None

    @classmethod
    def from_path(cls, path: str | Path) -> SafetensorsWeights:
        """A HF directory (single file or index of shards) or one safetensors file.

        Raises:
            ValueError: If `path` holds no safetensors weights.
        """
        path = Path(path)
        if path.is_dir() and (path / INDEX).is_file():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            return cls({key: path / name for key, name in weight_map.items()})
        file = path / SINGLE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(
                f"model.name_or_path: {path} has no {SINGLE} or {INDEX}; sharded loading "
                "reads safetensors only (re-save the model with save_pretrained)"
            )
        return cls({key: file for key in _File(file).header})

    def keys(self) -> set[str]:  # noqa: D102
        return set(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:  # noqa: D102
        return tuple(self._file_of[key].header[key]["shape"])

    def record(self) -> None:
        """From now on keep every tensor returned (for a `Replay`)."""
        self.recorded = {}

    def _out(self, request: _Key, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        if self.recorded is not None:
            self.recorded[request] = tensor
        return tensor

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:  # noqa: D102
        shape = self.shape(key)
        if not shape:
            assert lo == hi == 0, (key, lo, hi)
            return self._out(("rows", key, lo, hi), self._file_of[key].read(key, 0, 1)[0])
        width = math.prod(shape[1:])
        flat = self._file_of[key].read(key, lo * width, (hi - lo) * width)
        return self._out(("rows", key, lo, hi), flat.view(hi - lo, *shape[1:]))

    def flat(self, key: str, start: int, stop: int) -> torch.Tensor:  # noqa: D102
        flat = self._file_of[key].read(key, start, stop - start)
        return self._out(("flat", key, start, stop), flat)

    def close(self) -> None:
        """Close the open files."""
        for file in set(self._file_of.values()):
            file.close()


class Replay:
    """What a `SafetensorsWeights` returned while recording, served once more.

    Each request must repeat one the recorded build made (same tensor, same range),
    which holds when the second engine has the same backend and world size as the
    first. Served tensors are dropped, so memory falls as the second build fills.
    """

    def __init__(self, source: SafetensorsWeights) -> None:
        assert source.recorded is not None, "Replay needs a source that recorded"
        self._kept = source.recorded
        self._shapes = {key: source.shape(key) for _, key, _, _ in self._kept}
        source.recorded = None
        self.bytes_read = 0

    def keys(self) -> set[str]:  # noqa: D102
        return set(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:  # noqa: D102
        return self._shapes[key]

    def _take(self, request: _Key) -> torch.Tensor:
        if request not in self._kept:
            raise ValueError(f"kept weights hold no {request}: the second engine of a stage "
                             "must shard like the first")
        return self._kept.pop(request)

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:  # noqa: D102
        return self._take(("rows", key, lo, hi))

    def flat(self, key: str, start: int, stop: int) -> torch.Tensor:  # noqa: D102
        return self._take(("flat", key, start, stop))
