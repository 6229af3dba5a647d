"""NeuronSet: which rows/columns of which parameters a method trains or scores.

Selections are in STORAGE coordinates of the full (unsharded) parameter (see
`ncft.arch`), so one NeuronSet means the same thing on every engine and world size,
and its checksum is identical everywhere.

On disk a set is two files: `X.safetensors` with one int64 index tensor per
parameter name, and a `X.json` sidecar carrying the format tag, free-form metadata,
per-entry axis and count, and the checksum that ties the two files together.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ncft.arch import MlpBlock, unit_entries
from ncft.io import atomic_file, write_text

FORMAT = "ncft.neuron_set/1"


def compact_dtype(bound: int) -> torch.dtype:
    """int32 when every index is below 2^31 (any real dimension), else int64."""
    return torch.int32 if bound < 2**31 else torch.int64


class Selection:
    """Rows (axis 0) or columns (axis 1) of one stored parameter.

    Attributes:
        axis: 0 for rows (or elements of a 1-D tensor), 1 for columns.
        indices: 1-D int64 CPU tensor, strictly increasing, non-negative (built on
            access from `compact`, so keep a reference where it is used repeatedly).
        compact: The same indices as held: int32 where they fit (`compact_dtype`),
            and one tensor shared by the selections of a `NeuronSet` that are equal
            (a layer's gate, up and down units), so a set of L layers holds L lists.
    """

    __slots__ = ("axis", "compact")

    def __init__(self, axis: int, indices: torch.Tensor) -> None:
        if not isinstance(axis, int) or isinstance(axis, bool) or axis not in (0, 1):
            raise ValueError(f"axis must be 0 or 1, got {axis!r}")
        idx = indices
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1:
            raise ValueError("indices must be a 1-D tensor")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got {idx.dtype}")
        idx = idx.detach().to("cpu", torch.int64).contiguous()
        if idx.numel():
            step = idx[1:] - idx[:-1]
            if bool((step < 0).any()):
                raise ValueError("indices must be sorted ascending")
            if bool((step == 0).any()):
                raise ValueError("indices must be unique (found a duplicate)")
            if int(idx[0]) < 0:
                raise ValueError(f"indices must be non-negative, got {int(idx[0])}")
        bound = int(idx[-1]) + 1 if idx.numel() else 0
        # A private copy, so later in-place edits of the caller's tensor can't leak in.
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "compact", idx.to(compact_dtype(bound), copy=True))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Selection is immutable (cannot set {name!r})")

    @property
    def indices(self) -> torch.Tensor:
        """The indices as int64 (what `index_copy_` and `index_fill_` take)."""
        return self.compact.to(torch.int64)

    def _sharing(self, compact: torch.Tensor) -> Selection:
        """This selection holding `compact` (equal indices) instead of its own copy."""
        out = object.__new__(Selection)
        object.__setattr__(out, "axis", self.axis)
        object.__setattr__(out, "compact", compact)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        return self.axis == other.axis and torch.equal(self.compact.long(),
                                                       other.compact.long())

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return self.compact.numel()

    def __repr__(self) -> str:
        return f"Selection(axis={self.axis}, {len(self)} indices)"

    def __reduce__(self):
        return (Selection, (self.axis, self.indices))


def _combine(
    a: NeuronSet,
    b: NeuronSet,
    op: str,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> NeuronSet:
    """Apply `fn` per fqn present in both sets; `op` decides fqns present in one."""
    out: dict[str, Selection] = {}
    for fqn in sorted(set(a.entries) | set(b.entries)):
        sa, sb = a.entries.get(fqn), b.entries.get(fqn)
        if sa is not None and sb is not None:
            if sa.axis != sb.axis:
                raise ValueError(
                    f"{op}: entry {fqn!r} has axis {sa.axis} in one set and {sb.axis} in the other"
                )
            out[fqn] = Selection(sa.axis, fn(sa.indices, sb.indices))
        elif op == "union" or (op == "difference" and sa is not None):
            out[fqn] = sa if sa is not None else sb
    meta = {"derived": {"op": op, "left": a.checksum(), "right": b.checksum()}}
    return NeuronSet(out, meta)


class NeuronSet:
    """A map `parameter fqn -> Selection` (treat as immutable), plus JSON metadata.

    Empty selections are dropped on construction so that equal sets of
    `(fqn, axis, index)` triples have one representation and one checksum.

    Attributes:
        entries: `fqn -> Selection`, sorted by fqn.
        meta: JSON-serialisable free-form metadata (model_id, architecture, scorer,
            fraction, task, data_hash, ...). Not part of the checksum.

    """

    def __init__(
        self, entries: Mapping[str, Selection], meta: Mapping[str, Any] | None = None
    ) -> None:
        """Build a set.

        Args:
            entries: `fqn -> Selection` in storage coordinates of the full parameter.
            meta: JSON-serialisable metadata; stored as a JSON round-tripped copy.

        """
        for fqn, sel in entries.items():
            if not isinstance(fqn, str) or not fqn:
                raise ValueError(f"entries keys must be non-empty parameter names, got {fqn!r}")
            if not isinstance(sel, Selection):
                raise ValueError(f"entries[{fqn!r}] must be a Selection, got {type(sel).__name__}")
        self.entries: dict[str, Selection] = _shared({
            fqn: entries[fqn] for fqn in sorted(entries) if len(entries[fqn])
        })
        try:
            # Round-trip so meta compares equal after save/load (tuples become lists).
            self.meta: dict[str, Any] = json.loads(json.dumps(dict(meta or {})))
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta must be JSON-serialisable: {e}") from e

    def __repr__(self) -> str:
        return f"NeuronSet({len(self.entries)} entries, {self.num_selected()} selected)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        return self.entries == other.entries and self.meta == other.meta

    __hash__ = None  # type: ignore[assignment]

    def dense_mask(self, fqn: str, shape: Sequence[int]) -> torch.Tensor:
        """Full-size bool mask of `fqn`'s selected elements.

        For checks and reports on one gathered parameter; masks on shards are built
        by `ncft.masks` without any full-size tensor.
        """
        mask = torch.zeros(tuple(shape), dtype=torch.bool)
        sel = self.entries.get(fqn)
        if sel is not None:
            if sel.axis == 0:
                mask[sel.indices] = True
            else:
                mask[:, sel.indices] = True
        return mask

    def nbytes(self) -> int:
        """Bytes of index storage the set holds (shared lists counted once)."""
        seen = {s.compact.data_ptr(): s.compact.numel() * s.compact.element_size()
                for s in self.entries.values()}
        return sum(seen.values())

    def num_selected(self) -> int:
        """Count selected rows/columns/elements over all entries."""
        return sum(len(s) for s in self.entries.values())

    def union(self, other: NeuronSet) -> NeuronSet:
        """Per-fqn union; `ValueError` if one fqn has different axes."""
        return _combine(self, other, "union", lambda x, y: torch.unique(torch.cat([x, y])))

    def intersection(self, other: NeuronSet) -> NeuronSet:
        """Per-fqn intersection; `ValueError` if one fqn has different axes."""
        return _combine(self, other, "intersection", lambda x, y: x[torch.isin(x, y)])

    def difference(self, other: NeuronSet) -> NeuronSet:
        """Per-fqn `self - other`; `ValueError` if one fqn has different axes."""
        return _combine(self, other, "difference", lambda x, y: x[~torch.isin(x, y)])

    def iou(self, other: NeuronSet) -> float:
        """Intersection over union of the `(fqn, axis, index)` triples; 1.0 if both empty."""
        inter = 0
        for fqn, sa in self.entries.items():
            sb = other.entries.get(fqn)
            if sb is not None and sa.axis == sb.axis:
                inter += int(torch.isin(sa.indices, sb.indices).sum())
        union = self.num_selected() + other.num_selected() - inter
        return 1.0 if union == 0 else inter / union

    def select(self, fqns: Iterable[str]) -> NeuronSet:
        """Restrict the set to parameter names `fqns` (missing names are skipped)."""
        keep = set(fqns)
        return NeuronSet({k: v for k, v in self.entries.items() if k in keep}, self.meta)

    def checksum(self) -> str:
        """SHA-256 hex digest of the entries (not meta), identical on every machine."""
        h = hashlib.sha256(FORMAT.encode() + b"\0")
        for fqn, sel in self.entries.items():
            name = fqn.encode("utf-8")
            # Length prefixes and explicit little-endian keep the encoding unambiguous
            # and independent of the host's byte order.
            h.update(len(name).to_bytes(8, "little") + name)
            h.update(sel.axis.to_bytes(1, "little") + len(sel).to_bytes(8, "little"))
            h.update(sel.indices.numpy().astype("<i8", copy=False).tobytes())
        return h.hexdigest()

    @classmethod
    def from_units(
        cls,
        blocks: list[MlpBlock],
        units: Mapping[int, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
    ) -> NeuronSet:
        """Build the set of all parameters owned by neuron units, per layer.

        Args:
            blocks: MLP blocks from `ArchAdapter.mlp_blocks`.
            units: `layer -> unit indices` (any order, duplicates allowed).
            meta: Metadata for the set.

        Returns:
            The set of entries given by `ncft.arch.unit_entries` for every layer.

        """
        by_layer = {b.layer: b for b in blocks}
        entries: dict[str, Selection] = {}
        for layer, idx in units.items():
            if layer not in by_layer:
                raise ValueError(f"units has layer {layer}, but blocks has {sorted(by_layer)}")
            for fqn, (axis, sel) in unit_entries(by_layer[layer], idx).items():
                entries[fqn] = Selection(axis, sel)
        return cls(entries, meta)

    def units(self, blocks: list[MlpBlock]) -> dict[int, torch.Tensor]:
        """Recover `layer -> unit indices` from each block's down-projection entry.

        Layers with no selected unit are left out.
        """
        out: dict[int, torch.Tensor] = {}
        for block in blocks:
            down = next(p for p in block.projections if p.module_fqn == block.down_fqn)
            sel = self.entries.get(down.weight_fqn)
            if sel is None:
                continue
            if sel.axis != down.unit_axis:
                raise ValueError(
                    f"entry {down.weight_fqn!r} selects axis {sel.axis}, but its units lie "
                    f"along axis {down.unit_axis}; this set is not a neuron-unit selection"
                )
            out[block.layer] = sel.indices.clone()
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `X.safetensors` and its `X.json` sidecar, each atomically.

        Args:
            path: Target ending in ".safetensors".

        """
        tensors_path, json_path = _paths(path)
        checksum = self.checksum()
        # clone(): safetensors refuses tensors that share storage, and unit_entries
        # hands the same index tensor to several parameters.
        tensors = {fqn: sel.indices.clone() for fqn, sel in self.entries.items()}
        sidecar = {
            "format": FORMAT,
            "meta": self.meta,
            "entries": {fqn: {"axis": s.axis, "count": len(s)} for fqn, s in self.entries.items()},
            "checksum": checksum,
        }
        # Tensors first: the sidecar's checksum is what commits the pair, so a crash
        # between the two writes leaves a pair that fails to load rather than a wrong one.
        with atomic_file(tensors_path) as tmp:
            save_file(tensors, tmp, metadata={"format": FORMAT, "checksum": checksum})
        write_text(json_path, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NeuronSet:
        """Read a set written by `save`, checking format, counts and checksum.

        Raises:
            ValueError: If the files are malformed or disagree, naming the file.

        """
        tensors_path, json_path = _paths(path)
        try:
            sidecar = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path}: not valid JSON ({e})") from e
        if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
            got = sidecar.get("format") if isinstance(sidecar, dict) else None
            raise ValueError(f"{json_path}: format must be {FORMAT!r}, got {got!r}")
        try:
            tensors = load_file(tensors_path)
        except SafetensorError as e:
            raise ValueError(f"{tensors_path}: unreadable safetensors file ({e})") from e
        listed = sidecar.get("entries")
        if not isinstance(listed, dict) or set(listed) != set(tensors):
            raise ValueError(f"{json_path}: entries do not match the tensors in {tensors_path}")
        entries = {}
        for fqn, info in listed.items():
            t = tensors[fqn]
            if t.dtype != torch.int64 or t.dim() != 1 or info.get("count") != t.numel():
                raise ValueError(
                    f"{json_path}: entry {fqn!r} expects {info.get('count')} int64 indices, "
                    f"{tensors_path} has {t.dtype} of shape {tuple(t.shape)}"
                )
            try:
                entries[fqn] = Selection(info.get("axis"), t)
            except ValueError as e:
                raise ValueError(f"{json_path}: entry {fqn!r}: {e}") from e
        loaded = cls(entries, sidecar.get("meta"))
        if loaded.checksum() != sidecar.get("checksum"):
            raise ValueError(
                f"{json_path}: checksum {sidecar.get('checksum')!r} does not match the "
                f"contents of {tensors_path} ({loaded.checksum()})"
            )
        return loaded


def _shared(entries: dict[str, Selection]) -> dict[str, Selection]:
    """`entries` with equal index lists held once (gate/up/down of a layer's units)."""
    kept: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
    out = {}
    for fqn, sel in entries.items():
        same = kept.setdefault((len(sel), sel.compact.dtype), [])
        match = next((t for t in same if torch.equal(t, sel.compact)), None)
        if match is None:
            same.append(sel.compact)
            out[fqn] = sel
        else:
            out[fqn] = sel if match is sel.compact else sel._sharing(match)
    return out


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"path must end in '.safetensors', got {str(p)!r}")
    return p, p.with_suffix(".json")
