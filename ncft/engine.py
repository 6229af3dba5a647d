"""The narrow engine interface that the neuron science talks to.

`launcher/` implements it for a single process, DeepSpeed ZeRO-3, FSDP2 and FSDP1.
Nothing in `ncft/` imports an engine library: it sees only `Segment`s (which
elements of which full parameter this rank owns, and where) and the methods below.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class Segment:
    """A contiguous run of one full parameter's flattened elements owned by this rank.

    Elements `[start, stop)` of `flatten(full_param)` (in the parameter's storage
    layout) live on this rank at `local_flat(opt_param)[opt_offset : opt_offset +
    stop - start]`, where `opt_param` is the tensor the optimizer steps (a ZeRO-3
    fp32 sub-group partition, an FSDP1 flat-parameter shard, an FSDP2 DTensor, or
    the plain parameter), always the fp32 master even when compute runs in bf16.
    `grad()` returns the matching 1-D gradient view, which masking writes to in place.

    Attributes:
        fqn: Fully qualified parameter name in the unwrapped model.
        shape: Full (unsharded) shape of the parameter, as stored.
        start: First flattened element index held here.
        stop: One past the last flattened element index held here.
        opt_param: The optimizer-held tensor that contains this segment.
        opt_offset: Offset of element `start` inside `local_flat(opt_param)`.
        grad: Returns the writable 1-D local gradient of length `stop - start`, or
            None when no gradient exists yet.
    """

    fqn: str
    shape: tuple[int, ...]
    start: int
    stop: int
    opt_param: torch.Tensor
    opt_offset: int
    grad: Callable[[], torch.Tensor | None]

    @property
    def numel(self) -> int:
        """Number of elements of the parameter held in this segment."""
        return self.stop - self.start


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of a tensor (a DTensor's local shard, else itself).

    Duck-typed so that `ncft` needs no import of the sharding libraries: an FSDP2
    parameter is a DTensor, whose `to_local()` aliases the local shard.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def local_flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the rank-local storage of `t` (see `local_tensor`)."""
    local = local_tensor(t)
    assert local.is_contiguous(), "optimizer tensors must be contiguous to be masked flat"
    return local.view(-1)


def local_view(seg: Segment) -> torch.Tensor:
    """The segment's elements in the optimizer-held local storage (a writable view)."""
    return local_flat(seg.opt_param).narrow(0, seg.opt_offset, seg.numel)


def share(num: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of `num` items; shares differ by at most one."""
    return range(rank * num // world_size, (rank + 1) * num // world_size)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a HF model output (or the tensor itself)."""
    return output.logits if hasattr(output, "logits") else output


def device_of(engine: Engine) -> torch.device:
    """The device the engine computes on: `engine.device`.

    Engines without the attribute (test doubles) fall back to the device of their
    first materialised parameter.
    """
    device = getattr(engine, "device", None)
    if device is not None:
        return torch.device(device)
    for p in engine.module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Switch dropout off and restore the previous train/eval mode afterwards."""
    was_training = module.training
    module.train(False)
    try:
        yield
    finally:
        module.train(was_training)


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports.

    Attributes:
        grad_norm: Global L2 norm of the (masked) gradient before clipping.
    """

    grad_norm: float


class Engine(Protocol):
    """What the neuron science needs from a distributed training engine.

    Attributes:
        name: The backend name it was built for (`single`, `deepspeed`, `fsdp2`, ...).
        device: The device it computes on. Inputs go there, and `all_reduce_` moves
            any tensor there for the collective (NCCL takes device tensors only).
        rank: Global rank.
        world_size: Number of data-parallel ranks.
        module: The (wrapped) model.
        optimizer: The optimizer stepping the fp32 masters.
    """

    name: str
    device: torch.device
    rank: int
    world_size: int
    module: nn.Module
    optimizer: Any

    @property
    def is_main_process(self) -> bool:
        """True on global rank 0."""

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Run the wrapped model on one micro-batch and return its output."""

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch loss, averaged over the accumulation steps."""

    def step(self) -> StepStats:
        """Clip the accumulated gradient and take one optimizer step; zero the grads."""

    def segments(self) -> list[Segment]:
        """The trainable elements this rank owns, one `Segment` per parameter piece."""

    def gathered(self, fqns: Sequence[str]) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """Context manager giving full tensors of `fqns` on every rank (read-only).

        Callers gather a few parameters at a time so peak extra memory stays at about
        one layer.
        """

    def edited(self, fqns: Sequence[str]) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """Context manager giving full tensors of `fqns` to edit in place.

        On exit every rank's shards hold the edited values (every rank must make the
        same edit). For evaluation-time edits (deactivation, W-NCFT merges): optimizer
        master copies are not updated, so restore the values before training on.
        """

    def named_parameter_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """FQN and full shape of every parameter, in model order."""

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over data-parallel ranks and return it.

        `tensor` may live on any device: the engine communicates on its own `device`
        and copies the result back.
        """

    def close(self) -> None:
        """Release engine resources; the process group stays up."""


# Wrapper prefixes that engines and tools insert into module names.
_WRAPPERS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def unwrapped_name(name: str) -> str:
    """`name` with FSDP1/checkpoint/compile wrapper segments removed."""
    return _WRAPPERS.sub("", name).lstrip(".")


def find_module(root: nn.Module, fqn: str) -> nn.Module:
    """The module called `fqn` in the unwrapped model, found inside a wrapped `root`.

    FSDP1 renames `a.b` to `a._fsdp_wrapped_module.b` and keeps both the wrapper and
    the original module; the innermost match (the module that really runs) is
    returned, so hooks see exactly the original forward.
    """
    found = None
    for name, module in root.named_modules():
        if unwrapped_name(name) == fqn:
            found = module
    if found is None:
        raise ValueError(f"module {fqn!r} not found in {type(root).__name__}")
    return found


def engine_module(engine_or_model: Engine | nn.Module) -> nn.Module:
    """The (possibly wrapped) root module of an engine, or the model itself."""
    return engine_or_model if isinstance(engine_or_model, nn.Module) else engine_or_model.module
