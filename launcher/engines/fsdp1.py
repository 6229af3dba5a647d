"""FSDP1 with flat parameters (`use_orig_params=False`).

Each wrapped unit owns one `FlatParameter`: its parameters flattened and
concatenated, padded, and split evenly across ranks. A rank's shard holds, for each
parameter that reaches into it, the run `[intra_param_start_idx,
intra_param_end_idx]` of that flattened parameter at `offset_in_shard`
(`FlatParameter._shard_param_infos`): one `Segment` each.

FSDP1 refuses a FlatParameter that mixes trainable and frozen parameters, so every
module that owns a trainable parameter becomes its own unit and all its parameters
train; masks then freeze the unselected ones (a down projection's bias, say).

Precision: the trainable flat parameters stay fp32 (masters, and what masks act on);
with `compute_dtype=bfloat16` FSDP's `MixedPrecision` gathers bf16 copies for compute
and reduces gradients in fp32. Frozen units (every unit holds only trainable or only
frozen parameters, see above) are flattened in bf16 (`launcher.engines.frozen`), each
rank keeping the exact values of its shard's pieces on the host; `gathered` and
`edited` patch those exact pieces over what `summon_full_params` returns, so exports
keep every source bit.

With NCCL on several ranks the engine wraps with `sync_module_states`: ranks other
than 0 may pass a meta-device model, materialised empty (`param_init_fn`) and then
given rank 0's parameters and buffers. Gloo refuses that broadcast of CPU module
states, so on CPU every rank passes real weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from launcher.dist import DistInfo, all_gather_flat, broadcast_
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
        # After `_units`: it may make a frozen parameter of a trainable module train.
        self.frozen = frozen_store(model, cfg.compute_dtype, cfg.lower_frozen)
        sync = _from_rank0(model, info)
        # Rank 0's lowered parameters, whose exact values it sends after wrapping.
        kept = {n: p for n, p in model.named_parameters()
                if self.frozen is not None and n in self.frozen.names} if sync else {}
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in units)
        self.module = FSDP(
            model, auto_wrap_policy=policy, use_orig_params=False,
            sharding_strategy=ShardingStrategy.FULL_SHARD, **sync,
            mixed_precision=_policy(cfg.compute_dtype),
            # An explicit device: FSDP1 only infers accelerators and refuses to guess CPU.
            device_id=info.device,
        )
        if self.frozen is not None:
            self._place_frozen(kept if sync else None)
        del kept
        self.optimizer = make_optimizer(trainable(self.module), cfg)
        self._micro = 0

    def _pieces(self) -> Iterator[tuple[str, FSDP, int, int, int]]:
        """`(fqn, unit, start, stop, offset in shard)` of every parameter's local piece."""
        for prefix, unit in self._fsdp_units():
            flat = unit._flat_param
            for fqn, info in zip(flat._fqns, flat._shard_param_infos):
                full = f"{prefix}.{fqn}" if prefix else fqn
                if info.in_shard:
                    yield (full, unit, info.intra_param_start_idx,
                           info.intra_param_end_idx + 1, info.offset_in_shard)
                else:
                    yield full, unit, 0, 0, 0

    @torch.no_grad()
    def _place_frozen(self, from_rank0: dict[str, torch.Tensor] | None) -> None:
        """Trim the exact records to this rank's pieces (rank 0 sends them under sync)."""
        for name, _, start, stop, _ in self._pieces():
            if name not in self.frozen.names:
                continue
            if from_rank0 is None:  # every rank recorded the whole tensor
                self.frozen.keep_range(name, start, stop)
                continue
            shape = self._shapes[name]
            if self.rank == 0:
                buf = self.frozen.exact(name, from_rank0[name]).to(self.device).reshape(-1)
            else:
                buf = torch.empty(math.prod(shape), dtype=torch.float32, device=self.device)
            broadcast_(buf, self.device, src=0)
            self.frozen.record(name, buf[start:stop])

    def _exact_piece(self, name: str) -> torch.Tensor:
        """This rank's exact piece of a lowered parameter, zero-padded to the shard size.

        Call outside `summon_full_params`: inside it the unit's flat parameter is the
        unsharded one, where `offset_in_shard` means nothing.
        """
        unit, start, stop, offset = self._piece_of[name]
        flat = unit._flat_param
        piece = torch.zeros(flat.numel(), dtype=torch.float32, device=self.device)
        piece[: stop - start].copy_(
            self.frozen.exact(name, flat.detach().narrow(0, offset, stop - start)))
        return piece

    def _exact_full(self, name: str, piece: torch.Tensor, summoned: torch.Tensor
                    ) -> torch.Tensor:
        """A lowered parameter's exact fp32 value, from every rank's exact piece.

        The summoned bf16 value with each rank's piece put back over it (all-gathers
        of the pieces and of their bounds).
        """
        _, start, stop, _ = self._piece_of[name]
        every = all_gather_flat(piece, self.device).view(self.world_size, -1)
        bounds = all_gather_flat(torch.tensor([start, stop]), self.device).view(-1, 2)
        out = summoned.detach().float().reshape(-1).clone()
        for row, (lo, hi) in zip(every, bounds.tolist()):
            out[lo:hi] = row[: hi - lo]
        return out.view(summoned.shape)

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

    @property
    def _piece_of(self) -> dict[str, tuple[FSDP, int, int, int]]:
        if not hasattr(self, "_pieces_cache"):
            self._pieces_cache = {n: (u, a, b, o) for n, u, a, b, o in self._pieces()}
        return self._pieces_cache

    def _lowered(self, name: str) -> bool:
        return self.frozen is not None and name in self.frozen.names

    @contextmanager
    def _summoned(self, fqns: Sequence[str], writeback: bool):
        wanted = set(fqns)
        units = [
            unit for prefix, unit in self._fsdp_units()
            if any(_owner(f, prefix, unit) for f in wanted)
        ]
        pieces = {n: self._exact_piece(n) for n in fqns if self._lowered(n)}
        with ExitStack() as stack:
            for unit in units:
                stack.enter_context(
                    FSDP.summon_full_params(unit, recurse=False, writeback=writeback)
                )
            params = {
                name.replace(_WRAPPED, ""): p for name, p in self.module.named_parameters()
            }
            with torch.no_grad():
                full = {n: self._exact_full(n, pieces.pop(n), params[n]) if self._lowered(n)
                        else params[n].data for n in fqns}
                yield full
                for name in fqns:
                    if writeback and self._lowered(name):
                        # Rounded into the summoned bf16 copy (FSDP writes this rank's
                        # shard back from it), the exact piece kept on the host.
                        params[name].data.copy_(full[name])
                        _, start, stop, _ = self._piece_of[name]
                        self.frozen.record(name, full[name].reshape(-1)[start:stop])

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
