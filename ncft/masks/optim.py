"""AdamW whose update skips frozen elements of each (possibly sharded) tensor.

Masking the gradient alone does not keep unselected elements fixed: decoupled weight
decay moves every element, and Adam moments carried over from an earlier task (with
a different selection) keep moving elements that are no longer selected. So the
*update* is masked: for frozen elements the step adds exactly zero, which leaves
them bit-identical however many steps run.

Masks are laid out on the rank-local flat storage of each tensor the optimizer
steps (a ZeRO-3 fp32 sub-group partition, an FSDP1 flat shard, an FSDP2 local
shard or a plain parameter); the optimizer never communicates.

A mask is either structured (`ncft.masks.structured.TensorMask`, what `RankMasks`
installs: per segment, the selected rows or columns) or a dense bool per element.
Structured masks compute the update only on the trainable rows/columns, gathered
with `index_select` from `[rows, width]` views one block at a time and written back
with `index_copy_`; frozen elements are never written. Dense masks of large, sparse
tensors use a flat index of the trainable elements the same way
(`sparse_trainable_index`); other dense masks select the full-size update. All
paths give trainable elements bit-identical values (the arithmetic is elementwise).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ncft.engine import local_tensor
from ncft.masks.structured import ALL, TensorMask

# A mask takes the index path when at most this fraction of its elements is trainable
# and it has at least SPARSE_MIN_NUMEL elements. On CPU at 5% trainable (100M model,
# benchmarks/RESULTS.md "Mask overhead") it made the masked optimizer step 3-6x and
# apply_to_grads about 2x cheaper than full-size masked writes; on tiny tensors its
# extra small ops cost more than they save. 25% is a conservative cut-off, not a
# measured crossover.
SPARSE_MAX_FRACTION = 0.25
SPARSE_MIN_NUMEL = 1 << 16


def sparse_trainable_index(
    frozen: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """Flat int64 positions of the trainable elements, if the mask is worth indexing.

    Args:
        frozen: Bool mask, True = frozen, over a tensor's flat local storage.
        device: Where the index will be used (the tensor's device); defaults to the
            mask's device.

    Returns:
        The sorted 1-D int64 positions of the False entries of `frozen`, or None when
        the mask has fewer than `SPARSE_MIN_NUMEL` elements or more than
        `SPARSE_MAX_FRACTION` of them are trainable (then masking densely is cheaper).
    """
    numel = frozen.numel()
    if numel < SPARSE_MIN_NUMEL:
        return None
    trainable = numel - int(torch.count_nonzero(frozen))
    if trainable > SPARSE_MAX_FRACTION * numel:
        return None
    index = torch.nonzero(~frozen.reshape(-1)).view(-1)
    return index.to(device) if device is not None else index


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
        self._frozen: dict[int, tuple[torch.Tensor, torch.Tensor | TensorMask]] = {}
        # id(tensor) -> flat positions of its trainable elements, for sparse masks only.
        self._trainable_index: dict[int, torch.Tensor] = {}

    def set_frozen(
        self, masks: Mapping[int, tuple[torch.Tensor, torch.Tensor | TensorMask]]
    ) -> None:
        """Replace all masks.

        For dense masks, also precomputes once per mask the index of trainable
        elements that the update uses when the mask is sparse (see
        `sparse_trainable_index`). Masks must not be modified in place afterwards;
        call `set_frozen` again with the new masks.

        Args:
            masks: `{id(t): (t, mask)}` where `mask` is a `TensorMask`
                (`RankMasks.tensor_masks`) or a bool over `local_flat(t)`, True =
                frozen; an empty mapping removes all masks.
        """
        indices = {}
        for key, (tensor, frozen) in masks.items():
            local = local_tensor(tensor)
            if isinstance(frozen, TensorMask):
                assert frozen.numel == local.numel(), (frozen.numel, local.shape)
                continue
            assert frozen.dtype == torch.bool and frozen.numel() == local.numel(), (
                frozen.shape,
                local.shape,
            )
            index = sparse_trainable_index(frozen, local.device)
            if index is not None:
                indices[key] = index
        self._frozen = dict(masks)
        self._trainable_index = indices

    def frozen_mask(self, tensor: torch.Tensor) -> torch.Tensor | TensorMask | None:
        """The mask installed for `tensor` (dense bool or `TensorMask`), or None."""
        entry = self._frozen.get(id(tensor))
        return entry[1] if entry is not None else None

    # Update the moments of every tensor of a group with one `torch._foreach_*` call
    # per operation instead of three per tensor: on a GPU, three kernel launches per
    # step instead of 3 x tensors (FSDP2 steps one tensor per trainable parameter).
    # The elementwise results are the same. False: the per-tensor loop (the
    # benchmark's "before", benchmarks/mask_overhead.py --compare-foreach).
    foreach_moments = True

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step contract
        assert closure is None, "MaskedAdamW does not support closures"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if self.foreach_moments:
                self._moments(params, group)
            for p in params:
                self._update(p, group, moments=not self.foreach_moments)
        return None

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _moments(self, params: list[torch.Tensor], group: dict) -> None:
        """Every tensor's moments at once, grouped by device and dtype (foreach needs it)."""
        beta1, beta2 = group["betas"]
        by_kind: dict[tuple, tuple[list, list, list]] = {}
        for p in params:
            state = self._state(p)
            grad = local_tensor(p.grad)
            lists = by_kind.setdefault((grad.device, grad.dtype), ([], [], []))
            lists[0].append(local_tensor(state["exp_avg"]))
            lists[1].append(local_tensor(state["exp_avg_sq"]))
            lists[2].append(grad)
        for exp_avgs, exp_avg_sqs, grads in by_kind.values():
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    def _update(self, p: torch.Tensor, group: dict, moments: bool = True) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state = self._state(p)
        state["step"] += 1
        step = float(state["step"])  # a CPU scalar: no device sync
        param = local_tensor(p)
        grad = local_tensor(p.grad)
        exp_avg, exp_avg_sq = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])

        # Moments move on every element, frozen ones included (with whatever gradient
        # they have): the state stays full-size, in the format checkpoints read.
        if moments:
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)

        hyper = (lr, wd, step_size, bias_correction2_sqrt, eps)
        frozen = self.frozen_mask(p)
        if isinstance(frozen, TensorMask):
            _structured_update(param.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1), frozen, hyper)
            return
        index = self._trainable_index.get(id(p))
        if index is not None:
            # Sparse mask: the same elementwise arithmetic on the trainable elements
            # only, written back by index; frozen elements are never written.
            flat = param.view(-1)
            values = flat.index_select(0, index)
            m = exp_avg.view(-1).index_select(0, index)
            v = exp_avg_sq.view(-1).index_select(0, index)
            update = _adam_update(m, v, values, lr, wd, step_size, bias_correction2_sqrt, eps)
            flat.index_copy_(0, index, values.sub_(update))
            return
        update = _adam_update(
            exp_avg, exp_avg_sq, param, lr, wd, step_size, bias_correction2_sqrt, eps
        )
        if frozen is not None:
            # A select, not a multiply: inf/nan in frozen slots must not reach the
            # parameter. torch.where(out=) is a cheaper CPU kernel than masked_fill_.
            torch.where(frozen.view(update.shape), update.new_zeros(()), update, out=update)
        param.sub_(update)


