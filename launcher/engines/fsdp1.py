"""FSDP1 with flat parameters (`use_orig_params=False`).

Each wrapped unit owns one `FlatParameter`: its parameters flattened and
concatenated, padded, and split evenly across ranks. A rank's shard holds, for each
parameter that reaches into it, the run `[intra_param_start_idx,
intra_param_end_idx]` of that flattened parameter at `offset_in_shard`
(`FlatParameter._shard_param_infos`): one `Segment` each.

FSDP1 refuses a FlatParameter that mixes trainable and frozen parameters, so every
module that owns a trainable parameter becomes its own unit and all its parameters
train; masks then freeze the unselected ones (a down projection's bias, say).

Precision: the flat parameters stay fp32 (masters, and what masks act on); with
`compute_dtype=bfloat16` FSDP's `MixedPrecision` gathers bf16 copies for compute and
reduces gradients in fp32. `summon_full_params` (gathered, edited, export) returns
the fp32 values.

With NCCL on several ranks the engine wraps with `sync_module_states`: ranks other
than 0 may pass a meta-device model, materialised empty (`param_init_fn`) and then
given rank 0's parameters and buffers. Gloo refuses that broadcast of CPU module
states, so on CPU every rank passes real weights.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from launcher.dist import DistInfo
from launcher.engines.common import (
    LocalState,
    OptimConfig,
    ShardedBasics,
    check_compute_dtype,
    decoder_layers,
    make_optimizer,
    named_shapes,
    prepare_model,
    step_if_finite,
    trainable,
)
from ncft.engine import Segment, StepStats

_WRAPPED = "_fsdp_wrapped_module."


def _units(model: nn.Module) -> set[int]:
    """Ids of modules to wrap: decoder layers and every owner of a trainable param."""
    owners = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own):
            for p in own:  # see module docstring: a unit trains all or nothing
                p.requires_grad_(True)
            owners.add(id(module))
    return owners | {id(m) for m in decoder_layers(model)}


class Fsdp1Engine(ShardedBasics, LocalState):
    """FULL_SHARD FSDP1 over decoder layers and trainable modules, flat params."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, info: DistInfo) -> None:
        check_compute_dtype(cfg, "fsdp1")
        self.name, self.device = "fsdp1", info.device
        self.rank, self.world_size, self.cfg = info.rank, info.world_size, cfg
        self._shapes = dict(named_shapes(model))
        prepare_model(model, cfg)
        units = _units(model)
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in units)
        self.module = FSDP(
            model, auto_wrap_policy=policy, use_orig_params=False,
            sharding_strategy=ShardingStrategy.FULL_SHARD, **_from_rank0(model, info),
            mixed_precision=_policy(cfg.compute_dtype),
            # An explicit device: FSDP1 only infers accelerators and refuses to guess CPU.
            device_id=info.device,
        )
        self.optimizer = make_optimizer(trainable(self.module), cfg)
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:  # noqa: D102
        self._micro += 1
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> StepStats:  # noqa: D102
        assert self._micro == self.cfg.grad_accum, "step() before all micro-batches ran"
        self._micro = 0
        norm = float(self.module.clip_grad_norm_(self.cfg.clip_norm))
        step_if_finite(self.optimizer, norm)
        return StepStats(grad_norm=norm)

    def _fsdp_units(self) -> Iterator[tuple[str, FSDP]]:
        for name, module in self.module.named_modules():
            if isinstance(module, FSDP) and module._flat_param is not None:
                yield name.replace(_WRAPPED, "").replace("_fsdp_wrapped_module", ""), module

    def segments(self) -> list[Segment]:  # noqa: D102
        out = []
        for prefix, unit in self._fsdp_units():
            flat = unit._flat_param
            if not flat.requires_grad:
                continue
            for fqn, info in zip(flat._fqns, flat._shard_param_infos):
                full = f"{prefix}.{fqn}" if prefix else fqn
                if info.in_shard:
                    start, stop = info.intra_param_start_idx, info.intra_param_end_idx + 1
                    offset = info.offset_in_shard
                else:  # reported anyway: every rank must know the name is trainable
                    start = stop = offset = 0
                out.append(
                    Segment(
                        fqn=full, shape=self._shapes[full], start=start, stop=stop,
                        opt_param=flat, opt_offset=offset,
                        grad=lambda f=flat, o=offset, n=stop - start: (
                            None if f.grad is None else f.grad.narrow(0, o, n)
                        ),
                    )
                )
        return out

    @contextmanager
    def _summoned(self, fqns: Sequence[str], writeback: bool):
        wanted = set(fqns)
        units = [
            unit for prefix, unit in self._fsdp_units()
            if any(_owner(f, prefix, unit) for f in wanted)
        ]
        with ExitStack() as stack:
            for unit in units:
                stack.enter_context(
                    FSDP.summon_full_params(unit, recurse=False, writeback=writeback)
                )
            params = {
                name.replace(_WRAPPED, ""): p for name, p in self.module.named_parameters()
            }
            with torch.no_grad():
                yield {n: params[n].data for n in fqns}

    @contextmanager
    def gathered(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:  # noqa: D102
        with self._summoned(fqns, writeback=False) as full:
            yield full

    @contextmanager
    def edited(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:  # noqa: D102
        with self._summoned(fqns, writeback=True) as full:
            yield full

    def close(self) -> None:  # noqa: D102
        self.optimizer = None


def _policy(dtype: torch.dtype) -> MixedPrecision | None:
    """bf16 compute over fp32 flat shards, fp32 gradient reduction; fp32: none."""
    if dtype == torch.float32:
        return None
    # Buffers (rotary `inv_freq`) stay fp32: positions lose precision in bf16.
    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32,
                          buffer_dtype=torch.float32)


def _from_rank0(model: nn.Module, info: DistInfo) -> dict:
    """FSDP1 arguments that fill meta-device ranks from rank 0 (module docstring)."""
    meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    sync = info.backend == "nccl" and info.world_size > 1
    if meta and (not sync or info.rank == 0):
        raise ValueError("FSDP1: only ranks other than 0 may build the model on the meta "
                         "device, and only with NCCL on several ranks")
    if not sync:
        return {}
    device = info.device
    return {"sync_module_states": True,
            "param_init_fn": (lambda m: m.to_empty(device=device, recurse=False)) if meta else None}


def _owner(fqn: str, prefix: str, unit: FSDP) -> bool:
    rel = fqn[len(prefix) + 1 :] if prefix else fqn
    return (not prefix or fqn.startswith(prefix + ".")) and rel in unit._flat_param._fqns
