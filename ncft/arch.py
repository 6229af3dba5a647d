"""Architecture adapters: where each model family keeps its MLP and attention projections.

A *neuron unit* `j` of layer `i` is FFN intermediate unit `j`: its activation is entry
`j` of the input of the down projection (`act(gate(x)) * up(x)` for gated MLPs,
`act(fc_in(x))` for plain ones). Unit `j` owns output feature `j` of every
input-side projection (gate/up/fc_in: weight and bias element) and input feature `j`
of the output-side projection (down/fc_out weight only; that bias belongs to no unit).

Everything here is expressed in STORAGE coordinates of the full parameter: `axis=0`
indexes rows of the tensor as stored, `axis=1` its columns, 1-D tensors use axis 0.
`nn.Linear` stores `[out, in]`; GPT-2's `Conv1D` stores the transpose `[in, out]`,
so the same logical unit lands on the other axis there.

Adding a family is one `_PathAdapter(...)` entry in `ADAPTERS` naming its paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Roles whose output features are the units (or, for "attn", just the NeFT rows).
_OUT_SIDE_ROLES = ("gate", "up", "fc_in", "attn")
# Roles whose input features are the units.
_IN_SIDE_ROLES = ("down", "fc_out")
ROLES = ("gate", "up", "down", "fc_in", "fc_out", "attn")


@dataclass(frozen=True)
class Projection:
    """One linear projection, with the storage axis that indexes its neuron units.

    Attributes:
        role: "gate", "up", "down", "fc_in", "fc_out", or "attn" for attention
            projections (there `unit_axis` is the storage axis of output features).
        module_fqn: Module name, e.g. "model.layers.0.mlp.gate_proj".
        weight_fqn: `module_fqn + ".weight"`.
        bias_fqn: `module_fqn + ".bias"` if the module has a bias, else None.
        unit_axis: Storage axis of the weight that indexes neuron units.
        row_count: `weight.shape[0]` as stored (full, unsharded shape).

    """

    role: str
    module_fqn: str
    weight_fqn: str
    bias_fqn: str | None
    unit_axis: int
    row_count: int


@dataclass(frozen=True)
class MlpBlock:
    """The MLP of one decoder layer.

    Attributes:
        layer: Layer index.
        mlp_fqn: Module name of the MLP.
        down_fqn: Module whose forward input is the unit activation (hook target).
        d_ff: Number of neuron units.
        projections: All linear projections of the MLP, in `ROLES` order.

    """

    layer: int
    mlp_fqn: str
    down_fqn: str
    d_ff: int
    projections: tuple[Projection, ...]


@runtime_checkable
class ArchAdapter(Protocol):
    """Find the MLP blocks and attention projections of one model family."""

    name: str

    def mlp_blocks(self, model: nn.Module) -> list[MlpBlock]:
        """Return one `MlpBlock` per decoder layer, in layer order."""
        ...

    def attention_projections(self, model: nn.Module) -> list[str]:
        """Return module names of all attention projections, in layer order."""
        ...


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    # ZeRO-3 replaces a partitioned parameter's data with an empty tensor and keeps
    # the real shape in `ds_shape`; selections always refer to the full shape.
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(param.shape)


def make_projection(model: nn.Module, module_fqn: str, role: str) -> Projection:
    """Describe module `module_fqn` of `model` as a `Projection` with `role`.

    Args:
        model: The model holding the module.
        module_fqn: Name of an `nn.Linear`-like or `Conv1D` module.
        role: One of `ROLES`; "attn" for projections outside the MLP.

    Returns:
        The projection, with `unit_axis` resolved for the module's storage layout.

    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    module = model.get_submodule(module_fqn)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(_full_shape(weight)) != 2:
        raise ValueError(f"module_fqn {module_fqn!r} has no 2-D weight; not a projection")
    # Conv1D stores [in, out]: its output features are columns, input features rows.
    transposed = isinstance(module, Conv1D)
    out_axis = 1 if transposed else 0
    unit_axis = out_axis if role in _OUT_SIDE_ROLES else 1 - out_axis
    bias = getattr(module, "bias", None)
    return Projection(
        role=role,
        module_fqn=module_fqn,
        weight_fqn=f"{module_fqn}.weight",
        bias_fqn=f"{module_fqn}.bias" if isinstance(bias, torch.Tensor) else None,
        unit_axis=unit_axis,
        row_count=_full_shape(weight)[0],
    )


