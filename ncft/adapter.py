"""Neuron-level training from the user's own training code: attach, save, load, merge.

`ncft run` trains selected neurons through its own engines. This module gives the
same training to any loop (HF `Trainer`, accelerate, plain PyTorch) on any engine that
shards ordinary parameters (DeepSpeed ZeRO-3, FSDP2), with `ncft.sparse_delta`'s
child parameters:

    neurons = ncft.NeuronSet.load("sst2.safetensors")
    model = ncft.attach(model, neurons)   # before the trainer wraps the model
    ...train...
    ncft.save_adapter(model, "out/adapter")   # every rank, like trainer.save_model()
    model = ncft.load_adapter(base_model, "out/adapter")
    plain = ncft.merge(model)

`attach` freezes the model and gives every selected projection a small trainable
`ncft_delta` child holding only the selected rows/columns, so the engine allocates
gradients and optimizer state for the selected elements only and shards them like
any other parameter. Under ZeRO-3, `from_pretrained` may already have partitioned
the weights: the deltas are then read from the partitions each rank holds
(`ncft.param_shards`), one all-gather of the selected elements per matrix, so no rank
ever holds a full matrix. DeepSpeed partitions the new delta parameters itself when
the engine is built (`deepspeed.initialize` converts any plain parameter it finds).

An adapter directory holds `adapter.safetensors` (the delta values, a few MB),
`neurons.safetensors` + `neurons.json` (the NeuronSet) and `adapter.json` (format,
the base's shapes, and a fingerprint of the base's selected elements, which catches
an adapter loaded into another base of the same shape).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ncft import param_shards, sparse_delta
from ncft.io import atomic_dir, write_json
from ncft.neuron_set import NeuronSet

FORMAT = "ncft.adapter/1"
STATE_ATTR = "ncft_adapter"  # the attached model's `_Attached` record
DELTAS_FILE, CONFIG_FILE = "adapter.safetensors", "adapter.json"
NEURONS_FILE = "neurons.safetensors"
# Elements of different dtypes (an fp32-trained adapter loaded into a bf16 base) can
# only be compared approximately: bf16 keeps 8 significant bits.
CROSS_DTYPE_RTOL = 1e-2


@dataclass
class _Attached:
    """What `attach` did to a model, kept on it as `model.ncft_adapter`."""

    neurons: NeuronSet
    entries: list[sparse_delta.DeltaEntry]
    requires_grad: dict[str, bool]
    base: dict[str, Any]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DeepSpeed engine or DDP wrapper (their `.module`)."""
    root = model
    while not hasattr(root, STATE_ATTR) and isinstance(getattr(root, "module", None), nn.Module):
        root = root.module
    return root


def _state(model: nn.Module) -> _Attached | None:
    return getattr(_unwrap(model), STATE_ATTR, None)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _check_unwrapped(model: nn.Module) -> None:
    names = [n for n, _ in model.named_parameters()]
    if any("_fsdp_wrapped_module" in n or "_flat_param" in n for n in names):
        raise ValueError("attach: the model is already wrapped by FSDP1; call ncft.attach on "
                         "the plain model, before the trainer or accelerate wraps it")
    if any(param_shards.is_dtensor(p) for p in model.parameters()):
        raise ValueError("attach: the model's parameters are already DTensors (FSDP2); call "
                         "ncft.attach on the plain model, before fully_shard or "
                         "accelerator.prepare")
    if hasattr(model, "ds_inflight_param_registry"):  # set by deepspeed.initialize
        raise ValueError("attach: deepspeed.initialize already ran on this model, so its "
                         "optimizer would not see the new parameters; call ncft.attach "
                         "before the Trainer (or deepspeed.initialize) wraps the model")


