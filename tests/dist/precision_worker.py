"""One launched job: bf16 compute with fp32 masters on every engine, masked.

Run under torchrun by tests/launcher/engines/test_precision.py (CPU, gloo) and
tests/launcher/engines/test_gpu.py (NCCL). For each backend it hands the engine a
tiny fp32 Llama with `compute_dtype=bfloat16`, trains 3 masked AdamW steps at lr 1e-6
(far below bf16's resolution at these weights, so a pure-bf16 run would lose every
update), and rank 0 writes: the gathered weights before and after, a consolidated
export after, and a report of dtypes (logits, optimizer tensors, Adam moments) and
of whether each rank's unselected master elements stayed bit-identical.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.dist import init_distributed, shutdown
from launcher.engines import OptimConfig, build_engine
from launcher.run.checkpoint import export_hf
from ncft.engine import local_flat
from ncft.masks.layout import segment_mask
from ncft.masks.install import freeze_unselected, install
from tests.dist.mask_worker import ACCUM, GLOBAL_MICRO, batches, gather_all, neuron_sets
from tests.support.spawn import save_outputs, worker_parser, worker_start
from tests.support.tiny import tiny_llama

LR = 1e-6
STEPS = 3


def _master_snapshot(engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(unselected-element mask, copy) of each segment's local fp32 master."""
    out = []
    for seg, mask in _segment_masks(engine):
        view = local_flat(seg.opt_param)[seg.opt_offset : seg.opt_offset + seg.numel]
        out.append((mask, view.detach().clone()))
    return out


def _segment_masks(engine):
    plan = engine._ncft_plan  # set below: the installed mask plan's selection
    for seg in engine.segments():
        if not seg.numel:
            continue
        sel = plan.get(seg.fqn)
        allowed = (segment_mask(seg.shape, seg.start, seg.stop, sel.axis, sel.indices)
                   if sel is not None else torch.zeros(seg.numel, dtype=torch.bool))
        yield seg, ~allowed.to(seg.opt_param.device)


def run_backend(backend: str, info, out_dir: Path, ds_config: str) -> None:
    model = tiny_llama(seed=0)
    assert next(model.parameters()).dtype == torch.float32
    set_a, _ = neuron_sets(model)
    freeze_unselected(model, set(set_a.entries))
    cfg = OptimConfig(lr=LR, weight_decay=0.1, grad_clip=0.0, grad_accum=ACCUM,
                      micro_batch_size=GLOBAL_MICRO // info.world_size,
                      compute_dtype=torch.bfloat16)
    engine = build_engine(backend, model, cfg, info, ds_config=ds_config)
    engine._ncft_plan = set_a.entries
    tag = f"{backend}_ws{info.world_size}"
    before = gather_all(engine)
    masters_before = _master_snapshot(engine)
    plan = install(engine, set_a.entries)
    logits_dtype = None
    for step in range(STEPS):
        for mb in batches(step, info.rank, info.world_size, engine.device):
            out = engine.forward(mb)
            logits_dtype = str(out.logits.dtype)
            engine.backward(out.loss)
        plan.apply_to_grads()
        engine.step()
    after = gather_all(engine)
    masters_after = _master_snapshot(engine)
    frozen_ok = all(torch.equal(old[mask], new[mask])
                    for (mask, old), (_, new) in zip(masters_before, masters_after))
    selected_moved = all(bool((old[~mask] != new[~mask]).all())
                         for (mask, old), (_, new) in zip(masters_before, masters_after))
    segs = [s for s in engine.segments() if s.numel]
    opt_dtypes = sorted({str(local_flat(s.opt_param).dtype) for s in segs})
    moment_dtypes = sorted({str(v.dtype) for s in segs
                            for k, v in engine.optimizer.state.get(s.opt_param, {}).items()
                            if k in ("exp_avg", "exp_avg_sq")})
    export_dir = out_dir / f"{tag}_export"
    export_hf(engine, engine.module.config if hasattr(engine.module, "config") else model.config,
              export_dir)
    report = {"logits_dtype": logits_dtype, "optimizer_dtypes": opt_dtypes,
              "moment_dtypes": moment_dtypes, "device": str(engine.device), "name": engine.name,
              "frozen_masters_identical": frozen_ok, "selected_masters_moved": selected_moved}
    reports = [None] * info.world_size
    torch.distributed.all_gather_object(reports, report)
    if info.is_main_process:
        save_outputs(out_dir, tag, {"before": before, "after": after}, {"set_a": set_a}, reports)
    engine.close()


def main() -> None:
    parser = worker_parser()
    parser.add_argument("--ds-config", default="zero3")
    args, info = worker_start(parser)
    for backend in args.backends.split(","):
        run_backend(backend, info, args.out, args.ds_config)
    shutdown()


if __name__ == "__main__":
    main()
