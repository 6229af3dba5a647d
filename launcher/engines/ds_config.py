"""DeepSpeed JSON: tuning lives in `ds_configs/`, values the spec owns are filled here.

A shipped config writes `"auto"` for every value the spec owns (batch sizes,
accumulation, clipping, precision). A concrete value that disagrees with the spec is
an error rather than a silent override, in the spirit of accelerate's `fill_match`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from launcher.engines.common import OptimConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

# Blocks DeepSpeed would use to build its own optimizer; ours is MaskedAdamW, whose
# masked update is what keeps frozen elements bit-identical.
_FORBIDDEN = ("optimizer", "scheduler")


def resolve_path(name_or_path: str) -> Path:
    """A config given as a path, or as a name in `ds_configs/` (`zero3`)."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"engine.ds_config: {name_or_path!r} not found; shipped: {known}")
    return path


def load(name_or_path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and check it leaves optimizer choice to us."""
    path = resolve_path(name_or_path)
    config = json.loads(path.read_text())
    for key in _FORBIDDEN:
        if key in config:
            raise ValueError(
                f"{path}: remove the {key!r} block; ncft builds the optimizer from the spec's "
                "training section (it must mask the update per element)"
            )
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"{path}: zero_optimization.stage must be 3, got {stage!r}")
    return config


def _fill(config: dict, dotted: str, value: Any, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        raise ValueError(
            f"DeepSpeed config sets {dotted}={current!r} but the spec gives {value!r} "
            f"({source}); write \"auto\" in the JSON and set it in the spec"
        )


def fill(
    config: dict[str, Any], cfg: OptimConfig, world_size: int, dtype: torch.dtype
) -> dict[str, Any]:
    """Return a copy of `config` with every spec-owned `"auto"` value filled.

    Raises:
        ValueError: If the JSON holds a concrete value that disagrees with the spec.
    """
    out = copy.deepcopy(config)
    _fill(out, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, "training.micro_batch_size")
    _fill(out, "gradient_accumulation_steps", cfg.grad_accum, "training.grad_accum")
    _fill(
        out, "train_batch_size", cfg.micro_batch_size * cfg.grad_accum * world_size,
        "micro_batch_size x grad_accum x world size",
    )
    _fill(out, "gradient_clipping", float(cfg.grad_clip), "training.grad_clip")
    _fill(out, "bf16.enabled", dtype == torch.bfloat16, "model.dtype")
    _fill(out, "fp16.enabled", dtype == torch.float16, "model.dtype")
    out["zero_allow_untested_optimizer"] = True
    leftover = [k for k, v in _walk(out) if v == "auto"]
    if leftover:
        raise ValueError(f"DeepSpeed config: no spec value fills {leftover}; set them in the JSON")
    return out


def _walk(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
