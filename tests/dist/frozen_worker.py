"""One launched job: frozen weights in bf16 against the fp32-master reference.

Run under torchrun by tests/launcher/engines/test_frozen.py. For each backend, source
file dtype (fp32, bf16) and update mode (masked, sparse_delta), rank 0 saves the tiny
Llama as a HF directory in that dtype and every engine trains 3 steps with
`compute_dtype=bfloat16` twice: with frozen parameters lowered to bf16
(`launcher.engines.frozen`, the default) and with fp32 copies (`lower_frozen=False`,
the reference). Single and FSDP2 read the files shard by shard (meta model + sparse
loading, as `ncft run` does); FSDP1 loads the whole model on every rank. The lowered
engine also saves its local state after step 2, and a second lowered engine built
from the files restores it and takes step 3 (what a resume does). Rank 0 writes the
exported weights of each run, the source, and a report of dtypes and host bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.engines import OptimConfig, build_engine
from launcher.engines.weights import SafetensorsWeights
from launcher.run.checkpoint import gather_state_dict
from launcher.run.delta_weights import DeltaWeights
from ncft import sparse_delta
from ncft.masks.install import freeze_unselected, install
from tests.dist.mask_worker import ACCUM, GLOBAL_MICRO, batches, neuron_sets
from tests.support.spawn import backends_main
from tests.support.tiny import tiny_llama

STEPS = 3
LR = 1e-3
FROM_FILES = ("single", "fsdp2")  # engines with sharded loading


def _source(out_dir: Path, dtype: str, info) -> Path:
    path = out_dir / f"source-{dtype}"
    if info.is_main_process and not path.exists():
        tiny_llama(seed=0).to(getattr(torch, dtype)).save_pretrained(path)
    torch.distributed.barrier()
    return path


def _model(backend: str, source: Path, update: str, nset):
    """The stage's model, trainables marked, and the weights to fill it from (or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if backend in FROM_FILES:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source),
                                                     dtype=torch.float32)
        weights = SafetensorsWeights.from_path(source)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        weights = None
    if update == "sparse_delta":
        deltas = sparse_delta.install(model, nset.entries)
        if weights is not None:
            weights = DeltaWeights(weights, deltas)
    else:
        deltas = None
        freeze_unselected(model, nset.entries)
    return model.train(), weights, deltas


def _engine(backend, source, update, nset, info, lower: bool):
    model, weights, deltas = _model(backend, source, update, nset)
    cfg = OptimConfig(lr=LR, weight_decay=0.1, grad_clip=1.0, grad_accum=ACCUM,
                      micro_batch_size=GLOBAL_MICRO // info.world_size,
                      compute_dtype=torch.bfloat16, lower_frozen=lower)
    engine = build_engine(backend, model, cfg, info, weights=weights)
    plan = install(engine, nset.entries) if deltas is None else None
    return engine, plan, deltas


def _step(engine, plan, step: int, info) -> None:
    for mb in batches(step, info.rank, info.world_size, info.device):
        engine.backward(engine.forward(mb).loss)
    if plan is not None:
        plan.apply_to_grads()
    engine.step()


def _finish(engine, deltas) -> dict[str, torch.Tensor] | None:
    if deltas is not None:
        sparse_delta.write_back(engine, deltas)
    return gather_state_dict(engine)


def _device_dtypes(engine) -> dict[str, list[str]]:
    """Dtypes of the tensors holding frozen and trainable parameters on this rank."""
    frozen, trained = set(), set()
    for p in engine.module.parameters():
        (trained if p.requires_grad else frozen).add(str(p.dtype))
    return {"frozen": sorted(frozen), "trainable": sorted(trained)}


def run_case(backend: str, dtype: str, update: str, info, out_dir: Path) -> None:
    source = _source(out_dir, dtype, info)
    nset, _ = neuron_sets(tiny_llama(seed=0))
    tag = f"{backend}-{dtype}-{update}-ws{info.world_size}"
    ref, ref_plan, ref_deltas = _engine(backend, source, update, nset, info, lower=False)
    for step in range(STEPS):
        _step(ref, ref_plan, step, info)
    reference = _finish(ref, ref_deltas)
    ref.close()

    low, plan, deltas = _engine(backend, source, update, nset, info, lower=True)
    report = {"dtypes": _device_dtypes(low), "host_bytes_at_build": low.frozen.host_bytes()}
    for step in range(STEPS - 1):
        _step(low, plan, step, info)
    saved = low.local_state()
    _step(low, plan, STEPS - 1, info)
    lowered = _finish(low, deltas)
    low.close()

    again, plan, deltas = _engine(backend, source, update, nset, info, lower=True)
    again.load_local_state(saved)
    _step(again, plan, STEPS - 1, info)
    resumed = _finish(again, deltas)
    again.close()

    reports = [None] * info.world_size
    torch.distributed.all_gather_object(reports, report)
    if info.is_main_process:
        for phase, tensors in (("reference", reference), ("lowered", lowered),
                               ("resumed", resumed)):
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      out_dir / f"{tag}_{phase}.safetensors")
        nset.save(out_dir / "nset.safetensors")
        (out_dir / f"{tag}.json").write_text(json.dumps(reports))


def run_backend(backend: str, info, out_dir: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        for update in ("masked", "sparse_delta"):
            run_case(backend, dtype, update, info, out_dir)


if __name__ == "__main__":
    backends_main(run_backend)
