"""Pieces every engine shares: optimizer and precision settings, small helpers.

Precision: the engine owns it. It is handed the model in fp32 and keeps the
parameters the optimizer steps (the masters, which masks act on) and the AdamW
moments in fp32 whatever `compute_dtype` says; `compute_dtype=bfloat16` makes
forward and backward run in bf16 (FSDP2 `MixedPrecisionPolicy`, FSDP1
`MixedPrecision`, ZeRO-3's bf16 mode, autocast on the single engine). A learning
rate far below bf16's resolution (2^-8 relative) therefore still moves the selected
weights. Frozen parameters need no master: ZeRO-3 holds them in bf16 on the device,
and so do FSDP2 and single (`launcher.engines.frozen`); all three keep their exact
values on the host, so frozen elements stay bit-identical in exports.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from launcher.dist import all_reduce_
from ncft.engine import local_tensor
from ncft.masks.optim import MaskedAdamW

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class OptimConfig:
    """What an engine needs to build its optimizer, step, and compute.

    Attributes:
        lr: AdamW learning rate.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: Decoupled weight decay.
        grad_clip: Max global gradient norm; 0 disables clipping.
        grad_accum: Micro-batches per optimizer step.
        micro_batch_size: Examples per rank per micro-batch.
        compute_dtype: Forward/backward dtype (`model.dtype`); masters and moments
            stay fp32 (module docstring).
        activation_checkpointing: Recompute each decoder layer's activations in
            backward instead of storing them (`training.activation_checkpointing`).
        lower_frozen: Store frozen parameters in `compute_dtype` on the single and
            FSDP2 engines, their exact values on the host (`launcher.engines.frozen`);
            False keeps fp32 copies on the device (the reference the tests compare with).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    grad_accum: int = 1
    micro_batch_size: int = 1
    compute_dtype: torch.dtype = torch.float32
    activation_checkpointing: bool = False
    lower_frozen: bool = True

    @property
    def clip_norm(self) -> float:
        """The max-norm to pass to a clip function (inf = measure only)."""
        return self.grad_clip if self.grad_clip > 0 else math.inf


def step_if_finite(optimizer, norm: float) -> None:
    """Take the optimizer step unless the gradient norm is inf/nan; zero the grads.

    A non-finite norm means inf/nan gradients, and clipping by it makes every
    gradient nan: stepping would write nans into the masters. The step is skipped
    instead, as DeepSpeed's ZeRO optimizer does with an invalid norm (and its loss
    scaler with an fp16 overflow), so the weights after a bad step are the weights
    before it on every engine; the training loop decides whether the run stops or
    goes on (`training.on_nonfinite`). The norm is global, so every rank agrees.
    """
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def check_compute_dtype(cfg: OptimConfig, backend: str) -> None:
    """Refuse a compute dtype the engine cannot train safely.

    Raises:
        ValueError: For float16 outside DeepSpeed (no loss scaler on the others).
    """
    if cfg.compute_dtype in _COMPUTE_DTYPES:
        return
    if backend == "deepspeed" and cfg.compute_dtype == torch.float16:
        return
    raise ValueError(
        f"model.dtype={str(cfg.compute_dtype).removeprefix('torch.')} is not supported on "
        f"engine.backend={backend} (fp16 needs loss scaling, which only deepspeed does); "
        "use bfloat16 or float32"
    )


def prepare_model(model: nn.Module, cfg: OptimConfig) -> nn.Module:
    """Cast the model to fp32 masters and switch activation checkpointing on if asked.

    Call before wrapping: FSDP shards, and ZeRO-3 partitions, what they are given.
    """
    model.float()
    return enable_checkpointing(model, cfg)


