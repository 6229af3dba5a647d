"""Sharded loading: every rank reads from the safetensors files only what it will own.

A run's weights are a HF directory (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) or a stage checkpoint (`RUN/checkpoints/<stage>/
model.safetensors`). `launcher.engines.weights.SafetensorsWeights` reads a row range
or a flat element range of one tensor straight from its file (the byte range the
safetensors header gives), so a rank touches only its part; no rank holds the full
model, nothing is broadcast.

- FSDP2 (`fill_rows`): the model is built on the meta device on every rank,
  `fully_shard`ed, `to_empty`'d, then each rank copies rows `chunk_rows(R, W, r)`
  (what `torch.chunk` and `Shard(0)` give it) into its DTensor shard.
- ZeRO-3 (`zero3_model`): a twin of the meta model is built under
  `deepspeed.zero.Init`, so each rank allocates only its partitions, and each rank
  writes its own `ds_tensor` from the file (`flat_partition` arithmetic).

Non-persistent buffers (rotary `inv_freq`) are in no file; they are recomputed on
each rank (`recompute_buffers`). `Replay` serves again what a build read, from this
rank's memory, so a stage that builds a scoring engine and then a training engine
reads the files once.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.engines.frozen import FrozenStore
from launcher.engines.weights import Replay, SafetensorsWeights, Weights

__all__ = ["Replay", "SafetensorsWeights", "Weights", "fill_rows", "zero3_model"]
from ncft import sparse_delta
from ncft.engine import local_tensor
from ncft.masks.layout import chunk_rows, flat_partition


def param_keys(model: nn.Module, available: Iterable[str]) -> dict[str, str]:
    """Each parameter's key in the files, tied parameters under any of their names.

    A tied `lm_head.weight` is the same Parameter as `embed_tokens.weight`;
    `named_parameters()` lists it once, and the file may hold it under either name.

    Raises:
        ValueError: If a parameter is under none of its names.
    """
    available = set(available)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out, missing = {}, []
    for name, p in model.named_parameters():
        key = next((n for n in aliases[id(p)] if n in available), None)
        if key is None:
            missing.append(name)
        else:
            out[name] = key
    if missing:
        raise ValueError(f"the weights have no tensor for {len(missing)} parameters, e.g. "
                         f"{missing[:3]}; they do not belong to this model")
    return out


def _checked(weights: Weights, key: str, shape: tuple[int, ...]) -> None:
    found = weights.shape(key)
    if tuple(found) != tuple(shape):
        raise ValueError(f"weights hold {key} with shape {tuple(found)}, the model needs "
                         f"{tuple(shape)}")


def persistent_buffers(model: nn.Module) -> list[str]:
    """Names of buffers a checkpoint holds (the rest are recomputed)."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name, buf in module.named_buffers(recurse=False)
        if buf is not None and name not in module._non_persistent_buffers_set
    ]


@torch.no_grad()
def recompute_buffers(model: nn.Module) -> None:
    """Recompute every non-persistent buffer on its current device, as HF does on load.

    transformers rebuilds the buffers of a model materialised from meta (rotary
    `inv_freq` and `original_inv_freq`) with the model's `_init_weights(module)`; the
    same call serves here. Buffers are first set to NaN so one that no recipe
    rewrites is caught rather than left as `to_empty` garbage.

    Raises:
        ValueError: If a non-persistent buffer is not floating point or stays unset.
    """
    init = getattr(model, "_init_weights", None)
    for prefix, module in model.named_modules():
        own = module._buffers
        names = [n for n in module._non_persistent_buffers_set if own.get(n) is not None]
        if not names:
            continue
        bad = [n for n in names if not module._buffers[n].is_floating_point()]
        if init is None or bad:
            raise ValueError(f"cannot recompute the non-persistent buffers {names} of "
                             f"{prefix or type(model).__name__}; load this model without "
                             "sharded loading (engine.backend: single)")
        for n in names:
            module._buffers[n].fill_(float("nan"))
        init(module)
        unset = [n for n in names if module._buffers[n].isnan().any()]
        if unset:
            raise ValueError(f"{type(model).__name__}._init_weights does not recompute "
                             f"{prefix}.{unset[0]}")