def check_neurons(model: nn.Module, neurons: NeuronSet) -> None:
    """Check that `neurons` fits `model`'s parameter names and full shapes.

    Raises:
        ValueError: Naming the first entry that the model lacks, or whose indices fall
            outside the parameter (a NeuronSet made for another model).
    """
    if not isinstance(neurons, NeuronSet):
        raise ValueError(f"neurons must be an ncft.NeuronSet, got {type(neurons).__name__}; "
                         "load one with ncft.NeuronSet.load(path) or make one with ncft.score")
    if not neurons.entries:
        raise ValueError("neurons: the NeuronSet selects nothing")
    params = _params(model)
    made_for = neurons.meta.get("model_id") or "another model"
    for fqn, sel in neurons.entries.items():
        if fqn not in params:
            raise ValueError(f"neurons: the NeuronSet names {fqn!r}, which "
                             f"{type(model).__name__} does not have; it was made for "
                             f"{made_for}")
        shape = param_shards.full_shape(params[fqn])
        if sel.axis >= len(shape) or int(sel.indices[-1]) >= shape[sel.axis]:
            raise ValueError(
                f"neurons: entry {fqn!r} selects index {int(sel.indices[-1])} along axis "
                f"{sel.axis}, but the parameter has shape {shape}; the NeuronSet was made "
                f"for {made_for} with another shape")


