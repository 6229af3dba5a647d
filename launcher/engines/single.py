"""Plain PyTorch in one process: the reference every sharded engine must match.

Precision: trainable parameters stay fp32 (they are the masters the optimizer and the
masks act on) and `forward` runs under autocast to `compute_dtype`. Frozen weights of
matrix products (Linear, Conv1D) are stored in `compute_dtype`
(`launcher.engines.frozen`; exact values on the host): autocast would cast them to it
anyway, so results are unchanged and it casts only the trainable ones. Frozen
embeddings, norms and biases stay fp32. Autocast runs matmuls in bf16 and
keeps reductions such as softmax and norms in fp32, so a bf16 single run is close to,
not bit-equal with, the FSDP engines' bf16 parameter casts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from launcher.dist import DistInfo
from launcher.engines import loading
from launcher.engines.common import (
    LocalState,
    OptimConfig,
    autocast,
    batch_on_device,
    check_compute_dtype,
    make_optimizer,
    named_shapes,
    prepare_model,
    step_if_finite,
    trainable,
)
from launcher.engines.frozen import frozen_store, matmul_weights
from ncft.engine import Segment, StepStats


class SingleEngine(LocalState):
    """One process, unsharded parameters; a `Segment` is a whole parameter."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, info: DistInfo,
                 weights: loading.Weights | None = None) -> None:
        if info.world_size != 1:
            raise ValueError(
                f"engine.backend=single runs one process, but WORLD_SIZE={info.world_size}; "
                "use deepspeed, fsdp2 or fsdp1 for several ranks"
            )
        check_compute_dtype(cfg, "single")
        self.name, self.device = "single", info.device
        self.rank, self.world_size, self.cfg = 0, 1, cfg
        prepare_model(model, cfg)
        # Only what autocast casts anyway: a bf16 run computes exactly as with fp32 copies.
        self.frozen = frozen_store(model, cfg.compute_dtype, cfg.lower_frozen,
                                   only=matmul_weights(model))
        self.load_report = None
        if weights is not None:  # a meta-device model: straight from the files to the device
            keys = loading.param_keys(model, weights.keys())
            with loading.PeakMemory() as peak:
                model.to_empty(device=info.device)
                if hasattr(model, "tie_weights"):  # `to_empty` unties shared parameters
                    model.tie_weights()
                loading.fill_rows(model, weights, keys, 1, 0, self.frozen)
            self.load_report = loading.report("single", 0, peak, weights)
        self.module = model.to(info.device)
        self._params = dict(self.module.named_parameters())
        self.optimizer = make_optimizer(trainable(self.module), cfg)

    @property
    def is_main_process(self) -> bool:  # noqa: D102
        return True

    def forward(self, batch: dict[str, torch.Tensor]):  # noqa: D102
        with autocast(self.device, self.cfg.compute_dtype):
            return self.module(**batch_on_device(batch, self.device))

    def backward(self, loss: torch.Tensor) -> None:  # noqa: D102
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> StepStats:  # noqa: D102
        norm = float(torch.nn.utils.clip_grad_norm_(trainable(self.module), self.cfg.clip_norm))
        step_if_finite(self.optimizer, norm)
        return StepStats(grad_norm=norm)

    def segments(self) -> list[Segment]:  # noqa: D102
        return [
            Segment(
                fqn=name, shape=tuple(p.shape), start=0, stop=p.numel(), opt_param=p,
                opt_offset=0, grad=lambda p=p: None if p.grad is None else p.grad.view(-1),
            )
            for name, p in self._params.items()
            if p.requires_grad
        ]

    def _lowered(self, name: str) -> bool:
        return self.frozen is not None and name in self.frozen.names

    def _exact(self, name: str) -> torch.Tensor:
        p = self._params[name]
        return self.frozen.exact(name, p.detach()) if self._lowered(name) else p.detach()

    @contextmanager
    def gathered(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:  # noqa: D102
        yield {n: self._exact(n) for n in fqns}

    @contextmanager
    def edited(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:  # noqa: D102
        with torch.no_grad():
            # A lowered parameter is edited in fp32 and stored back rounded + exact rest.
            full = {n: self._exact(n).clone() if self._lowered(n) else self._params[n].data
                    for n in fqns}
            yield full
            for name in fqns:
                if self._lowered(name):
                    self.frozen.write(name, self._params[name].data, full[name])

    def named_parameter_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:  # noqa: D102
        return named_shapes(self.module)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return tensor

    def close(self) -> None:  # noqa: D102
        self.optimizer = None