def _structured_update(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: TensorMask,
    hyper: tuple[float, float, float, float, float],
) -> None:
    """Apply the update to the trainable elements of flat `param` only.

    One block at a time, so the temporaries (gathered values, moments and update)
    hold at most one block's trainable elements; elements no block lists are never
    written.
    """
    for offset, seg in mask.pieces:
        if seg.frozen is not None:  # small segment with a dense bool
            p = param[offset : offset + seg.numel]
            m, v = exp_avg[offset : offset + seg.numel], exp_avg_sq[offset : offset + seg.numel]
            update = _adam_update(m, v, p, *hyper)
            # A select, not a multiply: inf/nan in frozen slots must not reach p.
            torch.where(seg.frozen, update.new_zeros(()), update, out=update)
            p.sub_(update)
            continue
        for block in seg.blocks:
            p = block.view(param, offset)
            m, v = block.view(exp_avg, offset), block.view(exp_avg_sq, offset)
            if block.dim == ALL:
                p.sub_(_adam_update(m, v, p, *hyper))
                continue
            pos = block.positions()
            values = p.index_select(block.dim, pos)
            m, v = m.index_select(block.dim, pos), v.index_select(block.dim, pos)
            update = _adam_update(m, v, values, *hyper)
            p.index_copy_(block.dim, pos, values.sub_(update))


def _adam_update(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    param: torch.Tensor,
    lr: float,
    wd: float,
    step_size: float,
    bias_correction2_sqrt: float,
    eps: float,
) -> torch.Tensor:
    # The AdamW step plus decoupled decay, as one new tensor to subtract from `param`.
    # Purely elementwise, so it gives the same bits on a gathered subset of elements
    # as on the full tensor. `exp_avg` and `exp_avg_sq` are only read.
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    update = torch.div(exp_avg, denom, out=denom).mul_(step_size)
    if wd:
        update.add_(param, alpha=lr * wd)
    return update
