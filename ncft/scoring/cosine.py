"""NeFT's weight-cosine scorer: how far each row moved under full fine-tuning.

Per candidate `i` (a weight row, or an FFN unit's gate row + up row + down column and
biases), `cos_i = <w_cur, w_ref> / (|w_cur| |w_ref|)`; the score is `1 - cos_i`, so
the LEAST similar candidates score highest and are selected first (NeFT), and
`reverse=True` in `ncft.selection.top_k` gives NeFT's highest-similarity control.

No parameter is ever gathered. A row's dot product and squared norms are sums over
its elements, and each rank owns a contiguous run `[start, stop)` of every flattened
parameter (`Engine.segments()`); flattened element `e` of a `[R, C]` weight is row
`e // C`, column `e % C`, so each rank adds its elements' products into per-candidate
sums, and one all-reduce of `3 x num_candidates` float64 values finishes the job,
including rows that straddle a ZeRO-3 partition boundary.

Memory: `LocalSnapshot` keeps one clone of this rank's trainable local shards
(1/world of the trainable model, never a full copy); scoring itself adds the
per-candidate sums (3 float64 per candidate) plus float64 temporaries for at most
`CHUNK_ELEMENTS` elements at a time (8 MiB), far below one layer of a real model.
With a checkpoint reference (`CheckpointReference`) no snapshot is kept at all: the
reference rows this rank needs are read from the safetensors files one segment at a
time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ncft.engine import Engine, Segment, local_view
from ncft.scoring.groups import Group, Scores
from ncft.train import train

CHUNK_ELEMENTS = 1 << 18  # elements scored at once: temporaries <= 8 MiB


class Reference(Protocol):
    """The other weights: flattened elements `[start, stop)` of a parameter."""

    def read(self, fqn: str, start: int, stop: int) -> torch.Tensor:
        """Return a 1-D tensor of `stop - start` elements."""
        ...


@dataclass
class LocalSnapshot:
    """A clone of this rank's local trainable segments (the original weights).

    Attributes:
        pieces: `(fqn, start, stop) -> clone` of each non-empty segment.
    """

    pieces: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    _by_fqn: dict[str, list[tuple[int, int]]] = field(default_factory=dict, repr=False)

    @classmethod
    def take(cls, engine: Engine, fqns: Iterable[str] | None = None) -> LocalSnapshot:
        """Clone the local segments of `fqns` (default: every trainable parameter)."""
        wanted = None if fqns is None else set(fqns)
        pieces = {}
        for seg in engine.segments():
            if seg.numel and (wanted is None or seg.fqn in wanted):
                pieces[(seg.fqn, seg.start, seg.stop)] = local_view(seg).detach().clone()
        return cls(pieces)

    def read(self, fqn: str, start: int, stop: int) -> torch.Tensor:
        """The snapshot of elements `[start, stop)` of `fqn` (inside one saved segment)."""
        if not self._by_fqn:
            for name, lo, hi in self.pieces:
                self._by_fqn.setdefault(name, []).append((lo, hi))
        for lo, hi in self._by_fqn.get(fqn, []):
            if lo <= start and stop <= hi:
                return self.pieces[(fqn, lo, hi)][start - lo : stop - lo]
        raise ValueError(f"snapshot has no segment holding {fqn}[{start}:{stop}]; the "
                         "engine's layout changed since it was taken")

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot."""
        return sum(t.numel() * t.element_size() for t in self.pieces.values())


