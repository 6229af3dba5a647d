"""FSDP2 (`fully_shard`): per-parameter DTensors sharded on dim 0.

Each rank holds `torch.chunk(param, world, dim=0)[rank]`, a contiguous run of whole
rows of the flattened parameter, so a selection maps to the chunk's row range
(see `ncft.masks.layout.chunk_rows`).

Only rank 0 needs real weights: the other ranks may build the model on the meta
device (no host memory), and after sharding rank 0 broadcasts one parameter at a
time, each rank keeping its rows. Buffers, including non-persistent ones that no
checkpoint holds (rotary `inv_freq`), are broadcast too, so no rank relies on
re-running initialisation code for them.

Precision: the trainable sharded DTensors stay fp32 (masters, and what masks act
on); with `compute_dtype=bfloat16` a `MixedPrecisionPolicy` all-gathers them as bf16
for forward and backward and reduce-scatters gradients in fp32. Frozen parameters
are sharded in bf16 (`launcher.engines.frozen`: no cast at all-gather, half the
bytes), each rank keeping its rows' exact values on the host; `gathered` and
`edited` all-gather those exact values, so exports keep every source bit. FSDP2
checks one original dtype per `fully_shard` group among *trainable* parameters
only, so a layer may mix fp32 trainables (masked projections, sparse deltas) with
its bf16 frozen weights.

Given `weights` (`launcher.engines.loading`), every rank builds on meta instead and
reads its own rows from the safetensors files: no rank holds the full model and
nothing is broadcast; non-persistent buffers are recomputed on each rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from launcher.dist import DistInfo, all_gather_flat, any_rank, broadcast_
from launcher.engines import loading
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
from launcher.engines.frozen import frozen_store
from ncft.engine import Segment, StepStats, local_tensor
from ncft.masks.layout import chunk_rows


class Fsdp2Engine(ShardedBasics, LocalState):
    """`fully_shard` on every decoder layer, then on the root."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, info: DistInfo,
                 weights: loading.Weights | None = None) -> None:
        check_compute_dtype(cfg, "fsdp2")
        self.name, self.device = "fsdp2", info.device
        self.rank, self.world_size, self.cfg = info.rank, info.world_size, cfg
        self._shapes = dict(named_shapes(model))
        prepare_model(model, cfg)
        self.frozen = frozen_store(model, cfg.compute_dtype, cfg.lower_frozen)
        self.load_report = None
        policy = _policy(cfg.compute_dtype)
        if weights is not None:
            self._load_sharded(model, weights, info.device, policy)
        else:
            self._shard_in_memory(model, info, policy)
        self.module = model
        self._params = dict(model.named_parameters())
        self.optimizer = make_optimizer(trainable(model), cfg)
        self._micro = 0

    def _load_sharded(self, model: nn.Module, weights: loading.Weights,
                      device: torch.device, policy: MixedPrecisionPolicy) -> None:
        if not all(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise ValueError("FSDP2 sharded loading: build the model on the meta device")
        keys = loading.param_keys(model, weights.keys())  # before sharding: tied aliases
        with loading.PeakMemory() as peak:
            for layer in decoder_layers(model):
                fully_shard(layer, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            model.to_empty(device=device)
            loading.fill_rows(model, weights, keys, self.world_size, self.rank, self.frozen)
        self.load_report = loading.report("fsdp2", self.rank, peak, weights)

    def _shard_in_memory(self, model: nn.Module, info: DistInfo,
                         policy: MixedPrecisionPolicy) -> None:
        meta = _on_meta(model)
        from_rank0 = info.world_size > 1 and any_rank(meta, info.device)
        if meta and (self.rank == 0 or not from_rank0):
            raise ValueError("FSDP2: rank 0 must build the model with real weights; only "
                             "other ranks may build it on the meta device")
        # Rank 0's full tensors, kept referenced while sharding replaces them.
        full = dict(model.named_parameters()) if from_rank0 and self.rank == 0 else {}
        if not meta:
            model.to(info.device)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        if meta:
            model.to_empty(device=info.device)
        if from_rank0:
            self._broadcast_from_rank0(model, full, info.device)
        elif self.frozen is not None:  # every rank recorded whole tensors: keep its rows
            for name in self.frozen.names:
                shape = self._shapes[name]
                self.frozen.keep_rows(name, *chunk_rows(shape[0], self.world_size, self.rank),
                                      shape)
        del full

    @torch.no_grad()
    def _broadcast_from_rank0(
        self, model: nn.Module, full: dict[str, torch.Tensor], device: torch.device
    ) -> None:
        # One full parameter in flight at a time: peak extra memory is the largest
        # parameter, whatever the model's size.
        for name, param in model.named_parameters():
            shape = self._shapes[name]
            lowered = self._lowered(name)
            if self.rank == 0:  # a lowered parameter travels with its exact values
                source = self.frozen.exact(name, full[name]) if lowered else full[name]
                buf = source.detach().to(device)
            else:
                buf = torch.empty(shape, dtype=torch.float32 if lowered else param.dtype,
                                  device=device)
            broadcast_(buf, device, src=0)
            lo, hi = chunk_rows(shape[0], self.world_size, self.rank) if shape else (0, 0)
            local = local_tensor(param)
            mine = buf[lo:hi] if shape else buf
            if lowered:
                self.frozen.record(name, mine)
            local.copy_(mine)
        for buffer in model.buffers():
            broadcast_(buffer, device, src=0)

    def backward(self, loss: torch.Tensor) -> None:  # noqa: D102
        self._micro += 1
        # Reduce-scatter only on the last micro-batch; earlier ones accumulate locally.
        assert isinstance(self.module, FSDPModule)
        self.module.set_requires_gradient_sync(self._micro == self.cfg.grad_accum)
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> StepStats:  # noqa: D102
        assert self._micro == self.cfg.grad_accum, "step() before all micro-batches ran"
        self._micro = 0
        norm = torch.nn.utils.clip_grad_norm_(trainable(self.module), self.cfg.clip_norm)
        norm = float(local_tensor(norm))
        step_if_finite(self.optimizer, norm)
        return StepStats(grad_norm=norm)

    def segments(self) -> list[Segment]:  # noqa: D102
        out = []
        for name, p in self._params.items():
            if not p.requires_grad:
                continue
            shape = self._shapes[name]
            lo, hi = chunk_rows(shape[0], self.world_size, self.rank)
            local = local_tensor(p)
            assert local.shape[0] == hi - lo, (name, local.shape, lo, hi)
            width = math.prod(shape[1:])
            out.append(
                Segment(
                    fqn=name, shape=shape, start=lo * width, stop=hi * width, opt_param=p,
                    opt_offset=0, grad=lambda p=p: _local_grad(p),
                )
            )
        return out

    def _lowered(self, name: str) -> bool:
        return self.frozen is not None and name in self.frozen.names

    def _full(self, name: str) -> torch.Tensor:
        """The full value of `name` on every rank: exact fp32 for a lowered parameter."""
        if not self._lowered(name):
            return self._params[name].full_tensor()
        shape = self._shapes[name]
        rows, width = shape[0], math.prod(shape[1:])
        per_rank = -(-rows // self.world_size) * width  # torch.chunk's first chunk
        mine = self.frozen.exact(name, local_tensor(self._params[name])).reshape(-1)
        padded = torch.zeros(per_rank, dtype=torch.float32, device=self.device)
        padded[: mine.numel()].copy_(mine)
        every = all_gather_flat(padded, self.device)
        pieces = []
        for rank in range(self.world_size):
            lo, hi = chunk_rows(rows, self.world_size, rank)
            pieces.append(every[rank * per_rank : rank * per_rank + (hi - lo) * width])
        return torch.cat(pieces).view(shape)

    @contextmanager
    def gathered(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:  # noqa: D102
        with torch.no_grad():
            yield {n: self._full(n) for n in fqns}

    @contextmanager
    def edited(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:  # noqa: D102
        with torch.no_grad():
            full = {n: self._full(n) for n in fqns}
            yield full
            # Every rank made the same edit, so each copies back its own chunk: no
            # collective needed.
            for name, tensor in full.items():
                lo, hi = chunk_rows(tensor.shape[0], self.world_size, self.rank)
                local = local_tensor(self._params[name])
                if self._lowered(name):
                    self.frozen.write(name, local, tensor[lo:hi])
                else:
                    local.copy_(tensor[lo:hi])

    def close(self) -> None:  # noqa: D102
        self.optimizer = None


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _policy(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """bf16 compute over fp32 shards with fp32 gradient reduction; fp32: no casts."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _local_grad(p: torch.Tensor) -> torch.Tensor | None:
    return None if p.grad is None else local_tensor(p.grad).view(-1)
