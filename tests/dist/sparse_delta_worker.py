"""One launched job: masked and sparse-delta training on each engine, same data.

Run under torchrun by tests/ncft/test_sparse_delta_dist.py. For each backend it
trains a tiny Llama twice from the same weights for 4 steps (AdamW weight decay 0.1,
clipping that bites on every step, gradient accumulation 2) over neuron units and
NeFT attention rows: once with `training.update: masked` (freeze_unselected + mask
plan) and once with `sparse_delta` (ncft.sparse_delta.install, no masks, write_back
at the end). Rank 0 writes the gathered full weights of both arms (delta parameters
excluded), the grad norms and the trainable element counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.engines import OptimConfig, build_engine
from ncft import sparse_delta
from ncft.arch import get_adapter, make_projection, row_entries
from ncft.masks.install import freeze_unselected, install
from ncft.neuron_set import NeuronSet, Selection
from tests.dist.mask_worker import ACCUM, GLOBAL_MICRO, batches
from tests.support.spawn import backends_main
from tests.support.tiny import tiny_llama

STEPS = 4


def neuron_set(model) -> NeuronSet:
    """Units in both layers (gate/up rows + biases, down columns) and NeFT q/o rows."""
    blocks = get_adapter(model).mlp_blocks(model)
    units = NeuronSet.from_units(
        blocks, {0: torch.tensor([0, 5, 17, 36]), 1: torch.tensor([2, 3, 30])}
    )
    rows = {}
    for name, idx in (("model.layers.1.self_attn.q_proj", [1, 7]),
                      ("model.layers.0.self_attn.o_proj", [0, 11, 23])):
        rows.update(row_entries(make_projection(model, name, "attn"), torch.tensor(idx)))
    return units.union(NeuronSet({k: Selection(*v) for k, v in rows.items()}))


def gather_model(engine) -> dict[str, torch.Tensor]:
    """Full model parameters (no delta parameters), one at a time."""
    out = {}
    for name, _ in engine.named_parameter_shapes():
        if sparse_delta.is_delta_fqn(name):
            continue
        with engine.gathered([name]) as full:
            out[name] = full[name].detach().to("cpu", copy=True)
    return out


def train_arm(backend: str, update: str, info) -> tuple[dict, dict]:
    model = tiny_llama(seed=0)
    nset = neuron_set(model)
    entries = None
    if update == "masked":
        freeze_unselected(model, nset.entries)
    else:
        entries = sparse_delta.install(model, nset.entries)
    cfg = OptimConfig(
        lr=1e-2, weight_decay=0.1, grad_clip=0.005, grad_accum=ACCUM,
        micro_batch_size=GLOBAL_MICRO // info.world_size,
    )
    engine = build_engine(backend, model, cfg, info)
    plan = install(engine, nset.entries) if update == "masked" else None
    # Elements this rank keeps gradients and optimizer state for (padding excluded).
    trainable = sum(seg.numel for seg in engine.segments())
    norms = []
    for step in range(STEPS):
        for mb in batches(step, info.rank, info.world_size, info.device):
            engine.backward(engine.forward(mb).loss)
        if plan is not None:
            plan.apply_to_grads()
        norms.append(engine.step().grad_norm)
    if entries is not None:
        sparse_delta.write_back(engine, entries)
    probe = batches(99, info.rank, info.world_size, info.device)[0]
    with torch.no_grad():
        loss = float(engine.forward(probe).loss)
    weights = gather_model(engine)
    engine.close()
    report = {"grad_norms": norms, "local_trainable_numel": trainable, "probe_loss": loss}
    return weights, report


def run_backend(backend: str, info, out_dir: Path) -> None:
    """Both arms on `backend`; rank 0 saves weights, reports, the set and the init."""
    for update in ("masked", "sparse_delta"):
        weights, report = train_arm(backend, update, info)
        tag = f"{backend}_ws{info.world_size}_{update}"
        if info.is_main_process:
            save_file(weights, out_dir / f"{tag}.safetensors")
            (out_dir / f"{tag}.json").write_text(json.dumps(report))
    if info.is_main_process:
        model = tiny_llama(seed=0)
        save_file(model.state_dict(), out_dir / "init.safetensors")
        neuron_set(model).save(out_dir / "neurons.safetensors")


if __name__ == "__main__":
    backends_main(run_backend)