@torch.no_grad()
def _fill_buffers(model: nn.Module, weights: Weights) -> None:
    buffers = dict(model.named_buffers())
    for name in persistent_buffers(model):
        buf = buffers[name]
        if name not in weights.keys():
            raise ValueError(f"the weights have no persistent buffer {name} (stage "
                             "checkpoints hold parameters only); use engine.backend: "
                             "single")
        _checked(weights, name, tuple(buf.shape))
        buf.copy_(weights.rows(name, 0, buf.shape[0] if buf.dim() else 0))


@torch.no_grad()
def fill_rows(model: nn.Module, weights: Weights, keys: Mapping[str, str], world_size: int,
              rank: int, frozen: FrozenStore | None = None) -> None:
    """Fill this rank's rows of every parameter of a `to_empty`'d model, and its buffers.

    Serves FSDP2 (a `fully_shard`ed model: DTensors sharded on dim 0) and, with one
    rank, a plain model (the single engine).

    Args:
        model: The model (FSDP2: parameters are DTensors sharded on dim 0).
        weights: Where to read.
        keys: `param_keys` of the model, computed before sharding.
        world_size: Ranks the parameters are sharded over.
        rank: This rank.
        frozen: The engine's lowered frozen parameters: their file values are
            recorded there before the copy rounds them (`launcher.engines.frozen`).
    """
    recompute_buffers(model)  # first: `_init_weights` may also touch parameters
    for name, param in model.named_parameters():
        shape = tuple(param.shape)  # a DTensor reports the global shape
        _checked(weights, keys[name], shape)
        lo, hi = chunk_rows(shape[0], world_size, rank) if shape else (0, 0)
        local = local_tensor(param)
        src = weights.rows(keys[name], lo, hi)
        assert tuple(src.shape) == tuple(local.shape), (name, src.shape, local.shape)
        if frozen is not None and name in frozen.names:
            frozen.record(name, src)
        local.copy_(src)
    _fill_buffers(model, weights)


def zero3_model(meta: nn.Module, ds_cfg: dict, weights: Weights, world_size: int,
                rank: int, fp32_parts: dict[str, torch.Tensor] | None = None,
                ) -> nn.Module:
    """A twin of the meta HF model, built under `deepspeed.zero.Init` and filled.

    Each rank's partitions come from `weights`; `requires_grad` and the generation
    settings are copied from `meta`.

    DeepSpeed's layout (deepspeed/runtime/zero/partition_parameters.py,
    `Init._partition_param`, v0.19): a parameter of `ds_numel` elements is padded to
    `ds_numel_aligned = world * P`, `P = ceil(ds_numel / world)`, and rank r's
    `ds_tensor` (P elements, on `remote_device`) holds flat elements `[r P, (r+1) P)`;
    the tail past `ds_numel` is padding. That is `ncft.masks.layout.flat_partition`,
    so each rank writes its `ds_tensor` from its own file range, with no collective.
    `zero.Init` reads `remote_device` (`offload_param`) from the config. Given
    `fp32_parts`, each rank's partition is also kept there in fp32 (padded with zeros),
    read once with the rest (bf16 compute: the engine's exact masters and frozen values).
    """
    import deepspeed
    from transformers.initialization import no_init_weights

    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:  # older transformers 5.x (the GPU image's 5.17): fixed up below
        prevent_arange_dtype_change = None

    keys = param_keys(meta, weights.keys())
    dtype = next(meta.parameters()).dtype
    # zero.Init reads the world size from deepspeed.comm, which `deepspeed.initialize`
    # would only set up later: attach it to the existing process group now.
    deepspeed.init_distributed(torch.distributed.get_backend(), dist_init_required=False)
    # no_init_weights: the random init would be overwritten; prevent_arange_dtype_change
    # keeps rotary buffers fp32 when zero.Init casts new tensors to a bf16 dtype. No
    # `dtype=` argument: zero.Init then takes it from the config's bf16/fp16 flags
    # (which `ds_config.fill` set from the model's dtype), as `deepspeed.initialize`
    # would cast the module; given one, DeepSpeed 0.19's `_set_dtype` ignores it on an
    # accelerator without fp16 (operator precedence) and picks bf16. `copy_` below
    # casts the file's values to the partitions' dtype.
    keep_arange = prevent_arange_dtype_change or contextlib.nullcontext
    with no_init_weights(), keep_arange(), \
            _partition_only(deepspeed.zero.Init)(config_dict_or_path=ds_cfg):
        model = type(meta)._from_config(meta.config, dtype=dtype)
        # Sparse deltas (training.update=sparse_delta) are on the meta model only; the
        # twin gets the same ones here, partitioned like the rest and filled below.
        sparse_delta.mirror(model, sparse_delta.installed(meta))
    if prevent_arange_dtype_change is None:
        # Without it zero.Init built the rotary tables in the compute dtype: rebuild
        # them in fp32, as the newer transformers keeps them.
        for module in model.modules():
            for name in module._non_persistent_buffers_set:
                if module._buffers.get(name) is not None:
                    module._buffers[name] = module._buffers[name].float()
        recompute_buffers(model)
    # no_init_weights also skips `init_weights`, where transformers ties embeddings.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    wanted = dict(meta.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    if names != list(wanted):
        raise ValueError(f"the ZeRO-3 twin of {type(meta).__name__} has other parameters "
                         f"than the model ({sorted(set(names) ^ set(wanted))[:3]})")
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = tuple(param.ds_shape)
            assert shape == tuple(wanted[name].shape), (name, shape)
            _checked(weights, keys[name], shape)
            param.requires_grad_(wanted[name].requires_grad)
            start, stop, per_rank = flat_partition(param.ds_numel, world_size, rank)
            part = param.ds_tensor
            if getattr(part, "final_location", None) is not None:  # swapped out to NVMe
                raise ValueError("ZeRO-3 sharded loading does not fill NVMe-offloaded "
                                 "parameters; use offload_param.device cpu or none")
            assert part.numel() == per_rank and param.ds_numel_aligned == per_rank * world_size
            values = weights.flat(keys[name], start, stop)
            part[: stop - start].copy_(values)
            part[stop - start :].zero_()  # DeepSpeed leaves the padding uninitialised
            if fp32_parts is not None:
                fp32_parts[name] = fp32_partition(values, per_rank)
        _fill_buffers(model, weights)
    model.generation_config = meta.generation_config
    return model.train(meta.training)