@dataclass(frozen=True)
class _PathAdapter:
    """Generic adapter: a layer list plus attribute paths relative to each layer.

    Attributes:
        name: Registry name.
        layer_paths: Candidate paths of the layer `ModuleList`, tried in order (the
            causal-LM wrapper first, then the bare base model).
        mlp: Path of the MLP inside a layer.
        roles: `(role, attribute)` pairs of the MLP projections, in `ROLES` order.
        attention: Paths of the attention projections inside a layer.
        check: Optional hook that raises `ValueError` for configs the paths don't fit.

    """

    name: str
    layer_paths: tuple[str, ...]
    mlp: str
    roles: tuple[tuple[str, str], ...]
    attention: tuple[str, ...]
    check: Callable[[Any], None] | None = None

    def _layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        if self.check is not None and getattr(model, "config", None) is not None:
            self.check(model.config)
        for path in self.layer_paths:
            try:
                layers = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList):
                return path, layers
        raise ValueError(
            f"adapter {self.name!r} found no layer list in {type(model).__name__} "
            f"(tried {list(self.layer_paths)}); pass override= with a matching adapter"
        )

    def mlp_blocks(self, model: nn.Module) -> list[MlpBlock]:
        """Return one `MlpBlock` per decoder layer, in layer order."""
        prefix, layers = self._layers(model)
        blocks = []
        for i in range(len(layers)):
            mlp_fqn = f"{prefix}.{i}.{self.mlp}"
            projs = tuple(
                make_projection(model, f"{mlp_fqn}.{attr}", role) for role, attr in self.roles
            )
            down = next(p for p in projs if p.role in _IN_SIDE_ROLES)
            weight = model.get_submodule(down.module_fqn).weight
            d_ff = _full_shape(weight)[down.unit_axis]
            for p in projs:
                shape = _full_shape(model.get_submodule(p.module_fqn).weight)
                if shape[p.unit_axis] != d_ff:
                    raise ValueError(
                        f"{p.weight_fqn} has {shape[p.unit_axis]} units along axis "
                        f"{p.unit_axis}, but {down.weight_fqn} has {d_ff}; the model does "
                        f"not match adapter {self.name!r}"
                    )
            blocks.append(MlpBlock(i, mlp_fqn, down.module_fqn, d_ff, projs))
        return blocks

    def attention_projections(self, model: nn.Module) -> list[str]:
        """Return module names of all attention projections, in layer order."""
        prefix, layers = self._layers(model)
        return [f"{prefix}.{i}.{path}" for i in range(len(layers)) for path in self.attention]


def _check_bloom(config: Any) -> None:
    # With slow_but_exact tensor-parallel emulation, BloomMLP calls F.linear on slices
    # of dense_4h_to_h.weight and never runs the module, so hooks on it see nothing.
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise ValueError(
            "bloom config with pretraining_tp > 1 and slow_but_exact=True bypasses "
            "mlp.dense_4h_to_h.forward; set slow_but_exact=False to use ncft"
        )


_GATED = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_H_TO_4H = (("fc_in", "dense_h_to_4h"), ("fc_out", "dense_4h_to_h"))


def _llama_like(name: str) -> _PathAdapter:
    return _PathAdapter(name, ("model.layers", "layers"), "mlp", _GATED, _LLAMA_ATTN)


