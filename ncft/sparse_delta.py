"""Sparse-delta training: the selected rows/columns become small dense parameters.

`training.update: sparse_delta`. Masked training (`ncft.masks`) keeps a full
gradient and full AdamW moments for every matrix that holds a selected element.
Here every projection named by a NeuronSet gets a child module `ncft_delta` whose
parameters hold only the selected part (copied from the base at the start of a
stage); the whole model is then frozen except those children, so any engine (single,
ZeRO-3, FSDP2, FSDP1) allocates gradients and optimizer state for the selected
elements only, and shards them like any other parameter.

The projection's forward computes the base product and then uses the delta for the
selected part, with the same gradients as masked training:

* output features `R` (gate/up rows, NeFT rows, a `Conv1D`'s output columns): the
  base output's channels `R` are *replaced* by `x @ D^T`; so `dL/dD = dL/dy[R]^T x`,
  the masked gradient of those rows.
* input features `C` (down/fc_out units): the base product runs on `x` with `x[C]`
  zeroed, plus `x[C] @ D^T`; so `dL/dD = dL/dy^T x[C]`, the masked gradient of those
  columns, and `y` is the current full matrix's product.
* selected bias elements replace those of the base bias.

The base values of the selected elements are never read by the forward, so writing
the trained values back (`write_back`, through the engine's `gathered`/`edited`,
one projection at a time) is harmless at any time. After it the projections run
their original forward on the full, current matrices: evaluation, W-NCFT mixing,
snapshots and exports then see exactly what masked training would have produced.
Delta parameters are never part of a saved model (`is_delta_fqn`).

Why a child module and not extra parameters on the projection: FSDP1 trains a
wrapped unit's parameters all or nothing, so the small parameters must live in a
module of their own (it becomes its own unit, and is *called*, so FSDP1 and ZeRO-3
gather it by their usual module hooks).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ncft.engine import Engine

DELTA_ATTR = "ncft_delta"
UPDATE_MODES = ("masked", "sparse_delta")


def is_delta_fqn(fqn: str) -> bool:
    """True for the parameters `install` adds (they never go into a saved model)."""
    return f".{DELTA_ATTR}." in f".{fqn}"


class SparseDelta(nn.Module):
    """The trainable part of one projection: selected weight rows/columns and bias.

    Tensors are stored in the base's STORAGE orientation (`D = W.index_select(axis,
    idx)`), so writing back is one `index_copy_` along the same axis.

    Attributes:
        weight: Selected weight slice, or None.
        bias: Selected bias elements, or None.
        axis: Storage axis of the weight selection.
        out_side: True when the selection indexes output features.
        transposed: True for GPT-2's `Conv1D` (stores `[in, out]`).
        active: False once the values were written back (then it is never called).
    """

    def __init__(
        self,
        weight: torch.Tensor | None,
        axis: int,
        weight_idx: torch.Tensor | None,
        bias: torch.Tensor | None,
        bias_idx: torch.Tensor | None,
        transposed: bool,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight) if weight is not None else None
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.axis, self.transposed = axis, transposed
        self.out_side = (axis == 0) != transposed
        # Plain attributes, not buffers: the indices come from the NeuronSet on every
        # rank, so they must survive meta-device construction and `to_empty`.
        self.weight_idx, self.bias_idx = weight_idx, bias_idx
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.active = True

    def index(self, which: str, device: torch.device) -> torch.Tensor:
        """The weight/bias indices on `device` (cached)."""
        key = (which, device)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, f"{which}_idx").to(device)
        return self._on_device[key]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) if self.transposed else F.linear(x, self.weight)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, base_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Combine the base product `y` (no bias) with the selected part; add the bias."""
        if self.weight is not None:
            idx = self.index("weight", x.device)
            if self.out_side:
                y = y.index_copy(-1, idx, self._product(x).to(y.dtype))
            else:
                y = y + self._product(x.index_select(-1, idx)).to(y.dtype)
        if base_bias is not None:
            if self.bias is not None:
                base_bias = base_bias.index_copy(
                    0, self.index("bias", base_bias.device), self.bias.to(base_bias.dtype)
                )
            y = y + base_bias
        return y


def _delta_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Bound to a projection by `install`; `type(self).forward` is its own forward.
    delta = getattr(self, DELTA_ATTR)
    if not delta.active:
        return type(self).forward(self, x)
    base_in = x
    if delta.weight is not None and not delta.out_side:
        # Selected input features are fed through the delta only.
        base_in = x.index_fill(-1, delta.index("weight", x.device), 0)
    transposed = isinstance(self, Conv1D)
    y = torch.matmul(base_in, self.weight) if transposed else F.linear(base_in, self.weight)
    return delta(x, y, self.bias)


@dataclass(frozen=True)
class DeltaEntry:
    """One installed projection: where its delta lives and what it overwrites.

    Attributes:
        module_fqn: The projection's module name.
        axis: Storage axis of the weight selection (None: bias only).
        weight_idx: Selected weight rows/columns (CPU int64), or None.
        bias_idx: Selected bias elements (CPU int64), or None.
        delta: The installed module (engines wrap or re-class it in place, so this
            reference stays valid).
    """

    module_fqn: str
    axis: int | None
    weight_idx: torch.Tensor | None
    bias_idx: torch.Tensor | None
    delta: SparseDelta

    @property
    def pairs(self) -> list[tuple[str, str, int, torch.Tensor]]:
        """`(delta fqn, base fqn, axis, indices)` for the weight and the bias."""
        out = []
        for name, axis, idx in (("weight", self.axis, self.weight_idx),
                                ("bias", 0, self.bias_idx)):
            if idx is not None:
                out.append((f"{self.module_fqn}.{DELTA_ATTR}.{name}",
                            f"{self.module_fqn}.{name}", axis, idx))
        return out


def _group_by_module(
    model: nn.Module, selections: Mapping[str, object]
) -> dict[str, dict[str, object]]:
    params = dict(model.named_parameters())
    grouped: dict[str, dict[str, object]] = {}
    for fqn, sel in selections.items():
        if fqn not in params:
            raise ValueError(f"selection names parameters the model lacks: [{fqn!r}]")
        module_fqn, _, leaf = fqn.rpartition(".")
        module = model.get_submodule(module_fqn)
        if not isinstance(module, (nn.Linear, Conv1D)) or leaf not in ("weight", "bias"):
            raise ValueError(
                f"training.update=sparse_delta: {fqn!r} is not the weight or bias of a "
                f"Linear/Conv1D projection ({type(module).__name__}); only projections can "
                "hold sparse deltas. Use training.update: masked for this selection."
            )
        grouped.setdefault(module_fqn, {})[leaf] = sel
    return grouped


# `(fqn, parameter, axis, indices) -> the selected slice of the full parameter`.
SliceReader = Callable[[str, torch.Tensor, int, torch.Tensor], torch.Tensor]


def read_full(fqn: str, param: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """The selected slice of an unsharded (or meta) parameter; `install`'s default reader."""
    if getattr(param, "ds_shape", None) is not None:
        raise ValueError(
            f"{fqn}: parameter is already partitioned by ZeRO-3; install sparse deltas "
            "on the unwrapped model, before the engine is built"
        )
    base = param.detach()
    return base.index_select(axis, idx.to(base.device)).clone()


def install(model: nn.Module, selections: Mapping[str, object],
            read: SliceReader = read_full) -> list[DeltaEntry]:
    """Freeze `model` and give every selected projection a trainable `ncft_delta`.

    Call on the unwrapped model instead of `ncft.masks.install.freeze_unselected`, before
    the engine is built; then train with no masks. A model on the meta device (an
    FSDP2 rank that receives rank 0's weights) gets meta deltas, which the engine
    fills like any other parameter.

    Args:
        model: The model (plain, unsharded).
        selections: `fqn -> Selection` (a NeuronSet's entries, storage coordinates).
        read: Returns the selected slice of one full parameter (the deltas' start
            values); `ncft.adapter` passes one that reads a ZeRO-3 rank's partition.

    Returns:
        One `DeltaEntry` per projection, in model order; pass it to `write_back`.

    Raises:
        ValueError: If a selection names a parameter that is not a projection's weight
            or bias, or one the model lacks.
    """
    grouped = _group_by_module(model, selections)
    for p in model.parameters():
        p.requires_grad_(False)
    entries = []
    for module_fqn, _ in model.named_modules():
        if module_fqn not in grouped:
            continue
        module, sels = model.get_submodule(module_fqn), grouped[module_fqn]
        if hasattr(module, DELTA_ATTR):
            raise ValueError(f"{module_fqn}: sparse deltas are already installed")
        w_sel, b_sel = sels.get("weight"), sels.get("bias")
        weight = bias = None
        if w_sel is not None:
            weight = read(f"{module_fqn}.weight", module.weight, w_sel.axis, w_sel.indices)
        if b_sel is not None:
            bias = read(f"{module_fqn}.bias", module.bias, 0, b_sel.indices)
        axis = w_sel.axis if w_sel is not None else 0
        w_idx = w_sel.indices if w_sel is not None else None
        b_idx = b_sel.indices if b_sel is not None else None
        delta = SparseDelta(weight, axis, w_idx, bias, b_idx, isinstance(module, Conv1D))
        entries.append(_attach(module, module_fqn, delta))
    return entries


def _entry(module_fqn: str, delta: SparseDelta) -> DeltaEntry:
    axis = delta.axis if delta.weight_idx is not None else None  # None: bias only
    return DeltaEntry(module_fqn, axis, delta.weight_idx, delta.bias_idx, delta)


def _attach(module: nn.Module, module_fqn: str, delta: SparseDelta) -> DeltaEntry:
    module.add_module(DELTA_ATTR, delta)
    module.forward = types.MethodType(_delta_forward, module)
    return _entry(module_fqn, delta)


def mirror(model: nn.Module, entries: Iterable[DeltaEntry]) -> list[DeltaEntry]:
    """Give `model` deltas like `entries`' (same projections and indices), values unset.

    For an engine that builds its own copy of a model's structure and then fills every
    parameter from the files: ZeRO-3's twin is made under `deepspeed.zero.Init`, which
    partitions each parameter as its module is constructed, so the deltas must be made
    there too (`launcher.engines.loading.zero3_model`). Their values come from the
    files with the rest (`launcher.run.delta_weights`). Freezes nothing: the caller
    copies `requires_grad` from the model it mirrors.

    Returns:
        The new entries, in the order given.
    """
    out = []
    for entry in entries:
        src = entry.delta
        # No dtype: under zero.Init new tensors take the engine's compute dtype.
        weight = torch.empty(src.weight.shape) if src.weight is not None else None
        bias = torch.empty(src.bias.shape) if src.bias is not None else None
        delta = SparseDelta(weight, src.axis, src.weight_idx, bias, src.bias_idx,
                            src.transposed)
        out.append(_attach(model.get_submodule(entry.module_fqn), entry.module_fqn, delta))
    return out


def installed(model: nn.Module) -> list[DeltaEntry]:
    """The deltas `install` put on `model` (unwrapped), in model order."""
    return [_entry(name.rsplit(".", 1)[0], module) for name, module in model.named_modules()
            if isinstance(module, SparseDelta)]


def write_back(engine: Engine, entries: Iterable[DeltaEntry]) -> None:
    """Copy the deltas into the full matrices and return the projections to normal.

    Collective (every rank calls it). One projection at a time: gather its deltas,
    then edit its base weight and bias through the engine, so peak extra memory is
    one projection. Afterwards the model computes with its full matrices only.
    """
    entries = list(entries)
    for entry in entries:
        pairs = entry.pairs
        with engine.gathered([d for d, _, _, _ in pairs]) as full:
            values = {d: full[d].detach().clone() for d, _, _, _ in pairs}
        with torch.no_grad(), engine.edited([b for _, b, _, _ in pairs]) as full:
            for delta_fqn, base_fqn, axis, idx in pairs:
                target = full[base_fqn]
                target.index_copy_(axis, idx.to(target.device),
                                   values[delta_fqn].to(target.device, target.dtype))
    for entry in entries:
        entry.delta.active = False


def remove(model: nn.Module, entries: Iterable[DeltaEntry]) -> None:
    """Take the deltas of `entries` off `model`: the projections run their own forward.

    Their values are dropped; copy them into the base first (`ncft.adapter.merge`).
    """
    for entry in entries:
        module = model.get_submodule(entry.module_fqn)
        del module._modules[DELTA_ATTR]
        module.__dict__.pop("forward", None)  # the bound `_delta_forward`