def fp32_partition(values: torch.Tensor, per_rank: int) -> torch.Tensor:
    """A rank's flat partition `values` as fp32, zero-padded to the partition size."""
    part = torch.zeros(per_rank, dtype=torch.float32)
    part[: values.numel()].copy_(values)
    return part


def _partition_only(init_cls: type) -> type:
    """`zero.Init` without its broadcast of rank 0's freshly built parameters.

    `Init._zero_init_param` (partition_parameters.py, v0.19) broadcasts each new full
    parameter from rank 0 so random inits agree, then partitions it. Every partition
    is overwritten from the files right after, so the broadcast is wasted traffic, and
    it writes every full tensor on every other rank: measured at 3 ranks on a 240 MiB
    model, +196 MiB peak on ranks 1-2 against +86 MiB on rank 0 (shard: 80 MiB).
    """

    class PartitionOnly(init_cls):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitionOnly


class PeakMemory:
    """Peak host memory (resident set) of this process inside a `with` block.

    Linux resets the high-water mark `VmHWM` to the current RSS on writing 5 to
    `/proc/self/clear_refs`, so the peak is the block's own. Where that is refused,
    `ru_maxrss` (the process-lifetime peak) is used and the value is an upper bound.
    """

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.before = _status_kib("VmRSS")
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM") if self.exact else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak = max(hwm, _status_kib("VmRSS"))
        self.seconds = time.perf_counter() - self._start

    @property
    def added_mib(self) -> float:
        """Peak RSS in the block minus RSS when it began, MiB."""
        return (self.peak - self.before) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def report(engine: str, rank: int, peak: PeakMemory, weights: Weights) -> dict[str, Any]:
    """Print and return one rank's load numbers (every rank prints its own line)."""
    out = {
        "engine": engine, "rank": rank, "rss_before_mib": round(peak.before / 1024, 1),
        "peak_added_mib": round(peak.added_mib, 1),
        "read_mib": round(weights.bytes_read / 2**20, 1),
        # A wrapper (sparse deltas: launcher.run.delta_weights) reads through `base`.
        "source": "files" if isinstance(getattr(weights, "base", weights), SafetensorsWeights)
        else "memory",
        "seconds": round(peak.seconds, 2),
    }
    print(f"[rank {rank}] {engine} load from {out['source']}: read "
          f"{out['read_mib']} MiB, peak host memory +{out['peak_added_mib']} MiB over "
          f"{out['rss_before_mib']} MiB, {out['seconds']} s", flush=True)
    return out
