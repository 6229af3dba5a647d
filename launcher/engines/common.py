"""Pieces every engine shares: the optimizer settings and small helpers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ncft.masks.optim import MaskedAdamW


@dataclass(frozen=True)
class OptimConfig:
    """What an engine needs to build its optimizer and step.

    Attributes:
        lr: AdamW learning rate.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: Decoupled weight decay.
        grad_clip: Max global gradient norm; 0 disables clipping.
        grad_accum: Micro-batches per optimizer step.
        micro_batch_size: Examples per rank per micro-batch.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    grad_accum: int = 1
    micro_batch_size: int = 1

    @property
    def clip_norm(self) -> float:
        """The max-norm to pass to a clip function (inf = measure only)."""
        return self.grad_clip if self.grad_clip > 0 else math.inf


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
