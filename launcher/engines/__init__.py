"""Engine registry: a backend name from the spec to the class that builds it.

Imports are lazy so a run pays for DeepSpeed only when it asks for it.
"""

from __future__ import annotations

import importlib

from torch import nn

from launcher.dist import DistInfo
from launcher.engines.common import OptimConfig

BACKENDS = {
    "single": ("launcher.engines.single", "SingleEngine"),
    "deepspeed": ("launcher.engines.zero3", "Zero3Engine"),
    "fsdp2": ("launcher.engines.fsdp2", "Fsdp2Engine"),
    "fsdp1": ("launcher.engines.fsdp1", "Fsdp1Engine"),
}


def build_engine(
    backend: str, model: nn.Module, cfg: OptimConfig, info: DistInfo, ds_config: str = "zero3",
    weights=None,
):
    """Wrap `model` for `backend` and build its optimizer over trainable params.

    Call after `ncft.masks.install.freeze_unselected`, then `ncft.masks.install.install`.

    Args:
        backend: A key of `BACKENDS`.
        model: The unwrapped model (on the meta device when `weights` is given).
        cfg: Optimizer settings.
        info: This rank's place in the job.
        ds_config: DeepSpeed config name or path (deepspeed only).
        weights: For `single`, `fsdp2` and `deepspeed`, a `launcher.engines.loading.Weights`
            to fill a meta-device `model` from, each rank reading only its own shard.
    """
    if backend not in BACKENDS:
        raise ValueError(f"engine.backend: unknown {backend!r}; choose one of {sorted(BACKENDS)}")
    module, name = BACKENDS[backend]
    cls = getattr(importlib.import_module(module), name)
    if weights is not None and backend == "fsdp1":
        raise ValueError("engine.backend=fsdp1 has no sharded loading")
    if backend == "deepspeed":
        return cls(model, cfg, info, config=ds_config, weights=weights)
    if weights is not None:
        return cls(model, cfg, info, weights=weights)
    return cls(model, cfg, info)


__all__ = ["BACKENDS", "OptimConfig", "build_engine"]