def _reader(fqn: str, param: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    if param_shards.is_zero3(param):
        return param_shards.zero3_slice(fqn, param, axis, idx)
    return sparse_delta.read_full(fqn, param, axis, idx)


def _delta_values(state: _Attached) -> dict[str, torch.Tensor]:
    """`delta fqn -> full value` on the CPU (collective when the deltas are sharded).

    Raises:
        ValueError: If a gathered delta lacks its shape: an engine whose shards this
            module cannot read (FSDP1 keeps flat shards of several parameters).
    """
    out = {}
    for entry in state.entries:
        for delta_fqn, base_fqn, axis, idx in entry.pairs:
            name = delta_fqn.rsplit(".", 1)[1]
            value = param_shards.full_value(getattr(entry.delta, name)).contiguous()
            shape = list(state.base["shapes"][base_fqn])
            shape[axis] = idx.numel()
            if list(value.shape) != shape:
                raise ValueError(
                    f"save_adapter: {delta_fqn} reads as shape {tuple(value.shape)}, not "
                    f"{tuple(shape)}: its engine shards it in a way ncft cannot gather "
                    "(FSDP1 flat parameters). Use FSDP2 or DeepSpeed ZeRO-3")
            out[delta_fqn] = value
    return out


def _fingerprint(values: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the base's selected elements were: dtype, exact digest, and `sum |x|`, `sum x^2`.

    The digest decides when the dtypes agree; across dtypes (an fp32-trained adapter
    into a bf16 base) the two sums must agree within `CROSS_DTYPE_RTOL` per matrix.
    """
    digest = hashlib.sha256()
    stats = {}
    for key in sorted(values):
        v = values[key]
        digest.update(key.encode() + b"\0" + v.float().numpy().tobytes())
        v64 = v.double()
        # Both positive, so a relative tolerance means something across dtypes.
        stats[key] = [float(v64.abs().sum()), float((v64 * v64).sum())]
    dtype = str(next(iter(values.values())).dtype).removeprefix("torch.") if values else ""
    return {"dtype": dtype, "sha256": digest.hexdigest(), "stats": stats}


def attach(model: nn.Module, neurons: NeuronSet) -> nn.Module:
    """Make `neurons`' rows/columns of `model` small trainable parameters; freeze the rest.

    Call it on the plain model, before a trainer, accelerate or DeepSpeed wraps it. A
    model that `from_pretrained` loaded under a DeepSpeed ZeRO-3 config (partitioned at
    load) is fine: every rank must then call `attach` (it is collective), and each
    builds the deltas from the partition it holds.

    Args:
        model: A transformers (or any torch) model whose selected parameters are the
            weights/biases of Linear or Conv1D projections.
        neurons: The selection, in storage coordinates (`ncft.NeuronSet.load`,
            `ncft.score`).

    Returns:
        `model` itself, changed in place.

    Raises:
        ValueError: If `neurons` was made for another shape, the model already has an
            adapter, or it is already wrapped by an engine.
    """
    root = _unwrap(model)
    if getattr(root, STATE_ATTR, None) is not None or sparse_delta.installed(root):
        raise ValueError("attach: this model already has ncft deltas attached; attach once "
                         "per model (load_adapter attaches too), or merge first")
    _check_unwrapped(root)
    check_neurons(root, neurons)
    requires_grad = {n: p.requires_grad for n, p in root.named_parameters()}
    entries = sparse_delta.install(root, neurons.entries, read=_reader)
    # Fresh deltas are plain tensors on every rank (not yet sharded): no collective.
    start = {k: v.detach().cpu() for k, v in _start_values(entries).items()}
    params = _params(root)
    base = {
        "model_type": getattr(getattr(root, "config", None), "model_type", None),
        "architectures": list(getattr(getattr(root, "config", None), "architectures",
                                      None) or []),
        "shapes": {fqn: list(param_shards.full_shape(params[fqn])) for fqn in neurons.entries},
        **_fingerprint(start),
    }
    setattr(root, STATE_ATTR, _Attached(neurons, entries, requires_grad, base))
    return model


def _start_values(entries: Iterable[sparse_delta.DeltaEntry]) -> dict[str, torch.Tensor]:
    out = {}
    for entry in entries:
        for delta_fqn, _, _, _ in entry.pairs:
            out[delta_fqn] = getattr(entry.delta, delta_fqn.rsplit(".", 1)[1])
    return out


def _attached(model: nn.Module, verb: str) -> _Attached:
    state = _state(model)
    if state is None:
        raise ValueError(f"{verb}: the model has no ncft adapter; call ncft.attach(model, "
                         "neurons) or ncft.load_adapter(model, path) first")
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the trained deltas, the NeuronSet and the base's description to `path`.

    Under a sharded engine call it on every rank (as `trainer.save_model()` is): it
    gathers each delta (a few MB in all) and rank 0 writes; every rank returns once
    the directory is complete. Under bf16 compute the deltas are saved in the model's
    dtype (the engine's fp32 masters are not read).

    Args:
        model: The attached model, or the engine/wrapper around it.
        path: Output directory (replaced atomically if it exists).

    Raises:
        ValueError: If the model has no adapter attached.
    """
    state = _attached(model, "save_adapter")
    values = _delta_values(state)
    if not _distributed() or dist.get_rank() == 0:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as tmp:
            save_file(values, str(tmp / DELTAS_FILE), metadata={"format": FORMAT})
            state.neurons.save(tmp / NEURONS_FILE)
            write_json(tmp / CONFIG_FILE, {
                "format": FORMAT, "neurons_checksum": state.neurons.checksum(),
                "deltas": {k: list(v.shape) for k, v in values.items()},
                "base": state.base,
            })
    if _distributed():
        dist.barrier()


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"load_adapter: {config_path} does not exist; pass the directory "
                         "that ncft.save_adapter wrote")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"load_adapter: {config_path} has format {config.get('format')!r}, "
                         f"expected {FORMAT!r}")
    return config


