"""One launched job: masked training with and without activation checkpointing.

Run under torchrun by tests/launcher/engines/test_checkpointing.py. Per backend and
per setting of `activation_checkpointing`, a fresh tiny fp32 Llama trains 3 masked
AdamW steps (accumulation 2, clipping, weight decay); rank 0 saves the gathered
weights, every micro-batch loss, how many times layer 0's MLP ran forward during
training (twice per micro-batch when its activations are recomputed), and the
gradient-attribution scores taken on the trained engine (scoring runs in eval mode,
so its hooks see one forward even with checkpointing on).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.engines import OptimConfig, build_engine
from ncft.arch import get_adapter
from ncft.masks.install import freeze_unselected, install
from ncft.engine import find_module
from ncft.scoring.attribution import GradAttribution
from ncft.scoring.groups import unit_groups
from tests.dist.mask_worker import ACCUM, GLOBAL_MICRO, batches, gather_all, neuron_sets
from tests.dist.scoring_worker import encoded_examples
from tests.support.spawn import backends_main
from tests.support.tiny import tiny_llama

STEPS = 3


def _mlp0(engine):
    # Inside the checkpointed layer forward, so its hooks run again on recompute.
    return find_module(engine.module, "model.layers.0.mlp")


def train(backend: str, info, checkpointing: bool) -> dict:
    model = tiny_llama(seed=0)
    blocks = get_adapter(model).mlp_blocks(model)
    set_a, _ = neuron_sets(model)
    freeze_unselected(model, set(set_a.entries))
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.005, grad_accum=ACCUM,
                      micro_batch_size=GLOBAL_MICRO // info.world_size,
                      activation_checkpointing=checkpointing)
    engine = build_engine(backend, model, cfg, info)
    plan = install(engine, set_a.entries)
    calls = []
    handle = _mlp0(engine).register_forward_pre_hook(lambda *_: calls.append(1))
    losses = []
    for step in range(STEPS):
        for mb in batches(step, info.rank, info.world_size, engine.device):
            loss = engine.forward(mb).loss
            losses.append(float(loss))
            engine.backward(loss)
        plan.apply_to_grads()
        engine.step()
    handle.remove()
    forwards = len(calls)
    scores = GradAttribution(encoded_examples(), blocks, batch_size=3).score(
        engine, unit_groups(blocks))
    weights = gather_all(engine)
    engine.close()
    return {"weights": weights, "losses": losses, "layer0_forwards": forwards,
            "scores": scores}


def run_backend(backend: str, info, out: Path) -> None:
    for checkpointing in (False, True):
        result = train(backend, info, checkpointing)
        if info.is_main_process:
            tag = f"{backend}_ws{info.world_size}_ckpt{int(checkpointing)}"
            save_file(result["weights"], out / f"{tag}.safetensors")
            save_file({f"score.{k}": v for k, v in result["scores"].items()},
                      out / f"{tag}_scores.safetensors")
            (out / f"{tag}.json").write_text(json.dumps(
                {"losses": result["losses"], "layer0_forwards": result["layer0_forwards"]}))


if __name__ == "__main__":
    backends_main(run_backend)
