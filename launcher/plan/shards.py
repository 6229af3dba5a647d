"""Where each parameter's elements live on one rank, engine by engine (shapes only).

The parameter layouts `launcher.plan.memory` counts bytes over: a ZeRO-3 partition
`ceil(numel / W)` per parameter (`ncft.masks.layout.flat_partition`, padding included),
FSDP2's `torch.chunk` rows padded to the first chunk, one FSDP1 flat shard per wrapped
unit, and whole parameters on `single`. Trainable pieces are tagged with the optimizer
tensor that steps them (a ZeRO-3 sub-group, an FSDP1 unit, a parameter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.plan.model import ModelInfo, ParamInfo
from ncft.masks.layout import chunk_rows, flat_partition

ENGINES = ("deepspeed", "fsdp2", "fsdp1", "single")


@dataclass(frozen=True)
class DsTuning:
    """The ZeRO-3 settings that change memory (from the spec's DeepSpeed JSON)."""

    persistence_threshold: int = 100_000
    reduce_bucket_size: int = 500_000_000
    sub_group_size: int = 1_000_000_000


@dataclass(frozen=True)
class Held:
    """One parameter's piece on this rank.

    Attributes:
        param: The parameter.
        start: First flattened element held here.
        stop: One past the last.
        opt: Key of the optimizer tensor holding it, or None if it is frozen.
    """

    param: ParamInfo
    start: int
    stop: int
    opt: str | None


@dataclass
class Layout:
    """What one rank allocates for parameters, by engine.

    Attributes:
        held: The rank's piece of every parameter (the segments of the trainable ones).
        stored: Parameter elements allocated (padding included).
        stored_trainable: Of those, elements of trainable storage.
        opt_numel: Local elements of each optimizer tensor (what moments and masks cover).
        whole: Elements of parameters held whole besides (ZeRO-3 persistent ones).
    """

    held: list[Held] = field(default_factory=list)
    stored: int = 0
    stored_trainable: int = 0
    opt_numel: dict[str, int] = field(default_factory=dict)
    whole: int = 0


def layer_of(fqn: str, layers: tuple[str, ...]) -> str:
    """The decoder layer (one of `layers`) that `fqn` belongs to, or "" for none."""
    return next((name for name in layers if fqn.startswith(name + ".")), "")


def layout(
    engine: str, model: ModelInfo, world: int, rank: int, ds: DsTuning = DsTuning()
) -> Layout:
    """Lay `model`'s parameters out on rank `rank` of `world` as `engine` does."""
    if engine not in ENGINES:
        raise ValueError(f"engine.backend: unknown {engine!r}; choose one of {list(ENGINES)}")
    if engine == "fsdp1":
        return _fsdp1(model, world, rank)
    out = Layout()
    for p in model.params:
        if engine == "deepspeed":
            start, stop, stored = flat_partition(p.numel, world, rank)
            if p.numel < ds.persistence_threshold and world > 1:
                out.whole += p.numel  # on one rank the gathered tensor is the partition
        elif engine == "fsdp2":
            rows = p.shape[0] if p.shape else 1
            width = p.numel // rows
            lo, hi = chunk_rows(rows, world, rank)
            start, stop, stored = lo * width, hi * width, -(-rows // world) * width
        else:
            start, stop, stored = 0, p.numel, p.numel
        opt = None
        if p.trainable:
            opt = _ds_subgroup(out, ds) if engine == "deepspeed" else p.fqn
            out.opt_numel[opt] = out.opt_numel.get(opt, 0) + (
                stored if engine == "deepspeed" else stop - start
            )
            out.stored_trainable += stored
        out.held.append(Held(p, start, stop, opt))
        out.stored += stored
    return out


def _ds_subgroup(out: Layout, ds: DsTuning) -> str:
    # DeepSpeed closes a sub-group once its partitions reach sub_group_size elements.
    key = f"subgroup{max(len(out.opt_numel) - 1, 0)}"
    if out.opt_numel.get(key, 0) >= ds.sub_group_size:
        key = f"subgroup{len(out.opt_numel)}"
    return key


def _fsdp1_unit(p: ParamInfo, model: ModelInfo) -> str:
    # launcher/engines/fsdp1.py wraps every decoder layer and every module owning a
    # trainable parameter; what is in neither belongs to the root unit.
    if p.trainable and p.module:
        return p.module
    return layer_of(p.fqn, model.layers)


def _fsdp1(model: ModelInfo, world: int, rank: int) -> Layout:
    units: dict[str, list[ParamInfo]] = {}
    for p in model.params:
        units.setdefault(_fsdp1_unit(p, model), []).append(p)
    out = Layout()
    for name, params in units.items():
        total = sum(p.numel for p in params)
        shard = -(-total // world)
        lo, hi = min(rank * shard, total), min((rank + 1) * shard, total)
        trainable = params[0].trainable
        assert all(p.trainable == trainable for p in params), name
        offset = 0
        for p in params:
            start = min(max(lo - offset, 0), p.numel)
            stop = min(max(hi - offset, 0), p.numel)
            out.held.append(Held(p, start, stop, name if trainable else None))
            offset += p.numel
        out.stored += shard
        if trainable:
            out.stored_trainable += shard
            out.opt_numel[name] = shard
    return out
