"""One launched job: O-LoRA's second task trained on every sharded engine in turn.

Run under torchrun by tests/ncft/test_olora_dist.py (2 and 3 ranks). Per backend: the
tiny Llama with adapters task0 (its B set as if trained) and task1 (new, trainable),
3 optimizer steps on a fixed global batch of 6 rows (each rank its share) with O-LoRA's
penalty applied by `olora.add_penalty_grad`. Rank 0 saves the new adapter's weights
and the steps' gradient norms; pytest compares them with one process.

DeepSpeed runs with `stage3_param_persistence_threshold: 0`, so the tiny LoRA matrices
are really partitioned (the default keeps small parameters whole).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.engines import OptimConfig, build_engine
from ncft import olora
from ncft.train import train_step
from tests.support.olora import LAMBDAS, STEPS, batch_rows, two_adapter_model
from tests.support.spawn import backends_main


def run_backend(backend: str, info, out: Path) -> None:
    model = two_adapter_model()
    cfg = OptimConfig(lr=1e-2, micro_batch_size=6 // info.world_size)
    engine = build_engine(backend, model, cfg, info, ds_config=str(out / "ds_partitioned.json"))
    norms, values = [], []
    for _ in range(STEPS):
        rows = batch_rows(info.rank, info.world_size)
        _, norm = train_step(engine, [{"input_ids": rows, "labels": rows}], None,
                             penalty=lambda e: values.append(
                                 olora.add_penalty_grad(e, 1, *LAMBDAS)) or values[-1])
        norms.append(norm)
    names = [n for n, _ in engine.named_parameter_shapes() if ".task1." in n or ".task0." in n]
    tensors = {}
    for name in names:
        with engine.gathered([name]) as full:
            tensors[name] = full[name].detach().float().cpu().clone()
    if info.rank == 0:
        tag = f"{backend}_ws{info.world_size}"
        save_file(tensors, out / f"{tag}.safetensors")
        (out / f"{tag}.json").write_text(json.dumps({"norms": norms, "penalties": values}))
    engine.close()


if __name__ == "__main__":
    backends_main(run_backend)
