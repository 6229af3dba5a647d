"""DeepSpeed ZeRO-3: flat, end-padded partitions of every parameter.

Rank r holds elements `[r * P, (r + 1) * P)` of each flattened parameter padded to
`world * P` (`param.ds_tensor`). The optimizer never sees parameters: DeepSpeed
concatenates each rank's partitions into flat fp32 sub-group tensors
(`fp32_partitioned_groups_flat`, a parameter's place given by `grad_position`) and
calls the client optimizer's `step()` on those. So a `Segment`'s `opt_param` is the
sub-group tensor, and its gradient is the matching entry of `averaged_gradients`,
which is also what DeepSpeed takes the clipping norm of.

Precision: the model arrives in fp32. With `compute_dtype=bfloat16` the filled config
enables DeepSpeed's bf16 mode: it casts the module to bf16 for compute and keeps the
fp32 sub-group partitions as masters (what the optimizer and masks act on), with
fp32 AdamW moments; the masters start as the bf16-rounded weights. `gathered`
returns the fp32 masters of trainable parameters (DeepSpeed's own gather would give
the bf16 compute copies, which drop updates below bf16's resolution), so stage
checkpoints and exports carry every update.

Given `weights` (`launcher.engines.loading`), the model passed in is a meta-device
structure: the engine builds its twin under `deepspeed.zero.Init` and each rank fills
its own partitions from the safetensors files before `deepspeed.initialize` copies
them into the fp32 masters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

if not torch.cuda.is_available():  # must precede the first `import deepspeed`
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

from launcher.dist import DistInfo, all_gather_flat  # noqa: E402
from launcher.engines import ds_config, loading  # noqa: E402
from launcher.engines.common import (  # noqa: E402
    LocalState,
    OptimConfig,
    ShardedBasics,
    check_compute_dtype,
    enable_checkpointing,
    make_optimizer,
    named_shapes,
    prepare_model,
    trainable,
)
from ncft.engine import Segment, StepStats, local_flat  # noqa: E402
from ncft.masks.layout import flat_partition  # noqa: E402


def _fp32_partitions(model: nn.Module, world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's fp32 flat partition of every parameter of an fp32 model, zero-padded.

    (A model loaded from files gets these from `loading.zero3_model` instead.)
    """
    out = {}
    for name, p in model.named_parameters():
        start, stop, per_rank = flat_partition(p.numel(), world_size, rank)
        out[name] = loading.fp32_partition(p.detach().reshape(-1)[start:stop], per_rank)
    return out


