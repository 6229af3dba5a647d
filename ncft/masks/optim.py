"""AdamW whose update skips frozen elements of each (possibly sharded) tensor.

Masking the gradient alone does not keep unselected elements fixed: decoupled weight
decay moves every element, and Adam moments carried over from an earlier task (with
a different selection) keep moving elements that are no longer selected. So the
*update* is masked: for frozen elements the step adds exactly zero, which leaves
them bit-identical however many steps run.

Masks are laid out on the rank-local flat storage of each tensor the optimizer
steps (a ZeRO-3 fp32 sub-group partition, an FSDP1 flat shard, an FSDP2 local
shard or a plain parameter); the optimizer never communicates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ncft.engine import local_tensor


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) with optional per-tensor frozen-element masks.

    The arithmetic follows `torch.optim.AdamW` (single-tensor path) except that the
    decay and the Adam step are summed into one update before it is applied, so a
    frozen element receives `p - 0.0 == p`. Frozen elements' moments still decay
    with zero gradient; that never moves them while frozen.

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        lr: Learning rate.
        betas: Adam's (beta1, beta2).
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        # id(tensor) -> (tensor, frozen mask over local_flat(tensor)); keyed by id because
        # ZeRO-3 swaps its flat partitions in and out of param_groups around each step.
        self._frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_frozen(self, masks: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace all masks: `{id(t): (t, frozen_bool_over_local_flat(t))}`."""
        for tensor, frozen in masks.values():
            local = local_tensor(tensor)
            assert frozen.dtype == torch.bool and frozen.numel() == local.numel(), (
                frozen.shape,
                local.shape,
            )
        self._frozen = dict(masks)

    def frozen_mask(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The frozen mask installed for `tensor`, or None."""
        entry = self._frozen.get(id(tensor))
        return entry[1] if entry is not None else None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step contract
        assert closure is None, "MaskedAdamW does not support closures"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return None

    def _update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        param = local_tensor(p)
        grad = local_tensor(p.grad)
        exp_avg, exp_avg_sq = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        update = torch.div(exp_avg, denom, out=denom).mul_(step_size)
        if wd:
            update.add_(param, alpha=lr * wd)
        frozen = self.frozen_mask(p)
        if frozen is not None:
            # masked_fill_, not a multiply: it also clears inf/nan in frozen slots.
            update.masked_fill_(frozen.view(update.shape), 0.0)
        param.sub_(update)
