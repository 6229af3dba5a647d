"""Turn a NeuronSet into rank-local masks and apply them between backward and step.

A `RankMasks` holds, per segment this rank owns, a `SegmentMask`
(`ncft.masks.structured`): the positions of the selected rows or columns the segment
touches, or a dense bool for small segments. Building it is arithmetic on the
segments the engine reports; applying it touches local memory only, so a masked step
issues exactly the collectives an unmasked one does. The same masks, grouped by
optimizer tensor (`tensor_masks`), are what `MaskedAdamW.set_frozen` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ncft.engine import Engine, Segment, local_flat
from ncft.masks.structured import MaskBuilder, SegmentMask, TensorMask


class SelectionLike(Protocol):
    """Structural type for one selection: `axis` and sorted `indices`."""

    axis: int
    indices: torch.Tensor


@dataclass
class RankMasks:
    """Rank-local frozen masks for every segment of every trainable tensor.

    Attributes:
        segments: The segments the masks cover, in engine order.
        masks: Per segment, which of its elements are trainable.
        tensor_masks: `{id(opt_tensor): (opt_tensor, TensorMask)}`, the same masks
            laid on each optimizer tensor (what `MaskedAdamW.set_frozen` takes).
            Elements no segment covers (padding) are frozen.
        owned: Every tensor the masks hold, one storage each (the rank's mask
            bookkeeping; see `nbytes`).
    """

    segments: list[Segment]
    masks: list[SegmentMask]
    tensor_masks: dict[int, tuple[torch.Tensor, TensorMask]]
    owned: list[torch.Tensor]

    @classmethod
    def build(
        cls, selections: Mapping[str, SelectionLike], segments: Iterable[Segment]
    ) -> RankMasks:
        """Lay `selections` (fqn -> axis/indices, full storage coords) on `segments`.

        Args:
            selections: Selected rows/columns per parameter FQN (a NeuronSet's entries).
            segments: What this rank owns, from `Engine.segments()`.

        Returns:
            The masks. Parameters in `segments` but not in `selections` are fully frozen.

        Raises:
            ValueError: If a selected parameter is not trainable in this engine (it
                was frozen when the engine was built, so no optimizer state exists),
                or a selection's axis or indices do not fit its parameter.
        """
        segments = list(segments)
        owned = {seg.fqn for seg in segments}
        _check_trainable(selections, owned, segments)
        by_tensor: dict[int, tuple[torch.Tensor, TensorMask]] = {}
        builders: dict[torch.device, MaskBuilder] = {}
        masks = []
        for seg in segments:
            flat = local_flat(seg.opt_param)
            # On the tensor's device: the step and apply_to_grads index with it there.
            builder = builders.setdefault(flat.device, MaskBuilder(flat.device))
            sel = selections.get(seg.fqn)
            if sel is None:
                mask = SegmentMask(seg.numel)  # no blocks: all frozen
            else:
                mask = builder.segment(
                    seg.fqn, seg.shape, seg.start, seg.stop, sel.axis, sel.indices
                )
            masks.append(mask)
            entry = by_tensor.setdefault(
                id(seg.opt_param), (seg.opt_param, TensorMask(flat.numel()))
            )
            entry[1].pieces.append((seg.opt_offset, mask))
        tensors = [t for b in builders.values() for t in b.owned]
        return cls(segments=segments, masks=masks, tensor_masks=by_tensor, owned=tensors)

    def apply_to_grads(self) -> None:
        """Zero the gradient of every frozen element, in place, on this rank only.

        Call after the last backward of an optimizer step and before clipping, so
        the clipped norm is the norm of the masked gradient. Temporary memory: the
        trainable gradient values of one segment at a time.
        """
        for seg, mask in zip(self.segments, self.masks):
            grad = seg.grad()
            if grad is not None:
                mask.mask_grad(grad)

    def num_trainable_local(self) -> int:
        """Selected elements held on this rank (padding excluded)."""
        return sum(m.num_trainable() for m in self.masks)

    def nbytes(self) -> int:
        """Bytes the masks hold on this rank (indices and dense bools)."""
        return sum(t.numel() * t.element_size() for t in self.owned)

    # --- dense views, built on demand (for tests and inspection; never stored) ------

    @property
    def frozen(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """`{id(opt_tensor): (opt_tensor, one bool per local element, True = frozen)}`.

        Materialised on each access (a bool per element); `MaskedAdamW.set_frozen`
        also accepts this dense form.
        """
        return {
            key: (t, mask.dense_frozen(local_flat(t).device))
            for key, (t, mask) in self.tensor_masks.items()
        }

    @property
    def grad_frozen(self) -> list[torch.Tensor]:
        """Per segment, one bool per element, True = frozen (built on access)."""
        return [
            m.dense_frozen(local_flat(s.opt_param).device)
            for s, m in zip(self.segments, self.masks)
        ]

    @property
    def grad_index(self) -> list[torch.Tensor | None]:
        """Per segment, flat positions of its trainable elements, or None.

        None where the segment keeps a dense bool, positions where it is masked
        structurally (by row/column index). Built on access, for inspection;
        applying the masks never builds it.
        """
        out = []
        for seg, m in zip(self.segments, self.masks):
            if m.frozen is not None:
                out.append(None)
                continue
            device = local_flat(seg.opt_param).device
            out.append(torch.nonzero(~m.dense_frozen(device)).view(-1))
        return out


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


def install(engine: Engine, selections: Mapping[str, SelectionLike]) -> RankMasks:
    """Build the masks of `engine` and register its update masks with the optimizer."""
    masks = RankMasks.build(selections, engine.segments())
    engine.optimizer.set_frozen(masks.tensor_masks)
    return masks


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
