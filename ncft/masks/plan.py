"""Turn a NeuronSet into rank-local masks and apply them between backward and step.

A `MaskPlan` holds one bool buffer per optimizer tensor this rank steps (True =
frozen), laid out on that tensor's local flat storage, and per-segment views into it
for the gradients. Building it is arithmetic on the segments the engine reports;
applying it touches local memory only, so a masked step issues exactly the
collectives an unmasked one does. Sparse segments (few trainable elements) also get
an index of their trainable elements, so masking their gradient is a gather, a
memset and a scatter instead of a full-size masked write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ncft.engine import Engine, Segment, local_flat
from ncft.masks.layout import segment_mask
from ncft.masks.optim import sparse_trainable_index


class SelectionLike(Protocol):
    """Structural type for one selection: `axis` and sorted `indices`."""

    axis: int
    indices: torch.Tensor


@dataclass
class MaskPlan:
    """Rank-local frozen masks for every segment of every trainable tensor.

    Attributes:
        segments: The segments the masks cover, in engine order.
        grad_frozen: Per segment, a view of the frozen mask over its elements.
        frozen: `{id(opt_tensor): (opt_tensor, frozen mask over its local flat)}`,
            the form `MaskedAdamW.set_frozen` takes. Padding is always frozen.
        grad_index: Per segment, the positions of its trainable elements when the
            segment is sparse enough to mask by index (`sparse_trainable_index`),
            else None. Computed from `grad_frozen` when the plan is created, so the
            masks must not be modified in place afterwards.
    """

    segments: list[Segment]
    grad_frozen: list[torch.Tensor]
    frozen: dict[int, tuple[torch.Tensor, torch.Tensor]]
    grad_index: list[torch.Tensor | None] = field(init=False)

    def __post_init__(self) -> None:
        self.grad_index = [
            sparse_trainable_index(f, local_flat(seg.opt_param).device)
            for seg, f in zip(self.segments, self.grad_frozen)
        ]

    @classmethod
    def build(
        cls, selections: Mapping[str, SelectionLike], segments: Iterable[Segment]
    ) -> MaskPlan:
        """Lay `selections` (fqn -> axis/indices, full storage coords) on `segments`.

        Args:
            selections: Selected rows/columns per parameter FQN (a NeuronSet's entries).
            segments: What this rank owns, from `Engine.segments()`.

        Returns:
            The plan. Parameters in `segments` but not in `selections` are fully frozen.

        Raises:
            ValueError: If a selected parameter is not trainable in this engine (it
                was frozen when the engine was built, so no optimizer state exists).
        """
        segments = list(segments)
        frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        grad_frozen = []
        for seg in segments:
            key = id(seg.opt_param)
            if key not in frozen:
                flat = local_flat(seg.opt_param)
                # On the tensor's device: the step and apply_to_grads select with it there.
                ones = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
                frozen[key] = (seg.opt_param, ones)
            view = frozen[key][1][seg.opt_offset : seg.opt_offset + seg.numel]
            sel = selections.get(seg.fqn)
            if sel is not None:
                chosen = segment_mask(
                    seg.shape, seg.start, seg.stop, sel.axis, sel.indices, seg.fqn
                )
                view.copy_(~chosen)
            grad_frozen.append(view)
        owned = {seg.fqn for seg in segments}
        _check_trainable(selections, owned, segments)
        return cls(segments=segments, grad_frozen=grad_frozen, frozen=frozen)

    def apply_to_grads(self) -> None:
        """Zero the gradient of every frozen element, in place, on this rank only.

        Call after the last backward of an optimizer step and before clipping, so
        the clipped norm is the norm of the masked gradient.
        """
        for seg, frozen, index in zip(self.segments, self.grad_frozen, self.grad_index):
            grad = seg.grad()
            if grad is None:
                continue
            if index is not None:
                # Keep the few trainable values, clear the whole segment with a memset
                # (also clearing inf/nan in frozen slots), and put them back.
                kept = grad.index_select(0, index)
                grad.zero_()
                grad.index_copy_(0, index, kept)
            else:
                # A select, not a multiply, so inf/nan in frozen slots become 0.
                torch.where(frozen, grad.new_zeros(()), grad, out=grad)

    def num_trainable_local(self) -> int:
        """Selected elements held on this rank (padding excluded)."""
        return sum(int((~f).sum()) for f in self.grad_frozen)


def _check_trainable(
    selections: Mapping[str, SelectionLike], owned: set[str], segments: list[Segment]
) -> None:
    # A rank may own no piece of a small parameter, so only the names matter: every
    # selected FQN must be trainable somewhere. Engines report all trainable FQNs on
    # every rank (zero-length segments included) to make this check local.
    missing = sorted(set(selections) - owned)
    if missing:
        raise ValueError(
            f"selection names parameters the engine does not train: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Build the engine after "
            "freeze_unselected() with a NeuronSet that covers every task's parameters."
        )


def install(engine: Engine, selections: Mapping[str, SelectionLike]) -> MaskPlan:
    """Build a plan for `engine` and register its update masks with the optimizer."""
    plan = MaskPlan.build(selections, engine.segments())
    engine.optimizer.set_frozen(plan.frozen)
    return plan


def freeze_unselected(model: torch.nn.Module, fqns: Iterable[str]) -> list[str]:
    """Set `requires_grad=False` on every parameter not named in `fqns`.

    Whole matrices with no selected element must be frozen before an engine is
    built, so it allocates no gradient or optimizer state for them.

    Returns:
        The names left trainable, in model order.

    Raises:
        ValueError: If `fqns` names a parameter the model does not have.
    """
    wanted = set(fqns)
    names = dict(model.named_parameters())
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"selection names parameters the model lacks: {unknown[:5]}")
    for name, param in names.items():
        param.requires_grad_(name in wanted)
    return [n for n in names if n in wanted]