ADAPTERS: dict[str, ArchAdapter] = {
    **{
        name: _llama_like(name)
        for name in ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text")
    },
    "bloom": _PathAdapter(
        "bloom",
        ("transformer.h", "h"),
        "mlp",
        _H_TO_4H,
        ("self_attention.query_key_value", "self_attention.dense"),
        check=_check_bloom,
    ),
    "gpt_neox": _PathAdapter(
        "gpt_neox",
        ("gpt_neox.layers", "layers"),
        "mlp",
        _H_TO_4H,
        ("attention.query_key_value", "attention.dense"),
    ),
    "gpt2": _PathAdapter(
        "gpt2",
        ("transformer.h", "h"),
        "mlp",
        (("fc_in", "c_fc"), ("fc_out", "c_proj")),
        ("attn.c_attn", "attn.c_proj"),
    ),
}


def get_adapter(model_or_config: Any, override: str | None = None) -> ArchAdapter:
    """Choose the adapter for a model or config.

    Args:
        model_or_config: A model with a `.config`, or a config with `.model_type`.
        override: Registry name to use instead of the config's `model_type`, for
            models that share a known family's module layout.

    Returns:
        The registered adapter.

    Raises:
        ValueError: If `override` or the `model_type` has no registered adapter.

    """
    known = ", ".join(sorted(ADAPTERS))
    if override is not None:
        if override not in ADAPTERS:
            raise ValueError(f"override {override!r} is not a known adapter; known: {known}")
        return ADAPTERS[override]
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    raise ValueError(
        f"no ncft architecture adapter for {type(model_or_config).__name__} "
        f"(model_type={model_type!r}); known: {known}. If its layout matches a known "
        "family, pass override=<name>; otherwise write a small adapter in ncft/arch.py "
        "(usually one _PathAdapter naming its layer list, MLP and attention paths) and "
        "register it in ADAPTERS."
    )


def _as_indices(indices: torch.Tensor, field: str, size: int | None) -> torch.Tensor:
    """Sorted unique int64 copy of `indices`, range-checked against `size`."""
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(indices)
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(
            f"{field} must be a 1-D integer tensor, got {indices.dtype} "
            f"of shape {tuple(indices.shape)}"
        )
    out = torch.unique(indices.detach().to("cpu", torch.int64), sorted=True)
    if out.numel() and (out[0] < 0 or (size is not None and out[-1] >= size)):
        raise ValueError(f"{field} out of range [0, {size}): min {int(out[0])}, max {int(out[-1])}")
    return out


def unit_entries(block: MlpBlock, indices: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
    """Storage selections owned by neuron units `indices` of `block`.

    Args:
        block: The MLP block.
        indices: Unit indices in `[0, block.d_ff)`; duplicates and order don't matter.

    Returns:
        `fqn -> (axis, sorted int64 indices)`: input-side weights along their unit
        axis and their bias elements, and the output-side weight along its unit
        axis. The output-side bias is owned by no unit and is never included.

    """
    idx = _as_indices(indices, "indices", block.d_ff)
    entries: dict[str, tuple[int, torch.Tensor]] = {}
    for p in block.projections:
        entries[p.weight_fqn] = (p.unit_axis, idx)
        if p.role in _OUT_SIDE_ROLES and p.bias_fqn is not None:
            entries[p.bias_fqn] = (0, idx)
    return entries


def row_entries(proj: Projection, rows: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
    """Storage selections of NeFT "weight rows" (output features) of `proj`.

    Args:
        proj: Any projection (MLP or attention, see `make_projection`).
        rows: Output-feature indices of the logical `[out, in]` weight.

    Returns:
        `fqn -> (axis, sorted int64 indices)`: the weight along its output-feature
        storage axis (1 for `Conv1D`) and the bias elements of those outputs.

    """
    assert proj.role in ROLES, proj.role
    out_axis = proj.unit_axis if proj.role in _OUT_SIDE_ROLES else 1 - proj.unit_axis
    # Only the stored row count is known here, so columns are range-checked downstream.
    idx = _as_indices(rows, "rows", proj.row_count if out_axis == 0 else None)
    entries = {proj.weight_fqn: (out_axis, idx)}
    if proj.bias_fqn is not None:
        entries[proj.bias_fqn] = (0, idx)
    return entries