def _skip_cpu_shm_op() -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (~70 s, g++) on
    # first init. It only serves `inference_all_reduce`; training collectives go to
    # torch.distributed, so marking it unavailable changes nothing we use.
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class Zero3Engine(ShardedBasics, LocalState):
    """`deepspeed.initialize` with ZeRO stage 3 and the project's MaskedAdamW."""

    def __init__(
        self, model: nn.Module, cfg: OptimConfig, info: DistInfo, config: str = "zero3",
        weights: loading.Weights | None = None,
    ) -> None:
        if info.backend == "gloo":
            _skip_cpu_shm_op()
        check_compute_dtype(cfg, "deepspeed")
        self.name, self.device = "deepspeed", info.device
        self.rank, self.world_size, self.cfg = info.rank, info.world_size, cfg
        self._shapes = dict(named_shapes(model))
        prepare_model(model, cfg)
        ds_cfg = ds_config.fill(ds_config.load(config), cfg, info.world_size, cfg.compute_dtype)
        self._offload = "offload_optimizer" in ds_cfg["zero_optimization"]
        if self._offload and cfg.grad_clip > 0:
            # With optimizer offload DeepSpeed takes each partition's norm inside
            # backward, before any mask can apply: the clip norm would count frozen
            # elements. Refuse rather than clip with the wrong norm.
            raise ValueError(
                "training.grad_clip > 0 is not supported with offload_optimizer; "
                "set grad_clip: 0 or use ds_configs/zero3.json"
            )
        self.load_report = None
        # Under bf16 compute DeepSpeed casts the module before it makes its fp32
        # masters, so they would start bf16-rounded and frozen weights would exist only
        # in bf16: this rank's fp32 partition of every parameter is kept (host memory,
        # 4 bytes per element / world size) to start the masters exact and to gather
        # frozen weights exactly (checkpoints, export). The GPU check found the rounding:
        # every element of a masked bf16 run's export had moved.
        low = cfg.compute_dtype != torch.float32
        self._fp32_parts: dict[str, torch.Tensor] = {}
        if low and weights is None:
            self._fp32_parts = _fp32_partitions(model, self.world_size, self.rank)
        if weights is not None:
            with loading.PeakMemory() as peak:
                model = loading.zero3_model(model, ds_cfg, weights, self.world_size, self.rank,
                                            self._fp32_parts if low else None)
            # The twin is a new module: switch checkpointing on it too (no cast: its
            # partitions already have the config's dtype).
            enable_checkpointing(model, cfg)
            self.load_report = loading.report("deepspeed", self.rank, peak, weights)
        self.optimizer = make_optimizer(trainable(model), cfg)
        self._ds, self._zero, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_cfg, dist_init_required=False
        )
        self.module = self._ds.module
        self._params = dict(self.module.named_parameters())
        self._micro = 0
        self._exact_masters()

    @property
    def _wrapped(self):
        return self._ds  # DeepSpeed's engine runs the forward (its hooks gather)

    def backward(self, loss: torch.Tensor) -> None:  # noqa: D102
        # DeepSpeed divides by gradient_accumulation_steps itself.
        self._ds.backward(loss)
        self._micro += 1
        if self._micro < self.cfg.grad_accum:
            # Not a boundary: DeepSpeed's step only advances its micro-step counter,
            # which it needs to know when the next backward is the boundary.
            self._ds.step()

    def step(self) -> StepStats:  # noqa: D102
        assert self._micro == self.cfg.grad_accum, "step() before all micro-batches ran"
        assert self._ds.is_gradient_accumulation_boundary()
        self._micro = 0
        self._ds.step()
        norm = self._ds.get_global_grad_norm()
        return StepStats(grad_norm=float(norm) if norm is not None else float("nan"))

    def segments(self) -> list[Segment]:  # noqa: D102
        zero = self._zero
        out = []
        for name, p in self._params.items():
            if not p.requires_grad:
                continue
            group, offset, part_numel = zero.grad_position[zero.get_param_id(p)]
            start, stop, per_rank = flat_partition(p.ds_numel, self.world_size, self.rank)
            assert per_rank == part_numel, (name, per_rank, part_numel)
            index = next(i for i, q in enumerate(zero.fp16_groups[group]) if q is p)
            out.append(
                Segment(
                    fqn=name, shape=self._shapes[name], start=start, stop=stop,
                    opt_param=zero.fp32_partitioned_groups_flat[group], opt_offset=offset,
                    grad=lambda g=group, i=index, o=offset, n=stop - start: self._grad(g, i, o, n),
                )
            )
        return out

    @torch.no_grad()
    def _exact_masters(self) -> None:
        """Start the fp32 masters from the fp32 weights (bf16 compute only).

        Trainable partitions then need no copy of their own: the masters are exact.
        """
        if not self._fp32_parts:
            return
        for seg in self.segments():
            part = self._fp32_parts.pop(seg.fqn)
            local_flat(seg.opt_param).narrow(0, seg.opt_offset, seg.numel).copy_(
                part[: seg.numel])

    def _full_fp32(self, name: str) -> torch.Tensor:
        """A frozen parameter's exact fp32 value, gathered from every rank's partition."""
        p = self._params[name]
        full = all_gather_flat(self._fp32_parts[name], self.device)
        return full[: p.ds_numel].view(self._shapes[name])

    def _grad(self, group: int, index: int, offset: int, numel: int) -> torch.Tensor | None:
        zero = self._zero
        if self._offload:
            flat_grad = zero.fp32_partitioned_groups_flat[group].grad
            return None if flat_grad is None else flat_grad.narrow(0, offset, numel)
        grads = zero.averaged_gradients.get(group)
        return None if grads is None else grads[index].narrow(0, 0, numel)

    @contextmanager
    def gathered(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:  # noqa: D102
        low = self.cfg.compute_dtype != torch.float32
        masters = {n: self._full_master(n) if self._params[n].requires_grad
                   else self._full_fp32(n) for n in fqns if low}
        params = [self._params[n] for n in fqns if n not in masters]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield {n: masters[n] if n in masters else self._params[n].data for n in fqns}

    def _full_master(self, name: str) -> torch.Tensor:
        """The full fp32 master of a trainable parameter, gathered from every rank."""
        zero, p = self._zero, self._params[name]
        group, offset, part_numel = zero.grad_position[zero.get_param_id(p)]
        local = zero.fp32_partitioned_groups_flat[group].narrow(0, offset, part_numel)
        full = all_gather_flat(local.detach(), self.device)
        return full[: p.ds_numel].view(self._shapes[name])

    @contextmanager
    def edited(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:  # noqa: D102
        params = [self._params[n] for n in fqns]
        # modifier_rank=0: on exit rank 0's full tensors are broadcast and
        # re-partitioned into ds_tensor (persistent small params included).
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            yield {n: p.data for n, p in zip(fqns, params)}

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        # The client optimizer's param groups are empty between steps: DeepSpeed hands
        # it one fp32 sub-group partition at a time, and its state is keyed by those.
        return list(self._zero.fp32_partitioned_groups_flat)

    def load_local_state(self, saved) -> None:
        """Restore the fp32 masters and moments, then the model's partitions from them.

        DeepSpeed copies masters into the model's (possibly bf16) partitions after each
        step and re-gathers the persistent small parameters; a restore does the same.
        """
        super().load_local_state(saved)
        zero = self._zero
        with torch.no_grad():
            for low, master in zip(zero.fp16_partitioned_groups_flat,
                                   zero.fp32_partitioned_groups_flat):
                if low is not None and low.data_ptr() != master.data_ptr():
                    low.copy_(master)
        if zero.persistent_parameters:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)

    def close(self) -> None:  # noqa: D102
        # Drop DeepSpeed's module hooks and partition bookkeeping while the process
        # group is alive, so no destructor runs after it is destroyed.
        self._ds.destroy()
        self._ds = self._zero = self.optimizer = None