def enable_checkpointing(model: nn.Module, cfg: OptimConfig) -> nn.Module:
    """Switch activation checkpointing on when `cfg.activation_checkpointing` asks."""
    if cfg.activation_checkpointing:
        _enable_checkpointing(model)
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing composes with FSDP/ZeRO-3 parameter hooks. transformers
    # checkpoints a layer's `forward` (its module hooks stay outside) and only in train
    # mode, so scoring and evaluation (eval mode) store activations as usual and the
    # attribution hooks see every forward exactly once. transformers 5 renamed
    # `gradient_checkpointing_enable` (kept as a deprecated alias, and by peft wrappers).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"training.activation_checkpointing: {type(model).__name__} is not a transformers "
            "model (no activation_checkpointing_enable); set it to false"
        )


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`'s type, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_on_device(
    batch: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """The micro-batch on the engine's device.

    Data loaders collate on the host; on a GPU a host `input_ids` meeting CUDA
    embeddings fails, so every engine's `forward` places its batch here (a no-op on
    CPU and for tensors already there).
    """
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> MaskedAdamW:
    """The project's optimizer over `params` (every engine uses the same one)."""
    return MaskedAdamW(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with `requires_grad`, in model order."""
    return [p for p in model.parameters() if p.requires_grad]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found by the class names HF lists as unsplittable.

    `_no_split_modules` is how transformers itself marks decoder layers for device
    maps, so this needs no per-architecture table.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} declares no decoder-layer classes (_no_split_modules); "
            "cannot shard it per layer"
        )
    return layers


def named_shapes(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...]]]:
    """FQN and shape of every parameter of an unwrapped model."""
    for name, param in model.named_parameters():
        yield name, tuple(param.shape)


class ShardedBasics:
    """What the sharded engines answer alike: rank 0, full shapes, all-reduce, forward.

    Engines set `rank`, `device`, `module` and `_shapes` (FQN -> full shape, taken
    before wrapping); `_wrapped` is what a micro-batch is called on (the FSDP module;
    ZeRO-3 overrides it with DeepSpeed's engine).
    """

    rank: int
    device: torch.device
    module: nn.Module
    _shapes: dict[str, tuple[int, ...]]

    @property
    def _wrapped(self) -> nn.Module:
        return self.module

    @property
    def is_main_process(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    def forward(self, batch: dict[str, torch.Tensor]):
        """Run the wrapped model on one micro-batch, placed on the engine's device."""
        return self._wrapped(**batch_on_device(batch, self.device))

    def named_parameter_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """FQN and full shape of every parameter, in model order."""
        return iter(self._shapes.items())

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, communicating on the engine's device."""
        return all_reduce_(tensor, self.device)


class LocalState:
    """Mixin: save and restore this rank's training state without communication.

    What the optimizer steps on this rank (its local shards of the trainable
    parameters, or ZeRO-3's fp32 master partitions) and their AdamW moments are
    copied as plain local tensors, keyed by position. That is enough to continue a
    task mid-way: frozen elements are the stage's starting weights, which the caller
    reloads, and the data order is a function of seed and stage. A state only fits an
    engine of the same backend, world size and rank built over the same trainable
    parameters; `load_local_state` checks every shape and refuses anything else.
    """

    optimizer: MaskedAdamW

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        # The tensors the optimizer steps, in a fixed order: its param groups'.
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer tensors and Adam state as CPU tensors.

        Returns:
            `{"<i>.param", "<i>.exp_avg", "<i>.exp_avg_sq", "<i>.step"}` per optimizer
            tensor `i` (the Adam entries only once it has stepped).
        """
        out = {}
        for i, tensor in enumerate(self._optimizer_tensors()):
            out[f"{i}.param"] = _cpu_copy(local_tensor(tensor))
            state = self.optimizer.state.get(tensor)
            if state:
                for key in _ADAM_KEYS:
                    out[f"{i}.{key}"] = _cpu_copy(local_tensor(state[key]))
                out[f"{i}.step"] = state["step"].detach().reshape(1).clone()
        return out

    def load_local_state(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Restore what `local_state` returned on an engine built the same way.

        Raises:
            ValueError: If the number or shapes of optimizer tensors differ.
        """
        tensors = self._optimizer_tensors()
        count = sum(key.endswith(".param") for key in saved)
        if count != len(tensors):
            raise ValueError(
                f"saved optimizer state has {count} tensors, this engine steps {len(tensors)}"
            )
        with torch.no_grad():
            for i, tensor in enumerate(tensors):
                _copy_checked(local_tensor(tensor), saved[f"{i}.param"], f"tensor {i}")
                if f"{i}.step" not in saved:
                    continue
                state = self.optimizer.state[tensor]
                state["step"] = saved[f"{i}.step"].reshape(()).clone()
                for key in _ADAM_KEYS:
                    state[key] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
                    _copy_checked(local_tensor(state[key]), saved[f"{i}.{key}"], f"{key} {i}")


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"saved {what} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)
