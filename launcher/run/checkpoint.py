"""Consolidated exports: gather one parameter at a time, write a HF directory.

Peak extra memory is one full parameter per rank plus the growing CPU state dict
on rank 0 (which is what a consolidated checkpoint is). Writes are atomic
(`ncft.io.atomic_dir`): a temporary directory is renamed into place only when complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ncft.engine import Engine
from ncft.io import atomic_dir
from ncft.sparse_delta import is_delta_fqn


def gather_state_dict(engine: Engine) -> dict[str, torch.Tensor] | None:
    """Full parameters on rank 0 (CPU), None elsewhere; one gather at a time.

    Sparse-delta parameters (`training.update: sparse_delta`) are left out: a saved
    model holds only full matrices, into which `ncft.sparse_delta.write_back` has
    already copied the trained values.
    """
    out = {}
    for name, _ in engine.named_parameter_shapes():
        if is_delta_fqn(name):
            continue
        with engine.gathered([name]) as full:
            if engine.is_main_process:
                out[name] = full[name].detach().to("cpu", copy=True)
    return out if engine.is_main_process else None


def export_hf(engine: Engine, config, out_dir: Path, tokenizer=None) -> None:
    """Write a `from_pretrained`-loadable directory of the engine's model (rank 0).

    Args:
        engine: The engine holding the (possibly sharded) model.
        config: The HF `PretrainedConfig` of the model.
        out_dir: Target directory (replaced atomically).
        tokenizer: Saved alongside when given.
    """
    from huggingface_hub import save_torch_state_dict

    state = gather_state_dict(engine)
    if state is None:
        return
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        save_torch_state_dict(state, tmp, max_shard_size="5GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def iter_saved_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors HF directory, one at a time (never all loaded)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files to compare against")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
