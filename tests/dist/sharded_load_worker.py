"""One launched job: FSDP2 and ZeRO-3 engines filled from safetensors files, per rank.

Run under torchrun by tests/launcher/engines/test_loading.py. Every rank builds the
model on the meta device from the directory's config and the engine reads this
rank's rows / partitions straight from the files (`launcher.engines.loading`). For
each backend and each source (`--sources`, name=path) every rank saves its own local
shards, its logits on a fixed batch and its load report; rank 0 also saves the
gathered full weights. With `--replay` a second engine is built from what the first
read (the scoring/training pair of one stage) and saves its shards too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.dist import init_distributed, shutdown
from launcher.engines import OptimConfig, build_engine
from launcher.engines.weights import Replay, SafetensorsWeights
from ncft.engine import local_tensor
from tests.dist.mask_worker import gather_all
from tests.support.spawn import worker_parser, worker_start


def meta_model(model_dir: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def local_shards(engine, backend: str) -> dict[str, torch.Tensor]:
    """This rank's own storage of every parameter, as the engine holds it."""
    out = {}
    for name, param in engine.module.named_parameters():
        name = name.removeprefix("module.")
        if backend in ("fsdp2", "single"):
            out[name] = local_tensor(param).detach().to("cpu", copy=True)
        else:  # ZeRO-3: the flat partition, padding included
            out[name] = param.ds_tensor.detach().to("cpu", copy=True)
    return out


def run(backend: str, info, out: Path, model_dir: str, name: str, path: str, args) -> None:
    weights = SafetensorsWeights.from_path(path)
    if args.replay:
        weights.record()
    # --dtype is the compute dtype: engines take fp32 models and keep fp32 masters.
    cfg = OptimConfig(compute_dtype=getattr(torch, args.dtype))
    engine = build_engine(backend, meta_model(model_dir), cfg, info, weights=weights)
    tag = f"{backend}.{name}.rank{info.rank}"
    (out / f"{tag}.json").write_text(json.dumps(engine.load_report))
    if args.memory_only:
        engine.close()
        return
    # Before any forward: FSDP2's root keeps its parameters unsharded after one.
    tensors = {"shard." + k: v for k, v in local_shards(engine, backend).items()}
    batch = torch.randint(0, args.vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = engine.forward({"input_ids": batch.to(info.device)}).logits
        tensors.update(logits=logits.float().cpu().contiguous(), batch=batch)
    full = gather_all(engine)
    if info.rank == 0:
        tensors.update({"full." + k: v for k, v in full.items()})
    if args.replay:
        # Scoring moves weights (NeFT's probe); the replay must not see that.
        for name, _ in engine.named_parameter_shapes():
            with engine.edited([name]) as edit:
                edit[name].add_(1.0)
        engine.close()
        again = build_engine(backend, meta_model(model_dir), cfg, info,
                             weights=Replay(weights))
        tensors.update({"replay." + k: v for k, v in local_shards(again, backend).items()})
        (out / f"{tag}.replay.json").write_text(json.dumps(again.load_report))
        engine = again
    save_file(tensors, out / f"{tag}.safetensors")
    engine.close()


def main() -> None:
    parser = worker_parser(backends="fsdp2,deepspeed")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--sources", nargs="+", required=True, help="name=path")
    parser.add_argument("--vocab", type=int, default=96)
    parser.add_argument("--replay", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--memory-only", action="store_true")
    args, info = worker_start(parser)
    for backend in args.backends.split(","):
        for source in args.sources:
            name, path = source.split("=", 1)
            run(backend, info, args.out, args.model_dir, name, path, args)
    shutdown()


if __name__ == "__main__":
    main()