def _check_base(model: nn.Module, config: dict[str, Any], path: Path) -> None:
    saved = config["base"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if saved.get("model_type") and model_type != saved["model_type"]:
        raise ValueError(f"load_adapter: {path} was trained on a {saved['model_type']!r} "
                         f"model; this base is {model_type!r}")
    params = _params(model)
    for fqn, shape in saved["shapes"].items():
        have = param_shards.full_shape(params[fqn]) if fqn in params else None
        if have != tuple(shape):
            raise ValueError(f"load_adapter: {path} was trained on a base whose {fqn} has "
                             f"shape {tuple(shape)}; this base's is {have}: wrong base model")


def _check_fingerprint(found: dict[str, Any], saved: dict[str, Any], path: Path) -> None:
    if found["dtype"] == saved["dtype"]:
        if found["sha256"] == saved["sha256"]:
            return
        bad = next((k for k in saved["stats"] if found["stats"][k] != saved["stats"][k]),
                   next(iter(saved["stats"])))
    else:
        bad = next((k for k, (s, q) in saved["stats"].items()
                    if not all(abs(a - b) <= CROSS_DTYPE_RTOL * max(abs(b), 1e-12)
                               for a, b in zip(found["stats"][k], (s, q)))), None)
        if bad is None:
            return
    raise ValueError(
        f"load_adapter: the base's weights under {bad.replace('.ncft_delta.', '.')} are not "
        f"those {path} was trained from (fingerprint mismatch): wrong base model. Load the "
        "base the adapter was trained on")


def load_adapter(base_model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Attach the adapter saved at `path` to `base_model`: the trained model's forward.

    Checks that `base_model` is the model the adapter was trained from (parameter
    shapes, and the values of the selected elements before training). Like `attach`,
    call it on the plain model before any wrapping; the result trains on too.

    Args:
        base_model: The base the adapter was trained on (e.g. `from_pretrained`).
        path: A directory written by `save_adapter`.

    Returns:
        `base_model`, with the adapter's deltas attached.

    Raises:
        ValueError: If the directory is not an adapter, or `base_model` is not its base.
    """
    path = Path(path)
    config = _read_config(path)
    neurons = NeuronSet.load(path / NEURONS_FILE)
    if neurons.checksum() != config.get("neurons_checksum"):
        raise ValueError(f"load_adapter: {path / NEURONS_FILE} is not the NeuronSet "
                         f"{path / CONFIG_FILE} was saved with")
    root = _unwrap(base_model)
    _check_base(root, config, path)
    attach(root, neurons)
    state = getattr(root, STATE_ATTR)
    try:
        _check_fingerprint(state.base, config["base"], path)
    except ValueError:
        _detach(root, state)
        raise
    values = load_file(path / DELTAS_FILE)
    starts = _start_values(state.entries)
    if set(values) != set(starts):
        _detach(root, state)
        raise ValueError(f"load_adapter: {path / DELTAS_FILE} holds other deltas than its "
                         "NeuronSet selects")
    with torch.no_grad():
        for key, param in starts.items():
            param.copy_(values[key].to(param.device, param.dtype))
    return base_model


def _detach(root: nn.Module, state: _Attached) -> None:
    """Undo `attach`: drop the deltas, restore `requires_grad`."""
    sparse_delta.remove(root, state.entries)
    for name, p in root.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    delattr(root, STATE_ATTR)


def merge(model: nn.Module) -> nn.Module:
    """Write the deltas into the base weights and remove every trace of ncft.

    Only the selected elements change; every other element keeps its exact bits. The
    result is a plain transformers model (`save_pretrained` writes no ncft parameter,
    and `from_pretrained` reads it back), with the `requires_grad` flags it had
    before `attach`.

    Needs an unsharded model: after sharded training, `save_adapter` on every rank,
    then `load_adapter(base)` and `merge` in one process.

    Args:
        model: A model with an adapter (`attach` or `load_adapter`).

    Returns:
        The merged model (the same object).

    Raises:
        ValueError: If no adapter is attached, or the model is sharded.
    """
    root = _unwrap(model)
    state = _attached(root, "merge")
    params = _params(root)
    sharded = [n for n, p in params.items()
               if param_shards.is_zero3(p) or param_shards.is_dtensor(p)]
    if sharded:
        raise ValueError(f"merge: {sharded[0]} is sharded by the training engine; merge "
                         "needs the plain model: ncft.save_adapter on every rank, then "
                         "ncft.load_adapter(base_model, path) and ncft.merge in one process")
    with torch.no_grad():
        for entry in state.entries:
            for delta_fqn, base_fqn, axis, idx in entry.pairs:
                target, value = params[base_fqn], params[delta_fqn]
                target.index_copy_(axis, idx.to(target.device), value.to(target.dtype))
    _detach(root, state)
    return model
