"""One launched job: masked training on every engine in turn, full weights saved.

Run under torchrun by tests/ncft/test_masks_dist.py. For each backend it trains a
tiny Llama for 3 steps with NeuronSet A, switches to NeuronSet B on the same engine
(Adam moments carry over) for 3 more, with AdamW weight decay 0.1, clipping that
bites on every step and gradient accumulation 2. Rank 0 writes the gathered full weights
after each phase, the grad norms, and collective-call counts of a masked and an
unmasked step.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.dist import init_distributed, shutdown
from launcher.engines import OptimConfig, build_engine
from ncft.arch import get_adapter, make_projection, row_entries
from ncft.masks.install import freeze_unselected, install
from ncft.neuron_set import NeuronSet, Selection
from tests.support.spawn import save_outputs, worker_parser, worker_start
from tests.support.tiny import VOCAB, tiny_llama

GLOBAL_MICRO = 6  # divisible by 1, 2 and 3 ranks
ACCUM = 2
STEPS = 3


def neuron_sets(model) -> tuple[NeuronSet, NeuronSet]:
    """Two overlapping selections over the same matrices (task A, then task B)."""
    blocks = get_adapter(model).mlp_blocks(model)
    q1 = make_projection(model, "model.layers.1.self_attn.q_proj", "attn")
    a = NeuronSet.from_units(blocks, {0: torch.tensor([0, 5, 17, 36]), 1: torch.tensor([2, 3, 30])})
    b = NeuronSet.from_units(blocks, {0: torch.tensor([1, 5, 20]), 1: torch.tensor([2, 31, 35])})
    qa = NeuronSet({k: Selection(*v) for k, v in row_entries(q1, torch.tensor([1, 7])).items()})
    qb = NeuronSet({k: Selection(*v) for k, v in row_entries(q1, torch.tensor([7, 9])).items()})
    return a.union(qa), b.union(qb)


def batches(step: int, rank: int, world: int, device="cpu") -> list[dict]:
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(ACCUM):
        ids = torch.randint(0, VOCAB, (GLOBAL_MICRO, 12), generator=gen)
        per = GLOBAL_MICRO // world
        ids = ids[rank * per : (rank + 1) * per]
        out.append({"input_ids": ids.to(device), "labels": ids.to(device)})
    return out


class CallCounter:
    """Counts collective ops issued to the process group while active.

    Counts at the dispatcher (`c10d::*` ops in the profiler), below every Python
    wrapper, so DeepSpeed's and FSDP's own collective helpers are all seen.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __enter__(self):
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        for event in self._prof.events():
            if event.name.startswith("c10d::"):
                self.counts[event.name] += 1


def one_step(engine, plan, step, info, manual_norms=None):
    for mb in batches(step, info.rank, info.world_size, info.device):
        engine.backward(engine.forward(mb).loss)
    if plan is not None:
        plan.apply_to_grads()
    if manual_norms is not None:  # unsharded engine: the norm clipping must use
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        manual_norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    return engine.step().grad_norm


def gather_all(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, _ in engine.named_parameter_shapes():
        with engine.gathered([name]) as full:  # one parameter at a time
            out[name] = full[name].detach().to("cpu", copy=True)
    return out


def check_edit(engine, info) -> dict:
    """`engine.edited` writes back to shards, forward sees it, restoring is exact."""
    name = "model.layers.0.mlp.gate_proj.weight"
    probe = batches(0, info.rank, info.world_size, info.device)[0]
    with torch.no_grad():
        before_logits = engine.forward(probe).logits.clone()
    with engine.gathered([name]) as full:
        original = full[name].clone()
    with engine.edited([name]) as full:
        full[name][3].zero_()
    with engine.gathered([name]) as full:
        visible = bool((full[name][3] == 0).all()) and torch.equal(full[name][4], original[4])
    with torch.no_grad():
        edited_logits = engine.forward(probe).logits.clone()
    with engine.edited([name]) as full:
        full[name].copy_(original)
    with engine.gathered([name]) as full:
        restored = torch.equal(full[name], original)
    with torch.no_grad():
        after_logits = engine.forward(probe).logits
    return {
        "edit_visible": visible, "restore_exact": restored,
        "forward_changed": not torch.equal(edited_logits, before_logits),
        "forward_restored": torch.equal(after_logits, before_logits),
    }


def run_backend(
    backend: str, info, out_dir: Path, count: bool, dtype: str = "float32",
    ds_config: str = "zero3", grad_clip: float = 0.005,
) -> None:
    model = tiny_llama(seed=0)  # fp32: the engine keeps fp32 masters, computes in `dtype`
    set_a, set_b = neuron_sets(model)
    freeze_unselected(model, set(set_a.entries) | set(set_b.entries))
    cfg = OptimConfig(
        lr=1e-2, weight_decay=0.1, grad_clip=grad_clip, grad_accum=ACCUM,
        micro_batch_size=GLOBAL_MICRO // info.world_size, compute_dtype=getattr(torch, dtype),
    )
    engine = build_engine(backend, model, cfg, info, ds_config=ds_config)
    tag = f"{backend}_ws{info.world_size}"
    weights = {"init": gather_all(engine)}
    norms = []
    manual = [] if backend == "single" else None
    plan = install(engine, set_a.entries)
    for step in range(STEPS):
        norms.append(one_step(engine, plan, step, info, manual))
    weights["mid"] = gather_all(engine)
    plan = install(engine, set_b.entries)
    for step in range(STEPS, 2 * STEPS):
        norms.append(one_step(engine, plan, step, info, manual))
    weights["final"] = gather_all(engine)
    report = {"grad_norms": norms, "masked_grad_norms": manual, "edit": check_edit(engine, info)}
    if count:
        # Alternate masked and unmasked steps: ZeRO-3's prefetcher changes its
        # all-gather pattern between early steps, so compare like with like.
        counts = {"masked": [], "unmasked": []}
        for _ in range(2):
            engine.optimizer.set_frozen(plan.tensor_masks)
            with CallCounter() as masked:
                one_step(engine, plan, 99, info)
            engine.optimizer.set_frozen({})
            with CallCounter() as unmasked:
                one_step(engine, None, 99, info)
            counts["masked"].append(masked.counts)
            counts["unmasked"].append(unmasked.counts)
        report["collectives"] = counts
    if info.is_main_process:
        save_outputs(out_dir, tag, weights, {"set_a": set_a, "set_b": set_b}, report)
    engine.close()


def main() -> None:
    parser = worker_parser()
    parser.add_argument("--count", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ds-config", default="zero3")
    parser.add_argument("--grad-clip", type=float, default=0.005)
    args, info = worker_start(parser, one_thread=False)
    for backend in args.backends.split(","):
        run_backend(backend, info, args.out, args.count, args.dtype, args.ds_config,
                    args.grad_clip)
    shutdown()


if __name__ == "__main__":
    main()