class CheckpointReference:
    """Reads flattened ranges of parameters from a HF safetensors checkpoint directory.

    Only the rows covering `[start, stop)` are read (safetensors slices lazily), so a
    rank reads its own share of each parameter, never the whole model.
    """

    def __init__(self, directory: str | Path) -> None:
        """Index `model.safetensors` or a sharded `model.safetensors.index.json`."""
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {k: directory / v for k, v in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            path = directory / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                self._files = {k: path for k in f.keys()}  # noqa: SIM118 - not a dict
        else:
            raise ValueError(f"{directory} has no model.safetensors(.index.json)")
        self._handles: dict[Path, Any] = {}

    def read(self, fqn: str, start: int, stop: int) -> torch.Tensor:
        """Flattened elements `[start, stop)` of `fqn` from the checkpoint."""
        if fqn not in self._files:
            raise ValueError(f"checkpoint has no tensor {fqn!r}")
        path = self._files[fqn]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        sliced = self._handles[path].get_slice(fqn)
        shape = sliced.get_shape()
        width = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // width, (stop - 1) // width + 1
        rows = sliced[first:last].reshape(-1)
        offset = start - first * width
        return rows[offset : offset + stop - start]


def _candidate_index(shape: tuple[int, ...], start: int, stop: int, axis: int) -> torch.Tensor:
    """Candidate (row or column) of each flattened element in `[start, stop)`."""
    e = torch.arange(start, stop, dtype=torch.int64)
    if len(shape) == 1:
        return e
    width = math.prod(shape[1:])
    return e // width if axis == 0 else e % width


def _piece_owners(groups: Sequence[Group]) -> dict[str, tuple[int, int]]:
    owners: dict[str, tuple[int, int]] = {}
    for gi, g in enumerate(groups):
        for fqn, axis in g.pieces:
            if fqn in owners:
                raise ValueError(f"parameter {fqn} is a piece of two groups")
            owners[fqn] = (gi, axis)
    return owners


@dataclass(frozen=True)
class WeightCosine:
    """NeFT scorer: `1 - cos(current, reference)` per candidate (module docstring).

    Attributes:
        reference: The other weights (`LocalSnapshot` or `CheckpointReference`).
        details: Extra metadata, e.g. the fine-tuning steps taken.
    """

    reference: Reference
    details: dict[str, Any] = field(default_factory=dict)
    name: str = "weight_cosine"

    def score(self, engine: Engine, groups: Sequence[Group]) -> Scores:
        """Per-candidate `1 - cos`, from local segments and one all-reduce."""
        owners = _piece_owners(groups)
        segments = [seg for seg in engine.segments() if seg.fqn in owners]
        missing = sorted(set(owners) - {seg.fqn for seg in segments})
        if missing:
            raise ValueError(f"weight_cosine needs trainable parameters; not trained: "
                             f"{missing[:3]}")
        # Sums live where the weights do (the host under ZeRO-3 optimizer offload);
        # `all_reduce_` moves them to the engine's device for the collective.
        device = segments[0].opt_param.device if segments else torch.device("cpu")
        stats = [torch.zeros(3, g.size, dtype=torch.float64, device=device) for g in groups]
        for seg in segments:
            if seg.numel:
                gi, axis = owners[seg.fqn]
                self._accumulate(seg, axis, stats[gi])
        flat = engine.all_reduce_(torch.cat(stats, dim=1))
        return {g.name: _one_minus_cos(s) for g, s in
                zip(groups, flat.cpu().split([g.size for g in groups], dim=1))}

    def _accumulate(self, seg: Segment, axis: int, stats: torch.Tensor) -> None:
        # Chunks bound the float64 temporaries (~32 bytes per element) whatever the
        # parameter's size.
        view = local_view(seg).detach()
        for lo in range(0, seg.numel, CHUNK_ELEMENTS):
            hi = min(lo + CHUNK_ELEMENTS, seg.numel)
            start, stop = seg.start + lo, seg.start + hi
            cur = view[lo:hi].to(stats.device, torch.float64)
            ref = self.reference.read(seg.fqn, start, stop).to(stats.device, torch.float64)
            idx = _candidate_index(seg.shape, start, stop, axis).to(stats.device)
            stats[0].index_add_(0, idx, cur * ref)
            stats[1].index_add_(0, idx, cur * cur)
            stats[2].index_add_(0, idx, ref * ref)

    def meta(self) -> dict[str, Any]:
        """What a NeuronSet built from these scores records."""
        return {"scorer": self.name, "aggregation": "1 - cos(w_cur, w_ref) per candidate",
                **self.details}


def _one_minus_cos(stats: torch.Tensor) -> torch.Tensor:
    dot, n_cur, n_ref = stats
    denom = torch.sqrt(n_cur * n_ref)
    cos = torch.where(denom > 0, dot / denom.clamp(min=1e-300), torch.zeros_like(dot))
    # Two all-zero rows did not move: similarity 1.
    cos = torch.where((n_cur == 0) & (n_ref == 0), torch.ones_like(cos), cos)
    return 1.0 - cos


def finetune_and_score(
    engine: Engine, groups: Sequence[Group], steps: Iterable[Sequence[dict]], num_steps: int
) -> tuple[Scores, dict[str, Any]]:
    """NeFT's recipe: snapshot, fully fine-tune `num_steps` steps, score against the snapshot.

    The engine keeps the fine-tuned weights and optimizer state: build a fresh engine
    from the original model for the selective training that follows (it must be
    built after `freeze_unselected` anyway).

    Returns:
        The scores and the metadata to record.
    """
    fqns = {fqn for g in groups for fqn, _ in g.pieces}
    snap = LocalSnapshot.take(engine, fqns)
    bar = tqdm(total=num_steps, desc="neft full FT", disable=not engine.is_main_process)
    logs = train(engine, _take(steps, num_steps), None, on_step=lambda _log: bar.update())
    bar.close()
    scorer = WeightCosine(snap, {"finetune_steps": len(logs),
                                 "snapshot_local_bytes": snap.nbytes})
    return scorer.score(engine, groups), scorer.meta()


class NeftProbe:
    """NeFT's recipe as a `Scorer`: `finetune_and_score` on the engine it is given.

    The engine is fine-tuned in place (see `finetune_and_score`); `meta()` is
    available after `score`.

    Args:
        steps: Micro-batch lists to fine-tune on (only `num_steps` are taken).
        num_steps: Full fine-tuning steps before rows are compared.
    """

    name = "weight_cosine"

    def __init__(self, steps: Iterable[Sequence[dict]], num_steps: int) -> None:
        self.steps, self.num_steps = steps, num_steps
        self._meta: dict[str, Any] | None = None

    def score(self, engine: Engine, groups: Sequence[Group]) -> Scores:
        """Snapshot, fine-tune `num_steps` steps, return `1 - cos` against the snapshot."""
        scores, self._meta = finetune_and_score(engine, groups, self.steps, self.num_steps)
        return scores

    def meta(self) -> dict[str, Any]:
        """What a NeuronSet built from these scores records (steps taken, snapshot size)."""
        assert self._meta is not None, "NeftProbe.meta() before score()"
        return self._meta


def _take(steps: Iterable, n: int):
    for i, step in enumerate(steps):
        if i >= n:
            return
        yield step
