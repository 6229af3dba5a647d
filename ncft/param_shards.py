"""Read and gather parameters that a training engine already sharded, by duck typing.

`ncft.adapter` is called from the user's own training code, where the model may be
sharded before ncft sees it: `from_pretrained` under a DeepSpeed ZeRO-3 config
(`HfDeepSpeedConfig` / `zero.Init`) leaves each rank one flat partition of every
parameter (`param.ds_tensor`, `ds_shape`, `ds_numel`), and FSDP2 turns parameters
into DTensors. Nothing here imports DeepSpeed or FSDP: a ZeRO-3 parameter is
recognised by its `ds_tensor`, a DTensor by `full_tensor`.

ZeRO-3's layout is `ncft.masks.layout.flat_partition`: rank r holds flat elements
`[r P, (r + 1) P)` of the end-padded parameter. The selected rows (or columns) of a
`[R, C]` matrix, in the order `W.index_select(axis, idx)` stores them, are exactly
the selected elements of `flatten(W)` in increasing flat order (indices are sorted).
So each rank's selected elements form one contiguous run of the slice, at an offset
that arithmetic gives, and one all-gather of those runs (each padded to the longest)
assembles the slice on every rank: no rank ever holds more than the slice, and the
values are copied, not summed, so they are bit-exact.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ncft.masks.layout import flat_partition, segment_mask


def is_zero3(param: torch.Tensor) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3."""
    return getattr(param, "ds_tensor", None) is not None


def is_dtensor(param: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter)."""
    return callable(getattr(param, "full_tensor", None))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The unsharded shape of a parameter (ZeRO-3 keeps it in `ds_shape`)."""
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(param.shape)


def comm_device(group=None) -> torch.device:
    """Where this rank's collectives run: its GPU under NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _selected_before(shape: tuple[int, ...], axis: int, idx: torch.Tensor, flat: int) -> int:
    """How many selected elements lie at flat positions `< flat`."""
    if len(shape) == 1:
        return int((idx < flat).sum())
    width = math.prod(shape[1:])
    row, col = divmod(flat, width)
    if axis == 0:
        return width * int((idx < row).sum()) + (col if bool((idx == row).any()) else 0)
    return row * idx.numel() + int((idx < col).sum())


def _group_of(param: torch.Tensor):
    return getattr(param, "ds_process_group", None)


def _gather_runs(local: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's run (`sizes[r]` elements) concatenated in rank order, on the CPU."""
    device = comm_device(group)
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: local.numel()].copy_(local)
    out = torch.empty(longest * len(sizes), dtype=local.dtype, device=device)
    dist.all_gather_into_tensor(out, padded, group=group)
    runs = [out[r * longest : r * longest + n] for r, n in enumerate(sizes)]
    return torch.cat(runs).cpu()


def _rank_world(param: torch.Tensor) -> tuple[int, int]:
    group = _group_of(param)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    numel = math.prod(full_shape(param))
    per_rank = flat_partition(numel, world, rank)[2]
    if param.ds_tensor.numel() != per_rank:
        raise ValueError(
            f"a ZeRO-3 partition of {param.ds_tensor.numel()} elements is not DeepSpeed's "
            f"flat layout over {world} ranks ({per_rank} per rank); ncft reads ZeRO-3 "
            "partitions of the data-parallel group only"
        )
    return rank, world


def run_sizes(shape: tuple[int, ...], axis: int, idx: torch.Tensor, world: int) -> list[int]:
    """How many selected elements each rank's ZeRO-3 partition holds."""
    numel = math.prod(shape)
    bounds = [flat_partition(numel, world, r)[:2] for r in range(world)]
    return [_selected_before(shape, axis, idx, stop) - _selected_before(shape, axis, idx, start)
            for start, stop in bounds]


def local_run(shape: tuple[int, ...], axis: int, idx: torch.Tensor, part: torch.Tensor,
              rank: int, world: int, fqn: str = "parameter") -> torch.Tensor:
    """The selected elements in rank `rank`'s flat partition `part`, in slice order.

    Concatenated over ranks in rank order they are `full.index_select(axis, idx)`,
    flattened (module docstring).
    """
    start, stop, _ = flat_partition(math.prod(shape), world, rank)
    local = part.reshape(-1)[: stop - start]
    return local[segment_mask(shape, start, stop, axis, idx, fqn).to(local.device)]


def zero3_slice(fqn: str, param: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """`full(param).index_select(axis, idx)` from ZeRO-3 partitions (collective).

    Every rank of the parameter's group must call it, for the same parameters in the
    same order. Returns the slice on the partition's device, bit-exact.
    """
    shape = full_shape(param)
    rank, world = _rank_world(param)
    run = local_run(shape, axis, idx, param.ds_tensor.detach(), rank, world, fqn)
    values = _gather_runs(run, run_sizes(shape, axis, idx, world), _group_of(param))
    sliced = list(shape)
    sliced[axis] = idx.numel()
    return values.view(sliced).to(param.ds_tensor.device)


def zero3_full(param: torch.Tensor) -> torch.Tensor:
    """The full value of a ZeRO-3 parameter, on the CPU (collective; for small ones)."""
    shape = full_shape(param)
    _, world = _rank_world(param)
    numel = math.prod(shape)
    per_rank = param.ds_tensor.numel()
    sizes = [per_rank] * world
    flat = _gather_runs(param.ds_tensor.detach().reshape(-1), sizes, _group_of(param))
    return flat[:numel].view(shape)


def full_value(param: torch.Tensor) -> torch.Tensor:
    """A parameter's full value on the CPU: gathered if sharded (collective then)."""
    if is_zero3(param):
        return zero3_full(param)
    if is_dtensor(param):
        return param.detach().full_tensor().cpu()
    return param.detach().cpu()
